//! The built-in HTTP reverse proxy and its route table.
//!
//! Owns: the route table ([`Routes`]: Host → the live `web` containers of an app, swapped
//! atomically with ArcSwap, so a request sees either the old upstreams or the new ones), the
//! in-flight count per upstream that `deploy` drains on, per-host counters, and serving HTTP/1.1
//! ([`run`]): keep-alive both ways with pooled upstream connections, timeouts against slow
//! clients and slow apps, a body limit, a connection cap, hop-by-hop and `X-Forwarded-*`
//! headers, request ids, retries, WebSocket bridging and one access-log line per request
//! (target `berth::access`), and the ACME HTTP-01 answers `acme` hands it.
//!
//! Must not touch the store or the containers: `deploy` tells it what to route (addresses, and
//! the namespace to connect from). Upstream connections are [`pool`]'s, HTTP/1.1 on them
//! [`upstream`]'s.

mod pool;
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Empty, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::{TimeoutBody, TimeoutError};
use tracing::{debug, info, warn};

use pool::{Connection, Pool};
use upstream::{RequestHead, ResponseBody, SendError};

/// Requests counted for one host since it was first [`Routes::set`], by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Every request answered for the host, whatever its status.
    pub requests: u64,
    /// 1xx answers (WebSocket upgrades are 101).
    pub informational: u64,
    /// 2xx answers.
    pub success: u64,
    /// 3xx answers.
    pub redirection: u64,
    /// 4xx answers.
    pub client_error: u64,
    /// 5xx answers, including berth's own 502, 503 and 504.
    pub server_error: u64,
}

impl std::ops::AddAssign for HostStats {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.informational += other.informational;
        self.success += other.success;
        self.redirection += other.redirection;
        self.client_error += other.client_error;
        self.server_error += other.server_error;
    }
}

/// What outlives a [`Routes::set`] of a host: its counters, and the signal that its upstreams changed.
#[derive(Default)]
struct HostState {
    requests: AtomicU64,
    /// Answers by status class, 1xx at index 0.
    by_class: [AtomicU64; 5],
    changed: Notify,
    /// The HTTPS port plain-HTTP requests are redirected to; 0 when they are served.
    redirect_https: AtomicU16,
}

impl HostState {
    fn record(&self, status: StatusCode) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(class) = self
            .by_class
            .get(usize::from(status.as_u16() / 100).wrapping_sub(1))
        {
            class.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> HostStats {
        let class = |i: usize| self.by_class[i].load(Ordering::Relaxed);
        HostStats {
            requests: self.requests.load(Ordering::Relaxed),
            informational: class(0),
            success: class(1),
            redirection: class(2),
            client_error: class(3),
            server_error: class(4),
        }
    }
}

/// Requests in flight to one upstream address, whichever hosts route to it.
#[derive(Default)]
struct Gauge {
    count: AtomicUsize,
    idle: Notify,
    /// Cancelled by [`Routes::disconnect`]: the upstream is gone, its upgraded connections end.
    gone: CancellationToken,
}

/// One request counted in its upstream's [`Gauge`] until dropped.
struct InFlight(Arc<Gauge>);

impl InFlight {
    fn new(gauge: &Arc<Gauge>) -> Self {
        gauge.count.fetch_add(1, Ordering::AcqRel);
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Where the proxy reaches one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The network namespace to connect from: a container's own, so the connection to its
    /// address goes over that namespace's loopback instead of the host's route and the
    /// container's veth (less work per packet; the app sees its own address as the peer).
    /// `None`: from the proxy's namespace.
    pub netns: Option<PathBuf>,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, netns: None }
    }
}

/// One upstream of a route.
struct Upstream {
    addr: SocketAddr,
    netns: Option<PathBuf>,
    gauge: Arc<Gauge>,
    /// Milliseconds since [`Routes::epoch`] until which the upstream is skipped after it
    /// refused a connection; 0 while it is in the rotation.
    down_until: AtomicU64,
}

/// The upstreams a host points at now, served round-robin.
struct Route {
    state: Arc<HostState>,
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
}

impl Route {
    /// The next upstream in turn that is in the rotation, other than `avoid`; one out of the
    /// rotation when all are; `None` when there is no upstream besides `avoid`.
    /// `now_ms` is asked only when an upstream was taken out of the rotation.
    fn pick(&self, now_ms: impl Fn() -> u64, avoid: Option<SocketAddr>) -> Option<&Upstream> {
        let len = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for upstream in (0..len).map(|i| &self.upstreams[(start + i) % len]) {
            if Some(upstream.addr) == avoid {
                continue;
            }
            let down_until = upstream.down_until.load(Ordering::Relaxed);
            if down_until == 0 || down_until <= now_ms() {
                return Some(upstream);
            }
            fallback.get_or_insert(upstream);
        }
        fallback
    }
}

/// Host → upstreams, plus in-flight counts per upstream and counters per host.
///
/// Reads of the table are lock-free (ArcSwap); writers (`set`, `remove`) replace the whole map
/// under the `gauges` lock, so a request sees either the old upstreams or the new ones.
pub struct Routes {
    table: ArcSwap<HashMap<String, Arc<Route>>>,
    gauges: Mutex<HashMap<SocketAddr, Arc<Gauge>>>,
    /// ACME HTTP-01 answers: token → key authorization, served on plain HTTP for every host.
    acme: Mutex<HashMap<String, String>>,
    epoch: Instant,
}

