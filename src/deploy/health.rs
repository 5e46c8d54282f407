//! The start check: a new container is healthy once it answers HTTP on `$PORT`. Waits on that
//! condition with a deadline, and fails at once if the container exits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a container did not become healthy.
pub enum Unhealthy {
    Exited(i32),
    Timeout,
}

/// Sends `GET /` until any HTTP response comes back, the container exits (`exited` returns its
/// code) or `deadline` passes.
pub async fn wait_until_answers(
    addr: SocketAddr,
    host: &str,
    deadline: Duration,
    exited: impl Fn() -> Option<i32>,
) -> Result<(), Unhealthy> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if answers_http(addr, host).await {
            return Ok(());
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

async fn answers_http(addr: SocketAddr, host: &str) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-healthcheck\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        head.starts_with(b"HTTP/").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}
