//! The API's client: how the CLI, the git hooks and SSH commands reach the service. Three
//! ways in, one protocol (the REST API, `api`):
//! - the admin socket `DATA/berth.sock` (root on the server; the default);
//! - `BERTH_URL` and `BERTH_TOKEN` (a laptop: `http://` or `https://`, trusting the system's
//!   roots or the PEM file in `BERTH_CA`);
//! - in process, as a user ([`Client::local`]): the SSH endpoint runs a key owner's commands
//!   through the same routes.
//!
//! Owns connecting, sending a request and reading JSON, streamed [`Event`]s or bytes back, and
//! the errors' exit codes. [`commands`] maps each command line to calls and prints the answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{ErrorBody, Event, NDJSON};
use crate::service::{Caller, Kind};

pub mod commands;
pub mod run;

/// Where the API is.
#[derive(Clone)]
pub enum Client {
    /// The admin socket.
    Socket(PathBuf),
    /// A remote server.
    Remote {
        /// `scheme://host:port`, without a trailing slash.
        base: String,
        token: String,
        /// For `https://`.
        tls: Option<tokio_rustls::TlsConnector>,
    },
    /// The routes themselves, as this user.
    Local(axum::Router, Caller),
}

/// A failed call: the server's error (with its kind) or a transport failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub kind: Option<Kind>,
    pub message: String,
}

impl CallError {
    fn transport(message: impl Into<String>) -> Self {
        Self {
            kind: None,
            message: message.into(),
        }
    }

    /// The exit code the CLI ends with.
    pub fn exit_code(&self) -> i32 {
        self.kind.map_or(1, Kind::exit_code)
    }
}

impl From<ErrorBody> for CallError {
    fn from(body: ErrorBody) -> Self {
        let kind = serde_json::from_value(serde_json::Value::String(body.code)).ok();
        Self {
            kind,
            message: body.message,
        }
    }
}

pub type CallResult<T> = Result<T, CallError>;

impl Client {
    /// `BERTH_URL` + `BERTH_TOKEN` when set, else the admin socket in `data`.
    pub fn from_env(data: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let Ok(url) = std::env::var("BERTH_URL") else {
            return Ok(Client::Socket(crate::paths::Paths::new(data).socket()));
        };
        let token = std::env::var("BERTH_TOKEN").map_err(|_| {
            anyhow::anyhow!("BERTH_URL is set but BERTH_TOKEN is not — set it to a token from `berth tokens:create NAME`")
        })?;
        let base = url.trim_end_matches('/').to_string();
        let tls = match base.split_once("://") {
            Some(("http", _)) => None,
            Some(("https", _)) => Some(tls_connector().context("cannot set up TLS for BERTH_URL")?),
            _ => {
                anyhow::bail!("BERTH_URL {url:?} is not http://HOST[:PORT] or https://HOST[:PORT]")
            }
        };
        Ok(Client::Remote { base, token, tls })
    }

    /// The routes in this process, as `who`.
    pub fn local(router: axum::Router, who: Caller) -> Self {
        Client::Local(router, who)
    }