impl Default for Routes {
    fn default() -> Self {
        Self {
            table: ArcSwap::default(),
            gauges: Mutex::default(),
            acme: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

/// Where ACME servers fetch HTTP-01 answers (RFC 8555, section 8.3).
const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

impl Routes {
    /// Points `host` at `targets`, replacing what it pointed at. No targets keeps the host
    /// known with no live container: requests wait a moment for one, then get 503.
    pub fn set<T: Into<Target>>(&self, host: &str, targets: impl IntoIterator<Item = T>) {
        let host = host.to_ascii_lowercase();
        let mut gauges = lock(&self.gauges);
        let mut table = HashMap::clone(&self.table.load());
        let state = table
            .get(&host)
            .map(|route| route.state.clone())
            .unwrap_or_default();
        let upstreams = targets
            .into_iter()
            .map(|target| {
                let Target { addr, netns } = target.into();
                Upstream {
                    addr,
                    netns,
                    gauge: gauges.entry(addr).or_default().clone(),
                    down_until: AtomicU64::new(0),
                }
            })
            .collect();
        table.insert(
            host,
            Arc::new(Route {
                state: state.clone(),
                upstreams,
                next: AtomicUsize::new(0),
            }),
        );
        self.table.store(Arc::new(table));
        prune(&mut gauges);
        state.changed.notify_waiters();
    }

    /// Redirects plain-HTTP requests for `host` (already routed) to HTTPS on `port`, or serves
    /// them again with None.
    pub fn redirect_https(&self, host: &str, port: Option<u16>) {
        if let Some(route) = self.route(&host.to_ascii_lowercase()) {
            route
                .state
                .redirect_https
                .store(port.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Forgets `host` and its counters: its requests get 404.
    pub fn remove(&self, host: &str) {
        let host = host.to_ascii_lowercase();
        let mut gauges = lock(&self.gauges);
        let mut table = HashMap::clone(&self.table.load());
        let removed = table.remove(&host);
        self.table.store(Arc::new(table));
        prune(&mut gauges);
        if let Some(route) = removed {
            route.state.changed.notify_waiters();
        }
    }

    /// The upstreams `host` points at now.
    pub fn get(&self, host: &str) -> Vec<SocketAddr> {
        self.route(&host.to_ascii_lowercase())
            .map(|route| route.upstreams.iter().map(|u| u.addr).collect())
            .unwrap_or_default()
    }

    /// The counters of `host`, or `None` when it is not routed.
    pub fn stats(&self, host: &str) -> Option<HostStats> {
        self.route(&host.to_ascii_lowercase())
            .map(|route| route.state.stats())
    }

    /// Requests being forwarded to `addr` now: from the moment it was picked until the response
    /// body was sent or the client went away; an open WebSocket or event stream counts until it
    /// closes.
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        lock(&self.gauges)
            .get(&addr)
            .map_or(0, |gauge| gauge.count.load(Ordering::Acquire))
    }

    /// Waits until no request is in flight to `addr`, at most `deadline`; true if it became idle.
    pub async fn wait_idle(&self, addr: SocketAddr, deadline: Duration) -> bool {
        let gauge = lock(&self.gauges).entry(addr).or_default().clone();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let idle = gauge.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if gauge.count.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                return gauge.count.load(Ordering::Acquire) == 0;
            }
        }
    }

    /// Answers the ACME HTTP-01 challenge `token` with `key_authorization` on plain HTTP, for
    /// every host and before any redirect, or stops answering it with None.
    pub fn answer_acme(&self, token: &str, key_authorization: Option<String>) {
        let mut answers = lock(&self.acme);
        match key_authorization {
            Some(answer) => answers.insert(token.to_string(), answer),
            None => answers.remove(token),
        };
    }

    /// berth's own answer to a plain-HTTP request for `path`, when it is an ACME challenge.
    fn acme_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(ACME_CHALLENGE_PATH)?;
        let answers = lock(&self.acme);
        answers.get(token).cloned()
    }

    fn route(&self, host: &str) -> Option<Arc<Route>> {
        self.table.load().get(host).cloned()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ends the upgraded connections (WebSockets) still bridged to `addr`, an upstream that is
    /// gone (its container stopped): their clients see the connection close even when the
    /// upstream's own close never arrived. Later requests to `addr` count afresh.
    pub fn disconnect(&self, addr: SocketAddr) {
        if let Some(gauge) = lock(&self.gauges).remove(&addr) {
            gauge.gone.cancel();
        }
    }
}

/// Locks `mutex`, also after a holder panicked: what the proxy keeps behind a lock (routes'
/// gauges, ACME answers, idle connections, a connection's timer) is changed by whole inserts,
/// removes and swaps, so a panic never leaves it half-changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops the gauges nothing refers to any more (no route, no request, no waiter). Under the
/// lock nobody can take a new reference to such a gauge, so none is dropped while counted.
fn prune(gauges: &mut HashMap<SocketAddr, Arc<Gauge>>) {
    gauges.retain(|_, gauge| Arc::strong_count(gauge) > 1);
}

/// Settings of the proxy; [`Default`] is what `berth server` uses.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long a client may take to send a request's headers; also how long an idle keep-alive
    /// connection waits for its next request. Either way the connection is then closed.
    pub header_timeout: Duration,
    /// The longest pause allowed between two parts of a request body (→ 408).
    pub body_timeout: Duration,
    /// The largest request body forwarded, in bytes (→ 413).
    pub max_body: usize,
    /// How long an upstream may take to send its response headers (→ 504).
    pub upstream_timeout: Duration,
    /// How long a request to a host with no live container waits for one (→ 503).
    pub upstream_wait: Duration,
    /// How long an upstream that refused a connection stays out of the rotation.
    pub down_for: Duration,
    /// How long connecting to an upstream may take (→ 502).
    pub connect_timeout: Duration,
    /// Idle pooled upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream.
    pub pool_max_idle: usize,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_body: 100 << 20,
            upstream_timeout: Duration::from_secs(60),
            upstream_wait: Duration::from_secs(5),
            down_for: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 256,
            max_connections: 10_000,
        }
    }
}

