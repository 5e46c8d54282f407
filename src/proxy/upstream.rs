//! One HTTP/1.1 exchange with an upstream, driven in the request's own task.
//!
//! Owns: writing a request (head, and its body as sent or chunked), reading the response head
//! (`httparse`, 1xx interim answers skipped, bounded in size), and [`ResponseBody`], which reads
//! the response body (by length, chunked, or until close) straight from the connection as the
//! client takes it and puts the connection back in the [`Pool`] once the body was read whole
//! and the upstream keeps it alive. A `101 Switching Protocols` hands the connection out
//! ([`ResponseBody::take_upgraded`]). Must not know about routes or which headers to send: the
//! proxy hands it the head as the upstream should see it.
//!
//! No client connection task, channel or waker sits between the proxy and an upstream (as
//! hyper's client connection would): on a one-thread proxy those were a measurable part of
//! every request.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use tokio::io::AsyncWriteExt;

use super::pool::{Connection, Pool};
use super::UpstreamBody;

/// The longest response head read from an upstream, and the most headers in it.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 128;
/// The longest chunk-size or trailer line of a chunked body.
const MAX_LINE: usize = 4 << 10;
/// How much room each read from an upstream gets.
const READ_SIZE: usize = 8 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request could not be sent to an upstream or got no response.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// No connection: refused, unreachable, or the connect timeout passed.
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The client's request body failed: its limit, its timeout, or the client went away.
    #[error("the request body failed")]
    Body {
        #[source]
        source: BoxError,
    },
    /// Connected, but the exchange failed: the upstream closed the connection or sent garbage.
    #[error("the request to {addr} failed")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: ExchangeError,
    },
}

