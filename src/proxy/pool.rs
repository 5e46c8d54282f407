//! Keep-alive TCP connections to upstreams, pooled per address.
//!
//! Owns: connecting to an upstream (connect timeout, TCP_NODELAY; from inside the upstream's
//! network namespace when it has one, with a socket the runtime's [`NetnsSockets`] makes there)
//! and the idle connections kept per address (at most `max_idle`, closed after `idle_timeout`,
//! and never handed out again once the upstream closed them or sent bytes nobody asked for). A
//! connection is lent out whole, with its read buffer, and comes back through
//! [`Pool::put_back`]; HTTP on it is [`super::upstream`]'s. Must not know about routes, hosts,
//! headers or HTTP.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use berth_runtime::network::NetnsSockets;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// One connection to an upstream, with what was read from it and not used yet.
pub(super) struct Connection {
    pub(super) stream: TcpStream,
    pub(super) read: BytesMut,
    /// Where a request body's chunks are framed; kept to reuse its allocation.
    pub(super) write: Vec<u8>,
}

impl Connection {
    /// Whether the upstream may still answer on it: nothing unread, and it did not close it.
    fn is_open(&self) -> bool {
        self.read.is_empty()
            && matches!(self.stream.try_read(&mut [0; 1]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }
}

pub(super) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    netns_sockets: NetnsSockets,
}

struct Idle {
    conn: Connection,
    since: Instant,
}

impl Pool {
    pub(super) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            idle: Mutex::default(),
            connect_timeout,
            idle_timeout,
            max_idle,
            netns_sockets: NetnsSockets::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        pool
    }

    /// The most recently used idle connection to `addr` that is still open.
    pub(super) fn take_idle(&self, addr: SocketAddr) -> Option<Connection> {
        let mut idle = super::lock(&self.idle);
        let list = idle.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if idle.conn.is_open() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keeps `conn`, whose last response was read whole, for the next request to `addr`.
    pub(super) fn put_back(&self, addr: SocketAddr, conn: Connection) {
        if !conn.read.is_empty() {
            return;
        }
        let mut idle = super::lock(&self.idle);
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// A new connection to `addr`, from inside `netns` when given, within the connect timeout.
    pub(super) async fn connect(
        &self,
        addr: SocketAddr,
        netns: Option<&Path>,
    ) -> io::Result<Connection> {
        let connect = async {
            match netns {
                Some(netns) => {
                    let socket = self.netns_sockets.tcp(netns, addr.is_ipv6()).await?;
                    socket.connect(addr).await
                }
                None => TcpStream::connect(addr).await,
            }
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "TCP_NODELAY");
        }
        Ok(Connection {
            stream,
            read: BytesMut::new(),
            write: Vec::new(),
        })
    }
}

/// Closes the connections idle for longer than the idle timeout, until the pool is gone.
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
        super::lock(&pool.idle).retain(|_, list| {
            list.retain(|idle| idle.since.elapsed() < pool.idle_timeout);
            !list.is_empty()
        });
    }
}
