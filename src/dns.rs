//! The DNS stub of berth's containers, like Docker's embedded DNS: every container's
//! `/etc/resolv.conf` names the bridge's gateway, where `berth server` listens on port 53 (UDP
//! and TCP) and relays each query unchanged to the upstream resolvers, answering with the
//! first answer it gets (the next upstream is asked when one times out or fails; SERVFAIL when
//! all did). The upstreams are the `nameserver` lines of the host's `/etc/resolv.conf` (a
//! loopback stub such as systemd-resolved's 127.0.0.53 included: berth runs on the host) or
//! `--dns`; containers get the host's `search`, `domain` and `options` lines, not its name
//! servers, which they might not reach.
//!
//! Owns reading the host's resolv.conf, writing the containers' one ([`write_resolv_conf`]),
//! and the forwarder ([`Forwarder`]) with the bounds on what containers make it hold
//! ([`Limits`], [`MAX_QUERY`], [`MAX_UDP`]). Must not look into or change answers (it reads
//! only a message's 12-byte header and the extent of its question, to match an answer to its
//! query and to say SERVFAIL), nor decide which containers may ask: the firewall does (the
//! queries of a container without egress are rejected before they reach the forwarder).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// The host's resolver configuration.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The port DNS is served on.
pub const PORT: u16 = 53;
/// The largest query relayed, over UDP or TCP: one question and its EDNS options take a few
/// hundred bytes; anything longer is dropped (UDP) or ends its connection (TCP).
pub const MAX_QUERY: usize = 4096;
/// The largest UDP answer relayed; a longer one is answered with an empty truncated reply
/// (the TC bit), so the client asks again over TCP, where answers go up to 65535 bytes.
pub const MAX_UDP: usize = 4096;

#[derive(Debug, Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {addr} ({proto}) — berth answers its containers' DNS queries there; is another DNS server (dnsmasq?) bound to port {PORT} on all addresses?")]
    Listen {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "--dns {0:?} is not a list of addresses like 192.0.2.53,192.0.2.54:5353,[2001:db8::53]"
    )]
    BadUpstreams(String),
    #[error("cannot read the host's resolver configuration {path}")]
    ReadHost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the containers' resolver configuration {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What berth takes from the host's resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostResolvConf {
    /// Its `nameserver` lines, port 53 (scoped IPv6 addresses such as `fe80::1%eth0` left
    /// out: a socket address cannot carry the interface's name).
    pub nameservers: Vec<SocketAddr>,
    /// Its `search`, `domain` and `options` lines, as they are.
    pub lines: Vec<String>,
}

impl HostResolvConf {
    /// Reads `path`; a missing file is an empty one (glibc's reading too).
    pub fn read(path: &Path) -> Result<Self, DnsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(DnsError::ReadHost {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines().map(str::trim) {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => match words.next().map(str::parse::<IpAddr>) {
                    Some(Ok(ip)) => conf.nameservers.push(SocketAddr::new(ip, PORT)),
                    _ => warn!(line, "a name server berth cannot relay to; left out"),
                },
                Some("search" | "domain" | "options") => conf.lines.push(line.to_string()),
                _ => {}
            }
        }
        conf
    }

    /// The servers the host's own programs ask: its name servers, or, with none, 127.0.0.1
    /// (glibc's default).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        if self.nameservers.is_empty() {
            vec![SocketAddr::from((Ipv4Addr::LOCALHOST, PORT))]
        } else {
            self.nameservers.clone()
        }
    }
}

/// Parses `--dns`: comma-separated `ADDR[:PORT]` (an IPv6 address with a port in brackets).
pub fn parse_upstreams(list: &str) -> Result<Vec<SocketAddr>, DnsError> {
    let bad = || DnsError::BadUpstreams(list.to_string());
    let upstreams = list
        .split(',')
        .map(str::trim)
        .map(|item| {
            item.parse::<SocketAddr>()
                .or_else(|_| item.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, PORT)))
                .map_err(|_| bad())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(upstreams)
}

