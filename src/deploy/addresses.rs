//! Container IP addresses inside berth's private subnet: hands out the lowest free one.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use super::DeployError;

pub struct Addresses {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    used: Mutex<BTreeSet<Ipv4Addr>>,
}

impl Addresses {
    /// `gateway` is the bridge's own address (the subnet's first).
    pub fn new(gateway: Ipv4Addr, prefix: u8) -> Self {
        Self {
            gateway,
            prefix,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// Takes the lowest free address after the gateway.
    pub fn allocate(&self) -> Result<Ipv4Addr, DeployError> {
        let mut used = self.used.lock().expect("address lock");
        let first = u32::from(self.gateway) + 1;
        let broadcast = (u32::from(self.gateway) - 1) | (u32::MAX >> self.prefix);
        let ip = (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or(DeployError::NoAddresses)?;
        used.insert(ip);
        Ok(ip)
    }

    /// Marks an address as taken (a re-adopted container's).
    pub fn mark_used(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").insert(ip);
    }

    pub fn release(&self, ip: Ipv4Addr) {
        self.used.lock().expect("address lock").remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_first_and_exhaustion() {
        let a = Addresses::new(Ipv4Addr::new(10, 9, 9, 1), 29); // .2 … .6 usable
        let got: Vec<_> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 9, 9, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 9, 9, 6)));
        assert!(matches!(a.allocate(), Err(DeployError::NoAddresses)));
        a.release(Ipv4Addr::new(10, 9, 9, 4));
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 9, 9, 4));
    }
}
