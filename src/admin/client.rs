//! The client side of the admin socket: sends one request and prints the event stream.
//! Used by the CLI and the git hook; blocking std I/O, no async runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};

use super::{socket_path, Event, Request};

/// Sends `request` to the daemon in `data`, copies its output to stdout/stderr and returns the
/// exit code (0 when the daemon says done).
pub fn call(data: &Path, request: Request) -> anyhow::Result<i32> {
    let path = socket_path(data);
    let mut stream = UnixStream::connect(&path).map_err(|err| {
        anyhow::anyhow!(
            "cannot reach the berth server at {} ({err}) — is `berth server --data {}` running?",
            path.display(),
            data.display()
        )
    })?;
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let reader = BufReader::new(stream);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    for line in reader.lines() {
        let line = line.context("reading the server's answer")?;
        match serde_json::from_str::<Event>(&line)
            .with_context(|| format!("the server sent something unexpected: {line:?}"))?
        {
            Event::Out(text) => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Event::Err(text) => {
                stderr.write_all(text.as_bytes())?;
                stderr.flush()?;
            }
            Event::Data(chunk) => {
                let bytes = BASE64
                    .decode(chunk)
                    .context("the server sent data that is not base64")?;
                stdout.write_all(&bytes)?;
            }
            Event::Done => {
                stdout.flush()?;
                return Ok(0);
            }
            Event::Error(message) => bail!("{message}"),
        }
    }
    bail!("the server closed the connection before answering — check its log, and that it is still running")
}