/// The resolv.conf of the containers: berth's stub at `gateway`, then the host's `search`,
/// `domain` and `options` lines.
pub fn resolv_conf(gateway: Ipv4Addr, host: &HostResolvConf) -> String {
    let mut text = format!(
        "# Written by berth: its DNS stub on the bridge relays queries to the host's resolvers.\n\
         nameserver {gateway}\n"
    );
    for line in &host.lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Writes the containers' resolv.conf to `path` (readable by every container user).
pub fn write_resolv_conf(
    path: &Path,
    gateway: Ipv4Addr,
    host: &HostResolvConf,
) -> Result<(), DnsError> {
    crate::paths::write_atomic(path, resolv_conf(gateway, host).as_bytes(), 0o644).map_err(
        |source| DnsError::Write {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// What the forwarder holds at most for the containers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// UDP queries being answered at once; more are dropped (the client asks again).
    pub in_flight: usize,
    /// How long one upstream gets to answer before the next is asked.
    pub timeout: Duration,
    /// TCP connections at once, each answered one query at a time; more are closed at once.
    pub connections: usize,
    /// How long a TCP connection may take to send its next query (or take its answer).
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            in_flight: 256,
            timeout: Duration::from_secs(2),
            connections: 64,
            idle: Duration::from_secs(10),
        }
    }
}

/// The DNS forwarder, listening on one address (UDP and TCP, the same port).
pub struct Forwarder {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    upstreams: Arc<[SocketAddr]>,
    limits: Limits,
}

impl Forwarder {
    /// Listens on `addr` (UDP, then TCP on the port UDP got: port 0 picks one for both).
    pub async fn bind(
        addr: SocketAddr,
        upstreams: Vec<SocketAddr>,
        limits: Limits,
    ) -> Result<Self, DnsError> {
        let listen = |proto| {
            move |source| DnsError::Listen {
                addr,
                proto,
                source,
            }
        };
        let udp = UdpSocket::bind(addr).await.map_err(listen("UDP"))?;
        let addr = udp.local_addr().map_err(listen("UDP"))?;
        let tcp = TcpListener::bind(addr).await.map_err(listen("TCP"))?;
        Ok(Self {
            udp: Arc::new(udp),
            tcp,
            upstreams: upstreams.into(),
            limits,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.udp
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Answers queries until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = info_span!("dns", addr = %self.addr());
        async move {
            info!(upstreams = ?self.upstreams, "DNS stub listening");
            tokio::select! {
                () = serve_udp(self.udp, self.upstreams.clone(), self.limits) => {}
                () = serve_tcp(self.tcp, self.upstreams, self.limits) => {}
                () = shutdown.cancelled() => {}
            }
        }
        .instrument(span)
        .await
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, upstreams: Arc<[SocketAddr]>, limits: Limits) {
    let in_flight = Arc::new(Semaphore::new(limits.in_flight));
    // One byte more than the largest query: a datagram that fills it was longer.
    let mut buf = vec![0; MAX_QUERY + 1];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                debug!(%err, "receiving a DNS query");
                continue;
            }
        };
        if len > MAX_QUERY || !is_query(&buf[..len]) {
            debug!(%client, len, "dropped a DNS datagram that is no query or too long");
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            debug!(%client, "dropped a DNS query: {} in flight", limits.in_flight);
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(
            async move {
                let answer = relay(&query, &upstreams, false, limits.timeout).await;
                // Sending does not wait: the query is no longer in flight.
                drop(permit);
                if let Some(answer) = answer {
                    if let Err(err) = socket.send_to(&answer, client).await {
                        debug!(%client, %err, "sending a DNS answer");
                    }
                }
            }
            .in_current_span(),
        );
    }
}

async fn serve_tcp(listener: TcpListener, upstreams: Arc<[SocketAddr]>, limits: Limits) {
    let connections = Arc::new(Semaphore::new(limits.connections));
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors or similar: back off instead of spinning.
                warn!(%err, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%client, "closed a DNS connection: {} open", limits.connections);
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(
            async move {
                if let Err(err) = converse(stream, &upstreams, limits).await {
                    debug!(%client, %err, "DNS connection ended");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// Answers the queries of one TCP connection in turn until it closes, sends a bad query or is
/// idle for `limits.idle`.
async fn converse(
    mut stream: TcpStream,
    upstreams: &[SocketAddr],
    limits: Limits,
) -> io::Result<()> {
    loop {
        let query =
            match tokio::time::timeout(limits.idle, read_framed(&mut stream, MAX_QUERY)).await {
                Err(_) | Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(query))) => query,
                Ok(Err(err)) => return Err(err),
            };
        if !is_query(&query) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a query"));
        }
        let Some(answer) = relay(&query, upstreams, true, limits.timeout).await else {
            return Ok(());
        };
        tokio::time::timeout(limits.idle, write_framed(&mut stream, &answer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client took no answer"))??;
    }
}

/// The first answer to `query` of `upstreams`, asked in turn (over TCP or UDP, as the client
/// asked), each for at most `timeout`; SERVFAIL when none answered. None for a query too
/// malformed to answer at all.
async fn relay(
    query: &[u8],
    upstreams: &[SocketAddr],
    over_tcp: bool,
    timeout: Duration,
) -> Option<Vec<u8>> {
    for &upstream in upstreams {
        let asked = async {
            if over_tcp {
                ask_tcp(query, upstream).await
            } else {
                ask_udp(query, upstream).await
            }
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(err)) => debug!(%upstream, %err, "upstream DNS server failed"),
            Err(_) => debug!(%upstream, "upstream DNS server did not answer in time"),
        }
    }
    empty_reply(query, Reply::ServFail)
}

async fn ask_udp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let any: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0)).await?;
    // Connected: only the upstream's datagrams arrive (and its ICMP errors, as errors).
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0; MAX_UDP + 1];
    loop {
        let len = socket.recv(&mut buf).await?;
        if !answers(query, &buf[..len]) {
            continue;
        }
        if len > MAX_UDP {
            return empty_reply(query, Reply::Truncated)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed query"));
        }
        buf.truncate(len);
        return Ok(buf);
    }
}

