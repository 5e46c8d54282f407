//! Speaking the Docker Registry HTTP API v2 to one registry for one pull, over `reqwest`:
//! which addresses berth connects to, TLS, the login (HTTP basic, or a bearer token from the
//! registry's token server), and how much of each answer it reads.
//!
//! The registry is untrusted, and so is everything its answers point at:
//! - Each host name is resolved once per pull ([`Pinned`]) and every connection of the pull
//!   goes to the addresses that one answer gave, so a name cannot pass the "not this machine"
//!   check with one address and be connected to at another (DNS rebinding). Redirects and
//!   token servers on other hosts go through the same check, IP literals included.
//! - Plain HTTP only when the registry itself is spoken to in plain HTTP (loopback); no proxy
//!   from the environment (it would connect elsewhere than the checked addresses).
//! - Every body berth buffers is read through [`read_limited`]: manifests and configs up to
//!   the caller's limit, token and error answers up to [`MAX_SMALL`]; blobs are handed over
//!   as a stream for the caller to bound.
//!
//! Owns HTTP to registries; must not parse images or store anything.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::{HeaderValue, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use thiserror::Error;

/// The largest token or error answer read from a registry or its token server.
pub const MAX_SMALL: usize = 64 << 10;

/// How long fetching one manifest or token may take in all.
const SMALL_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Resolves a host name to its addresses (the system's resolver outside tests).
pub(super) type Lookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Vec<IpAddr>>> + Send + Sync>;

/// What went wrong talking to a registry, before any meaning is given to its answers.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{host} is this machine (it is or resolves to a loopback or unspecified address)")]
    OwnHost { host: String },
    #[error("{url} is plain HTTP, which berth speaks only to a registry on loopback")]
    Insecure { url: String },
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect")]
    Connect(#[source] reqwest::Error),
    #[error("its TLS certificate is not one this machine trusts")]
    Untrusted(#[source] reqwest::Error),
    #[error("the connection failed")]
    Transfer(#[source] reqwest::Error),
    #[error("HTTP {code}{}", if errors.is_empty() { String::new() } else { format!(" ({})", errors.join(", ")) })]
    Status {
        code: u16,
        /// The registry's error codes (`MANIFEST_UNKNOWN`, …) from its error answer.
        errors: Vec<String>,
    },
    #[error("an answer of {size} bytes or more, over the {limit} bytes berth reads")]
    TooLarge { size: u64, limit: usize },
    #[error("the token server {realm} answered badly: {detail}")]
    Token { realm: String, detail: String },
}

impl RegistryError {
    /// The error as reqwest gives it, or the one berth's resolver or redirect policy raised
    /// inside it (which reqwest wraps).
    fn from_reqwest(e: reqwest::Error, connecting: bool) -> RegistryError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut certificate = false;
        while let Some(c) = cause {
            certificate |= matches!(tls_error(c), Some(rustls::Error::InvalidCertificate(_)));
            match c.downcast_ref::<RegistryError>() {
                Some(RegistryError::OwnHost { host }) => {
                    return RegistryError::OwnHost { host: host.clone() }
                }
                Some(RegistryError::Insecure { url }) => {
                    return RegistryError::Insecure { url: url.clone() }
                }
                _ => cause = c.source(),
            }
        }
        if certificate {
            RegistryError::Untrusted(e)
        } else if connecting && (e.is_connect() || e.is_timeout()) {
            RegistryError::Connect(e)
        } else {
            RegistryError::Transfer(e)
        }
    }
}

/// The rustls error inside `e`: rustls' errors come wrapped in io::Errors (one in another),
/// which are not their sources.
fn tls_error<'e>(mut e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        e = e.downcast_ref::<io::Error>()?.get_ref()?;
    }
}

/// Whether `ip` is this machine's own: loopback or unspecified (also as IPv4-mapped IPv6).
fn own(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

/// The system's resolver.
fn system_lookup() -> Lookup {
    Arc::new(|host: String| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    })
}

