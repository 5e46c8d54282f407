//! The container network berth manages: one bridge with a private subnet, and the addresses in it.
//! [`Network::attach`] gives a container (an app's or a build's) its own network namespace with
//! the lowest free address; [`Network::detach`] takes both back. The OS work (netlink, namespace
//! files) is the runtime crate's; this module owns only the bridge's name, the subnet and which
//! addresses are taken.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

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
    used: Mutex<Used>,
}

/// The taken addresses, and where the next search starts.
#[derive(Default)]
struct Used {
    taken: BTreeSet<Ipv4Addr>,
    /// Just past the last address handed out: addresses are reused only after the whole
    /// subnet went round, so a connection some client still holds to a stopped container
    /// never reaches a new one that got its address.
    next: u32,
}

impl Network {
    pub fn new(bridge: String, gateway: Ipv4Addr, prefix: u8, netns_dir: PathBuf) -> Self {
        Self {
            bridge,
            gateway,
            prefix,
            netns_dir,
            used: Mutex::new(Used::default()),
        }
    }

    /// A new network namespace for container `id` on the bridge, with the lowest free address.
    /// Returns the address and the namespace's path. On failure nothing is left taken.
    pub async fn attach(&self, id: &str) -> Result<(Ipv4Addr, PathBuf), NetworkError> {
        let ip = self.allocate()?;
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
            Ok(netns) => Ok((ip, netns)),
            Err(err) => {
                self.release(ip);
                Err(err.into())
            }
        }
    }

    /// Removes container `id`'s network namespace and frees `ip` (when it had one). Errors are
    /// logged: taking things down must always make progress.
    pub async fn detach(&self, id: &str, ip: Option<Ipv4Addr>) {
        if let Err(err) = berth_runtime::network::delete_netns(&self.netns_dir, id).await {
            tracing::warn!(%id, %err, "removing a netns failed");
        }
        if let Some(ip) = ip {
            self.release(ip);
        }
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

    fn release(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").taken.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_go_round_before_reuse_and_run_out() {
        let n = Network::new(
            "b".into(),
            Ipv4Addr::new(10, 9, 9, 1),
            29, // .2 … .6 usable
            PathBuf::from("/nonexistent"),
        );
        let ip = |last| Ipv4Addr::new(10, 9, 9, last);
        assert_eq!(n.allocate().unwrap(), ip(2));
        assert_eq!(n.allocate().unwrap(), ip(3));
        n.release(ip(2));
        assert_eq!(
            n.allocate().unwrap(),
            ip(4),
            "a freed address waits its turn"
        );
        n.mark_used(ip(5));
        assert_eq!(n.allocate().unwrap(), ip(6));
        assert_eq!(n.allocate().unwrap(), ip(2), "round again from the start");
        assert!(matches!(n.allocate(), Err(NetworkError::NoAddresses)));
        n.release(ip(4));
        assert_eq!(n.allocate().unwrap(), ip(4));
    }
}
