//! Maps shared with the agent. Names and value types come from `mesh-common`.
//! Every map is pinned by name, so a restarted agent (and the pinned programs of
//! a stopped one) share the same state.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use mesh_common::{
    CidrKey, ClientKey, DEFAULT_MAX_PENDING, FP_STATS, MAX_EXCLUSIONS, MAX_PODS, OrigDst, PodAddr,
    PodCounters, PodInfo, PortKey, SockKey, SockState, Splice,
};

/// Enrolled pods by netns cookie; written by the agent.
#[map(name = "MESH_PODS")]
pub static PODS: HashMap<u64, PodInfo> = HashMap::pinned(MAX_PODS, 0);

/// Enrolled pods by address -> slot; written by the agent.
#[map(name = "MESH_POD_ADDRS")]
pub static POD_ADDRS: HashMap<PodAddr, u32> = HashMap::pinned(MAX_PODS * 4, 0);

/// Per-pod counters, indexed by slot; read (and summed) by the agent.
#[map(name = "MESH_POD_COUNTERS")]
pub static POD_COUNTERS: PerCpuArray<PodCounters> = PerCpuArray::pinned(MAX_PODS, 0);

/// Captured connections by client socket cookie, for as long as the connection
/// lives (getpeername reads it); the agent removes an entry when it is done with
/// the connection. Its size bounds the concurrent captured connections per node
/// (the agent sets it at load time).
#[map(name = "MESH_PENDING")]
pub static PENDING: HashMap<u64, OrigDst> = HashMap::pinned(DEFAULT_MAX_PENDING, 0);

/// Client (netns, port, family) -> socket cookie. LRU: an entry can only be
/// evicted after its PENDING entry was refused or removed, and then the agent
/// closes the connection (it cannot be told where it was going).
#[map(name = "MESH_CLIENTS")]
pub static CLIENTS: LruHashMap<ClientKey, u64> = LruHashMap::pinned(DEFAULT_MAX_PENDING, 0);

/// UDP sockets that addressed a DNS server -> that server (see `dns`).
#[map(name = "MESH_DNS_SOCKETS")]
pub static DNS_SOCKETS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(DEFAULT_MAX_PENDING, 0);

/// netns cookie -> the DNS server the pod last addressed (see `dns`).
#[map(name = "MESH_DNS_RESOLVERS")]
pub static DNS_RESOLVERS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PODS, 0);

/// The agent's inbound listeners, index slot * 2 + (0 IPv4 | 1 IPv6).
#[map(name = "MESH_INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockMap = SockMap::pinned(MAX_PODS * 2, 0);

#[map(name = "MESH_EXCLUDED_PORTS")]
pub static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::pinned(MAX_EXCLUSIONS, 0);

#[map(name = "MESH_EXCLUDED_CIDRS")]
pub static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> =
    LpmTrie::pinned(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// Fast path: sockets of local legs (see `fastpath`). Four per proxied flow at
/// most; the agent sizes it from `maxConnections`. Entries leave when their
/// socket closes.
#[map(name = "MESH_SOCKS")]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(DEFAULT_MAX_PENDING * 4, 0);

/// What each fast-path socket sent, and how; removed when the socket closes.
#[map(name = "MESH_SOCK_STATE")]
pub static SOCK_STATE: HashMap<SockKey, SockState> =
    HashMap::pinned(DEFAULT_MAX_PENDING * 4, BPF_F_NO_PREALLOC);

/// Splices the agent asked for, per direction; removed by the agent, or when
/// the socket closes.
#[map(name = "MESH_SPLICE")]
pub static SPLICE: HashMap<SockKey, Splice> =
    HashMap::pinned(DEFAULT_MAX_PENDING * 2, BPF_F_NO_PREALLOC);

/// Fast-path switches (index 0), written by the agent.
#[map(name = "MESH_FASTPATH_CONFIG")]
pub static FASTPATH_CONFIG: Array<u32> = Array::pinned(1, 0);

/// Fast-path counters (`FP_*`), summed over CPUs by the agent.
#[map(name = "MESH_FASTPATH_STATS")]
pub static FASTPATH_STATS: PerCpuArray<u64> = PerCpuArray::pinned(FP_STATS, 0);

/// Adds to a pod's counters (this CPU's copy).
#[inline(always)]
pub fn count(slot: u32, f: impl FnOnce(&mut PodCounters)) {
    if let Some(counters) = POD_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot: no other CPU writes this copy, and programs do not
        // preempt each other on one CPU for the same map value here.
        f(unsafe { &mut *counters });
    }
}
