//! Types shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel and userspace see the
//! same bytes. Map names are constants so both sides cannot drift apart.
#![no_std]

/// Enrolled pods, keyed by the pod's network-namespace cookie
/// (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`). The cookie comes from kernel state,
/// so a pod cannot pretend to be another one.
pub const MAP_PODS: &str = "MESH_PODS";
/// Per-pod counters, a per-CPU array indexed by [`PodInfo::slot`].
pub const MAP_POD_COUNTERS: &str = "MESH_POD_COUNTERS";

/// How many pods one agent can enrol at once (size of the pod maps).
pub const MAX_PODS: u32 = 4096;

/// Value of [`MAP_PODS`]: what the kernel knows about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Index of this pod's entry in [`MAP_POD_COUNTERS`].
    pub slot: u32,
    /// Reserved for per-pod flags; zero for now.
    pub flags: u32,
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
}

impl PodCounters {
    /// Adds another CPU's copy to this one.
    pub fn accumulate(&mut self, other: &PodCounters) {
        self.connect4 = self.connect4.wrapping_add(other.connect4);
        self.connect6 = self.connect6.wrapping_add(other.connect6);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], Copy, contain only integers and have no padding.
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::PodCounters {}
}