/// What went wrong talking HTTP/1.1 to an upstream.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error("reading from or writing to the upstream failed")]
    Io(#[from] io::Error),
    #[error("writing the request to the upstream failed")]
    Write(#[source] io::Error),
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error("the upstream closed the connection before its response was complete")]
    Truncated,
    #[error("the upstream's response head is malformed")]
    Parse(#[from] httparse::Error),
    #[error("the upstream's response head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("the upstream's response has an invalid header or status")]
    InvalidHead,
    #[error("the upstream's chunked response body is malformed")]
    Chunked,
}

/// A request head encoded as the upstream gets it, once: sent again as it is when a kept
/// connection turns out closed, or to another upstream.
pub(super) struct RequestHead {
    bytes: Vec<u8>,
    method: Method,
    /// The body goes chunked (it has no length, and is not empty).
    chunked: bool,
}

impl RequestHead {
    /// `target` is the origin-form target (path and query); `headers` are the ones the
    /// upstream should see.
    pub(super) fn new(
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: &UpstreamBody,
    ) -> Self {
        let chunked = !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH);
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(method.as_str().as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(target.as_bytes());
        bytes.extend_from_slice(b" HTTP/1.1\r\n");
        put_fields(&mut bytes, headers);
        if chunked {
            bytes.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        Self {
            bytes,
            method: method.clone(),
            chunked,
        }
    }
}

/// Sends `head` and `body` to `addr` on an idle pooled connection, or a new one (made in
/// `netns` when given) when there is none or the idle one turns out closed before anything was
/// answered (and the body can be sent again), and reads the response head into `headers` (an
/// empty map whose allocation it reuses: the request's, once encoded).
pub(super) async fn send(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    netns: Option<&Path>,
    head: &RequestHead,
    mut body: UpstreamBody,
    mut headers: HeaderMap,
) -> Result<Response<ResponseBody>, SendError> {
    loop {
        let (mut conn, reused) = match pool.take_idle(addr) {
            Some(conn) => (conn, true),
            None => {
                // Boxed, as the body below: a rare path kept out of every request's future.
                let conn = (Box::pin(pool.connect(addr, netns)).await)
                    .map_err(|source| SendError::Connect { addr, source })?;
                (conn, false)
            }
        };
        let resendable = body.is_end_stream();
        match exchange(&mut conn, head, &mut body, &mut headers).await {
            Ok((status, framing, keep_alive)) => {
                let reuse = keep_alive.then(|| (Arc::downgrade(pool), addr));
                let mut response = Response::new(ResponseBody {
                    conn: Some(conn),
                    framing,
                    reuse,
                    trailers: HeaderMap::new(),
                });
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                return Ok(response);
            }
            // The kept connection was closed meanwhile; nothing of the request was answered.
            Err(Failure::Upstream(ExchangeError::Closed | ExchangeError::Write(_)))
                if reused && resendable => {}
            Err(Failure::Upstream(source)) => return Err(SendError::Exchange { addr, source }),
            Err(Failure::Body(source)) => return Err(SendError::Body { source }),
        }
    }
}

enum Failure {
    Upstream(ExchangeError),
    Body(BoxError),
}

impl From<ExchangeError> for Failure {
    fn from(err: ExchangeError) -> Self {
        Self::Upstream(err)
    }
}

impl Failure {
    fn write(err: io::Error) -> Self {
        Self::Upstream(ExchangeError::Write(err))
    }
}

/// Writes the request, then reads the response head: status, `headers`, how its body is
/// framed and whether the connection can carry another request afterwards.
async fn exchange(
    conn: &mut Connection,
    head: &RequestHead,
    body: &mut UpstreamBody,
    headers: &mut HeaderMap,
) -> Result<(StatusCode, Framing, bool), Failure> {
    conn.stream
        .write_all(&head.bytes)
        .await
        .map_err(Failure::write)?;
    // Whether the upstream took the whole body. One that answers before it has (a 413, a 401)
    // and stops reading gets its answer forwarded, and its connection is not reused.
    let mut whole = true;
    if !body.is_end_stream() {
        let (mut read, mut write) = conn.stream.split();
        let mut probe = [0u8; 1];
        whole = Box::pin(async {
            tokio::select! {
                biased;
                sent = write_body(&mut write, &mut conn.write, body, head.chunked) => match sent {
                    Ok(()) => Ok(true),
                    // It stopped reading: it may have answered already.
                    Err(Failure::Upstream(ExchangeError::Write(_))) => Ok(false),
                    Err(err) => Err(err),
                },
                // Bytes (or its close) before the whole body: read the answer, if any.
                _ = read.peek(&mut probe) => Ok(false),
            }
        })
        .await?;
    }
    loop {
        let (status, version) = read_head(conn, headers).await?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue; // 100 Continue and the like: the final answer follows
        }
        let close = has_token(headers, "close");
        let keep_alive = if version == 1 {
            !close
        } else {
            !close && has_token(headers, "keep-alive")
        };
        let (framing, keep_alive) = framing(&head.method, status, headers, keep_alive && whole)?;
        return Ok((status, framing, keep_alive));
    }
}

/// Writes a request body as it arrives from the client, chunked when it has no length.
async fn write_body(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    body: &mut UpstreamBody,
    chunked: bool,
) -> Result<(), Failure> {
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let data = match frame.map_err(Failure::Body)?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue; // as a chunk, it would end the body
        }
        if chunked {
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
            to.write_all(out).await.map_err(Failure::write)?;
        } else {
            to.write_all(&data).await.map_err(Failure::write)?;
        }
    }
    // Trailers go after the last chunk; a body sent by length has no room for them.
    if chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        if let Some(trailers) = &trailers {
            put_fields(out, trailers);
        }
        out.extend_from_slice(b"\r\n");
        to.write_all(out).await.map_err(Failure::write)?;
    }
    Ok(())
}

/// Writes `fields` as header (or trailer) lines.
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one response head into `map` (header values share the bytes read); returns its status
/// and minor version.
async fn read_head(
    conn: &mut Connection,
    map: &mut HeaderMap,
) -> Result<(StatusCode, u8), ExchangeError> {
    let len = loop {
        if !conn.read.is_empty() {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            if let httparse::Status::Complete(len) = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut response, &conn.read, &mut headers)?
            {
                break len;
            }
        }
        if conn.read.len() >= MAX_HEAD {
            return Err(ExchangeError::HeadTooLong);
        }
        conn.read.reserve(READ_SIZE);
        let read = tokio::io::AsyncReadExt::read_buf(&mut conn.stream, &mut conn.read).await;
        match read {
            Ok(0) if conn.read.is_empty() => return Err(ExchangeError::Closed),
            Ok(0) => return Err(ExchangeError::Truncated),
            Ok(_) => {}
            // A kept connection the upstream had closed answers a write with a reset.
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset && conn.read.is_empty() => {
                return Err(ExchangeError::Closed)
            }
            Err(err) => return Err(err.into()),
        }
    };
    // Parsed again from the frozen head, so header values share its bytes instead of copies.
    // The header slots are filled without being zeroed first (as hyper does).
    let bytes = conn.read.split_to(len).freeze();
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        &bytes,
        &mut headers,
    )?;
    let status = (response.code)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(ExchangeError::InvalidHead)?;
    map.clear();
    map.reserve(response.headers.len());
    for header in response.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| ExchangeError::InvalidHead)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(header.value))
            .map_err(|_| ExchangeError::InvalidHead)?;
        map.append(name, value);
    }
    Ok((status, response.version.unwrap_or(1)))
}

