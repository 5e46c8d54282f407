//! The container network berth manages: one bridge with a private subnet, and the addresses in it.
//! [`Network::attach`] gives a container (an app's or a build's) its own network namespace with
//! the lowest free address and the resolv.conf naming berth's DNS stub on the gateway (`dns`
//! writes it and answers there); [`Network::detach`] takes address and namespace back. The OS
//! work (netlink, namespace files, the firewall) is the runtime crate's; this module owns only
//! the bridge's name, the subnet, which addresses are taken and which of them may not open
//! connections out of the bridge (their egress is off: the firewall's `no-egress` set, written
//! before such a container starts and whenever it changes).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use berth_runtime::Bind;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("no free container address left in berth's subnet — stop some apps or use a larger --subnet")]
    NoAddresses,
    #[error("cannot set up the container's network: {0}")]
    Runtime(#[from] berth_runtime::Error),
}

pub struct Network {
    /// The bridge's name (`--bridge`).
    pub bridge: String,
    /// The bridge's own address, the subnet's first.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// Where the named network namespaces live (`DATA/netns`).
    netns_dir: PathBuf,
    /// The resolv.conf every container gets (`DATA/resolv.conf`).
    resolv_conf: PathBuf,
    used: Mutex<Used>,
    /// Held while the firewall's set is written, so the last write has seen every change.
    firewall: tokio::sync::Mutex<()>,
}

/// The taken addresses, and where the next search starts.
#[derive(Default)]
struct Used {
    taken: BTreeSet<Ipv4Addr>,
    /// Just past the last address handed out: addresses are reused only after the whole
    /// subnet went round, so a connection some client still holds to a stopped container
    /// never reaches a new one that got its address.
    next: u32,
    /// Taken addresses whose containers may not open connections out of the bridge.
    no_egress: BTreeSet<Ipv4Addr>,
}

/// A container's place on the network, as [`Network::attach`] gives it.
pub struct Attachment {
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Its `/etc/resolv.conf`, read-only: berth's DNS stub on the gateway.
    pub resolv_conf: Bind,
}

impl Network {
    pub fn new(
        bridge: String,
        gateway: Ipv4Addr,
        prefix: u8,
        netns_dir: PathBuf,
        resolv_conf: PathBuf,
    ) -> Self {
        Self {
            bridge,
            gateway,
            prefix,
            netns_dir,
            resolv_conf,
            used: Mutex::new(Used::default()),
            firewall: tokio::sync::Mutex::new(()),
        }
    }

    /// A new network namespace for container `id` on the bridge, with the lowest free address;
    /// unless `egress`, the firewall keeps it from opening connections out of the bridge (and
    /// from asking the DNS stub) from its first packet on. On failure nothing is left taken.
    pub async fn attach(&self, id: &str, egress: bool) -> Result<Attachment, NetworkError> {
        let ip = self.allocate()?;
        if !egress {
            if let Err(err) = self.set_egress(&[ip], false).await {
                self.release(ip).await;
                return Err(err);
            }
        }
        match berth_runtime::network::create_netns(
            &self.netns_dir,
            id,
            &self.bridge,
            ip,
            self.prefix,
            self.gateway,
        )
        .await
        {
            Ok(netns) => Ok(Attachment {
                ip,
                netns,
                resolv_conf: Bind {
                    source: self.resolv_conf.clone(),
                    destination: "/etc/resolv.conf".into(),
                    readonly: true,
                    idmapped: false,
                },
            }),
            Err(err) => {
                self.release(ip).await;
                Err(err.into())
            }
        }
    }

    /// Container `id`'s network namespace file (while it is attached).
    pub fn netns(&self, id: &str) -> PathBuf {
        berth_runtime::network::netns_path(&self.netns_dir, id)
    }

    /// Removes container `id`'s network namespace and frees `ip` (when it had one). Errors are
    /// logged: taking things down must always make progress.
    pub async fn detach(&self, id: &str, ip: Option<Ipv4Addr>) {
        if let Err(err) = berth_runtime::network::delete_netns(&self.netns_dir, id).await {
            tracing::warn!(%id, %err, "removing a netns failed");
        }
        if let Some(ip) = ip {
            self.release(ip).await;
        }
    }

    /// Lets the containers at `ips` open connections out of the bridge (`allowed`) or not, at
    /// once.
    pub async fn set_egress(&self, ips: &[Ipv4Addr], allowed: bool) -> Result<(), NetworkError> {
        let changed = {
            let mut used = self.used.lock().expect("address lock");
            let before = used.no_egress.len();
            for ip in ips {
                if allowed {
                    used.no_egress.remove(ip);
                } else {
                    used.no_egress.insert(*ip);
                }
            }
            used.no_egress.len() != before
        };
        if changed {
            self.write_firewall().await?;
        }
        Ok(())
    }

    /// Writes the addresses without egress to the firewall.
    async fn write_firewall(&self) -> Result<(), NetworkError> {
        let _writing = self.firewall.lock().await;
        let ips: Vec<Ipv4Addr> = {
            let used = self.used.lock().expect("address lock");
            used.no_egress.iter().copied().collect()
        };
        let bridge = self.bridge.clone();
        tokio::task::spawn_blocking(move || berth_runtime::firewall::set_no_egress(&bridge, &ips))
            .await
            .expect("firewall task")?;
        Ok(())
    }

    /// Takes the next free address after the last one handed out, going round the subnet
    /// (the gateway and the broadcast address excluded).
    fn allocate(&self) -> Result<Ipv4Addr, NetworkError> {
        let mut used = self.used.lock().expect("address lock");
        let first = u32::from(self.gateway) + 1;
        let broadcast = (u32::from(self.gateway) - 1) | (u32::MAX >> self.prefix);
        let start = used.next.clamp(first, broadcast - 1);
        let ip = (start..broadcast)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|ip| !used.taken.contains(ip))
            .ok_or(NetworkError::NoAddresses)?;
        used.taken.insert(ip);
        used.next = u32::from(ip) + 1;
        Ok(ip)
    }

    /// Marks an address as taken (a re-adopted container's).
    pub fn mark_used(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").taken.insert(ip);
    }

    /// Frees `ip`, and takes it out of the firewall's set if it was there.
    async fn release(&self, ip: Ipv4Addr) {
        let was_blocked = {
            let mut used = self.used.lock().expect("address lock");
            used.taken.remove(&ip);
            used.no_egress.remove(&ip)
        };
        if was_blocked {
            if let Err(err) = self.write_firewall().await {
                tracing::warn!(%ip, %err, "taking a freed address out of the no-egress set failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_go_round_before_reuse_and_run_out() {
        let n = Network::new(
            "b".into(),
            Ipv4Addr::new(10, 9, 9, 1),
            29, // .2 … .6 usable
            PathBuf::from("/nonexistent"),
            PathBuf::from("/nonexistent/resolv.conf"),
        );
        let ip = |last| Ipv4Addr::new(10, 9, 9, last);
        assert_eq!(n.allocate().unwrap(), ip(2));
        assert_eq!(n.allocate().unwrap(), ip(3));
        n.release(ip(2)).await;
        assert_eq!(
            n.allocate().unwrap(),
            ip(4),
            "a freed address waits its turn"
        );
        n.mark_used(ip(5));
        assert_eq!(n.allocate().unwrap(), ip(6));
        assert_eq!(n.allocate().unwrap(), ip(2), "round again from the start");
        assert!(matches!(n.allocate(), Err(NetworkError::NoAddresses)));
        n.release(ip(4)).await;
        assert_eq!(n.allocate().unwrap(), ip(4));
    }
}
