//! Where a captured outbound connection was going: the data path's view of the
//! PENDING and CLIENTS maps.

use parking_lot::Mutex;
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, anyhow};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mesh_common::{ClientKey, FAMILY_IPV4, FAMILY_IPV6, OrigDst, PodAddr};

/// A captured connection as the kernel recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Captured {
    pub original_dst: SocketAddr,
    /// The client socket's cookie: the key of its PENDING entry.
    pub socket_cookie: u64,
    pub slot: u32,
}

pub struct OrigDstTable {
    maps: Mutex<Maps>,
}

struct Maps {
    pending: BpfHashMap<MapData, u64, OrigDst>,
    clients: BpfHashMap<MapData, ClientKey, u64>,
    /// Connections the agent holds: their PENDING entries must stay.
    live: HashSet<u64>,
}

impl OrigDstTable {
    pub fn new(pending: Map, clients: Map) -> Result<Self> {
        Ok(Self {
            maps: Mutex::new(Maps {
                pending: BpfHashMap::try_from(pending)?,
                clients: BpfHashMap::try_from(clients)?,
                live: HashSet::new(),
            }),
        })
    }

    /// Looks up the connection whose client is `client` (the peer address of the
    /// socket the agent accepted) in the pod with `netns_cookie`. The entry stays
    /// until [`Self::forget`], so the application's getpeername keeps working.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Result<Captured> {
        let family = match client.ip() {
            IpAddr::V4(_) => FAMILY_IPV4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => FAMILY_IPV4,
            IpAddr::V6(_) => FAMILY_IPV6,
        };
        let key = ClientKey {
            netns_cookie,
            port: client.port(),
            family,
            _pad: [0; 5],
        };
        let mut maps = self.maps.lock();
        let cookie = maps.clients.get(&key, 0).map_err(|e| {
            anyhow!("no capture record for client {client} (netns {netns_cookie}): {e}")
        })?;
        let _ = maps.clients.remove(&key);
        let orig = maps
            .pending
            .get(&cookie, 0)
            .map_err(|e| anyhow!("no original destination for client {client}: {e}"))?;
        maps.live.insert(cookie);
        Ok(Captured {
            original_dst: socket_addr(&orig),
            socket_cookie: cookie,
            slot: orig.slot,
        })
    }

    /// The agent is done with a connection.
    pub fn forget(&self, socket_cookie: u64) {
        let mut maps = self.maps.lock();
        maps.live.remove(&socket_cookie);
        let _ = maps.pending.remove(&socket_cookie);
    }

    /// Removes entries of connections that never reached the agent (the client
    /// gave up, or an agent died holding them) once they are older than `age`.
    /// Returns how many were removed.
    pub fn sweep(&self, age: Duration) -> usize {
        let now = monotonic_ns();
        let mut maps = self.maps.lock();
        let stale: Vec<u64> = maps
            .pending
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(cookie, orig)| {
                !maps.live.contains(cookie)
                    && now.saturating_sub(orig.created_ns) > age.as_nanos() as u64
            })
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in &stale {
            let _ = maps.pending.remove(cookie);
        }
        stale.len()
    }

    /// Entries in PENDING (captured connections alive or pending).
    pub fn pending_count(&self) -> usize {
        self.maps
            .lock()
            .pending
            .keys()
            .filter(|k| k.is_ok())
            .count()
    }
}

pub fn socket_addr(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(pod_addr_to_ip(&orig.addr), orig.port)
}

pub fn pod_addr_to_ip(addr: &PodAddr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn ip_to_pod_addr(ip: IpAddr) -> PodAddr {
    match ip {
        IpAddr::V4(v4) => PodAddr::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => PodAddr::from_ipv4(v4.octets()),
            None => PodAddr::from_ipv6(v6.octets()),
        },
    }
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make records look old.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The DNS server each enrolled pod last addressed (MESH_DNS_RESOLVERS).
pub struct DnsResolvers {
    map: Mutex<BpfHashMap<MapData, u64, OrigDst>>,
}

impl DnsResolvers {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self {
            map: Mutex::new(BpfHashMap::try_from(map)?),
        })
    }

    pub fn get(&self, netns_cookie: u64) -> Option<SocketAddr> {
        let orig = self.map.lock().get(&netns_cookie, 0).ok()?;
        Some(socket_addr(&orig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for ip in ["10.1.0.2", "fd00:1::2", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(pod_addr_to_ip(&ip_to_pod_addr(ip)), ip);
        }
        // An IPv4-mapped IPv6 address is the IPv4 address.
        let mapped: IpAddr = "::ffff:10.1.0.2".parse().unwrap();
        assert_eq!(
            pod_addr_to_ip(&ip_to_pod_addr(mapped)),
            "10.1.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn loopback_is_recognised_in_both_families() {
        assert!(ip_to_pod_addr("127.0.0.9".parse().unwrap()).is_loopback());
        assert!(ip_to_pod_addr("::1".parse().unwrap()).is_loopback());
        assert!(!ip_to_pod_addr("10.0.0.1".parse().unwrap()).is_loopback());
        assert!(!ip_to_pod_addr("fd00::1".parse().unwrap()).is_loopback());
    }
}