async fn ask_tcp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    match read_framed(&mut stream, u16::MAX.into()).await? {
        Some(answer) if answers(query, &answer) => Ok(answer),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an answer to another query",
        )),
        None => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

/// Reads one length-prefixed message (RFC 1035 4.2.2) of at most `max` bytes; None when the
/// stream ends before one starts.
async fn read_framed(stream: &mut TcpStream, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut prefix = [0; 2];
    match stream.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes, more than {max}"),
        ));
    }
    let mut message = vec![0; len];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// The size of a DNS message's header (RFC 1035 4.1.1).
const HEADER: usize = 12;
/// The QR bit (of the header's third byte): set in answers.
const QR: u8 = 0x80;

/// Whether `message` has a header and is a query, not an answer.
fn is_query(message: &[u8]) -> bool {
    message.len() >= HEADER && message[2] & QR == 0
}

/// Whether `answer` answers `query`: an answer with its id.
fn answers(query: &[u8], answer: &[u8]) -> bool {
    answer.len() >= HEADER && answer[2] & QR != 0 && answer[..2] == query[..2]
}

enum Reply {
    /// RCODE 2: the server could not answer.
    ServFail,
    /// No error, TC set: ask again over TCP.
    Truncated,
}

/// A reply to `query` without answer records: its id, opcode, RD bit and question, with
/// `reply`'s flags. None for a query whose question cannot be found (or with more than one,
/// which no server answers).
fn empty_reply(query: &[u8], reply: Reply) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut message = query[..end].to_vec();
    let (tc, rcode) = match reply {
        Reply::ServFail => (0, 2),
        Reply::Truncated => (0x02, 0),
    };
    // QR, the query's opcode, TC, the query's RD; RA, RCODE.
    message[2] = QR | (query[2] & 0x78) | tc | (query[2] & 0x01);
    message[3] = 0x80 | rcode;
    // No answer, authority or additional records.
    message[6..HEADER].fill(0);
    Some(message)
}

