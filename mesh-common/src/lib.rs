//! Types shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` plain data without padding holes: the kernel and
//! userspace see the same bytes. Map names are constants so both sides cannot
//! drift apart. All maps are pinned by name (see the agent's `ebpf` module), so a
//! restarted agent finds the state its predecessor left.
#![no_std]

/// Enrolled pods, keyed by the pod's network-namespace cookie
/// (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`). The cookie comes from kernel state,
/// so a pod cannot pretend to be another one.
pub const MAP_PODS: &str = "MESH_PODS";
/// Enrolled pods by address ([`PodAddr`] -> slot), for inbound capture, which
/// runs in the pod's namespace before any socket exists.
pub const MAP_POD_ADDRS: &str = "MESH_POD_ADDRS";
/// Per-pod counters, a per-CPU array indexed by [`PodInfo::slot`].
pub const MAP_POD_COUNTERS: &str = "MESH_POD_COUNTERS";
/// Captured connections, for as long as they live: client socket cookie ->
/// [`OrigDst`]. Not LRU: when it is full, new connections are refused and
/// counted, never let through uncaptured.
pub const MAP_PENDING: &str = "MESH_PENDING";
/// How the agent finds a pending connection from the socket it accepted:
/// [`ClientKey`] (the client's port in the pod's namespace) -> socket cookie.
pub const MAP_CLIENTS: &str = "MESH_CLIENTS";
/// The agent's inbound listeners, index `slot * 2 + (0 for IPv4 | 1 for IPv6)`.
/// A socket leaves the map by itself when it closes, which is how the kernel
/// knows the agent is gone.
pub const MAP_INBOUND_LISTENERS: &str = "MESH_INBOUND_LISTENERS";
/// Ports a pod excludes from capture ([`PortKey`]).
pub const MAP_EXCLUDED_PORTS: &str = "MESH_EXCLUDED_PORTS";
/// Destination CIDRs a pod excludes from capture (LPM trie over [`CidrKey`]).
pub const MAP_EXCLUDED_CIDRS: &str = "MESH_EXCLUDED_CIDRS";

/// How many pods one agent can enrol at once (size of the pod maps).
pub const MAX_PODS: u32 = 4096;
/// Default size of [`MAP_PENDING`] and [`MAP_CLIENTS`] (configurable).
pub const DEFAULT_MAX_PENDING: u32 = 65536;
/// Size of the exclusion maps (all pods together).
pub const MAX_EXCLUSIONS: u32 = 16384;

/// The agent's outbound listener in every enrolled pod (127.0.0.1 and ::1), as
/// Istio's ztunnel. These ports are reserved inside enrolled pods.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound (plaintext) listener in every enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// The agent's mTLS tunnel (HBONE) listener in every enrolled pod, on the pod's
/// own addresses: inbound capture lets it through, because it is the agent.
pub const TUNNEL_PORT: u16 = 15008;
/// Source address of the agent's own connections into a pod (over the pod's
/// loopback, so inbound capture does not take them again), as Istio's ztunnel.
pub const AGENT_SOURCE_IPV4: [u8; 4] = [127, 0, 0, 6];

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
pub const DIRECTION_OUTBOUND: u8 = 0;
pub const DIRECTION_INBOUND: u8 = 1;

/// Value of [`MAP_PODS`]: what the kernel knows about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Index of this pod's entries in the per-slot maps.
    pub slot: u32,
    /// Reserved for per-pod flags; zero for now.
    pub flags: u32,
}

/// An IPv6 address, or an IPv4 one mapped into IPv6 (`::ffff:a.b.c.d`), so one
/// key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddr {
    pub addr: [u8; 16],
}

impl PodAddr {
    pub const fn from_ipv4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_ipv6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// Whether this is an IPv4 address mapped into IPv6.
    pub fn is_ipv4(&self) -> bool {
        self.addr[..10] == [0u8; 10] && self.addr[10] == 0xff && self.addr[11] == 0xff
    }

    /// 127.0.0.0/8 or ::1: destinations inside the pod's own loopback.
    pub fn is_loopback(&self) -> bool {
        if self.is_ipv4() {
            self.addr[12] == 127
        } else {
            self.addr == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        }
    }
}

/// Value of [`MAP_PENDING`]: where a captured connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The destination the application dialled.
    pub addr: PodAddr,
    /// Its port, host byte order.
    pub port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`] (IPv4-mapped destinations count as IPv4).
    pub family: u8,
    pub _pad: u8,
    /// The source pod's slot.
    pub slot: u32,
    /// The source pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// `bpf_ktime_get_ns()` at connect time, so the agent can drop entries of
    /// connections that never reached it.
    pub created_ns: u64,
}

/// Key of [`MAP_CLIENTS`]: a client socket as the agent sees it after accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    /// The client's local port, host byte order.
    pub port: u16,
    /// Family of the agent listener the connection reaches.
    pub family: u8,
    pub _pad: [u8; 5],
}

/// Key of [`MAP_EXCLUDED_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub slot: u32,
    /// Host byte order.
    pub port: u16,
    /// [`DIRECTION_OUTBOUND`] (destination port) or [`DIRECTION_INBOUND`] (pod port).
    pub direction: u8,
    pub _pad: u8,
}

/// Data of an [`MAP_EXCLUDED_CIDRS`] key: the slot (big-endian, so it is the
/// most significant part of the prefix) then the address. A CIDR `a/len` of a
/// pod is stored with prefix length `32 + len` (`32 + 96 + len` for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    pub slot_be: [u8; 4],
    pub addr: PodAddr,
}

/// Value of [`MAP_POD_COUNTERS`]: per-pod event counts, one copy per CPU.
///
/// Per-CPU because bpfel has no atomic fetch-add and per-CPU slots need none;
/// the agent sums the copies when it reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// IPv4 TCP `connect()` calls made by processes of the pod.
    pub connect4: u64,
    /// IPv6 TCP `connect()` calls made by processes of the pod.
    pub connect6: u64,
    /// Outbound connections redirected to the agent.
    pub captured_outbound: u64,
    /// Inbound connections steered to the agent.
    pub captured_inbound: u64,
    /// Connections left alone because of a configured exclusion.
    pub excluded: u64,
    /// Connections refused because no agent was listening for the pod.
    pub refused_agent_absent: u64,
    /// Connections refused because the pending-connection map was full.
    pub refused_map_full: u64,
}

impl PodCounters {
    /// Adds another CPU's copy to this one.
    pub fn accumulate(&mut self, other: &PodCounters) {
        self.connect4 = self.connect4.wrapping_add(other.connect4);
        self.connect6 = self.connect6.wrapping_add(other.connect6);
        self.captured_outbound = self.captured_outbound.wrapping_add(other.captured_outbound);
        self.captured_inbound = self.captured_inbound.wrapping_add(other.captured_inbound);
        self.excluded = self.excluded.wrapping_add(other.excluded);
        self.refused_agent_absent = self
            .refused_agent_absent
            .wrapping_add(other.refused_agent_absent);
        self.refused_map_full = self.refused_map_full.wrapping_add(other.refused_map_full);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], Copy, contain only integers and byte arrays, and
    // have no padding holes (explicit _pad fields fill them).
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::PodAddr {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKey {}
}
