//! Container networking over netlink (rtnetlink; never shells out to `ip`): the host's
//! gateway device, one named network namespace per container (a file under `netns_dir`,
//! bind-mounted from the namespace) and the veth pair joining it to the host, with `eth0`,
//! `lo` and the default route set up inside.
//!
//! Containers are **routed**, not bridged: the host side of each veth has no address and no
//! bridge; the host reaches the container by a `/32` route through its veth (from the gateway
//! address), and the container reaches the host, its gateway, through its default route. The
//! "bridge" device only holds the gateway address (it has no ports). A Linux bridge takes at
//! most 1024 ports, which would cap a server near 1000 containers; routes have no such cap,
//! and containers share no layer-2 segment (no ARP between them: they cannot reach each
//! other, nor spoof one another's address to the host). Each container costs one route.
//!
//! [`NetnsSockets`] makes TCP sockets inside a container's namespace, for the host's proxy: a
//! connection from such a socket to the container's own address never leaves the namespace.
//!
//! Switching namespaces happens only on dedicated std threads, never on a tokio worker.
//! Touches only the links, addresses and namespaces it is named.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, PoisonError};

use futures::TryStreamExt;
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::net::TcpSocket;
use tokio::sync::oneshot;

use crate::Error;

/// Creates the gateway device `name` (a bridge without ports) if missing, gives it
/// `gateway/prefix_len` and sets it up. Idempotent.
pub async fn ensure_bridge(name: &str, gateway: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
    let handle = connect()?;
    if link_index(&handle, name).await?.is_none() {
        let added = handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await;
        if let Err(err) = added {
            if errno(&err) != Some(nix::libc::EEXIST) {
                return Err(Error::netlink(format!("creating bridge {name}"))(err));
            }
        }
    }
    let index = link_index(&handle, name)
        .await?
        .ok_or_else(|| missing(format!("bridge {name} vanished after it was created")))?;
    handle
        .address()
        .add(index, IpAddr::V4(gateway), prefix_len)
        .replace()
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "giving bridge {name} the address {gateway}/{prefix_len}"
        )))?;
    set_up(&handle, index, name).await
}

/// Deletes the bridge `name`; succeeds if there is none.
pub async fn remove_bridge(name: &str) -> Result<(), Error> {
    let handle = connect()?;
    delete_link(&handle, name).await
}

/// Creates the network namespace `netns_dir/<id>` with `eth0` = `ip/prefix_len`, `lo` up and a
/// default route via `gateway`, joined to `bridge` by a veth pair. Returns the namespace path.
/// On failure nothing is left behind.
pub async fn create_netns(
    netns_dir: &Path,
    id: &str,
    bridge: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(netns_dir)
        .map_err(Error::io(format!("creating {}", netns_dir.display())))?;
    let path = netns_path(netns_dir, id);
    let ns_path = path.clone();
    on_thread(move || new_netns(&ns_path)).await?;
    let wired = wire(&path, id, bridge, ip, prefix_len, gateway).await;
    if let Err(err) = wired {
        if let Err(cleanup) = delete_netns(netns_dir, id).await {
            tracing::warn!(id, "cleaning up a half-made network namespace: {cleanup}");
        }
        return Err(err);
    }
    Ok(path)
}

/// Where [`create_netns`] puts container `id`'s namespace file.
pub fn netns_path(netns_dir: &Path, id: &str) -> PathBuf {
    netns_dir.join(id)
}

/// Deletes container `id`'s veth pair and network namespace file. Idempotent.
pub async fn delete_netns(netns_dir: &Path, id: &str) -> Result<(), Error> {
    let handle = connect()?;
    delete_link(&handle, &veth_names(id).0).await?;
    let path = netns_path(netns_dir, id);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(err) => return Err(Error::sys(format!("unmounting {}", path.display()))(err)),
    }
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("deleting {}", path.display()))(err))
        }
        _ => Ok(()),
    }
}

/// The host-side veth name and the peer's temporary name (both at most 15 bytes), derived
/// from the container id.
pub fn veth_names(id: &str) -> (String, String) {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let short = hash & 0xffff_ffff_ffff;
    (format!("vb{short:012x}"), format!("vp{short:012x}"))
}

/// The veth pair: host side up with a route to the container through it, peer moved into
/// the namespace and set up there.
async fn wire(
    path: &Path,
    id: &str,
    bridge: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<(), Error> {
    let handle = connect()?;
    if link_index(&handle, bridge).await?.is_none() {
        return Err(missing(format!(
            "bridge {bridge} (the gateway device) does not exist: call ensure_bridge first"
        )));
    }
    let (host, peer) = veth_names(id);
    delete_link(&handle, &host).await?;
    handle
        .link()
        .add(LinkVeth::new(&host, &peer).build())
        .execute()
        .await
        .map_err(Error::netlink(format!("creating veth pair {host}/{peer}")))?;
    let ns = File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
    let peer_index = link_index(&handle, &peer)
        .await?
        .ok_or_else(|| missing(format!("veth {peer} vanished after it was created")))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "moving {peer} into {}",
            path.display()
        )))?;
    let host_index = link_index(&handle, &host)
        .await?
        .ok_or_else(|| missing(format!("veth {host} vanished after it was created")))?;
    set_up(&handle, host_index, &host).await?;
    // The host reaches the container through its veth, from the gateway address.
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(host_index)
                .pref_source(gateway)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(Error::netlink(format!("routing {ip} through {host}")))?;
    let path = path.to_path_buf();
    on_thread(move || in_netns(&path, configure_inside(peer, ip, prefix_len, gateway))).await
}