/// Whether the `Connection` header names `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    super::tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
}

/// How the body of a response to `method` with `status` and `headers` ends (RFC 9112 §6.3),
/// and whether the connection stays usable after it.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    keep_alive: bool,
) -> Result<(Framing, bool), ExchangeError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((Framing::Upgraded, false));
    }
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), keep_alive));
    }
    if let Some(coding) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = coding
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            (Framing::Chunked(Chunk::Size), keep_alive)
        } else {
            (Framing::Close, false)
        });
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    match lengths.next() {
        None => Ok((Framing::Close, false)),
        Some(first) => {
            if lengths.any(|other| other != first) {
                return Err(ExchangeError::InvalidHead);
            }
            let length = (first.to_str().ok())
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or(ExchangeError::InvalidHead)?;
            Ok((Framing::Length(length), keep_alive))
        }
    }
}

/// How much of a response body is left to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes the connection.
    Close,
    /// Switched protocols: no body; the connection is the client's now.
    Upgraded,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// Before the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

/// A response body read from its upstream connection as the client takes it.
pub(super) struct ResponseBody {
    /// None once the body ended (the connection went back to the pool or was closed).
    conn: Option<Connection>,
    framing: Framing,
    /// Where the connection goes once the body was read whole; None: it is closed then.
    reuse: Option<(Weak<Pool>, SocketAddr)>,
    /// The trailer fields of a chunked body read so far (at most [`MAX_HEADERS`]).
    trailers: HeaderMap,
}

