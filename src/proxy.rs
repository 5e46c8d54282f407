//! The built-in HTTP reverse proxy and its route table. A route maps a Host to the live `web`
//! containers of an app; [`Routes::set`] swaps it atomically (ArcSwap), so a request sees either
//! the old upstreams or the new ones, never none. Must not touch the store or the runtime:
//! `deploy` tells it what to route.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The upstreams of one route, served round-robin.
#[derive(Debug, Default)]
struct Upstreams {
    addrs: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// Host → upstreams. Reads are lock-free; writers replace the whole map.
#[derive(Default)]
pub struct Routes {
    table: ArcSwap<HashMap<String, Arc<Upstreams>>>,
}

impl Routes {
    /// Points `host` at `addrs` (replacing what it pointed at), or removes it when `addrs` is empty.
    pub fn set(&self, host: &str, addrs: Vec<SocketAddr>) {
        let host = host.to_ascii_lowercase();
        self.table.rcu(|table| {
            let mut table = HashMap::clone(table);
            if addrs.is_empty() {
                table.remove(&host);
            } else {
                table.insert(
                    host.clone(),
                    Arc::new(Upstreams {
                        addrs: addrs.clone(),
                        next: 0.into(),
                    }),
                );
            }
            table
        });
    }

    /// The upstreams `host` points at now.
    pub fn get(&self, host: &str) -> Vec<SocketAddr> {
        self.table
            .load()
            .get(host)
            .map(|u| u.addrs.clone())
            .unwrap_or_default()
    }

    fn pick(&self, host: &str) -> Option<SocketAddr> {
        let table = self.table.load();
        let upstreams = table.get(host)?;
        let n = upstreams.next.fetch_add(1, Ordering::Relaxed);
        upstreams.addrs.get(n % upstreams.addrs.len()).copied()
    }
}

#[derive(Clone)]
struct Proxy {
    routes: Arc<Routes>,
    client: Client<HttpConnector, Body>,
}

/// Serves HTTP on `listener` until `shutdown` fires.
pub async fn run(listener: TcpListener, routes: Arc<Routes>, shutdown: CancellationToken) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let app = Router::new()
        .fallback(forward)
        .with_state(Proxy { routes, client });
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    if let Err(err) = served {
        warn!(%err, "proxy stopped");
    }
}

/// The Host of a request, lowercased, without a port.
fn request_host(req: &Request) -> Option<String> {
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    Some(host.to_ascii_lowercase())
}

async fn forward(
    State(proxy): State<Proxy>,
    axum::extract::ConnectInfo(client_addr): axum::extract::ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let Some(host) = request_host(&req) else {
        return (
            StatusCode::BAD_REQUEST,
            "berth: the request has no Host header\n",
        )
            .into_response();
    };
    let Some(upstream) = proxy.routes.pick(&host) else {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "berth: no app is served at {host} — check the app name and that it is deployed\n"
            ),
        )
            .into_response();
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("http://{upstream}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return (StatusCode::BAD_REQUEST, "berth: bad request path\n").into_response(),
    };
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    for hop in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(hop);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if let Ok(value) = HeaderValue::from_str(&client_addr.ip().to_string()) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match proxy.client.request(req).await {
        Ok(response) => response.map(Body::new),
        Err(err) => {
            debug!(%err, %upstream, %host, "upstream failed");
            (
                StatusCode::BAD_GATEWAY,
                format!("berth: the app at {host} did not answer\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_swap_and_round_robin() {
        let routes = Routes::default();
        let a: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.3:5000".parse().unwrap();
        assert_eq!(routes.pick("hello.localhost"), None);
        routes.set("Hello.localhost", vec![a, b]);
        let picks: Vec<_> = (0..4)
            .map(|_| routes.pick("hello.localhost").unwrap())
            .collect();
        assert_eq!(picks, vec![a, b, a, b]);
        routes.set("hello.localhost", vec![b]);
        assert_eq!(routes.get("hello.localhost"), vec![b]);
        routes.set("hello.localhost", vec![]);
        assert_eq!(routes.pick("hello.localhost"), None);
    }
}
