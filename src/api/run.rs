//! `berth run` over the API: `POST /api/v1/apps/{app}/run` upgrades the connection
//! (`Connection: upgrade`, `Upgrade: berth-run`) and both sides switch to frames: one byte
//! saying what the frame is, four bytes of length (big-endian), then that many bytes (at most
//! [`MAX_FRAME`]).
//!
//! - client → daemon: [`STDIN`] bytes, [`EOF`] (no more input), [`RESIZE`] (rows and columns,
//!   two big-endian u16);
//! - daemon → client: [`STDOUT`] and [`STDERR`] bytes, then [`EXIT`] (the exit code, a
//!   big-endian i32) or [`ERROR`] (why it could not run: one line), and the daemon closes.
//!
//! The client closing the connection means the user is gone: the container is stopped. Owns
//! the frames and the daemon's end; the CLI's end is `client::run`; what a run is and does
//! belongs to `deploy`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{bad_request, ApiError, ErrorBody, Who, S};
use crate::attach::{self, Input, Output, WindowSize};
use crate::service::{Caller, Service};

pub const STDIN: u8 = 0;
pub const EOF: u8 = 1;
pub const RESIZE: u8 = 2;
pub const STDOUT: u8 = 3;
pub const STDERR: u8 = 4;
pub const EXIT: u8 = 5;
pub const ERROR: u8 = 6;
/// The longest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// The protocol named in the `Upgrade` header.
pub const PROTOCOL: &str = "berth-run";

pub async fn write_frame(
    to: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    for chunk in payload.chunks(MAX_FRAME) {
        let mut frame = Vec::with_capacity(5 + chunk.len());
        frame.push(kind);
        frame.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        frame.extend_from_slice(chunk);
        to.write_all(&frame).await?;
    }
    if payload.is_empty() {
        to.write_all(&[kind, 0, 0, 0, 0]).await?;
    }
    to.flush().await
}

/// The next frame, or None at the end of the stream.
pub async fn read_frame(
    from: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, more than {MAX_FRAME}"),
        ));
    }
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

/// What to run.
#[derive(Debug, Serialize, Deserialize, utoipa::IntoParams)]
pub struct RunParams {
    /// A shell command line.
    pub command: String,
    /// With both: run it with a terminal of this size.
    pub rows: Option<u16>,
    pub cols: Option<u16>,
}

#[utoipa::path(post, path = "/apps/{app}/run", tag = "processes", params(("app" = String, Path), RunParams),
    description = "Runs a command in a one-off container of the live release, attached: send `Connection: upgrade` and `Upgrade: berth-run`; after `101 Switching Protocols` both sides exchange frames (see `src/api/run.rs`).",
    responses((status = 101, description = "Switched to the run's frames"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn run(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Query(params): Query<RunParams>,
    request: Request,
) -> Response {
    if let Err(err) = s.app(&who, &app).await {
        return ApiError(err).into_response();
    }
    let upgrade_asked = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !upgrade_asked {
        return bad_request(format!(
            "a run needs `Connection: upgrade` and `Upgrade: {PROTOCOL}` — use `berth run APP -- COMMAND`"
        ))
        .into_response();
    }
    let terminal = match (params.rows, params.cols) {
        (Some(rows), Some(cols)) => Some(WindowSize { rows, cols }),
        _ => None,
    };
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                serve(read, write, s, who, app, params.command, terminal).await
            }
            Err(err) => debug!(%err, "a run's upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .expect("a valid response")
}

/// The daemon's end of one run, once the connection switched to frames.
async fn serve(
    mut from_client: impl AsyncRead + Unpin + Send + 'static,
    mut to_client: impl AsyncWrite + Unpin,
    s: Arc<Service>,
    who: Caller,
    app: String,
    command: String,
    terminal: Option<WindowSize>,
) {
    let (frontend, attach) = attach::pair(terminal);
    let attach::Frontend { input, output } = frontend;
    // Client → container, until the client closes the connection: then it is gone.
    let gone = CancellationToken::new();
    let receiving = tokio::spawn({
        let gone = gone.clone();
        async move {
            while let Ok(Some((kind, payload))) = read_frame(&mut from_client).await {
                let message = match (kind, payload.as_slice()) {
                    (STDIN, _) => Input::Data(payload),
                    (EOF, _) => Input::Eof,
                    (RESIZE, &[r1, r2, c1, c2]) => Input::Resize(WindowSize {
                        rows: u16::from_be_bytes([r1, r2]),
                        cols: u16::from_be_bytes([c1, c2]),
                    }),
                    _ => continue,
                };
                // Once the run is over nobody takes input; the client closes soon.
                let _ = input.send(message).await;
            }
            gone.cancel();
        }
    });
    // Container → client, until the output ends or the client is gone.
    let forwarding = async {
        let mut output = output;
        loop {
            let message = tokio::select! {
                message = output.recv() => message,
                () = gone.cancelled() => return false,
            };
            let sent = match message {
                Some(Output::Stdout(bytes)) => write_frame(&mut to_client, STDOUT, &bytes).await,
                Some(Output::Stderr(bytes)) => write_frame(&mut to_client, STDERR, &bytes).await,
                None => return true,
            };
            if sent.is_err() {
                return false;
            }
        }
    };
    let (ran, connected) = tokio::join!(s.run(&who, &app, &command, attach), forwarding);
    receiving.abort();
    debug!(%app, ?ran, connected, "a run over the API ended");
    if connected {
        let _ = match ran {
            Ok(code) => write_frame(&mut to_client, EXIT, &code.to_be_bytes()).await,
            Err(err) => write_frame(&mut to_client, ERROR, err.to_string().as_bytes()).await,
        };
        let _ = to_client.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_big_payloads_split() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let big = vec![7u8; MAX_FRAME + 10];
        write_frame(&mut a, STDOUT, b"hi").await.unwrap();
        write_frame(&mut a, EOF, &[]).await.unwrap();
        write_frame(&mut a, STDERR, &big).await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((STDOUT, b"hi".to_vec()))
        );
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((EOF, Vec::new())));
        let first = read_frame(&mut b).await.unwrap().unwrap();
        let second = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((first.0, first.1.len()), (STDERR, MAX_FRAME));
        assert_eq!((second.0, second.1.len()), (STDERR, 10));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut head = vec![STDIN];
        head.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        a.write_all(&head).await.unwrap();
        let err = read_frame(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
