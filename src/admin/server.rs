//! Accepts admin socket connections: reads one request, runs its handler, streams the events back
//! (or, for `berth run`, hands the connection to [`super::run`]).

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};

use super::{handlers, Event, Handles, Request};
use crate::progress::{Line, Progress};

/// Serves the admin socket until `shutdown` fires. Requests in flight keep running.
pub async fn run(listener: UnixListener, daemon: Arc<Handles>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!(%err, "admin socket accept failed");
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, daemon.clone()));
    }
}

async fn serve_connection(stream: UnixStream, daemon: Arc<Handles>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    if read.read_line(&mut line).await.is_err() {
        return;
    }
    if let Ok(Request::Run {
        name,
        command,
        terminal,
    }) = serde_json::from_str::<Request>(&line)
    {
        let deployer = daemon.deployer.clone();
        return super::run::serve(read, write, deployer, name, command, terminal).await;
    }
    let (tx, mut rx) = mpsc::channel::<Line>(256);
    let out = Progress::new(tx);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            let event = match line {
                Line::Out(text) => Event::Out(text + "\n"),
                Line::Warn(text) => Event::Err(text + "\n"),
                Line::Data(bytes) => Event::Data(BASE64.encode(bytes)),
            };
            if send(&mut write, &event).await.is_err() {
                return None; // the client went away; dropping rx tells the handler
            }
        }
        Some(write)
    });
    let final_event = match serde_json::from_str::<Request>(&line) {
        Err(err) => Event::Error(format!(
            "the server did not understand the request ({err}) — are the client and server the same berth version?"
        )),
        Ok(request) => {
            debug!(?request, "admin request");
            match handlers::handle(&daemon, request, &out).await {
                Ok(()) => Event::Done,
                Err(err) => Event::Error(format!("{err:#}")),
            }
        }
    };
    drop(out);
    if let Ok(Some(mut write)) = writer.await {
        let _ = send(&mut write, &final_event).await;
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, event: &Event) -> std::io::Result<()> {
    let mut text = serde_json::to_string(event).expect("events serialize");
    text.push('\n');
    write.write_all(text.as_bytes()).await
}
