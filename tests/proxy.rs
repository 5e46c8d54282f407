//! The proxy against real upstreams: `proxy::run` on 127.0.0.1:0 in front of small HTTP,
//! raw-TCP and WebSocket servers these tests start on 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::get;
use axum::Router;
use berth::proxy::{self, ProxyConfig, Routes, Target};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

struct Proxy {
    addr: SocketAddr,
    routes: Arc<Routes>,
    shutdown: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn config() -> ProxyConfig {
    ProxyConfig {
        header_timeout: Duration::from_millis(500),
        upstream_timeout: Duration::from_millis(500),
        upstream_wait: Duration::from_millis(300),
        max_body: 1024,
        ..ProxyConfig::default()
    }
}

async fn start_proxy(config: ProxyConfig) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = Arc::new(Routes::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy::run(
        listener,
        routes.clone(),
        config,
        shutdown.clone(),
    ));
    Proxy {
        addr,
        routes,
        shutdown,
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// An upstream that answers every request (any method, any path) with `x-upstream: NAME` and the request's headers,
/// one `name: value` per line.
async fn echo(name: &'static str) -> SocketAddr {
    let answer = move |headers: HeaderMap| async move {
        let lines: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap()))
            .collect();
        ([("x-upstream", name)], lines)
    };
    serve(Router::new().fallback(answer)).await
}

/// An address nothing listens on: connections to it are refused.
async fn refused() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Sends one request on a fresh connection; returns the status, headers and whole body.
async fn send(proxy: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    let response = open(proxy, req).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

async fn open(proxy: SocketAddr, req: Request<Full<Bytes>>) -> Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

fn request(method: &str, host: &str, path: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
}

async fn get_from(proxy: SocketAddr, host: &str) -> (StatusCode, HeaderMap, String) {
    send(
        proxy,
        request("GET", host, "/").body(Full::default()).unwrap(),
    )
    .await
}

fn assert_berth_line(body: &str) {
    assert!(body.starts_with("berth: "), "{body:?}");
    assert_eq!(body.lines().count(), 1, "{body:?}");
}

/// Reads from a raw connection until `pattern` has arrived (or EOF), with a deadline.
async fn read_until(stream: &mut TcpStream, pattern: &str) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0; 4096];
        while !String::from_utf8_lossy(&seen).contains(pattern) {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap();
    String::from_utf8(seen).unwrap()
}

#[tokio::test]
async fn unknown_host_404_no_upstream_503_refused_502_slow_504() {
    let proxy = start_proxy(config()).await;
    let slow = serve(Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        }),
    ))
    .await;
    proxy.routes.set("empty.localhost", Vec::<Target>::new());
    proxy.routes.set("refused.localhost", vec![refused().await]);
    proxy.routes.set("slow.localhost", vec![slow]);
    // An upstream to connect to from a network namespace that is gone (its container was
    // removed) is as unreachable as one that refuses.
    let gone = Target {
        addr: echo("gone").await,
        netns: Some("/run/berth-test-no-such-netns".into()),
    };
    proxy.routes.set("gone.localhost", [gone]);

    let cases = [
        ("nobody.localhost", StatusCode::NOT_FOUND),
        ("empty.localhost", StatusCode::SERVICE_UNAVAILABLE),
        ("refused.localhost", StatusCode::BAD_GATEWAY),
        ("gone.localhost", StatusCode::BAD_GATEWAY),
        ("slow.localhost", StatusCode::GATEWAY_TIMEOUT),
    ];
    for (host, expected) in cases {
        let started = Instant::now();
        let (status, headers, body) = get_from(proxy.addr, host).await;
        assert_eq!(status, expected, "{host}: {body}");
        assert_berth_line(&body);
        assert!(headers.contains_key("x-request-id"));
        assert!(started.elapsed() < Duration::from_secs(2), "{host}");
    }
    assert_eq!(
        proxy.routes.stats("empty.localhost").unwrap().server_error,
        1
    );
    assert_eq!(proxy.routes.stats("nobody.localhost"), None);

    // A removed host is unknown again.
    proxy.routes.remove("empty.localhost");
    let (status, _, _) = get_from(proxy.addr, "empty.localhost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_request_waits_for_an_upstream_to_be_set() {
    let proxy = start_proxy(ProxyConfig {
        upstream_wait: WAIT,
        ..config()
    })
    .await;
    proxy.routes.set("app.localhost", Vec::<Target>::new());
    let waiting = tokio::spawn(get_from(proxy.addr, "app.localhost"));
    let up = echo("up").await;
    proxy.routes.set("app.localhost", vec![up]);
    let (status, headers, _) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-upstream"], "up");
}

