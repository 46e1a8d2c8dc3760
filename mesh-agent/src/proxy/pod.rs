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

    /// The pod's address of the same family as `other`.
    pub fn addr_like(&self, other: IpAddr) -> IpAddr {
        self.addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == other.is_ipv4())
            .unwrap_or(other)
    }
}
