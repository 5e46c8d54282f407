//! The CLI's end of `berth run`: asks the API to upgrade the connection
//! (`api::run`), then sends stdin (and window sizes) and prints what the command writes.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use axum::body::Body;
use hyper::{header, Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWrite};

use super::{CallError, Client};
use crate::api::run::{
    read_frame, write_frame, EOF, ERROR, EXIT, PROTOCOL, RESIZE, STDERR, STDIN, STDOUT,
};
use crate::attach::WindowSize;

/// The size of a terminal that does not say its own.
const DEFAULT_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Runs `command` (a shell command line) in a one-off container of `app`, with a terminal when
/// `tty` and stdin is one; returns its exit code.
pub async fn run(client: &Client, app: &str, command: &str, tty: bool) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let terminal = (tty && stdin.is_terminal()).then(|| window_size(&stdin));
    let mut query = format!("command={}", super::encode(command));
    if let Some(size) = terminal {
        query.push_str(&format!("&rows={}&cols={}", size.rows, size.cols));
    }
    let response = client
        .send(
            Method::POST,
            &format!("/apps/{app}/run?{query}"),
            &[(header::CONNECTION, "upgrade"), (header::UPGRADE, PROTOCOL)],
            Body::empty(),
        )
        .await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let bytes = super::read_all(response).await?;
        return Err(super::error_of(status, &bytes).into());
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| CallError::transport(format!("the server did not switch to the run: {e}")))?;
    let (mut from_daemon, to_daemon) = tokio::io::split(TokioIo::new(upgraded));
    // Keys go to the container as typed (^C included) while it runs; restored on return.
    let _raw = match terminal {
        Some(_) => Some(RawMode::enter(&stdin)?),
        None => None,
    };
    tokio::spawn(send_input(to_daemon, terminal.is_some()));
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let frame = read_frame(&mut from_daemon)
            .await
            .map_err(|e| CallError::transport(format!("reading the server's answer: {e}")))?;
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
                Err(_) => anyhow::bail!("the server sent a malformed exit code"),
            },
            Some((ERROR, message)) => anyhow::bail!("{}", String::from_utf8_lossy(&message)),
            Some((kind, _)) => anyhow::bail!("the server sent a frame of unknown kind {kind} — are the client and server the same berth version?"),
            None => anyhow::bail!("the server closed the connection before the command ended — check its log, and that it is still running"),
        }
    }
}

/// Sends stdin (then its end) and, with a terminal, every new window size to the daemon;
/// returns only when sending fails.
async fn send_input(mut to_daemon: impl AsyncWrite + Unpin, terminal: bool) -> std::io::Result<()> {
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
            // Dropping the write half would shut the connection down, which the daemon takes
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
        use anyhow::Context;
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