/// Where the question section of `query` ends (its one question, or none).
fn question_end(query: &[u8]) -> Option<usize> {
    match u16::from_be_bytes([*query.get(4)?, *query.get(5)?]) {
        0 => return Some(HEADER),
        1 => {}
        _ => return None,
    }
    let mut at = HEADER;
    loop {
        let len = *query.get(at)?;
        match len & 0xC0 {
            // The root label ends the name.
            0 if len == 0 => {
                at += 1;
                break;
            }
            0 => at += 1 + usize::from(len),
            // A compression pointer ends it too.
            0xC0 => {
                at += 2;
                break;
            }
            _ => return None,
        }
    }
    // QTYPE, QCLASS.
    let end = at + 4;
    (end <= query.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name`, type A, id `id`, with RD set.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    fn rcode(message: &[u8]) -> u8 {
        message[3] & 0x0F
    }

    #[test]
    fn host_resolv_conf_gives_upstreams_and_the_lines_containers_keep() {
        let host = HostResolvConf::parse(
            "# comment\nnameserver 127.0.0.53\nnameserver ::1\nnameserver fe80::1%eth0\n\
             search corp.example  lan\noptions edns0 trust-ad\nsortlist 10.0.0.0\n  domain x\n",
        );
        assert_eq!(
            host.upstreams(),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 219, 0, 1), &host)
                .lines()
                .skip(1)
                .collect::<Vec<_>>(),
            [
                "nameserver 10.219.0.1",
                "search corp.example  lan",
                "options edns0 trust-ad",
                "domain x"
            ]
        );
        assert_eq!(
            HostResolvConf::parse("search a\n").upstreams(),
            vec!["127.0.0.1:53".parse().unwrap()],
            "no name server: glibc asks 127.0.0.1"
        );
    }

    #[test]
    fn dns_flag_values() {
        assert_eq!(
            parse_upstreams("192.0.2.53, 192.0.2.54:5353,[2001:db8::53]:53,2001:db8::54").unwrap(),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "192.0.2.54:5353".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "[2001:db8::54]:53".parse().unwrap(),
            ]
        );
        for bad in ["", "dns.example", "192.0.2.53,", "192.0.2.53:99999"] {
            assert!(
                matches!(parse_upstreams(bad), Err(DnsError::BadUpstreams(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn empty_replies_keep_id_and_question() {
        let q = query(0xBEEF, "db.berth-test.internal");
        let fail = empty_reply(&q, Reply::ServFail).unwrap();
        assert_eq!(fail.len(), q.len());
        assert_eq!(&fail[..2], &[0xBE, 0xEF]);
        assert_eq!(fail[2], 0x81, "an answer, RD kept");
        assert_eq!(rcode(&fail), 2);
        assert_eq!(&fail[4..6], &[0, 1]);
        assert_eq!(&fail[HEADER..], &q[HEADER..]);
        let truncated = empty_reply(&q, Reply::Truncated).unwrap();
        assert_eq!((truncated[2], rcode(&truncated)), (0x83, 0));
        // With an EDNS record after the question: left out.
        let mut edns = q.clone();
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(empty_reply(&edns, Reply::ServFail).unwrap(), fail);
        // Cut short, or with a label type that does not exist: no reply.
        assert!(empty_reply(&q[..q.len() - 1], Reply::ServFail).is_none());
        let mut bad = q.clone();
        bad[HEADER] = 0x40;
        assert!(empty_reply(&bad, Reply::ServFail).is_none());
    }

    /// An upstream of the test's own on 127.0.0.1, UDP and TCP on one port: `tag` answers each
    /// query at once with the query, QR set and `tag` appended; a silent one reads nothing.
    async fn upstream(tag: Option<&'static [u8]>) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let answer = move |query: &[u8]| {
            let mut answer = query.to_vec();
            answer[2] |= QR;
            answer.extend_from_slice(tag.unwrap());
            answer
        };
        tokio::spawn(async move {
            let Some(_) = tag else {
                // Silent: holds its sockets, answers nothing (TCP connections complete in the
                // kernel's backlog and then wait).
                let _keep = (udp, tcp);
                std::future::pending::<()>().await;
                return;
            };
            let udp = async {
                let mut buf = vec![0; 65536];
                loop {
                    let (len, from) = udp.recv_from(&mut buf).await.unwrap();
                    udp.send_to(&answer(&buf[..len]), from).await.unwrap();
                }
            };
            let tcp = async {
                loop {
                    let (mut stream, _) = tcp.accept().await.unwrap();
                    tokio::spawn(async move {
                        while let Ok(Some(query)) = read_framed(&mut stream, 65535).await {
                            write_framed(&mut stream, &answer(&query)).await.unwrap();
                        }
                    });
                }
            };
            tokio::join!(udp, tcp);
        });
        addr
    }

    /// An address nothing listens on (its ICMP port-unreachable fails a query at once).
    async fn closed_port() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.local_addr().unwrap()
    }

    async fn forwarder(upstreams: Vec<SocketAddr>, limits: Limits) -> SocketAddr {
        let forwarder = Forwarder::bind("127.0.0.1:0".parse().unwrap(), upstreams, limits)
            .await
            .unwrap();
        let addr = forwarder.addr();
        tokio::spawn(forwarder.run(CancellationToken::new()));
        addr
    }

    async fn ask_over_udp(to: SocketAddr, query: &[u8]) -> Vec<u8> {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(query, to).await.unwrap();
        let mut buf = vec![0; 65536];
        let len = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        buf.truncate(len);
        buf
    }

    async fn ask_over_tcp(stream: &mut TcpStream, query: &[u8]) -> Option<Vec<u8>> {
        write_framed(stream, query).await.ok()?;
        tokio::time::timeout(Duration::from_secs(10), read_framed(stream, 65535))
            .await
            .expect("an answer or the end within 10 s")
            .ok()?
    }

    fn tagged(query: &[u8], tag: &[u8]) -> Vec<u8> {
        let mut answer = query.to_vec();
        answer[2] |= QR;
        answer.extend_from_slice(tag);
        answer
    }

    /// Queries reach the first upstream that answers, over UDP and over TCP, as they were:
    /// one that refuses is passed at once, a silent one after the timeout; with none
    /// answering, SERVFAIL after each had its timeout.
    #[tokio::test]
    async fn relays_to_the_next_upstream_on_failure_and_timeout() {
        let limits = Limits {
            timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (silent, refusing) = (upstream(None).await, closed_port().await);
        let answering = upstream(Some(b"answered")).await;
        let addr = forwarder(vec![refusing, silent, answering], limits).await;
        let q = query(7, "db.berth-test.internal");

        let started = std::time::Instant::now();
        assert_eq!(ask_over_udp(addr, &q).await, tagged(&q, b"answered"));
        let took = started.elapsed();
        assert!(
            took >= limits.timeout && took < limits.timeout * 2,
            "the silent upstream had its timeout, the refusing one none: {took:?}"
        );
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for id in [8, 9] {
            let q = query(id, "db.berth-test.internal");
            assert_eq!(
                ask_over_tcp(&mut stream, &q).await,
                Some(tagged(&q, b"answered"))
            );
        }

        let addr = forwarder(vec![silent, refusing], limits).await;
        let started = std::time::Instant::now();
        let answer = ask_over_udp(addr, &q).await;
        assert!(started.elapsed() >= limits.timeout);
        assert_eq!(rcode(&answer), 2, "SERVFAIL");
        assert_eq!(answer, empty_reply(&q, Reply::ServFail).unwrap());
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let answer = ask_over_tcp(&mut stream, &q).await.unwrap();
        assert_eq!(rcode(&answer), 2, "SERVFAIL over TCP");
    }

    /// At most `in_flight` UDP queries are held; the ones beyond are dropped, not queued: the
    /// upstream never sees them, and the next query after the held ones were answered is the
    /// next it sees. Garbage and answers sent to the stub are dropped too.
    #[tokio::test]
    async fn udp_queries_beyond_the_cap_are_dropped() {
        let held = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let limits = Limits {
            in_flight: 2,
            timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        let addr = forwarder(vec![held.local_addr().unwrap()], limits).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&[1, 2, 3], addr).await.unwrap();
        client
            .send_to(&tagged(&query(99, "x.test"), b""), addr)
            .await
            .unwrap();
        client.send_to(&vec![0; MAX_QUERY + 1], addr).await.unwrap();
        for id in 1..=5 {
            client.send_to(&query(id, "x.test"), addr).await.unwrap();
        }
        let receive = || async {
            let mut buf = vec![0; 65536];
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(10), held.recv_from(&mut buf))
                    .await
                    .expect("a query upstream")
                    .unwrap();
            buf.truncate(len);
            (buf, from)
        };
        let mut asked = Vec::new();
        for _ in 0..2 {
            asked.push(receive().await);
        }
        let mut buf = vec![0; 65536];
        assert_eq!(
            asked.iter().map(|(q, _)| q[1]).collect::<Vec<_>>(),
            [1, 2],
            "the first two queries, the garbage before them dropped"
        );
        for (q, from) in &asked {
            held.send_to(&tagged(q, b""), from).await.unwrap();
        }
        let mut answered = Vec::new();
        for _ in 0..2 {
            let len = client.recv(&mut buf).await.unwrap();
            answered.push(buf[..len][1]);
        }
        answered.sort();
        assert_eq!(answered, [1, 2]);
        client.send_to(&query(6, "x.test"), addr).await.unwrap();
        let (q, from) = receive().await;
        assert_eq!(q[1], 6, "queries 3 to 5 were dropped, not queued");
        held.send_to(&tagged(&q, b""), from).await.unwrap();
        let len = client.recv(&mut buf).await.unwrap();
        assert_eq!(buf[..len][1], 6);
    }

    /// A TCP query longer than MAX_QUERY ends its connection before it is read; connections
    /// beyond the cap are closed at once; an idle one is closed after the idle time.
    #[tokio::test]
    async fn tcp_connections_are_bounded() {
        let limits = Limits {
            connections: 2,
            idle: Duration::from_millis(500),
            ..Limits::default()
        };
        let answering = upstream(Some(b"ok")).await;
        let addr = forwarder(vec![answering], limits).await;
        let q = query(1, "x.test");
        let closed = |mut stream: TcpStream| async move {
            let mut buf = [0; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("closed within 5 s");
            matches!(read, Ok(0) | Err(_))
        };

        // Closed within 5 s, where the default idle time is 10 s.
        let patient = forwarder(vec![answering], Limits::default()).await;
        let mut oversized = TcpStream::connect(patient).await.unwrap();
        let prefix = u16::try_from(MAX_QUERY + 1).unwrap().to_be_bytes();
        oversized.write_all(&prefix).await.unwrap();
        assert!(closed(oversized).await, "an oversized length prefix");

        // Two connections, each served (so each holds its place)…
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        for stream in [&mut first, &mut second] {
            assert_eq!(ask_over_tcp(stream, &q).await, Some(tagged(&q, b"ok")));
        }
        // …and a third is closed before it is read.
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask_over_tcp(&mut third, &q).await, None, "over the cap");

        // Idle connections are closed after the idle time, which frees their places.
        let started = std::time::Instant::now();
        assert!(closed(first).await, "idle");
        assert!(started.elapsed() >= limits.idle / 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = TcpStream::connect(addr).await.unwrap();
            if ask_over_tcp(&mut again, &q).await.is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a place freed by idle connections"
            );
        }
        drop(second);
    }
}
