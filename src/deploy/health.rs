//! The checks a new container must pass before it gets traffic. `web`: answers `GET /` on
//! `$PORT` with a status below 500, within a deadline, failing at once if the container exits.
//! Other process types: still running after a short settle time. Waits on conditions with
//! deadlines; never sleeps a fixed time as synchronisation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How many answers of 500 or above a `web` container may give before it fails its check (an
/// app may answer 503 for a moment while it warms up).
const BAD_ANSWERS: u32 = 5;

/// Why a container did not pass its check.
#[derive(Debug, PartialEq, Eq)]
pub enum Unhealthy {
    Exited(i32),
    Timeout,
    /// It answered `GET /` with this status (500 or above), again and again.
    Status(u16),
}

/// Sends `GET /` until an answer below 500 comes back, the container exits (`exited` returns
/// its code), it keeps answering 500 or above, or `deadline` passes.
pub async fn wait_until_healthy(
    addr: SocketAddr,
    host: &str,
    deadline: Duration,
    exited: impl Fn() -> Option<i32>,
) -> Result<(), Unhealthy> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    let mut bad = 0;
    loop {
        match status(addr, host).await {
            Some(code) if code < 500 => return Ok(()),
            Some(code) => {
                bad += 1;
                if bad >= BAD_ANSWERS {
                    return Err(Unhealthy::Status(code));
                }
            }
            None => {}
        }
        if let Some(code) = exited() {
            return Err(Unhealthy::Exited(code));
        }
        if start.elapsed() >= deadline {
            return Err(Unhealthy::Timeout);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// The status of one `GET /`, or None when nothing answered HTTP within 5 s.
async fn status(addr: SocketAddr, host: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-healthcheck\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        parse_status(&head)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// The status code of a response that starts `HTTP/1.x NNN`.
fn parse_status(head: &[u8; 12]) -> Option<u16> {
    if !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
        return None;
    }
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let cases: &[(&[u8; 12], Option<u16>)] = &[
            (b"HTTP/1.1 200", Some(200)),
            (b"HTTP/1.0 503", Some(503)),
            (b"HTTP/1.1 404", Some(404)),
            (b"HTTP/2.0 200", None),
            (b"SSH-2.0-Open", None),
            (b"HTTP/1.1 2x0", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_status(head),
                *want,
                "{:?}",
                String::from_utf8_lossy(*head)
            );
        }
    }
}