/// The resolver of one pull: each name is looked up once, checked, and that answer is the
/// only one any connection of the pull uses.
#[derive(Clone)]
struct Pinned {
    lookup: Lookup,
    allow_own: bool,
    answers: Arc<tokio::sync::Mutex<HashMap<String, Vec<IpAddr>>>>,
}

impl Pinned {
    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, RegistryError> {
        let mut answers = self.answers.lock().await;
        let ips = match answers.get(host) {
            Some(ips) => ips.clone(),
            None => {
                let ips = (self.lookup)(host.to_string()).await.map_err(|source| {
                    RegistryError::Resolve {
                        host: host.to_string(),
                        source,
                    }
                })?;
                answers.insert(host.to_string(), ips.clone());
                ips
            }
        };
        if ips.is_empty() {
            return Err(RegistryError::Resolve {
                host: host.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            });
        }
        if !self.allow_own && ips.iter().any(|ip| own(*ip)) {
            return Err(RegistryError::OwnHost {
                host: host.to_string(),
            });
        }
        Ok(ips)
    }
}

impl reqwest::dns::Resolve for Pinned {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (pinned, host) = (self.clone(), name.as_str().to_string());
        Box::pin(async move {
            let ips = pinned.addresses(&host).await?;
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Which URLs a pull may fetch besides its resolver's check: plain HTTP only when the
/// registry is spoken to in plain HTTP, and no IP literal of this machine unless allowed
/// (the resolver never sees those).
#[derive(Clone, Copy)]
struct Policy {
    plain_http: bool,
    allow_own: bool,
}

impl Policy {
    fn check(&self, url: &Url) -> Result<(), RegistryError> {
        match url.scheme() {
            "https" => {}
            "http" if self.plain_http => {}
            _ => {
                return Err(RegistryError::Insecure {
                    url: url.to_string(),
                })
            }
        }
        if !self.allow_own && ip_literal(url).is_some_and(own) {
            return Err(RegistryError::OwnHost {
                host: url.host_str().unwrap_or_default().to_string(),
            });
        }
        Ok(())
    }
}

/// The address `url`'s host names literally, if it does (reqwest resolves only names).
fn ip_literal(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// How berth proves itself to the registry, once it asked.
#[derive(Clone)]
enum Auth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// One registry, for one pull.
pub struct Registry {
    http: reqwest::Client,
    policy: Policy,
    pinned: Pinned,
    /// `http://host:port` or `https://host[:port]`
    base: Url,
    repository: String,
    login: Option<(String, String)>,
    auth: Mutex<Auth>,
}

impl Registry {
    /// The registry `host[:port]` (plain HTTP when `plain_http`), for the image `repository`.
    /// Its addresses may be this machine's own only when `allow_own`.
    pub fn new(
        host: &str,
        plain_http: bool,
        repository: &str,
        login: Option<(String, String)>,
        allow_own: bool,
    ) -> Result<Registry, RegistryError> {
        Registry::with_lookup(
            host,
            plain_http,
            repository,
            login,
            allow_own,
            system_lookup(),
        )
    }

    pub(super) fn with_lookup(
        host: &str,
        plain_http: bool,
        repository: &str,
        login: Option<(String, String)>,
        allow_own: bool,
        lookup: Lookup,
    ) -> Result<Registry, RegistryError> {
        let scheme = if plain_http { "http" } else { "https" };
        let base =
            Url::parse(&format!("{scheme}://{host}/")).map_err(|_| RegistryError::Resolve {
                host: host.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a host[:port]"),
            })?;
        let policy = Policy {
            plain_http,
            allow_own,
        };
        policy.check(&base)?;
        let pinned = Pinned {
            lookup,
            allow_own,
            answers: Default::default(),
        };
        // reqwest is built without its own crypto provider: berth uses ring throughout.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .dns_resolver(pinned.clone())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("more than 5 redirects");
                }
                match policy.check(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(RegistryError::Connect)?;
        Ok(Registry {
            http,
            policy,
            pinned,
            base,
            repository: repository.to_string(),
            login,
            auth: Mutex::new(Auth::Anonymous),
        })
    }

    /// Resolves the registry's name (once: every later connection uses this answer), so
    /// that a registry on this machine is refused before anything is sent.
    pub async fn resolve(&self) -> Result<(), RegistryError> {
        match (ip_literal(&self.base), self.base.host_str()) {
            (None, Some(name)) => self.pinned.addresses(name).await.map(drop),
            _ => Ok(()),
        }
    }

    /// The manifest `reference` (a tag or a digest), at most `limit` bytes, asking for the
    /// `accept` media types.
    pub async fn manifest(
        &self,
        reference: &str,
        accept: &[&str],
        limit: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let path = format!("v2/{}/manifests/{reference}", self.repository);
        let response = self.get(&path, &accept.join(", "), true).await?;
        read_limited(response, limit).await
    }

    /// The blob `digest`, its body not read yet: the caller bounds it (or uses
    /// [`read_limited`]).
    pub async fn blob(&self, digest: &str) -> Result<Response, RegistryError> {
        let path = format!("v2/{}/blobs/{digest}", self.repository);
        self.get(&path, "*/*", false).await
    }

    /// GET `path` below the registry's base URL, answering one login challenge; any answer
    /// but a success is an error. `small` fetches get [`SMALL_FETCH_TIMEOUT`] in all.
    async fn get(&self, path: &str, accept: &str, small: bool) -> Result<Response, RegistryError> {
        let url = self.base.join(path).map_err(|_| RegistryError::Status {
            code: 400,
            errors: vec![format!("bad path {path}")],
        })?;
        let mut answered = false;
        loop {
            let auth = self.auth.lock().expect("auth lock").clone();
            let mut request = self
                .http
                .get(url.clone())
                .header(ACCEPT, HeaderValue::from_str(accept).expect("media types"));
            if small {
                request = request.timeout(SMALL_FETCH_TIMEOUT);
            }
            request = match auth {
                Auth::Anonymous => request,
                Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
                Auth::Bearer(token) => request.bearer_auth(token),
            };
            let response = request
                .send()
                .await
                .map_err(|e| RegistryError::from_reqwest(e, true))?;
            if response.status() == StatusCode::UNAUTHORIZED && !answered {
                answered = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string);
                if let Some(auth) = self.answer(challenge.as_deref()).await? {
                    *self.auth.lock().expect("auth lock") = auth;
                    continue;
                }
            }
            return fail_unless_success(response).await;
        }
    }

    /// How to answer the registry's login challenge: a bearer token from its token server
    /// (with the login, if any, as HTTP basic), or the login as HTTP basic; `None` when
    /// there is nothing to answer with.
    async fn answer(&self, challenge: Option<&str>) -> Result<Option<Auth>, RegistryError> {
        let challenges = challenge
            .and_then(|c| http_auth::parse_challenges(c).ok())
            .unwrap_or_default();
        let bearer = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
        let Some(bearer) = bearer else {
            return Ok(self
                .login
                .as_ref()
                .map(|(user, password)| Auth::Basic(user.clone(), password.clone())));
        };
        let param = |name: &str| {
            bearer
                .params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        let Some(realm) = param("realm") else {
            return Ok(None);
        };
        let bad = |detail: String| RegistryError::Token {
            realm: realm.clone(),
            detail,
        };
        let mut url = Url::parse(&realm).map_err(|e| bad(format!("not a URL ({e})")))?;
        self.policy.check(&url)?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = param("service") {
                query.append_pair("service", &service);
            }
            let scope =
                param("scope").unwrap_or_else(|| format!("repository:{}:pull", self.repository));
            query.append_pair("scope", &scope);
        }
        let mut request = self.http.get(url).timeout(SMALL_FETCH_TIMEOUT);
        if let Some((user, password)) = &self.login {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::from_reqwest(e, true))?;
        let body = read_limited(fail_unless_success(response).await?, MAX_SMALL)
            .await
            .map_err(|e| match e {
                RegistryError::TooLarge { size, limit } => bad(format!(
                    "an answer of {size} bytes or more, over the {limit} berth reads"
                )),
                e => e,
            })?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token =
            serde_json::from_slice(&body).map_err(|e| bad(format!("not a token ({e})")))?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| bad("no `token` in its answer".into()))?;
        Ok(Some(Auth::Bearer(token)))
    }
}

/// `response` if it is a success; otherwise its status and the error codes of its body
/// (read no further than [`MAX_SMALL`]).
async fn fail_unless_success(response: Response) -> Result<Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Code>,
    }
    #[derive(serde::Deserialize)]
    struct Code {
        code: String,
    }
    let errors = match read_limited(response, MAX_SMALL).await {
        Ok(body) => serde_json::from_slice::<Envelope>(&body)
            .map(|e| e.errors.into_iter().map(|c| c.code).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Err(RegistryError::Status {
        code: status.as_u16(),
        errors,
    })
}

/// The body of `response`, refused as soon as it is known to be over `limit` bytes (by its
/// `Content-Length`, or once that much has arrived).
pub async fn read_limited(mut response: Response, limit: usize) -> Result<Vec<u8>, RegistryError> {
    if let Some(size) = response.content_length().filter(|&n| n > limit as u64) {
        return Err(RegistryError::TooLarge { size, limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| RegistryError::from_reqwest(e, false))?
    {
        if body.len() + chunk.len() > limit {
            return Err(RegistryError::TooLarge {
                size: (body.len() + chunk.len()) as u64,
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A real HTTP/1.1 server on a real socket for the tests of pulls: every answer closes its
/// connection (so each request makes a new one), and each request is recorded with how many
/// body bytes were written before the client hung up.
#[cfg(test)]
pub(super) mod test_server {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the server answers to one request.
    pub enum Answer {
        /// A status line and headers (each ending in CRLF), then this body.
        Full(String, Vec<u8>),
        /// A status line and headers, then spaces until [`ENDLESS`] bytes or the client goes.
        Endless(String),
    }

    /// How much an endless body sends at most (so a test that reads it all still ends).
    pub const ENDLESS: u64 = 256 << 20;

    /// One request served.
    #[derive(Debug, Clone)]
    pub struct Hit {
        pub path: String,
        /// Body bytes written.
        pub written: u64,
        /// Whether the client hung up before the whole body was written.
        pub cut_off: bool,
    }

    /// Serves `listener` with `answer(path)` until the test ends; returns the hits so far.
    pub fn serve(
        listener: TcpListener,
        answer: impl Fn(&str) -> Answer + Send + Sync + 'static,
    ) -> Arc<Mutex<Vec<Hit>>> {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let recorded = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (answer, hits) = (answer.clone(), recorded.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                    let (status, body, len) = match answer(&path) {
                        Answer::Full(status, body) => {
                            let len = body.len() as u64;
                            (status, Some(body), len)
                        }
                        Answer::Endless(status) => (status, None, ENDLESS),
                    };
                    let mut hit = Hit {
                        path,
                        written: 0,
                        cut_off: false,
                    };
                    let head = format!("{status}Connection: close\r\n\r\n");
                    let mut ok = conn.write_all(head.as_bytes()).await.is_ok();
                    let chunk = body.unwrap_or_else(|| vec![b' '; 64 << 10]);
                    while ok && hit.written < len {
                        let n = chunk.len().min((len - hit.written) as usize);
                        ok = conn.write_all(&chunk[..n]).await.is_ok();
                        hit.written += if ok { n as u64 } else { 0 };
                    }
                    hit.cut_off = !ok;
                    let _ = conn.shutdown().await;
                    hits.lock().unwrap().push(hit);
                });
            }
        });
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{serve, Answer};
    use super::*;
    use std::process::Command;

    /// A fake DNS, the one stand-in of these tests: a real name that answers differently on
    /// each query needs a DNS server of the test's own that the resolver asks, and `/etc/hosts`
    /// (which the HTTPS test binds over in its mount namespace) gives one fixed answer.
    /// `registry.test` answers 192.0.2.1 first and 127.0.0.1 after that; `blobs.test`
    /// answers 127.0.0.1. The counts are of queries per name.
    fn fake_rebinding_dns(counts: Arc<Mutex<HashMap<String, usize>>>) -> Lookup {
        Arc::new(move |host: String| {
            let n = {
                let mut counts = counts.lock().unwrap();
                let n = counts.entry(host.clone()).or_default();
                *n += 1;
                *n
            };
            Box::pin(async move {
                match (host.as_str(), n) {
                    ("registry.test", 1) => Ok(vec!["192.0.2.1".parse().unwrap()]),
                    ("registry.test" | "blobs.test", _) => Ok(vec!["127.0.0.1".parse().unwrap()]),
                    _ => Err(io::Error::new(io::ErrorKind::NotFound, host)),
                }
            })
        })
    }

    /// DNS rebinding: `registry.test` passes the check with a public address, then answers
    /// loopback. In a network namespace of the test's own, where 192.0.2.1 (a documentation
    /// address) is a local one, so nothing leaves it. Every request of the pull goes to the
    /// checked address; the loopback server sees none, also when the registry redirects to a
    /// name or a literal of loopback.
    #[test]
    fn a_name_is_resolved_once_and_only_its_checked_addresses_are_reached() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", "192.0.2.1/32", "dev", "lo"][..],
            ] {
                let status = Command::new("ip").args(args).status().expect("ip");
                assert!(status.success(), "ip {args:?}");
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(rebinding())
        })
        .join()
        .unwrap();
    }

    async fn rebinding() {
        let public = tokio::net::TcpListener::bind("192.0.2.1:0").await.unwrap();
        let port = public.local_addr().unwrap().port();
        let loopback = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let public_hits = serve(public, move |path| {
            let redirect = |to: String| {
                Answer::Full(
                    format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\n"),
                    Vec::new(),
                )
            };
            match path.rsplit('/').next().unwrap_or_default() {
                "sha256:aa" => redirect(format!("http://blobs.test:{port}/blob")),
                "sha256:bb" => redirect(format!("http://127.0.0.1:{port}/blob")),
                "sha256:cc" => redirect(format!("http://[::ffff:127.0.0.1]:{port}/blob")),
                _ => Answer::Full(
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n".into(),
                    b"public".to_vec(),
                ),
            }
        });
        let loopback_hits = serve(loopback, |_| {
            Answer::Full(
                "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n".into(),
                b"loopback".to_vec(),
            )
        });
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let registry = Registry::with_lookup(
            &format!("registry.test:{port}"),
            true,
            "team/app",
            None,
            false,
            fake_rebinding_dns(counts.clone()),
        )
        .unwrap();
        registry.resolve().await.unwrap();
        for _ in 0..3 {
            let body = registry.manifest("1", &["*/*"], 1024).await.unwrap();
            assert_eq!(body, b"public");
        }
        for (digest, host) in [
            ("sha256:aa", "blobs.test"),
            ("sha256:bb", "127.0.0.1"),
            ("sha256:cc", "[::ffff:7f00:1]"),
        ] {
            match registry.blob(digest).await {
                Err(RegistryError::OwnHost { host: got }) => assert_eq!(got, host),
                other => panic!("redirect to {host}: {other:?}"),
            }
        }
        assert_eq!(counts.lock().unwrap()["registry.test"], 1);
        assert_eq!(public_hits.lock().unwrap().len(), 3 + 3);
        assert!(loopback_hits.lock().unwrap().is_empty());

        // A name answering loopback from the start is refused before anything is sent.
        let own = Registry::with_lookup(
            "blobs.test",
            false,
            "team/app",
            None,
            false,
            fake_rebinding_dns(counts),
        )
        .unwrap();
        assert!(matches!(
            own.resolve().await,
            Err(RegistryError::OwnHost { host }) if host == "blobs.test"
        ));
        // HTTPS registries are never sent on to plain HTTP.
        let policy = Policy {
            plain_http: false,
            allow_own: true,
        };
        let http = Url::parse("http://registry.test/v2/").unwrap();
        assert!(matches!(
            policy.check(&http),
            Err(RegistryError::Insecure { .. })
        ));
    }
}