#[tokio::test]
async fn idempotent_requests_retry_on_another_upstream() {
    let proxy = start_proxy(config()).await;
    let (dead, good) = (refused().await, echo("good").await);

    // Round robin starts at the refusing upstream; a POST with a body is not retried.
    proxy.routes.set("app.localhost", vec![dead, good]);
    let post = request("POST", "app.localhost", "/upload")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let (status, _, body) = send(proxy.addr, post).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_berth_line(&body);

    // A GET is retried on the other upstream; the refusing one then leaves the rotation.
    proxy.routes.set("app.localhost", vec![dead, good]);
    for _ in 0..4 {
        let (status, headers, body) = get_from(proxy.addr, "app.localhost").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["x-upstream"], "good");
    }
    for method in ["PUT", "DELETE"] {
        proxy.routes.set("app.localhost", vec![dead, good]);
        let req = request(method, "app.localhost", "/")
            .body(Full::default())
            .unwrap();
        let (status, _, body) = send(proxy.addr, req).await;
        assert_eq!(status, StatusCode::OK, "{method}: {body}");
    }
}

#[tokio::test]
async fn round_robin_across_upstreams() {
    let proxy = start_proxy(config()).await;
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    proxy.routes.set("app.localhost", vec![a, b, c]);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (_, headers, _) = get_from(proxy.addr, "app.localhost").await;
        seen.push(headers["x-upstream"].to_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
    let stats = proxy.routes.stats("app.localhost").unwrap();
    assert_eq!((stats.requests, stats.success), (6, 6));
}

/// Upstream connections are kept alive and reused across requests from different clients: an
/// upstream answering with the number of the connection each request came on sees only one.
#[tokio::test]
async fn upstream_connections_are_pooled() {
    let proxy = start_proxy(config()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy
        .routes
        .set("app.localhost", vec![listener.local_addr().unwrap()]);
    tokio::spawn(async move {
        for number in 1.. {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                loop {
                    let head = read_until(&mut stream, "\r\n\r\n").await;
                    if !head.ends_with("\r\n\r\n") {
                        return;
                    }
                    let body = format!("connection {number}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    for _ in 0..5 {
        let (status, _, body) = get_from(proxy.addr, "app.localhost").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "connection 1"));
    }
}

/// Every way an upstream can frame a response body arrives whole (chunked with extensions and
/// trailers, until close, none for HEAD and 204, after a 100 Continue), and the connection is
/// reused after each one that leaves it open; one the upstream closed silently is not.
#[tokio::test]
async fn upstream_responses_of_every_framing_arrive_whole() {
    let proxy = start_proxy(config()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy
        .routes
        .set("app.localhost", vec![listener.local_addr().unwrap()]);
    tokio::spawn(async move {
        for number in 1.. {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                loop {
                    let head = read_until(&mut stream, "\r\n\r\n").await;
                    let Some(line) = head.lines().next().filter(|_| head.ends_with("\r\n\r\n"))
                    else {
                        return;
                    };
                    let c = format!("x-connection: {number}\r\n");
                    let answer = match line {
                        "GET /chunked HTTP/1.1" => format!(
                            "HTTP/1.1 200 OK\r\n{c}transfer-encoding: chunked\r\n\r\n\
                             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
                        ),
                        "HEAD /head HTTP/1.1" => {
                            format!("HTTP/1.1 200 OK\r\n{c}content-length: 5\r\n\r\n")
                        }
                        "GET /no-content HTTP/1.1" => format!("HTTP/1.1 204 No Content\r\n{c}\r\n"),
                        "GET /continue HTTP/1.1" => format!(
                            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n{c}content-length: 2\r\n\r\nok"
                        ),
                        "GET /close HTTP/1.1" => {
                            let answer = format!("HTTP/1.0 200 OK\r\n{c}\r\nuntil close");
                            stream.write_all(answer.as_bytes()).await.unwrap();
                            return;
                        }
                        "GET /silent-close HTTP/1.1" => {
                            let answer = format!("HTTP/1.1 200 OK\r\n{c}content-length: 3\r\n\r\nbye");
                            stream.write_all(answer.as_bytes()).await.unwrap();
                            return;
                        }
                        other => panic!("unexpected request {other:?}"),
                    };
                    stream.write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    let cases = [
        ("GET", "/chunked", StatusCode::OK, "hello world", "1"),
        ("HEAD", "/head", StatusCode::OK, "", "1"),
        ("GET", "/no-content", StatusCode::NO_CONTENT, "", "1"),
        ("GET", "/continue", StatusCode::OK, "ok", "1"),
        ("GET", "/close", StatusCode::OK, "until close", "1"),
        ("GET", "/chunked", StatusCode::OK, "hello world", "2"),
        ("GET", "/silent-close", StatusCode::OK, "bye", "2"),
        ("GET", "/chunked", StatusCode::OK, "hello world", "3"),
    ];
    for (method, path, status, body, connection) in cases {
        let req = request(method, "app.localhost", path)
            .body(Full::default())
            .unwrap();
        let answer = send(proxy.addr, req).await;
        assert_eq!(
            (answer.0, answer.2.as_str()),
            (status, body),
            "{method} {path}"
        );
        assert_eq!(answer.1["x-connection"], connection, "{method} {path}");
        assert!(!answer.1.contains_key("x-trailer"), "{method} {path}");
    }
}

/// A request body the client sends chunked reaches the upstream whole, chunked again.
#[tokio::test]
async fn chunked_request_bodies_are_forwarded() {
    let proxy = start_proxy(config()).await;
    let upstream = serve(
        Router::new().fallback(|headers: HeaderMap, body: Bytes| async move {
            let coding = headers.get("transfer-encoding").cloned();
            (
                [(
                    "x-coding",
                    coding.unwrap_or(HeaderValue::from_static("none")),
                )],
                body,
            )
        }),
    )
    .await;
    proxy.routes.set("app.localhost", vec![upstream]);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until(&mut client, "hello world").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-coding: chunked"), "{answer}");
}

/// Trailer fields go through both ways: a chunked request's to the upstream (told by `TE:
/// trailers` that its own will be passed on), the upstream's to a client that asked for them
/// with `TE: trailers`, as the response's `Trailer` header announces.
#[tokio::test]
async fn trailers_are_forwarded_both_ways() {
    let proxy = start_proxy(config()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy
        .routes
        .set("app.localhost", vec![listener.local_addr().unwrap()]);
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request = read_until(&mut stream, "0\r\nx-request-sum: 5\r\n\r\n").await;
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\ntrailer: x-checksum\r\ntransfer-encoding: chunked\r\n\r\n\
                  2\r\nok\r\n0\r\nx-checksum: abc\r\n\r\n",
            )
            .await
            .unwrap();
        request.to_ascii_lowercase()
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"POST /t HTTP/1.1\r\nHost: app.localhost\r\nTE: trailers\r\nTrailer: x-request-sum\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-request-sum: 5\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until(&mut client, "x-checksum: abc\r\n\r\n").await;
    let request = upstream.await.unwrap();
    assert!(request.contains("\r\nte: trailers\r\n"), "{request}");
    assert!(
        request.contains("\r\ntrailer: x-request-sum\r\n"),
        "{request}"
    );
    assert!(
        request.contains("hello\r\n0\r\nx-request-sum: 5\r\n\r\n"),
        "{request}"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\ntrailer: x-checksum\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("ok\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn plain_http_is_redirected_to_https_when_asked() {
    let proxy = start_proxy(config()).await;
    proxy.routes.set("app.localhost", vec![echo("app").await]);
    proxy.routes.redirect_https("app.localhost", Some(8443));
    let req = request("GET", "app.localhost", "/a/b?c=d")
        .body(Full::default())
        .unwrap();
    let (status, headers, body) = send(proxy.addr, req).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers["location"], "https://app.localhost:8443/a/b?c=d");
    assert_berth_line(&body);
    proxy.routes.redirect_https("app.localhost", Some(443));
    let (_, headers, _) = get_from(proxy.addr, "app.localhost").await;
    assert_eq!(headers["location"], "https://app.localhost/");
    proxy.routes.redirect_https("app.localhost", None);
    assert_eq!(
        get_from(proxy.addr, "app.localhost").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn forwarding_headers_replace_client_copies_and_append_to_x_forwarded_for() {
    let proxy = start_proxy(config()).await;
    proxy.routes.set("app.localhost", vec![echo("app").await]);
    let req = request("GET", "App.localhost", "/")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-port", "1")
        .header("x-real-ip", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "client-id-1")
        .body(Full::default())
        .unwrap();
    let (status, headers, body) = send(proxy.addr, req).await;
    assert_eq!(status, StatusCode::OK);
    let port = proxy.addr.port();
    for line in [
        "x-forwarded-for: 203.0.113.9, 127.0.0.1\n".to_owned(),
        "x-forwarded-proto: http\n".to_owned(),
        "x-forwarded-host: App.localhost\n".to_owned(),
        format!("x-forwarded-port: {port}\n"),
        "x-real-ip: 127.0.0.1\n".to_owned(),
        "x-request-id: client-id-1\n".to_owned(),
    ] {
        assert!(body.contains(&line), "{line:?} not in\n{body}");
    }
    for gone in ["forwarded:", "evil.example", "6.6.6.6", "https"] {
        assert!(!body.contains(gone), "{gone:?} in\n{body}");
    }
    assert_eq!(headers["x-request-id"], "client-id-1");

    // An unusable id is replaced by berth's own, the same one upstream and back.
    let req = request("GET", "app.localhost", "/")
        .header("x-request-id", "not valid!")
        .body(Full::default())
        .unwrap();
    let (_, headers, body) = send(proxy.addr, req).await;
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(body.contains(&format!("x-request-id: {id}\n")), "{body}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let proxy = start_proxy(config()).await;
    proxy.routes.set("app.localhost", vec![echo("app").await]);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nConnection: keep-alive, X-Hop\r\n\
              X-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: deflate, trailers\r\n\
              Proxy-Authorization: Basic eA==\r\nX-End: kept\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until(&mut client, "x-end: kept\n")
        .await
        .to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    for gone in [
        "x-hop",
        "keep-alive",
        "deflate",
        "proxy-authorization",
        "\nconnection:",
    ] {
        assert!(!answer.contains(gone), "{gone:?} in\n{answer}");
    }
    // TE is the client's word to berth; berth tells the upstream it passes trailers on.
    assert!(answer.contains("\nte: trailers\n"), "{answer}");

    // An upstream's `Connection: close` and what it names stay between berth and the upstream.
    let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy
        .routes
        .set("raw.localhost", vec![raw.local_addr().unwrap()]);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = raw.accept().await.unwrap();
            read_until(&mut stream, "\r\n\r\n").await;
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Internal\r\n\
                      X-Internal: 1\r\nKeep-Alive: timeout=5\r\nX-App: yes\r\n\r\nok",
                )
                .await
                .unwrap();
        }
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        // The second request on the same connection proves berth kept it open.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut client, "\r\n\r\nok").await.to_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-app: yes"), "{answer}");
        for gone in ["connection:", "x-internal", "keep-alive"] {
            assert!(!answer.contains(gone), "{gone:?} in\n{answer}");
        }
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let proxy = start_proxy(config()).await;
    proxy.routes.set("app.localhost", vec![echo("app").await]);
    let small = request("POST", "app.localhost", "/upload")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    assert_eq!(send(proxy.addr, small).await.0, StatusCode::OK);
    let large = request("POST", "app.localhost", "/upload")
        .body(Full::new(Bytes::from(vec![b'x'; 2000])))
        .unwrap();
    let (status, _, body) = send(proxy.addr, large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_berth_line(&body);

    // Without a Content-Length the limit is found while streaming.
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    client.write_all(chunked.as_bytes()).await.unwrap();
    let answer = read_until(&mut client, "\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn a_slowloris_client_is_closed_within_the_header_timeout() {
    let proxy = start_proxy(config()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    client.write_all(b"GET / HT").await.unwrap();
    let mut buf = [0; 1024];
    // hyper may answer 408 before closing; either way the connection ends.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after {WAIT:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

type WebSocket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket upstream on 127.0.0.1 that hands its first connection to `serve`.
async fn websocket_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(tokio_tungstenite::accept_async(stream).await.unwrap()).await;
    });
    addr
}

/// A WebSocket client through the proxy to `ws://ws.localhost/`, after one echoed message.
async fn websocket_client(proxy: SocketAddr, text: &str) -> WebSocket {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://ws.localhost/chat", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert_eq!(echoed.unwrap().unwrap(), Message::text(text));
    ws
}

/// Waits for the end of `ws` (a close frame, an error or the stream's end; not a message).
async fn websocket_ends(ws: &mut WebSocket, what: &str) {
    let ended = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap_or_else(|_| panic!("the client's socket stayed open after {what}"));
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
}

#[tokio::test]
async fn websocket_round_trip_counts_in_flight_while_open() {
    let proxy = start_proxy(config()).await;
    let upstream = websocket_upstream(|mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            if message.is_text() {
                ws.send(message).await.unwrap();
            }
        }
    })
    .await;
    proxy.routes.set("ws.localhost", vec![upstream]);
    let mut ws = websocket_client(proxy.addr, "hello").await;
    assert_eq!(proxy.routes.in_flight(upstream), 1);
    ws.send(Message::text("again")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert_eq!(echoed.unwrap().unwrap(), Message::text("again"));
    assert_eq!(proxy.routes.in_flight(upstream), 1);
    assert!(
        !proxy
            .routes
            .wait_idle(upstream, Duration::from_millis(100))
            .await
    );
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(proxy.routes.wait_idle(upstream, WAIT).await);
    assert_eq!(proxy.routes.stats("ws.localhost").unwrap().informational, 1);
}

#[tokio::test]
async fn an_app_that_goes_away_closes_the_websocket() {
    let proxy = start_proxy(config()).await;
    // Answers one message, then the app stops: its connection ends without a close frame.
    let upstream = websocket_upstream(|mut ws| async move {
        if let Some(Ok(message)) = ws.next().await {
            ws.send(message).await.unwrap();
        }
    })
    .await;
    proxy.routes.set("ws.localhost", vec![upstream]);
    let mut ws = websocket_client(proxy.addr, "bye").await;
    websocket_ends(&mut ws, "the app went away").await;
    assert!(proxy.routes.wait_idle(upstream, WAIT).await);
}

#[tokio::test]
async fn disconnecting_an_upstream_closes_its_websockets() {
    let proxy = start_proxy(config()).await;
    let (closed_tx, closed_rx) = oneshot::channel();
    // An upstream that never closes by itself (as one whose close is lost).
    let upstream = websocket_upstream(|mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            ws.send(message).await.unwrap();
        }
        let _ = closed_tx.send(());
    })
    .await;
    proxy.routes.set("ws.localhost", vec![upstream]);
    let mut ws = websocket_client(proxy.addr, "hi").await;
    proxy.routes.set("ws.localhost", Vec::<Target>::new());
    proxy.routes.disconnect(upstream);
    websocket_ends(&mut ws, "its upstream was disconnected").await;
    tokio::time::timeout(WAIT, closed_rx)
        .await
        .expect("the upstream side stayed open")
        .unwrap();
    assert_eq!(proxy.routes.in_flight(upstream), 0);
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let proxy = start_proxy(config()).await;
    let (streams_tx, mut streams) = mpsc::channel::<futures::channel::mpsc::Sender<Bytes>>(1);
    let upstream = serve(
        Router::new()
            .route(
                "/events",
                get(|State(streams_tx): State<mpsc::Sender<_>>| async move {
                    let (events, rx) = futures::channel::mpsc::channel::<Bytes>(8);
                    streams_tx.send(events).await.unwrap();
                    (
                        [("content-type", "text/event-stream")],
                        Body::from_stream(rx.map(Ok::<_, std::convert::Infallible>)),
                    )
                }),
            )
            .with_state(streams_tx),
    )
    .await;
    proxy.routes.set("sse.localhost", vec![upstream]);
    let req = request("GET", "sse.localhost", "/events")
        .body(Full::default())
        .unwrap();
    let response = open(proxy.addr, req).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut events = streams.recv().await.unwrap();
    for n in 1..=3 {
        let event = format!("data: {n}\n\n");
        events.send(Bytes::from(event.clone())).await.unwrap();
        let frame = tokio::time::timeout(WAIT, body.frame()).await;
        let frame = frame.expect("event held back").unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), event);
        assert_eq!(proxy.routes.in_flight(upstream), 1);
    }
    drop(events);
    assert!(tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .is_none());
    assert!(proxy.routes.wait_idle(upstream, WAIT).await);

    // A stream still open when its upstream is disconnected (the end of a drain) ends cleanly,
    // with its last chunk, not with a broken connection.
    let req = request("GET", "sse.localhost", "/events")
        .body(Full::default())
        .unwrap();
    let mut body = open(proxy.addr, req).await.into_body();
    let mut events = streams.recv().await.unwrap();
    events.send(Bytes::from("data: 4\n\n")).await.unwrap();
    let frame = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "data: 4\n\n");
    proxy.routes.disconnect(upstream);
    let end = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the stream stayed open after its upstream was disconnected");
    assert!(end.is_none(), "the stream broke instead of ending: {end:?}");
    assert!(proxy.routes.wait_idle(upstream, WAIT).await);
    drop(events);
}

#[tokio::test]
async fn wait_idle_returns_once_a_slow_request_finished() {
    let proxy = start_proxy(config()).await;
    let (arrived_tx, mut arrived) = mpsc::channel::<oneshot::Sender<()>>(1);
    let upstream = serve(
        Router::new()
            .route(
                "/",
                get(|State(arrived): State<mpsc::Sender<_>>| async move {
                    let (release, released) = oneshot::channel();
                    arrived.send(release).await.unwrap();
                    released.await.unwrap();
                    "done"
                }),
            )
            .with_state(arrived_tx),
    )
    .await;
    proxy.routes.set("app.localhost", vec![upstream]);
    let request = tokio::spawn(get_from(proxy.addr, "app.localhost"));
    let release = arrived.recv().await.unwrap();
    assert_eq!(proxy.routes.in_flight(upstream), 1);
    // A deploy swaps the route away, then drains the old upstream.
    proxy.routes.set("app.localhost", Vec::<Target>::new());
    assert!(
        !proxy
            .routes
            .wait_idle(upstream, Duration::from_millis(100))
            .await
    );
    let routes = proxy.routes.clone();
    let drained = tokio::spawn(async move { routes.wait_idle(upstream, WAIT).await });
    release.send(()).unwrap();
    let (status, _, body) = request.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
    assert!(drained.await.unwrap());
    assert_eq!(proxy.routes.in_flight(upstream), 0);
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let proxy = start_proxy(ProxyConfig {
        max_connections: 1,
        ..config()
    })
    .await;
    proxy.routes.set("app.localhost", vec![echo("app").await]);
    let ask = b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n";
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(ask).await.unwrap();
    assert!(read_until(&mut first, "x-upstream")
        .await
        .starts_with("HTTP/1.1 200"));

    // The first connection stays open (keep-alive), so the second is not served yet.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(ask).await.unwrap();
    let mut buf = [0; 64];
    let early = tokio::time::timeout(Duration::from_millis(200), second.read(&mut buf)).await;
    assert!(early.is_err(), "served over the cap");
    drop(first);
    assert!(read_until(&mut second, "x-upstream")
        .await
        .starts_with("HTTP/1.1 200"));
}

/// Collects what a tracing subscriber writes, and wakes whoever waits for a line.
#[derive(Clone, Default)]
struct LogBuffer(Arc<(std::sync::Mutex<String>, tokio::sync::Notify)>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
             .0
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(data));
        self.0 .1.notify_waiters();
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// The access-log line that contains `needle`, once it was written.
    async fn access_line(&self, needle: &str) -> String {
        let find = || {
            let text = self.0 .0.lock().unwrap();
            let line = text
                .lines()
                .find(|l| l.contains("berth::access") && l.contains(needle));
            line.map(str::to_owned)
        };
        tokio::time::timeout(WAIT, async {
            loop {
                let written = self.0 .1.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                if let Some(line) = find() {
                    return line;
                }
                written.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no access line with {needle}"))
    }
}

#[tokio::test]
async fn one_access_log_line_per_request() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Global: a thread-local default is not reliably seen while other tests log on their
    // threads. Their lines land here too; the hosts below are this test's own.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let proxy = start_proxy(config()).await;
    let upstream = echo("app").await;
    proxy.routes.set("log.localhost", vec![upstream]);
    let req = request("GET", "log.localhost", "/some/path?q=secret")
        .header("x-request-id", "log-me-1")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(proxy.addr, req).await.0, StatusCode::OK);
    let (status, _, _) = get_from(proxy.addr, "nolog.localhost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let line = logs.access_line("host=log.localhost").await;
    for field in [
        "method=GET",
        "path=\"/some/path\"",
        "status=200",
        "ms=",
        &format!("upstream={upstream}"),
        "request_id=\"log-me-1\"",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    assert!(!line.contains("secret"), "{line}");
    let line = logs.access_line("host=nolog.localhost").await;
    assert!(
        line.contains("status=404") && line.contains("upstream=-"),
        "{line}"
    );
    let text = logs.0 .0.lock().unwrap().clone();
    let ours = text
        .lines()
        .filter(|l| l.contains("log.localhost") && l.contains("berth::access"));
    assert_eq!(ours.count(), 2, "{text}");
}

#[tokio::test]
async fn a_client_that_goes_away_stops_counting_in_flight() {
    let proxy = start_proxy(config()).await;
    let (arrived_tx, mut arrived) = mpsc::channel::<()>(1);
    let upstream = serve(
        Router::new()
            .route(
                "/",
                get(|State(arrived): State<mpsc::Sender<()>>| async move {
                    arrived.send(()).await.unwrap();
                    std::future::pending::<()>().await
                }),
            )
            .with_state(arrived_tx),
    )
    .await;
    proxy.routes.set("app.localhost", vec![upstream]);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .unwrap();
    arrived.recv().await.unwrap();
    assert_eq!(proxy.routes.in_flight(upstream), 1);
    drop(client);
    assert!(proxy.routes.wait_idle(upstream, WAIT).await);
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let proxy = start_proxy(ProxyConfig {
        body_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let upstream =
        serve(Router::new().fallback(|body: Bytes| async move { body.len().to_string() })).await;
    proxy.routes.set("app.localhost", vec![upstream]);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    client
        .write_all(
            b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 100\r\n\r\nonly ten..",
        )
        .await
        .unwrap();
    let answer = read_until(&mut client, "\r\n\r\nberth: ").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// An upstream that answers before it has read the request body (a 413 of its own, say) and
/// closes gets its answer to the client, not a 502; the client's `Expect: 100-continue` is
/// answered by berth and not sent on.
#[tokio::test]
async fn an_answer_before_the_whole_body_is_forwarded() {
    let mut config = config();
    config.max_body = 64 << 20;
    let proxy = start_proxy(config).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy
        .routes
        .set("app.localhost", vec![listener.local_addr().unwrap()]);
    let upstream = tokio::spawn(async move {
        let mut heads = Vec::new();
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().await.unwrap();
            let head = read_until(&mut conn, "\r\n\r\n").await;
            conn.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n",
            )
            .await
            .unwrap();
            heads.push(head);
            // Closed without reading the body.
        }
        heads
    });
    for expect in [false, true] {
        let mut req = request("POST", "app.localhost", "/upload");
        if expect {
            req = req.header("expect", "100-continue");
        }
        let big = req
            .body(Full::new(Bytes::from(vec![b'x'; 8 << 20])))
            .unwrap();
        let (status, _, body) = send(proxy.addr, big).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "too big\n"),
            "expect: {expect}"
        );
    }
    let heads = upstream.await.unwrap();
    assert!(
        heads
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("expect:")),
        "{heads:?}"
    );
}
