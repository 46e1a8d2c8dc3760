//! `workloads.yaml`: mesh workloads on other nodes that pods here may talk to.
//! Traffic to them goes through the mTLS tunnel to their node's agent, which
//! must prove the identity listed here.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadsFile {
    #[serde(default)]
    pub workloads: Vec<RemoteWorkload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoteWorkload {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node it runs on (for operators; routing uses the address).
    pub node: String,
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
}

fn default_service_account() -> String {
    "default".to_string()
}

impl RemoteWorkload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
