//! `node.yaml`: facts about this node and the agent's own settings.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The node configuration. Unknown fields are errors, never ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    /// The Kubernetes node name.
    pub name: String,
    /// Where the admin API (health, readiness, metrics, status) listens.
    /// Loopback by default: it is for the node's own probes and operators.
    #[serde(default = "default_admin_address")]
    pub admin_address: SocketAddr,
    /// Mount point of the BPF filesystem (mounted by the agent if it is not).
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
}

pub fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::ADMIN_PORT))
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}
