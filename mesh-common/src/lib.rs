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
/// UDP sockets of enrolled pods that sent to a DNS server, by socket cookie
/// -> [`OrigDst`] (the server they addressed): replies from the agent's DNS
/// proxy are shown to come from it. LRU: a socket's entry lives as long as
/// it is among the most recent.
pub const MAP_DNS_SOCKETS: &str = "MESH_DNS_SOCKETS";
/// The DNS server each enrolled pod last addressed, by netns cookie ->
/// [`OrigDst`]: where the agent forwards the names it does not answer.
pub const MAP_DNS_RESOLVERS: &str = "MESH_DNS_RESOLVERS";
/// The agent's inbound listeners, index `slot * 2 + (0 for IPv4 | 1 for IPv6)`.
/// A socket leaves the map by itself when it closes, which is how the kernel
/// knows the agent is gone.
pub const MAP_INBOUND_LISTENERS: &str = "MESH_INBOUND_LISTENERS";
/// Ports a pod excludes from capture ([`PortKey`]).
pub const MAP_EXCLUDED_PORTS: &str = "MESH_EXCLUDED_PORTS";
/// Destination CIDRs a pod excludes from capture (LPM trie over [`CidrKey`]).
pub const MAP_EXCLUDED_CIDRS: &str = "MESH_EXCLUDED_CIDRS";

/// Same-node fast path: the sockets of local legs (application <-> agent,
/// agent <-> local pod), keyed by [`SockKey`]; an sk_msg program attached to
/// this map moves each send straight into the peer socket.
pub const MAP_SOCKS: &str = "MESH_SOCKS";
/// Per fast-path socket, [`SockKey`] -> [`SockState`]: what it sent and how.
pub const MAP_SOCK_STATE: &str = "MESH_SOCK_STATE";
/// Spliced flows, written by the agent: an application socket ([`SockKey`]) ->
/// [`Splice`] (its peer application socket on the same node).
pub const MAP_SPLICE: &str = "MESH_SPLICE";
/// Fast-path switches, index 0: [`FASTPATH_LOOPBACK`] | [`FASTPATH_SPLICE`].
pub const MAP_FASTPATH_CONFIG: &str = "MESH_FASTPATH_CONFIG";
/// Fast-path counters, a per-CPU array indexed by the `FP_*` constants.
pub const MAP_FASTPATH_STATS: &str = "MESH_FASTPATH_STATS";

/// Loopback legs are accelerated (sockets added to [`MAP_SOCKS`]).
pub const FASTPATH_LOOPBACK: u32 = 1;
/// Authorized same-node L4 flows may be spliced (needs [`FASTPATH_LOOPBACK`]).
pub const FASTPATH_SPLICE: u32 = 2;

/// Sockets added to [`MAP_SOCKS`].
pub const FP_SOCKETS_ADDED: u32 = 0;
/// Sockets that could not be added (map full, ...): they take the normal path.
pub const FP_INSERT_FAILED: u32 = 1;
/// Sends moved to the peer socket of a loopback leg, and their bytes.
pub const FP_REDIRECTED_MSGS: u32 = 2;
pub const FP_REDIRECTED_BYTES: u32 = 3;
/// Sends that took the normal TCP path (no peer in the map, or a socket that
/// already did: never mixed, so byte order holds), and their bytes.
pub const FP_PASSED_MSGS: u32 = 4;
pub const FP_PASSED_BYTES: u32 = 5;
/// Sends moved straight to the other application of a spliced flow.
pub const FP_SPLICED_MSGS: u32 = 6;
pub const FP_SPLICED_BYTES: u32 = 7;
/// Directions of spliced flows that switched to the kernel path.
pub const FP_SPLICES_ACTIVE: u32 = 8;
/// Size of [`MAP_FASTPATH_STATS`].
pub const FP_STATS: u32 = 16;

/// How many pods one agent can enrol at once (size of the pod maps).
pub const MAX_PODS: u32 = 4096;
/// Default size of [`MAP_PENDING`] and [`MAP_CLIENTS`] (configurable).
pub const DEFAULT_MAX_PENDING: u32 = 65536;
/// Size of the exclusion maps (all pods together).
pub const MAX_EXCLUSIONS: u32 = 16384;

/// The agent's outbound listener in every enrolled pod (127.0.0.1 and ::1), as
/// Istio's ztunnel. These ports are reserved inside enrolled pods.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's DNS proxy in every enrolled pod (UDP, 127.0.0.1 and ::1), as
/// ztunnel's. Reserved inside enrolled pods.
pub const DNS_PROXY_PORT: u16 = 15053;
/// The port DNS queries are captured on (UDP; TCP goes with all TCP).
pub const DNS_PORT: u16 = 53;
/// The agent's inbound (plaintext) listener in every enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// The agent's mTLS tunnel (HBONE) listener in every enrolled pod, on the pod's
/// own addresses: inbound capture lets it through, because it is the agent.
pub const TUNNEL_PORT: u16 = 15008;
/// Source address of the agent's own connections into a pod (over the pod's
/// loopback, so inbound capture does not take them again), as Istio's ztunnel.
pub const AGENT_SOURCE_IPV4: [u8; 4] = [127, 0, 0, 6];
/// Socket mark of the agent's deliveries from the client's own address
/// (`preserveSourceAddress`): the pod's replies carry it too (the kernel's
/// `tcp_fwmark_accept`), and a routing rule in the pod sends marked packets
/// back over loopback to the agent. The fast path knows the agent's legs by it.
pub const DELIVERY_MARK: u32 = 0x6d65_7368;
/// The routing table in every enrolled pod that holds `local default dev lo`
/// for marked replies, and the priority of the rule that selects it.
pub const DELIVERY_TABLE: u32 = 0x6d65;
pub const DELIVERY_RULE_PRIORITY: u32 = 100;
/// The loopback device's index, the same in every network namespace. The
/// agent's deliveries are bound to it, and that is how inbound capture
/// knows them: nothing from outside a namespace arrives on its loopback.
pub const LOOPBACK_IFINDEX: u32 = 1;

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

/// A TCP socket as both the kernel and the agent can name it: its network
/// namespace and its own (local) and peer (remote) address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local: PodAddr,
    pub remote: PodAddr,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection (in the
    /// same namespace: a loopback leg).
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// [`SockState::flags`]: this socket sent through the normal TCP path at least
/// once; it never redirects afterwards (the receiver reads redirected bytes
/// before normal ones, so mixing could reorder).
pub const SOCK_PASSED: u32 = 1;
/// This socket's sends go straight to its spliced peer ([`SockState::peer`]).
pub const SOCK_SPLICED: u32 = 2;

/// Value of [`MAP_SOCK_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// Bytes this socket has sent (all paths).
    pub sent: u64,
    /// Bytes sent straight to the spliced peer.
    pub spliced: u64,
    pub flags: u32,
    pub _pad: u32,
    /// Where spliced sends go, once [`SOCK_SPLICED`] is set.
    pub peer: SockKey,
}

/// Value of [`MAP_SPLICE`], for one direction of a flow the agent authorized:
/// the application socket of the key sends straight to `peer` once every byte
/// it sent before has been relayed by the agent (`sent == forwarded`) and the
/// agent's relay socket `via` put all those bytes in `peer`'s queue by the
/// fast path (never the normal one), so no byte can overtake another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    pub peer: SockKey,
    pub via: SockKey,
    /// Bytes of this direction the agent has relayed so far.
    pub forwarded: u64,
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
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::Splice {}
}
