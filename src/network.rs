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
    used: Mutex<BTreeSet<Ipv4Addr>>,
}

impl Network {
    pub fn new(bridge: String, gateway: Ipv4Addr, prefix: u8, netns_dir: PathBuf) -> Self {
        Self {
            bridge,
            gateway,
            prefix,
            netns_dir,
            used: Mutex::new(BTreeSet::new()),
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

    /// Takes the lowest free address after the gateway.
    fn allocate(&self) -> Result<Ipv4Addr, NetworkError> {
        let mut used = self.used.lock().expect("address lock");
        let first = u32::from(self.gateway) + 1;
        let broadcast = (u32::from(self.gateway) - 1) | (u32::MAX >> self.prefix);
        let ip = (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or(NetworkError::NoAddresses)?;
        used.insert(ip);
        Ok(ip)
    }

    /// Marks an address as taken (a re-adopted container's).
    pub fn mark_used(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").insert(ip);
    }

    fn release(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_first_and_exhaustion() {
        let n = Network::new(
            "b".into(),
            Ipv4Addr::new(10, 9, 9, 1),
            29, // .2 … .6 usable
            PathBuf::from("/nonexistent"),
        );
        let got: Vec<_> = (0..5).map(|_| n.allocate().unwrap()).collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 9, 9, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 9, 9, 6)));
        assert!(matches!(n.allocate(), Err(NetworkError::NoAddresses)));
        n.release(Ipv4Addr::new(10, 9, 9, 4));
        assert_eq!(n.allocate().unwrap(), Ipv4Addr::new(10, 9, 9, 4));
    }
}
