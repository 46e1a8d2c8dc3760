//! A pod of this node as the data path needs it.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use crate::{capture::pod_netns::PodNetns, identity::SpiffeId, policy};

/// An enrolled pod: its namespace (to make sockets in), identity and
/// addresses, and what selects its policies.
pub struct PodHandle {
    /// `namespace/name`.
    pub key: String,
    pub netns_cookie: u64,
    pub netns: PodNetns,
    /// The pod's workload identity.
    pub identity: SpiffeId,
    pub addrs: Vec<IpAddr>,
    /// Namespace and labels, for selecting its authorization policies.
    pub workload: policy::Workload,
    /// Its connections being proxied now (for `limits.connectionsPerPod`).
    pub open_connections: Arc<AtomicUsize>,
    /// Ports declared plain TCP (`opaquePorts`), sorted.
    pub opaque_ports: Vec<u16>,
    /// Where the kubelet probes this pod from, and which ports.
    pub kubelet_probes: crate::config::KubeletProbes,
    /// Which address deliveries into the pod come from.
    pub source_address: super::source_address::SourceAddress,
}

impl PodHandle {
    /// The workload name Istio's metrics use: the `app` label, else the pod name.
    pub fn workload_name(&self) -> String {
        self.workload
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| self.key.rsplit('/').next().unwrap_or(&self.key).to_string())
    }

    /// Whether connections to `port` are decided per request (parsed as
    /// HTTP): the port is not declared opaque and one of the pod's HTTP
    /// rules may apply on it. Otherwise the connection is decided once, at
    /// once, and a server that speaks first is never kept waiting.
    pub fn decided_per_request(&self, policies: &policy::CompiledPolicies, port: u16) -> bool {
        self.opaque_ports.binary_search(&port).is_err()
            && policies
                .for_workload(&self.workload)
                .has_http_rules_on(port)
    }

    /// The pod's address of the same family as `other`.
    pub fn addr_like(&self, other: IpAddr) -> IpAddr {
        self.addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == other.is_ipv4())
            .unwrap_or(other)
    }
}