/// Why berth answered a request itself. `Display` is the one-line body sent to the client.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("berth: the request has no Host header — send the app's domain as Host")]
    NoHost,
    #[error("berth: this app is served over HTTPS — use {0}")]
    RedirectHttps(String),
    #[error("berth: no app is served at {0} — check the app name and its domains")]
    UnknownHost(String),
    #[error("berth: the app at {0} has no running web container — check `berth ps` and `berth logs` for it")]
    NoUpstream(String),
    #[error("berth: the request body is larger than {0} bytes — send a smaller body")]
    TooLarge(usize),
    #[error("berth: the request body stalled — send it without long pauses")]
    BodyStalled,
    #[error("berth: the app at {host} refused the connection — it may be restarting; check `berth logs` for it")]
    Refused {
        host: String,
        #[source]
        source: SendError,
    },
    #[error("berth: the app at {host} closed the connection without an answer — check `berth logs` for it")]
    Failed {
        host: String,
        #[source]
        source: SendError,
    },
    #[error("berth: the app at {host} did not answer within {after:?} — make it answer sooner or check `berth logs` for it")]
    Timeout { host: String, after: Duration },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::RedirectHttps(_) => StatusCode::PERMANENT_REDIRECT,
            Self::NoHost => StatusCode::BAD_REQUEST,
            Self::UnknownHost(_) => StatusCode::NOT_FOUND,
            Self::NoUpstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyStalled => StatusCode::REQUEST_TIMEOUT,
            Self::Refused { .. } | Self::Failed { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Sorts a failed upstream request by where it went wrong: the client's body or the upstream.
    fn from_send(host: &str, max_body: usize, source: SendError) -> Self {
        let caused_by = |is: fn(&(dyn std::error::Error + 'static)) -> bool| {
            std::iter::successors(Some(&source as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(is)
        };
        if caused_by(|e| e.is::<LengthLimitError>()) {
            Self::TooLarge(max_body)
        } else if caused_by(|e| e.is::<TimeoutError>()) {
            Self::BodyStalled
        } else if let SendError::Connect { .. } = source {
            Self::Refused {
                host: host.to_owned(),
                source,
            }
        } else {
            Self::Failed {
                host: host.to_owned(),
                source,
            }
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        debug!(
            error = &self as &dyn std::error::Error,
            "berth answered itself"
        );
        let mut response = text_response(self.status(), format!("{self}\n"));
        if let Self::RedirectHttps(location) = &self {
            if let Ok(location) = HeaderValue::from_str(location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
        }
        response
    }
}

/// A plain-text answer of berth's own.
fn text_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
/// A request [`Proxy::prepare`]d for its upstreams.
struct Forward {
    route: Arc<Route>,
    head: RequestHead,
    body: UpstreamBody,
    /// Empty, for the response's headers.
    headers: HeaderMap,
    /// It may be sent again to another upstream: idempotent, without a body.
    retry: bool,
    client_upgrade: Option<OnUpgrade>,
}

/// A request body on its way to an upstream: limited in size and in pauses, or none.
type UpstreamBody = Either<Pin<Box<TimeoutBody<Limited<Incoming>>>>, Empty<Bytes>>;
/// A response body on its way to the client: the upstream's, or berth's own one line.
type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The client side of one accepted connection, with the header values every request on it
/// sends upstream made once.
struct Conn {
    /// The client's IP address.
    peer: HeaderValue,
    /// The port the client connected to.
    local_port: HeaderValue,
    /// The client came over TLS (the HTTPS listener).
    https: bool,
    /// The upstream timeout's timer, kept for the connection's next request: moving a pending
    /// timer's deadline later is one atomic step, registering and removing one per request
    /// is timer-wheel work under the runtime's lock.
    upstream_timer: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl Conn {
    fn new(peer: IpAddr, local_port: u16, https: bool) -> Self {
        Self {
            peer: HeaderValue::from_str(&peer.to_string())
                .expect("an IP address is a valid header value"),
            local_port: HeaderValue::from(local_port),
            https,
            upstream_timer: Mutex::default(),
        }
    }

    /// `work`'s output, or None when it took longer than `limit`. (`work` is pinned by the
    /// caller: a future taken by value would be stored twice in this one.)
    async fn within<F: Future>(&self, limit: Duration, work: Pin<&mut F>) -> Option<F::Output> {
        let deadline = tokio::time::Instant::now() + limit;
        let kept = lock(&self.upstream_timer).take();
        let mut timer = match kept {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let output = tokio::select! {
            biased;
            output = work => output,
            () = timer.as_mut() => return None,
        };
        *lock(&self.upstream_timer) = Some(timer);
        Some(output)
    }
}

struct Proxy {
    routes: Arc<Routes>,
    pool: Arc<Pool>,
    config: ProxyConfig,
}

/// Serves HTTP/1.1 on `listener` until `shutdown` fires, then lets open requests finish.
pub async fn run(
    listener: TcpListener,
    routes: Arc<Routes>,
    config: ProxyConfig,
    shutdown: CancellationToken,
) {
    serve(listener, routes, config, None, shutdown).await
}

/// Serves HTTPS (HTTP/1.1 over TLS with `tls`, which picks a certificate by SNI) on `listener`
/// until `shutdown` fires, then lets open requests finish.
pub async fn run_tls(
    listener: TcpListener,
    routes: Arc<Routes>,
    config: ProxyConfig,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve(listener, routes, config, Some(acceptor), shutdown).await
}

async fn serve(
    listener: TcpListener,
    routes: Arc<Routes>,
    config: ProxyConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let pool = Pool::new(
        config.connect_timeout,
        config.pool_idle_timeout,
        config.pool_max_idle,
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // Each response goes out in one buffer and one write, its body copied in behind its
        // head, instead of a write of both pieces: cheaper for the common small answer.
        .writev(false);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let proxy = Arc::new(Proxy {
        routes,
        pool,
        config,
    });
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    warn!(%err, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "TCP_NODELAY");
        }
        let conn = Conn::new(
            peer.ip(),
            stream.local_addr().map_or(0, |addr| addr.port()),
            tls.is_some(),
        );
        let (proxy, http, tls, shutdown) =
            (proxy.clone(), http.clone(), tls.clone(), shutdown.clone());
        connections.spawn(async move {
            let served = match tls {
                None => serve_connection(proxy, conn, &http, stream, &shutdown).await,
                Some(acceptor) => {
                    // The handshake gets the header timeout too: a client that stalls in it
                    // holds nothing longer than one that stalls in its headers.
                    let timeout = proxy.config.header_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(proxy, conn, &http, stream, &shutdown).await
                        }
                        Ok(Err(err)) => {
                            debug!(%err, %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(err) = served {
                debug!(%err, %peer, "client connection ended");
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Serves one client connection (plain TCP or TLS) until it ends or `shutdown` fires.
async fn serve_connection<IO>(
    proxy: Arc<Proxy>,
    conn: Conn,
    http: &http1::Builder,
    io: IO,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = service_fn(move |req| {
        let mut exchange = Exchange::start(&req);
        let prepared = proxy.prepare(&conn, req, &mut exchange);
        let (proxy, conn) = (proxy.clone(), conn.clone());
        async move { Ok::<_, Infallible>(proxy.answer(&conn, exchange, prepared).await) }
    });
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.cancelled() => {
            // Finishes the request in progress, then closes instead of keeping alive.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

impl Proxy {
    /// Everything about `req` that needs no waiting, done in hyper's call of the service:
    /// `exchange` filled in, the route looked up, the upstream request head encoded. What
    /// is returned holds nothing of the request's head, which shares the client connection's
    /// read buffer: hyper reads on while the request is answered (to see a client that
    /// leaves), and a buffer still shared would have to be allocated anew for each such read.
    /// Err is berth's own answer (boxed: it is the rare case).
    fn prepare(
        &self,
        conn: &Conn,
        mut req: Request<Incoming>,
        exchange: &mut Exchange,
    ) -> Result<Forward, Box<Response<ProxyBody>>> {
        if !conn.https {
            if let Some(answer) = self.routes.acme_answer(req.uri().path()) {
                return Err(Box::new(text_response(StatusCode::OK, answer)));
            }
        }
        let fail = |err: ProxyError| Box::new(err.into_response());
        let host =
            request_host(req.uri(), req.headers()).ok_or_else(|| fail(ProxyError::NoHost))?;
        exchange.host.clone_from(&host);
        let route = (self.routes.route(&host))
            .ok_or_else(|| fail(ProxyError::UnknownHost(host.clone())))?;
        exchange.host_state = Some(route.state.clone());
        if !conn.https {
            let redirect = route.state.redirect_https.load(Ordering::Relaxed);
            if redirect != 0 {
                let port = if redirect == 443 {
                    String::new()
                } else {
                    format!(":{redirect}")
                };
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                return Err(fail(ProxyError::RedirectHttps(format!(
                    "https://{host}{port}{target}"
                ))));
            }
        }
        if req.body().size_hint().lower() > self.config.max_body as u64 {
            return Err(fail(ProxyError::TooLarge(self.config.max_body)));
        }
        let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let forwarded_host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| HeaderValue::from_str(&host).ok());
        // A client that takes trailers gets the upstream's, so the upstream may send them.
        let takes_trailers =
            tokens(&parts.headers, header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
        strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
        if takes_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // berth's server side answers `Expect: 100-continue` itself (as it reads the body); an
        // upstream's early 100 would read as an answer before the whole body.
        parts.headers.remove(header::EXPECT);
        if let (None, Some(value)) = (parts.headers.get(header::HOST), &forwarded_host) {
            // An absolute-form request may come without Host; the upstream needs one.
            parts.headers.insert(header::HOST, value.clone());
        }
        set_forwarding(
            &mut parts.headers,
            conn,
            forwarded_host,
            &exchange.request_id,
        );
        let retry = is_idempotent(&parts.method) && body.is_end_stream();
        let body = if body.is_end_stream() {
            Either::Right(Empty::new())
        } else {
            Either::Left(Box::pin(TimeoutBody::new(
                self.config.body_timeout,
                Limited::new(body, self.config.max_body),
            )))
        };
        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let head = RequestHead::new(&parts.method, target, &parts.headers, &body);
        // Encoded: the request's header map takes the response's headers, so no map is
        // allocated per request.
        let mut headers = parts.headers;
        headers.clear();
        Ok(Forward {
            route,
            head,
            body,
            headers,
            retry,
            client_upgrade,
        })
    }

    /// The answer to a request [`prepare`](Self::prepare)d, counted and logged by `exchange`.
    async fn answer(
        &self,
        conn: &Conn,
        mut exchange: Exchange,
        prepared: Result<Forward, Box<Response<ProxyBody>>>,
    ) -> Response<Tracked> {
        let (mut response, upgrade) = match prepared {
            Err(response) => (*response, None),
            Ok(forward) => match self.forward(conn, forward, &mut exchange).await {
                Ok((mut response, client_upgrade)) => {
                    let upstream = response.body_mut().take_upgraded();
                    let upgrade = client_upgrade.zip(upstream);
                    (response.map(Either::Left), upgrade)
                }
                Err(err) => (err.into_response(), None),
            },
        };
        exchange.status = response.status();
        if let Some(state) = &exchange.host_state {
            state.record(exchange.status);
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID, exchange.request_id.clone());
        let exchange = match upgrade {
            Some((client, upstream)) => {
                tokio::spawn(bridge(client, upstream, exchange));
                None
            }
            None => Some(exchange),
        };
        // A stream (no length known: server-sent events, long polls) ends cleanly, with its
        // last chunk, when its upstream is disconnected at the end of a drain.
        let gone = (exchange.as_ref())
            .filter(|_| response.body().size_hint().exact().is_none())
            .and_then(|exchange| exchange.in_flight.as_ref())
            .map(|flight| Box::pin(flight.0.gone.clone().cancelled_owned()));
        response.map(|body| Tracked {
            body,
            exchange,
            gone,
        })
    }

    /// Sends a request to one of its host's upstreams (and, for an idempotent request without
    /// a body whose upstream failed, once more to another). Returns the upstream's response
    /// and, when it switched protocols, the client side of the upgrade.
    async fn forward(
        &self,
        conn: &Conn,
        forward: Forward,
        exchange: &mut Exchange,
    ) -> Result<(Response<ResponseBody>, Option<OnUpgrade>), ProxyError> {
        let Forward {
            route,
            head,
            mut body,
            mut headers,
            retry,
            client_upgrade,
        } = forward;
        let route = if route.upstreams.is_empty() {
            // Boxed: a rare path kept out of every request's future.
            Box::pin(self.route_with_upstreams(exchange)).await?
        } else {
            route
        };
        let mut tried = None;
        let mut response = loop {
            let Some(upstream) = route.pick(|| self.routes.now_ms(), tried) else {
                return Err(ProxyError::NoUpstream(exchange.host.clone()));
            };
            let headers = std::mem::take(&mut headers);
            let body = std::mem::replace(&mut body, Either::Right(Empty::new()));
            match self
                .send(conn, upstream, &head, body, headers, exchange)
                .await
            {
                Err(err @ (ProxyError::Refused { .. } | ProxyError::Failed { .. }))
                    if retry && tried.is_none() && route.upstreams.len() > 1 =>
                {
                    debug!(error = %err, upstream = %upstream.addr, "retrying on another upstream");
                    tried = Some(upstream.addr);
                }
                sent => break sent?,
            }
        };
        let switched =
            client_upgrade.is_some() && response.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(response.headers_mut(), switched);
        Ok((response, client_upgrade.filter(|_| switched)))
    }

    /// The route of `exchange.host` once it has an upstream, waiting up to `upstream_wait`
    /// for one.
    async fn route_with_upstreams(
        &self,
        exchange: &mut Exchange,
    ) -> Result<Arc<Route>, ProxyError> {
        let host = &exchange.host.clone();
        let deadline = tokio::time::Instant::now() + self.config.upstream_wait;
        loop {
            let route = self
                .routes
                .route(host)
                .ok_or_else(|| ProxyError::UnknownHost(host.to_owned()))?;
            exchange.host_state = Some(route.state.clone());
            if !route.upstreams.is_empty() {
                return Ok(route);
            }
            let changed = route.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // A `set` between the load above and `enable` would otherwise go unnoticed.
            if !self
                .routes
                .route(host)
                .is_some_and(|now| Arc::ptr_eq(&now, &route))
            {
                continue;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(ProxyError::NoUpstream(host.to_owned()));
            }
        }
    }

    /// One try of a request (for `exchange.host`) against `upstream`, counted in flight from
    /// here on.
    async fn send(
        &self,
        conn: &Conn,
        upstream: &Upstream,
        head: &RequestHead,
        body: UpstreamBody,
        headers: HeaderMap,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        exchange.upstream = Some(upstream.addr);
        exchange.in_flight = Some(InFlight::new(&upstream.gauge));
        let sent = upstream::send(
            &self.pool,
            upstream.addr,
            upstream.netns.as_deref(),
            head,
            body,
            headers,
        );
        tokio::pin!(sent);
        match conn.within(self.config.upstream_timeout, sent).await {
            Some(Ok(response)) => {
                if upstream.down_until.load(Ordering::Relaxed) != 0 {
                    upstream.down_until.store(0, Ordering::Relaxed);
                }
                Ok(response)
            }
            Some(Err(source)) => {
                let err = ProxyError::from_send(&exchange.host, self.config.max_body, source);
                if matches!(err, ProxyError::Refused { .. }) {
                    let until = self.routes.now_ms() + self.config.down_for.as_millis() as u64;
                    upstream.down_until.store(until, Ordering::Relaxed);
                }
                Err(err)
            }
            None => Err(ProxyError::Timeout {
                host: exchange.host.clone(),
                after: self.config.upstream_timeout,
            }),
        }
    }
}

/// Copies bytes both ways between an upgraded client and upstream. When either side ends its
/// stream, or the upstream is disconnected, both connections are closed (an app that stops at
/// the end of a drain closes its clients' WebSockets); the request stays in flight until then.
async fn bridge(client: OnUpgrade, mut upstream: Connection, exchange: Exchange) {
    match client.await {
        Ok(client) => {
            let gone = exchange
                .in_flight
                .as_ref()
                .map(|flight| flight.0.gone.clone())
                .unwrap_or_default();
            let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
            let (mut up_read, mut up_write) = upstream.stream.split();
            // What the upstream sent right behind its 101 goes first.
            let sent_early = std::mem::take(&mut upstream.read);
            let ended = tokio::select! {
                ended = tokio::io::copy(&mut client_read, &mut up_write) => ended,
                ended = async {
                    client_write.write_all(&sent_early).await?;
                    tokio::io::copy(&mut up_read, &mut client_write).await
                } => ended,
                () = gone.cancelled() => Ok(0),
            };
            if let Err(err) = ended {
                debug!(%err, "upgraded connection ended");
            }
        }
        Err(err) => debug!(%err, "upgrade failed"),
    }
    drop(exchange);
}

/// The status logged for a request whose client went away before it was answered (as nginx).
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// One request from start to end: counted in flight while forwarded, logged when dropped.
struct Exchange {
    started: Instant,
    method: Method,
    path: String,
    request_id: HeaderValue,
    host: String,
    host_state: Option<Arc<HostState>>,
    upstream: Option<SocketAddr>,
    in_flight: Option<InFlight>,
    status: StatusCode,
}

impl Exchange {
    /// Keeps copies of what it needs of `req` (see [`Proxy::prepare`]).
    fn start(req: &Request<Incoming>) -> Self {
        Self {
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            request_id: request_id(req.headers()),
            host: String::new(),
            host_state: None,
            upstream: None,
            in_flight: None,
            status: CLIENT_CLOSED,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        info!(
            target: "berth::access",
            host = %self.host,
            method = %self.method,
            path = self.path,
            status = self.status.as_u16(),
            ms = self.started.elapsed().as_millis() as u64,
            upstream = %self.upstream.map_or_else(|| "-".to_owned(), |addr| addr.to_string()),
            request_id = self.request_id.to_str().unwrap_or("-"),
        );
    }
}

/// A response body that holds its request's [`Exchange`] until the last frame was taken or the
/// client went away (hyper drops the body then).
struct Tracked {
    body: ProxyBody,
    exchange: Option<Exchange>,
    /// For a stream: fires when its upstream is disconnected.
    gone: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending()
            && this
                .gone
                .as_mut()
                .is_some_and(|g| g.as_mut().poll(cx).is_ready())
        {
            frame = Poll::Ready(None);
        }
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.exchange = None;
            this.gone = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies commonly drop. (`Trailer`, which names a message's trailer
/// fields, goes on: berth forwards trailers.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The Host a request is for, lowercased, without a port: from an absolute-form target, else
/// the Host header (`host [":" port]`, RFC 9110 §7.2; None when malformed).
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let host = match uri.authority() {
        Some(authority) => authority.host(),
        None => {
            let value = headers.get(header::HOST)?.to_str().ok()?;
            let (host, port) = match value.strip_prefix('[') {
                Some(rest) => {
                    let (inside, port) = rest.split_once(']')?;
                    let ip = inside
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b));
                    (ip.then_some(&value[..inside.len() + 2])?, port)
                }
                None => value.split_at(value.find(':').unwrap_or(value.len())),
            };
            let port_ok = port.is_empty()
                || port
                    .strip_prefix(':')
                    .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
            let name_ok = host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
            (port_ok && name_ok).then_some(host)?
        }
    };
    Some(host.to_ascii_lowercase()).filter(|host| !host.is_empty())
}

/// Whether the request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated tokens of every `name` header (`Connection`, `TE`).
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes the hop-by-hop headers and those the `Connection` header names. With `upgrade`,
/// keeps the `Upgrade` protocol and sends `Connection: upgrade` on.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a lookup for each.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let protocol = upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(protocol) = protocol {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Tells the upstream who asked: `X-Forwarded-For` gets the peer appended, the other
/// forwarding headers are berth's alone (client copies replaced, `Forwarded` dropped).
fn set_forwarding(
    headers: &mut HeaderMap,
    conn: &Conn,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
) {
    let prior: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect();
    let forwarded_for = if prior.is_empty() {
        Some(conn.peer.clone())
    } else {
        let peer = conn.peer.to_str().expect("an IP address is visible ASCII");
        HeaderValue::from_str(&format!("{}, {peer}", prior.join(", "))).ok()
    };
    headers.remove(header::FORWARDED);
    headers.reserve(6); // one growth instead of several for the inserts below
    for (name, value) in [
        (X_FORWARDED_FOR, forwarded_for),
        (X_REAL_IP, Some(conn.peer.clone())),
        (
            X_FORWARDED_PROTO,
            Some(HeaderValue::from_static(if conn.https {
                "https"
            } else {
                "http"
            })),
        ),
        (X_FORWARDED_HOST, host),
        (X_FORWARDED_PORT, Some(conn.local_port.clone())),
        (X_REQUEST_ID, Some(request_id.clone())),
    ] {
        match value {
            Some(value) => headers.insert(name, value),
            None => headers.remove(name),
        };
    }
}

/// The client's `X-Request-Id` when it is a sane token, else a new random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|value| is_valid_request_id(value.as_bytes()))
        .and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok()) // a copy: see prepare
        .unwrap_or_else(|| {
            let mut id = [0; 32];
            hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut id)
                .expect("32 hex digits hold 16 bytes");
            HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
        })
}

fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+=/".contains(b))
}

fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pick(routes: &Routes, host: &str) -> Option<SocketAddr> {
        let route = routes.route(host)?;
        let addr = route.pick(|| routes.now_ms(), None)?.addr;
        Some(addr)
    }

    /// Counts one request to `addr` as `Proxy::send` does, through the route of `host`.
    fn start_request(routes: &Routes, host: &str, addr: SocketAddr) -> InFlight {
        let route = routes.route(host).unwrap();
        let upstream = route.upstreams.iter().find(|u| u.addr == addr).unwrap();
        InFlight::new(&upstream.gauge)
    }

    #[test]
    fn set_remove_and_round_robin() {
        let routes = Routes::default();
        let (a, b) = (addr("10.0.0.2:5000"), addr("10.0.0.3:5000"));
        assert!(routes.route("hello.localhost").is_none());
        routes.set("Hello.localhost", vec![a, b]);
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&routes, "hello.localhost").unwrap())
            .collect();
        assert_eq!(picks, vec![a, b, a, b]);
        routes.set("hello.localhost", vec![b]);
        assert_eq!(routes.get("HELLO.localhost"), vec![b]);
        // Empty keeps the host known (503, not 404).
        routes.set("hello.localhost", Vec::<Target>::new());
        assert!(routes.route("hello.localhost").is_some());
        assert_eq!(pick(&routes, "hello.localhost"), None);
        routes.remove("hello.localhost");
        assert!(routes.route("hello.localhost").is_none());
        assert_eq!(routes.stats("hello.localhost"), None);
    }

    #[test]
    fn down_upstreams_are_skipped_until_set_again() {
        let routes = Routes::default();
        let (a, b) = (addr("10.0.0.2:5000"), addr("10.0.0.3:5000"));
        routes.set("app.localhost", vec![a, b]);
        let route = routes.route("app.localhost").unwrap();
        route.upstreams[0]
            .down_until
            .store(u64::MAX, Ordering::Relaxed);
        let picks: Vec<_> = (0..3)
            .map(|_| pick(&routes, "app.localhost").unwrap())
            .collect();
        assert_eq!(picks, vec![b, b, b]);
        // All down: still one to try rather than none; avoiding the only other leaves none.
        route.upstreams[1]
            .down_until
            .store(u64::MAX, Ordering::Relaxed);
        assert!(route.pick(|| routes.now_ms(), None).is_some());
        assert_eq!(
            route.pick(|| routes.now_ms(), Some(a)).map(|u| u.addr),
            Some(b)
        );
        routes.set("app.localhost", vec![a, b]);
        let picks: Vec<_> = (0..2)
            .map(|_| pick(&routes, "app.localhost").unwrap())
            .collect();
        assert_eq!(picks, vec![a, b]);
    }

    #[test]
    fn stats_survive_set_of_the_same_host() {
        let routes = Routes::default();
        routes.set("app.localhost", vec![addr("10.0.0.2:5000")]);
        let state = routes.route("app.localhost").unwrap().state.clone();
        for status in [200, 201, 304, 404, 502, 101] {
            state.record(StatusCode::from_u16(status).unwrap());
        }
        routes.set("app.localhost", vec![addr("10.0.0.3:5000")]);
        routes.set("app.localhost", Vec::<Target>::new());
        let expected = HostStats {
            requests: 6,
            informational: 1,
            success: 2,
            redirection: 1,
            client_error: 1,
            server_error: 1,
        };
        assert_eq!(routes.stats("APP.localhost"), Some(expected));
    }

    #[tokio::test]
    async fn in_flight_counts_per_address_across_sets_and_wait_idle_wakes() {
        let routes = Arc::new(Routes::default());
        let a = addr("10.0.0.2:5000");
        routes.set("app.localhost", vec![a]);
        let first = start_request(&routes, "app.localhost", a);
        let second = start_request(&routes, "app.localhost", a);
        // The deploy swaps the route away; the requests still count until they end.
        routes.set("app.localhost", vec![addr("10.0.0.3:5000")]);
        assert_eq!(routes.in_flight(a), 2);
        assert!(!routes.wait_idle(a, Duration::from_millis(50)).await);
        let waiter = tokio::spawn({
            let routes = routes.clone();
            async move { routes.wait_idle(a, Duration::from_secs(5)).await }
        });
        drop(first);
        assert_eq!(routes.in_flight(a), 1);
        drop(second);
        assert!(waiter.await.unwrap());
        assert_eq!(routes.in_flight(a), 0);
        assert!(routes.wait_idle(addr("10.9.9.9:1"), Duration::ZERO).await);
    }

    #[test]
    fn request_host_table() {
        let cases: [(&str, Option<&str>, Option<&str>); 12] = [
            ("/", Some("App.Localhost"), Some("app.localhost")),
            ("/", Some("app.localhost:8080"), Some("app.localhost")),
            ("/", Some("[::1]:8080"), Some("[::1]")),
            ("/", Some("[::1]"), Some("[::1]")),
            ("/", None, None),
            ("/", Some("bad host"), None),
            ("/", Some(":8080"), None),
            ("/", Some("app.localhost:80x"), None),
            ("/", Some("a:1:2"), None),
            ("/", Some("[::1"), None),
            ("/", Some("[::1]x"), None),
            (
                "http://Other.localhost/x",
                Some("app.localhost"),
                Some("other.localhost"),
            ),
        ];
        for (target, host, expected) in cases {
            let mut headers = HeaderMap::new();
            if let Some(host) = host {
                headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            }
            let uri: Uri = target.parse().unwrap();
            assert_eq!(
                request_host(&uri, &headers).as_deref(),
                expected,
                "{target} {host:?}"
            );
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<String> {
        let mut names: Vec<_> = map.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn strip_hop_by_hop_table() {
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str]);
        let cases: [Case; 5] = [
            (
                &[
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("x-app", "1"),
                ],
                false,
                &["x-app"],
            ),
            (
                &[
                    ("connection", "close, X-Secret"),
                    ("x-secret", "s"),
                    ("x-app", "1"),
                ],
                false,
                &["x-app"],
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("te", "trailers"),
                    ("trailer", "x"),
                    ("proxy-authorization", "p"),
                    ("proxy-connection", "keep-alive"),
                    ("upgrade", "websocket"),
                    ("content-type", "text/plain"),
                ],
                false,
                &["content-type", "trailer"],
            ),
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &["connection", "upgrade"],
            ),
            (
                &[
                    ("connection", "x-a"),
                    ("connection", "x-b"),
                    ("x-a", "1"),
                    ("x-b", "2"),
                ],
                false,
                &[],
            ),
        ];
        for (input, upgrade, kept) in cases {
            let mut map = headers(input);
            strip_hop_by_hop(&mut map, upgrade);
            assert_eq!(names(&map), kept, "{input:?}");
            if upgrade {
                assert_eq!(map[header::CONNECTION], "upgrade");
                assert_eq!(map[header::UPGRADE], "websocket");
            }
        }
    }

    #[test]
    fn forwarding_headers_table() {
        let conn = Conn::new("192.0.2.7".parse().unwrap(), 8080, false);
        let cases: [(&[(&str, &str)], &str); 3] = [
            (&[], "192.0.2.7"),
            (
                &[("x-forwarded-for", "203.0.113.1")],
                "203.0.113.1, 192.0.2.7",
            ),
            (
                &[
                    ("x-forwarded-for", "203.0.113.1"),
                    ("x-forwarded-for", "10.1.1.1"),
                ],
                "203.0.113.1, 10.1.1.1, 192.0.2.7",
            ),
        ];
        for (input, forwarded_for) in cases {
            let mut map = headers(input);
            map.insert(header::FORWARDED, HeaderValue::from_static("for=evil"));
            map.insert(X_REAL_IP, HeaderValue::from_static("6.6.6.6"));
            map.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            let host = Some(HeaderValue::from_static("app.localhost:8080"));
            set_forwarding(&mut map, &conn, host, &HeaderValue::from_static("id-1"));
            assert_eq!(map.get_all(X_FORWARDED_FOR).iter().count(), 1);
            assert_eq!(map[X_FORWARDED_FOR], forwarded_for);
            assert_eq!(map[X_REAL_IP], "192.0.2.7");
            assert_eq!(map[X_FORWARDED_PROTO], "http");
            assert_eq!(map[X_FORWARDED_HOST], "app.localhost:8080");
            assert_eq!(map[X_FORWARDED_PORT], "8080");
            assert_eq!(map[X_REQUEST_ID], "id-1");
            assert!(!map.contains_key(header::FORWARDED));
        }
    }

    #[test]
    fn request_id_table() {
        let cases: [(Option<&str>, bool); 5] = [
            (Some("abc-123_x.y"), true),
            (Some(""), false),
            (Some("has space"), false),
            (Some(&"a".repeat(129)), false),
            (None, false),
        ];
        for (sent, kept) in cases {
            let mut map = HeaderMap::new();
            if let Some(sent) = sent {
                map.insert(X_REQUEST_ID, HeaderValue::from_str(sent).unwrap());
            }
            let id = request_id(&map);
            assert_eq!(Some(id.to_str().unwrap()) == sent, kept, "{sent:?}");
            assert!(is_valid_request_id(id.as_bytes()));
        }
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
