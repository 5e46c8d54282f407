//! Keep-alive HTTP/1.1 connections to upstreams, pooled per address.
//!
//! Owns: connecting to an upstream (connect timeout, TCP_NODELAY), one hyper client connection
//! task per upstream connection, and the idle connections kept per address (at most
//! `max_idle`, closed after `idle_timeout`). A connection goes back to the pool when the
//! [`Pooled`] handed out with its response is dropped, which the proxy does once the response
//! body was sent; one the upstream closed, or that switched protocols, is never reused.
//!
//! It is hyper's own client connection (`hyper::client::conn::http1`) under a small pool of
//! ours instead of hyper-util's `legacy::Client`, whose pool spawns a task per request and
//! boxes the connect and checkout futures: on a one-thread proxy that was a measurable part of
//! every request. Must not know about routes, hosts or headers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::UpstreamBody;

/// Why a request could not be sent to an upstream or got no response.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// No connection: refused, unreachable, or the connect timeout passed.
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Connected, but the exchange failed: the upstream closed the connection, sent garbage,
    /// or the request body failed (its limit or its timeout, found in the source chain).
    #[error("the request to {addr} failed")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

pub(super) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    http: http1::Builder,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// A connection lent out with a response; back to the pool when dropped, if still usable.
pub(super) struct Pooled {
    pool: Weak<Pool>,
    addr: SocketAddr,
    /// Taken on drop.
    sender: Option<SendRequest<UpstreamBody>>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(pool), Some(sender)) = (self.pool.upgrade(), self.sender.take()) {
            pool.put_back(self.addr, sender);
        }
    }
}

impl Pool {
    pub(super) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            idle: Mutex::default(),
            http: http1::Builder::new(),
            connect_timeout,
            idle_timeout,
            max_idle,
        });
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        pool
    }

    /// Sends `req` to `addr` on an idle connection, or a new one when there is none or the idle
    /// one turns out closed before the request went out.
    pub(super) async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        loop {
            let (mut sender, reused) = match self.take_idle(addr) {
                Some(sender) => (sender, true),
                None => (self.connect(addr).await?, false),
            };
            if sender.ready().await.is_err() && reused {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pooled = Pooled {
                        pool: Arc::downgrade(self),
                        addr,
                        sender: Some(sender),
                    };
                    return Ok((response, pooled));
                }
                Err(mut err) => match err.take_message() {
                    // Not sent: the kept connection closed meanwhile; the request is intact.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        return Err(SendError::Exchange {
                            addr,
                            source: err.into_error(),
                        })
                    }
                },
            }
        }
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put_back(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<UpstreamBody>, SendError> {
        let connect_error = |source| SendError::Connect { addr, source };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_error)?;
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "TCP_NODELAY");
        }
        let (sender, connection) = self
            .http
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Exchange { addr, source })?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(%err, %addr, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // Every change is one push or pop: the map stays consistent even if a holder panicked.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes the connections idle for longer than the idle timeout (dropping the sender ends its
/// connection task), until the pool is gone.
async fn sweep(pool: Weak<Pool>) {
    let Some(every) = pool.upgrade().map(|pool| pool.idle_timeout / 4) else {
        return;
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.lock().retain(|_, list| {
            list.retain(|conn| {
                conn.since.elapsed() < pool.idle_timeout && !conn.sender.is_closed()
            });
            !list.is_empty()
        });
    }
}
