//! `services.yaml`: services with virtual IPs; a captured connection to a
//! service address is served by one of its endpoints, chosen by the agent.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicesFile {
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    /// Virtual IPs (IPv4 and/or IPv6) applications dial.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Prefer endpoints on this node, then in this zone (default), or not.
    #[serde(default)]
    pub locality: LocalityConfig,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Weighted subsets for canaries, e.g. v1 95 / v2 5: a subset is picked by
    /// weight, then an endpoint among its members (by labels).
    #[serde(default)]
    pub subsets: Vec<SubsetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubsetConfig {
    pub name: String,
    pub weight: u32,
    /// Endpoints whose labels include all of these belong to the subset.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// `tcp` (balanced per connection), `http`, `http2`/`grpc` (per request: to come).
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LocalityConfig {
    PreferNode,
    #[default]
    PreferZone,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointConfig {
    pub name: String,
    pub address: IpAddr,
    pub node: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_protocol() -> String {
    "tcp".to_string()
}

fn default_weight() -> u32 {
    1
}

impl ServiceConfig {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