    /// Sends a request to `path` (under `/api/v1`) and returns the answer as it is.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(hyper::header::HeaderName, &str)],
        body: Body,
    ) -> CallResult<Response<Body>> {
        let uri_path = format!("{}{path}", crate::api::PREFIX);
        let mut builder = Request::builder().method(method);
        for (name, value) in headers {
            builder = builder.header(name, *value);
        }
        match self {
            Client::Local(router, who) => {
                use tower::ServiceExt;
                let mut request = builder
                    .uri(uri_path)
                    .body(body)
                    .map_err(|e| CallError::transport(e.to_string()))?;
                request.extensions_mut().insert(who.clone());
                let response = router.clone().oneshot(request).await.expect("infallible");
                Ok(response)
            }
            Client::Socket(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|err| {
                    CallError::transport(format!(
                        "cannot reach the berth server at {} ({err}) — is `berth server` running (with --data {})?",
                        path.display(),
                        path.parent().unwrap_or(Path::new("/")).display()
                    ))
                })?;
                let request = builder
                    .uri(uri_path)
                    .header(hyper::header::HOST, "localhost")
                    .body(body)
                    .map_err(|e| CallError::transport(e.to_string()))?;
                exchange(stream, request).await
            }
            Client::Remote { base, token, tls } => {
                let authority = base.split_once("://").map_or("", |(_, a)| a);
                let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                let addr = match authority.contains(':') {
                    true => authority.to_string(),
                    false if tls.is_some() => format!("{authority}:443"),
                    false => format!("{authority}:80"),
                };
                let stream = tokio::net::TcpStream::connect(&addr).await.map_err(|err| {
                    CallError::transport(format!(
                        "cannot reach the berth server at {base} ({err}) — check BERTH_URL and that the server runs with --api"
                    ))
                })?;
                let request = builder
                    .uri(uri_path)
                    .header(hyper::header::HOST, authority)
                    .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(body)
                    .map_err(|e| CallError::transport(e.to_string()))?;
                match tls {
                    None => exchange(stream, request).await,
                    Some(tls) => {
                        let name = rustls_pki_types::ServerName::try_from(host.to_string())
                            .map_err(|e| CallError::transport(format!("BERTH_URL's host: {e}")))?;
                        let stream = tls.connect(name, stream).await.map_err(|err| {
                            CallError::transport(format!("TLS with {base} failed: {err} — check BERTH_URL (and BERTH_CA for a private CA)"))
                        })?;
                        exchange(stream, request).await
                    }
                }
            }
        }
    }

    /// A call with a JSON body (or none) whose answer is JSON.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> CallResult<T> {
        let response = self
            .send(
                method,
                path,
                &json_headers("application/json"),
                json_body(body),
            )
            .await?;
        let status = response.status();
        let bytes = read_all(response).await?;
        if !status.is_success() {
            return Err(error_of(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            b"null".to_vec()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::transport(format!("the server's answer is not what this berth expects ({e}) — are the client and server the same version?")))
    }

    /// A call whose progress streams: each line goes to `out` (waiting for it, so none is lost);
    /// returns the result.
    pub async fn call_streamed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        out: &crate::progress::Progress,
    ) -> CallResult<T> {
        let response = self
            .send(method, path, &json_headers(NDJSON), json_body(body))
            .await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = read_all(response).await?;
            return Err(error_of(status, &bytes));
        }
        let mut lines = Lines::new(response.into_body());
        while let Some(line) = lines.next().await? {
            let event: Event = serde_json::from_slice(&line).map_err(|e| {
                CallError::transport(format!("the server sent something unexpected ({e})"))
            })?;
            match event {
                Event::Out(text) => out.line(text).await,
                Event::Err(text) => out.warn(text).await,
                Event::Done(value) => {
                    return serde_json::from_value(value).map_err(|e| {
                        CallError::transport(format!(
                            "the server's answer is not what this berth expects ({e})"
                        ))
                    })
                }
                Event::Error(body) => return Err(body.into()),
            }
        }
        Err(CallError::transport(
            "the server closed the connection before answering — check its log, and that it is still running",
        ))
    }
}

fn json_headers(accept: &str) -> [(hyper::header::HeaderName, &str); 2] {
    [
        (hyper::header::CONTENT_TYPE, "application/json"),
        (hyper::header::ACCEPT, accept),
    ]
}

fn json_body(body: Option<&(impl Serialize + ?Sized)>) -> Body {
    match body {
        Some(body) => Body::from(serde_json::to_vec(body).expect("requests serialize")),
        None => Body::empty(),
    }
}

/// Sends one request on a fresh connection (upgrades allowed) and returns the answer.
pub(crate) async fn exchange<IO>(io: IO, request: Request<Body>) -> CallResult<Response<Body>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| CallError::transport(format!("talking to the berth server failed: {e}")))?;
    tokio::spawn(connection.with_upgrades());
    let response = sender.send_request(request).await.map_err(|e| {
        CallError::transport(format!(
            "the berth server did not answer: {e} — check its log, and that it is still running"
        ))
    })?;
    Ok(response.map(Body::new))
}

/// Reads an answer's whole body (error and JSON answers are small; the server bounds them).
async fn read_all(response: Response<Body>) -> CallResult<Vec<u8>> {
    let collected =
        response.into_body().collect().await.map_err(|e| {
            CallError::transport(format!("reading the server's answer failed: {e}"))
        })?;
    Ok(collected.to_bytes().to_vec())
}

fn error_of(status: StatusCode, bytes: &[u8]) -> CallError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => body.into(),
        Err(_) => CallError::transport(format!(
            "the server answered {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )),
    }
}

/// The lines of a streamed body.
pub struct Lines {
    body: Body,
    buffer: Vec<u8>,
}

/// The longest line a stream may send (a log line is at most 16 KiB).
const MAX_LINE: usize = 1 << 20;

impl Lines {
    pub fn new(body: Body) -> Self {
        Self {
            body,
            buffer: Vec::new(),
        }
    }

    /// The next line without its newline, or None at the end.
    pub async fn next(&mut self) -> CallResult<Option<Vec<u8>>> {
        loop {
            if let Some(at) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=at).take(at).collect();
                return Ok(Some(line));
            }
            if self.buffer.len() > MAX_LINE {
                return Err(CallError::transport(
                    "the server sent a line longer than 1 MiB",
                ));
            }
            match self.body.frame().await {
                None if self.buffer.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.buffer))),
                Some(Err(e)) => {
                    return Err(CallError::transport(format!(
                        "the server's answer broke off: {e}"
                    )))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// TLS for `https://` BERTH_URLs: the PEM roots in `BERTH_CA`, else the system's bundle.
fn tls_connector() -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let file =
        std::env::var("BERTH_CA").unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&file)
        .map_err(|e| anyhow::anyhow!("cannot read CA certificates from {file}: {e}"))?
    {
        let cert = cert.map_err(|e| anyhow::anyhow!("{file} holds a bad certificate: {e}"))?;
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Percent-encodes a path segment or query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}
