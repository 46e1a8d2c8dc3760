//! `pods.yaml`: the pods running on this node, which the agent enrols.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// The pods file. Unknown fields are errors, never ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodsFile {
    #[serde(default)]
    pub pods: Vec<PodConfig>,
}

/// One pod on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// The pod's network namespace, e.g. `/var/run/netns/cni-...` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; the kernel programs are attached here and so
    /// apply to every container of the pod.
    pub cgroup: PathBuf,
    /// Traffic of this pod that is not captured.
    #[serde(default)]
    pub capture_exclusions: CaptureExclusions,
    /// Ports of this pod that serve plain TCP (MySQL, SMTP, ...): connections
    /// to them are never parsed as HTTP; its policies decide each connection
    /// as a whole (HTTP fields as on any TCP traffic), at once.
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
    /// The kubelet's health probes: connections from these node addresses
    /// to these ports are let in whatever the pod's policies say (as Istio
    /// does), and counted; anything else from the node is decided as usual.
    #[serde(default)]
    pub kubelet_probes: KubeletProbes,
}

/// `kubeletProbes`: where the kubelet probes a pod from, and which ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeletProbes {
    /// The node's own addresses (the pod's `status.hostIPs`).
    #[serde(default)]
    pub from: Vec<std::net::IpAddr>,
    /// The ports of the pod's HTTP, TCP and gRPC probes.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// What capture leaves alone for one pod. Everything else of an enrolled pod goes
/// through the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaptureExclusions {
    /// Destination ports of outbound connections.
    #[serde(default)]
    pub outbound_ports: Vec<u16>,
    /// Destination networks of outbound connections.
    #[serde(default)]
    pub outbound_cidrs: Vec<ipnet::IpNet>,
    /// Ports of the pod that inbound connections may reach directly (e.g. a
    /// kubelet probe port).
    #[serde(default)]
    pub inbound_ports: Vec<u16>,
}

fn default_service_account() -> String {
    "default".to_string()
}

impl PodConfig {
    /// `namespace/name`, how operators name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
