//! The HTTP checks a new container must pass before it gets traffic: berth's default (`web`
//! answers `GET /` on `$PORT` with a status below 500 within a deadline) and app.json `path`
//! checks. Both fail at once if the container exits. Waits on conditions with deadlines; the
//! only fixed pauses are the ones an app.json check asks for (`initialDelay`, `wait`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::checks::Check;

/// The most of an answer a check reads (for `content`).
const MAX_ANSWER: u64 = 64 * 1024;

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
    /// An app.json check failed all its attempts; the last one's reason.
    Check(String),
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
        match get(addr, host, "/", Duration::from_secs(5)).await {
            Some((code, _)) if code < 500 => return Ok(()),
            Some((code, _)) => {
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

/// Runs an app.json `path` check against the container at `addr` (its `port` replacing the
/// address's): after `initialDelay`, up to `attempts` GETs, `wait` seconds apart, each within
/// `timeout`; one passes with a 2xx or 3xx answer that contains `content` (when given).
pub async fn path_check(
    addr: SocketAddr,
    host: &str,
    check: &Check,
    exited: impl Fn() -> Option<i32>,
) -> Result<(), Unhealthy> {
    let path = check.path.as_deref().unwrap_or("/");
    let addr = SocketAddr::new(addr.ip(), check.port.unwrap_or(addr.port()));
    tokio::time::sleep(Duration::from_secs(check.initial_delay)).await;
    let mut reason = String::new();
    for attempt in 1..=check.attempts {
        match get(addr, host, path, Duration::from_secs(check.timeout)).await {
            Some((status, body)) if (200..400).contains(&status) => match &check.content {
                Some(content) if !body.contains(content.as_str()) => {
                    reason = format!("GET {path} answered {status} without {content:?}");
                }
                _ => return Ok(()),
            },
            Some((status, _)) => reason = format!("GET {path} answered {status}"),
            None => reason = format!("GET {path} got no answer within {} s", check.timeout),
        }
        if let Some(code) = exited() {
            return Err(Unhealthy::Exited(code));
        }
        if attempt < check.attempts {
            tokio::time::sleep(Duration::from_secs(check.wait)).await;
        }
    }
    Err(Unhealthy::Check(format!(
        "{reason} ({} attempts)",
        check.attempts
    )))
}

/// One `GET path`: the status and (up to [`MAX_ANSWER`] bytes of) the whole answer, or None when
/// nothing answered HTTP within `timeout`.
async fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-healthcheck\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        let _ = stream.take(MAX_ANSWER).read_to_end(&mut answer).await;
        let head: &[u8; 12] = answer.get(..12)?.try_into().ok()?;
        let status = parse_status(head)?;
        Some((status, String::from_utf8_lossy(&answer).into_owned()))
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
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

    /// A server on 127.0.0.1 that answers every request with `answer`; returns its address.
    async fn answering(answer: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn check(json: &str) -> Check {
        let text = format!(r#"{{"healthchecks": {{"web": [{json}]}}}}"#);
        crate::checks::from_app_json(&text).unwrap()["web"][0].clone()
    }

    #[tokio::test]
    async fn path_checks() {
        let ok = answering("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nstatus=ok").await;
        let broken = answering("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").await;
        let running = || None;
        let fast = r#""attempts": 2, "wait": 0, "timeout": 2"#;
        let pass = check(&format!(
            r#"{{"path": "/health", "content": "status=ok", {fast}}}"#
        ));
        assert_eq!(path_check(ok, "h", &pass, running).await, Ok(()));
        let wrong = check(&format!(
            r#"{{"path": "/health", "content": "ready", {fast}}}"#
        ));
        assert_eq!(
            path_check(ok, "h", &wrong, running).await,
            Err(Unhealthy::Check(
                "GET /health answered 200 without \"ready\" (2 attempts)".into()
            ))
        );
        let any = check(&format!(r#"{{"path": "/", {fast}}}"#));
        assert_eq!(
            path_check(broken, "h", &any, running).await,
            Err(Unhealthy::Check("GET / answered 503 (2 attempts)".into()))
        );
        assert_eq!(
            path_check(broken, "h", &any, || Some(3)).await,
            Err(Unhealthy::Exited(3)),
            "an exited container fails at once"
        );
        let elsewhere = check(&format!(
            r#"{{"path": "/", "port": {}, {fast}}}"#,
            ok.port()
        ));
        assert_eq!(
            path_check(broken, "h", &elsewhere, running).await,
            Ok(()),
            "port is honoured"
        );
    }

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
