//! Maps shared with the agent. Names and value types come from `mesh-common`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use mesh_common::{MAX_PODS, PodCounters, PodInfo};

/// Enrolled pods by netns cookie; written by the agent.
#[map(name = "MESH_PODS")]
pub static PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(MAX_PODS, 0);

/// Per-pod counters, indexed by `PodInfo::slot`; read (and summed) by the agent.
#[map(name = "MESH_POD_COUNTERS")]
pub static POD_COUNTERS: PerCpuArray<PodCounters> = PerCpuArray::with_max_entries(MAX_PODS, 0);