/// Inside the namespace: peer renamed `eth0` with its address and up, `lo` up, default route.
async fn configure_inside(
    peer: String,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<(), Error> {
    let handle = connect()?;
    let eth0 = link_index(&handle, &peer)
        .await?
        .ok_or_else(|| missing(format!("veth {peer} is not in the namespace")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(eth0).name("eth0").build())
        .execute()
        .await
        .map_err(Error::netlink(format!("renaming {peer} to eth0")))?;
    handle
        .address()
        .add(eth0, IpAddr::V4(ip), prefix_len)
        .execute()
        .await
        .map_err(Error::netlink(format!("giving eth0 {ip}/{prefix_len}")))?;
    set_up(&handle, eth0, "eth0").await?;
    let lo = link_index(&handle, "lo")
        .await?
        .ok_or_else(|| missing("the namespace has no lo".to_string()))?;
    set_up(&handle, lo, "lo").await?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .build(),
        )
        .execute()
        .await
        .map_err(Error::netlink(format!(
            "adding the default route via {gateway}"
        )))
}

/// On the calling (dedicated) thread: a new network namespace bind-mounted at `path`.
fn new_netns(path: &Path) -> Result<(), Error> {
    File::create(path).map_err(Error::io(format!("creating {}", path.display())))?;
    let made = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(Error::sys("creating a network namespace"))
        .and_then(|()| {
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(Error::sys(format!(
                "bind-mounting the namespace at {}",
                path.display()
            )))
        });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// On the calling (dedicated) thread: enters the namespace at `path` and runs `work` on a
/// current-thread runtime, so its netlink socket lives in that namespace.
fn in_netns(path: &Path, work: impl Future<Output = Result<(), Error>>) -> Result<(), Error> {
    let ns = File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(Error::sys(format!("entering {}", path.display())))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting a runtime inside the namespace"))?
        .block_on(work)
}

/// Makes TCP sockets inside network namespaces other than the caller's. A socket stays in the
/// namespace it was made in wherever it is used, so a connection from one made in a container's
/// namespace to the container's own address goes over that namespace's loopback: no veth, no
/// host route or firewall on the way, and the container sees its own address as the peer.
///
/// The switching happens on one thread of its own, started on first use, which does nothing
/// else: it enters the namespace, makes the socket and goes back before it takes the next job.
/// Should it ever fail to go back, it ends, and the next call starts a new one.
#[derive(Default)]
pub struct NetnsSockets {
    jobs: Mutex<Option<mpsc::Sender<SocketJob>>>,
}

struct SocketJob {
    netns: PathBuf,
    ipv6: bool,
    made: oneshot::Sender<std::io::Result<TcpSocket>>,
}

impl NetnsSockets {
    /// A new TCP socket (non-blocking, close-on-exec) inside the network namespace at `netns`
    /// (a namespace file such as [`create_netns`] makes), IPv6 when `ipv6`, to be connected or
    /// bound from any thread.
    pub async fn tcp(&self, netns: &Path, ipv6: bool) -> std::io::Result<TcpSocket> {
        let (made, socket) = oneshot::channel();
        self.submit(SocketJob {
            netns: netns.to_path_buf(),
            ipv6,
            made,
        })?;
        socket.await.unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread making sockets in network namespaces ended",
            ))
        })
    }

    /// Hands `job` to the thread, starting one if there is none or the last one ended.
    fn submit(&self, job: SocketJob) -> std::io::Result<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match jobs.as_ref() {
            Some(sender) => match sender.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || make_sockets(receiver))?;
        // Should the new thread have ended already (it could not open its own namespace), the
        // send fails and drops the job, which tells the caller.
        let _ = sender.send(job);
        *jobs = Some(sender);
        Ok(())
    }
}

/// The body of [`NetnsSockets`]' thread: one socket per job, each made inside the job's
/// namespace, the thread back in its own one before the next job.
fn make_sockets(jobs: mpsc::Receiver<SocketJob>) {
    let Ok(home) = File::open("/proc/thread-self/ns/net") else {
        return; // the job's caller is told that the thread ended
    };
    for job in jobs {
        let made = File::open(&job.netns)
            .and_then(|ns| Ok(nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)?))
            .and_then(|()| match job.ipv6 {
                true => TcpSocket::new_v6(),
                false => TcpSocket::new_v4(),
            });
        let back = nix::sched::setns(&home, CloneFlags::CLONE_NEWNET);
        let _ = job.made.send(made);
        if back.is_err() {
            return; // never make another socket in a namespace it did not mean
        }
    }
}

/// Runs `work` on a new std thread (whose namespaces it may change) and awaits its result.
async fn on_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let (send, receive) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = send.send(work());
    });
    receive
        .await
        .unwrap_or_else(|_| Err(missing("the namespace thread panicked".to_string())))
}

fn connect() -> Result<Handle, Error> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(Error::io("opening a netlink socket"))?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        Err(err) if errno(&err) == Some(nix::libc::ENODEV) => Ok(None),
        Err(err) => Err(Error::netlink(format!("looking up link {name}"))(err)),
    }
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(Error::netlink(format!("setting {name} up")))
}

async fn delete_link(handle: &Handle, name: &str) -> Result<(), Error> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Err(err) if errno(&err) != Some(nix::libc::ENODEV) => {
            Err(Error::netlink(format!("deleting link {name}"))(err))
        }
        _ => Ok(()),
    }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn missing(reason: String) -> Error {
    Error::Netlink {
        context: "network setup".to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::veth_names;

    #[test]
    fn veth_names_are_short_stable_and_distinct() {
        let (host, peer) = veth_names("myapp-web-1-0123456789abcdef0123456789abcdef");
        assert!(host.len() <= 15 && peer.len() <= 15, "{host} {peer}");
        assert_ne!(host, peer);
        assert_eq!(veth_names("a").0, veth_names("a").0);
        assert_ne!(veth_names("app-web-1").0, veth_names("app-web-2").0);
    }
}