impl ResponseBody {
    /// The connection of a `101 Switching Protocols` answer, with what the upstream already
    /// sent on the new protocol in its read buffer.
    pub(super) fn take_upgraded(&mut self) -> Option<Connection> {
        (self.framing == Framing::Upgraded)
            .then(|| self.conn.take())
            .flatten()
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some((pool, addr))) = (conn, self.reuse.take()) {
            if let Some(pool) = pool.upgrade() {
                pool.put_back(addr, conn);
            }
        }
    }

    /// Reads more from the upstream; Ok(false) when it closed the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ExchangeError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        conn.read.reserve(READ_SIZE);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.stream),
            cx,
            &mut conn.read
        ))?;
        Poll::Ready(Ok(read > 0))
    }

    /// Up to `max` bytes of body data from the read buffer, if it holds any.
    fn take(&mut self, max: u64) -> Option<Bytes> {
        let read = &mut self.conn.as_mut()?.read;
        let n = usize::try_from(max).unwrap_or(usize::MAX).min(read.len());
        (n > 0).then(|| read.split_to(n).freeze())
    }

    /// The next step through the body: Some(data), None when it needs more bytes (`poll_fill`),
    /// or the end, as a frame result.
    fn step(&mut self) -> Result<Step, ExchangeError> {
        let buffered = self.conn.as_ref().map_or(0, |conn| conn.read.len());
        match self.framing {
            Framing::Done | Framing::Upgraded | Framing::Length(0) => Ok(Step::End),
            Framing::Length(left) => Ok(match self.take(left) {
                Some(data) => {
                    self.framing = Framing::Length(left - data.len() as u64);
                    Step::Data(data)
                }
                None => Step::Fill { eof_ends: false },
            }),
            Framing::Close => Ok(match self.take(u64::MAX) {
                Some(data) => Step::Data(data),
                None => Step::Fill { eof_ends: true },
            }),
            Framing::Chunked(Chunk::Data(left)) => Ok(match self.take(left) {
                Some(data) => {
                    let left = left - data.len() as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    Step::Data(data)
                }
                None => Step::Fill { eof_ends: false },
            }),
            Framing::Chunked(Chunk::DataEnd) => {
                if buffered < 2 {
                    return Ok(Step::Fill { eof_ends: false });
                }
                let read = &mut self.conn.as_mut().expect("bytes are buffered").read;
                if &read[..2] != b"\r\n" {
                    return Err(ExchangeError::Chunked);
                }
                read.advance(2);
                self.framing = Framing::Chunked(Chunk::Size);
                Ok(Step::Again)
            }
            Framing::Chunked(Chunk::Size) => {
                let Some(conn) = self.conn.as_mut() else {
                    return Ok(Step::End);
                };
                match httparse::parse_chunk_size(&conn.read) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.read.advance(used);
                        self.framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                        Ok(Step::Again)
                    }
                    Ok(httparse::Status::Partial) if buffered < MAX_LINE => {
                        Ok(Step::Fill { eof_ends: false })
                    }
                    _ => Err(ExchangeError::Chunked),
                }
            }
            Framing::Chunked(Chunk::Trailers) => {
                let Some(conn) = self.conn.as_mut() else {
                    return Ok(Step::End);
                };
                match conn.read.windows(2).position(|w| w == b"\r\n") {
                    // The empty line: the body is complete, its trailers (if any) follow it.
                    Some(0) => {
                        conn.read.advance(2);
                        Ok(match self.trailers.is_empty() {
                            true => Step::End,
                            false => Step::Trailers(std::mem::take(&mut self.trailers)),
                        })
                    }
                    // A trailer field, kept for the client (hyper sends on those the
                    // response's `Trailer` header names, to a client that said `TE: trailers`).
                    Some(end) => {
                        let line = conn.read.split_to(end + 2);
                        let field = &line[..end];
                        // Name and value split at the first colon (a line without one is a
                        // name with an empty value).
                        let (name, value) = match field.iter().position(|&b| b == b':') {
                            Some(colon) => (&field[..colon], &field[colon + 1..]),
                            None => (field, &[][..]),
                        };
                        let name = HeaderName::from_bytes(name.trim_ascii());
                        let value = HeaderValue::from_bytes(value.trim_ascii());
                        if let (Ok(name), Ok(value)) = (name, value) {
                            if self.trailers.len() < MAX_HEADERS {
                                self.trailers.append(name, value);
                            }
                        }
                        Ok(Step::Again)
                    }
                    None if buffered < MAX_LINE => Ok(Step::Fill { eof_ends: false }),
                    None => Err(ExchangeError::Chunked),
                }
            }
        }
    }
}

impl Drop for ResponseBody {
    /// A body known to be empty may never be polled: its connection is reusable all the same.
    fn drop(&mut self) {
        if self.framing == Framing::Length(0) {
            self.finish();
        }
    }
}

enum Step {
    Data(Bytes),
    /// The trailer fields after the last chunk: the body's last frame.
    Trailers(HeaderMap),
    /// Needs more bytes; whether the upstream closing then ends the body cleanly.
    Fill {
        eof_ends: bool,
    },
    Again,
    End,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        loop {
            let step = match this.step() {
                Ok(step) => step,
                Err(err) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(err)));
                }
            };
            match step {
                Step::Data(data) => {
                    if this.framing == Framing::Length(0) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Again => {}
                Step::Trailers(trailers) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Step::End => {
                    if this.framing != Framing::Upgraded {
                        this.finish();
                    }
                    return Poll::Ready(None);
                }
                Step::Fill { eof_ends } => match ready!(this.poll_fill(cx)) {
                    Ok(true) => {}
                    Ok(false) if eof_ends => {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    Ok(false) => {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(ExchangeError::Truncated)));
                    }
                    Err(err) => {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(err)));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self.framing,
            Framing::Done | Framing::Upgraded | Framing::Length(0)
        )
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done | Framing::Upgraded => SizeHint::with_exact(0),
            Framing::Chunked(_) | Framing::Close => SizeHint::default(),
        }
    }
}
