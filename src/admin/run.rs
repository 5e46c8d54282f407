//! `berth run` on the admin socket. After its JSON request line ([`super::Request::Run`]) both
//! sides switch to frames: one byte saying what the frame is, four bytes of length (big-endian),
//! then that many bytes (at most [`MAX_FRAME`]).
//!
//! - client → daemon: [`STDIN`] bytes, [`EOF`] (no more input), [`RESIZE`] (rows and columns,
//!   two big-endian u16);
//! - daemon → client: [`STDOUT`] and [`STDERR`] bytes, then [`EXIT`] (the exit code, a
//!   big-endian i32) or [`ERROR`] (why it could not run: one line), and the daemon closes.
//!
//! The client closing the connection means the user is gone: the container is stopped. Owns
//! the frames and both ends: [`serve`] (the daemon's) and [`call`] (the CLI's); what a run is
//! and does belongs to `deploy`.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{socket_path, Request};
use crate::attach::{self, Input, Output, WindowSize};
use crate::deploy::Deployer;

const STDIN: u8 = 0;
const EOF: u8 = 1;
const RESIZE: u8 = 2;
const STDOUT: u8 = 3;
const STDERR: u8 = 4;
const EXIT: u8 = 5;
const ERROR: u8 = 6;
/// The longest frame either side accepts.
const MAX_FRAME: usize = 64 * 1024;
/// The size of a terminal that does not say its own.
const DEFAULT_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Who started a run from the admin socket (root on the server).
const ADMIN: &str = "admin";

async fn write_frame(
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
async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<(u8, Vec<u8>)>> {
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

/// The daemon's end of one `berth run` connection, once its request line has been read.
pub async fn serve(
    mut from_client: BufReader<OwnedReadHalf>,
    mut to_client: OwnedWriteHalf,
    deployer: Arc<Deployer>,
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
    let (ran, connected) = tokio::join!(
        deployer.run_one_off(&app, &command, ADMIN, attach),
        forwarding
    );
    receiving.abort();
    debug!(%app, ?ran, connected, "run over the admin socket ended");
    if connected {
        let _ = match ran {
            Ok(code) => write_frame(&mut to_client, EXIT, &code.to_be_bytes()).await,
            Err(err) => write_frame(&mut to_client, ERROR, err.to_string().as_bytes()).await,
        };
    }
}

/// The CLI's end: runs `command` (a shell command line) in a one-off container of `app` on
/// the daemon in `data`, with a terminal when `tty` and stdin is one; returns its exit code.
pub fn call(data: &Path, app: String, command: String, tty: bool) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(client(data, app, command, tty));
    // Reading stdin may still block a thread; the process ends anyway.
    runtime.shutdown_background();
    result
}

async fn client(data: &Path, app: String, command: String, tty: bool) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let terminal = (tty && stdin.is_terminal()).then(|| window_size(&stdin));
    let path = socket_path(data);
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|err| {
            anyhow::anyhow!(
            "cannot reach the berth server at {} ({err}) — is `berth server --data {}` running?",
            path.display(),
            data.display()
        )
        })?;
    let (from_daemon, mut to_daemon) = stream.into_split();
    let request = Request::Run {
        name: app,
        command,
        terminal,
    };
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    to_daemon.write_all(line.as_bytes()).await?;
    // Keys go to the container as typed (^C included) while it runs; restored on return.
    let _raw = match terminal {
        Some(_) => Some(RawMode::enter(&stdin)?),
        None => None,
    };
    tokio::spawn(send_input(to_daemon, terminal.is_some()));

    let mut from_daemon = BufReader::new(from_daemon);
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let frame = read_frame(&mut from_daemon)
            .await
            .context("reading the server's answer")?;
        match frame {
            Some((STDOUT, bytes)) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            Some((STDERR, bytes)) => {
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            Some((EXIT, bytes)) => match <[u8; 4]>::try_from(bytes.as_slice()) {
                Ok(code) => return Ok(i32::from_be_bytes(code)),
                Err(_) => bail!("the server sent a malformed exit code"),
            },
            Some((ERROR, message)) => bail!("{}", String::from_utf8_lossy(&message)),
            Some((kind, _)) => bail!("the server sent a frame of unknown kind {kind} — are the client and server the same berth version?"),
            None => bail!("the server closed the connection before the command ended — check its log, and that it is still running"),
        }
    }
}

/// Sends stdin (then its end) and, with a terminal, every new window size to the daemon;
/// returns only when sending fails.
async fn send_input(mut to_daemon: OwnedWriteHalf, terminal: bool) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut resized = match terminal {
        true => Some(signal(SignalKind::window_change())?),
        false => None,
    };
    let mut stdin = tokio::io::stdin();
    let mut open = true;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = stdin.read(&mut chunk), if open => match read {
                Ok(0) | Err(_) => {
                    open = false;
                    write_frame(&mut to_daemon, EOF, &[]).await?;
                }
                Ok(n) => write_frame(&mut to_daemon, STDIN, &chunk[..n]).await?,
            },
            Some(()) = async { resized.as_mut()?.recv().await } => {
                let size = window_size(&std::io::stdin());
                let mut payload = size.rows.to_be_bytes().to_vec();
                payload.extend_from_slice(&size.cols.to_be_bytes());
                write_frame(&mut to_daemon, RESIZE, &payload).await?;
            }
            // Dropping the socket's write half would shut it down, which the daemon takes
            // for the user going away: keep it until the run is over.
            else => std::future::pending().await,
        }
    }
}

/// The size of the terminal `fd` is, or 24×80 when it does not say.
fn window_size(fd: &impl AsFd) -> WindowSize {
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives the call.
    let done = unsafe {
        nix::libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()),
            nix::libc::TIOCGWINSZ,
            &mut size as *mut nix::libc::winsize,
        )
    };
    match done {
        0 if size.ws_row > 0 && size.ws_col > 0 => WindowSize {
            rows: size.ws_row,
            cols: size.ws_col,
        },
        _ => DEFAULT_SIZE,
    }
}

/// The local terminal in raw mode (no echo, no line editing, no signals from keys) until
/// dropped, which puts back how it was.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter(stdin: &std::io::Stdin) -> anyhow::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let saved = tcgetattr(stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin, SetArg::TCSANOW, &raw).context("switching the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
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
