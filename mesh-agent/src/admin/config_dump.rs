//! `/config_dump`: the configuration in force, as JSON, for operators (what
//! is enrolled, which services and policies apply and where each policy came
//! from, which certificates are held), and node settings that wait for a
//! restart. Never a private key.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    config::{NodeConfig, PodConfig, RemoteWorkload, ServiceConfig},
    state::{AgentState, CertificateView},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub config_generation: u64,
    /// The node settings in force (those the agent started with).
    pub node: NodeConfig,
    /// Settings changed since the start that apply at the next restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<PendingRestart>,
    pub pods: Vec<PodConfig>,
    pub workloads: Vec<RemoteWorkload>,
    pub services: Vec<ServiceConfig>,
    pub policies: Vec<PolicyView>,
    pub peer_authentications: Vec<PeerAuthenticationView>,
    pub request_authentications: Vec<RequestAuthenticationView>,
    /// Every HTTPRoute: accepted by each parent or why not, and the
    /// backends that cannot be served (their requests get 500).
    pub routes: Vec<crate::routes::RouteStatus>,
    pub certificates: Vec<CertificateView>,
    /// With `discovery: kubernetes`: where the pods, workloads and services
    /// above come from (the API, or the saved state until the API answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kubernetes::KubernetesStatus>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRestart {
    /// `node.yaml` as it is now.
    pub node: NodeConfig,
}

/// One authorization policy as compiled, with the file it came from.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub namespace: String,
    pub name: String,
    pub file: String,
    pub action: String,
    pub dry_run: bool,
    /// `None`: every workload in its namespace (or the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: usize,
    pub http_rules: bool,
    /// Why the document could not be enforced as written; it then stands
    /// here as a DENY-all over what it selects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforceable: Option<String>,
}

/// One PeerAuthentication as loaded.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationView {
    pub namespace: String,
    pub name: String,
    pub file: String,
    /// `None`: namespace-wide (mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: String,
    pub port_modes: BTreeMap<u16, String>,
}

/// One RequestAuthentication: its rules, and how far `jwksUri` fetching got.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationView {
    pub namespace: String,
    pub name: String,
    pub file: String,
    /// `None`: namespace-wide (mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub jwt_rules: Vec<JwtRuleView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRuleView {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// `inline`, or the `jwksUri`.
    pub jwks: String,
    /// Keys in use (0 while a `jwksUri` has not been fetched).
    pub keys: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_error: Option<String>,
}

pub fn dump(state: &AgentState) -> ConfigDump {
    let desired = state.desired();
    let policies = desired
        .policies
        .set
        .iter()
        .map(|p| PolicyView {
            namespace: p.name().namespace.clone(),
            name: p.name().name.clone(),
            file: p.source().display().to_string(),
            action: p.action().to_string(),
            dry_run: p.dry_run(),
            selector: p.selector().cloned(),
            rules: p.rule_count(),
            http_rules: p.has_http_rules(),
            unenforceable: p.unenforceable().map(ToString::to_string),
        })
        .collect();
    let peer_authentications = desired
        .policies
        .set
        .peer_authentications()
        .map(|p| PeerAuthenticationView {
            namespace: p.name().namespace.clone(),
            name: p.name().name.clone(),
            file: p.source().display().to_string(),
            selector: p.selector().cloned(),
            mode: p.mode().to_string(),
            port_modes: p
                .port_modes()
                .iter()
                .map(|(port, mode)| (*port, mode.to_string()))
                .collect(),
        })
        .collect();
    let request_authentications = desired
        .policies
        .set
        .request_authentications()
        .map(|r| RequestAuthenticationView {
            namespace: r.name().namespace.clone(),
            name: r.name().name.clone(),
            file: r.source().display().to_string(),
            selector: r.selector().cloned(),
            jwt_rules: r
                .rules()
                .iter()
                .map(|rule| {
                    let (jwks, keys, fetch_error) = match &rule.keys {
                        crate::policy::JwtKeys::Set(set) => {
                            ("inline".to_string(), set.keys.len(), None)
                        }
                        crate::policy::JwtKeys::Remote(remote) => (
                            remote.uri().to_string(),
                            remote.get().map_or(0, |set| set.keys.len()),
                            remote.last_error(),
                        ),
                    };
                    JwtRuleView {
                        issuer: rule.issuer.clone(),
                        audiences: rule.audiences.clone(),
                        jwks,
                        keys,
                        fetch_error,
                    }
                })
                .collect(),
        })
        .collect();
    ConfigDump {
        config_generation: state.config_generation(),
        node: desired.node.clone(),
        pending_restart: state
            .pending_node
            .read()
            .clone()
            .map(|node| PendingRestart { node }),
        pods: desired.pods.clone(),
        workloads: desired.workloads.clone(),
        services: desired.services.clone(),
        policies,
        peer_authentications,
        request_authentications,
        routes: state.proxy.snapshot().routes.statuses().to_vec(),
        certificates: state.certificates(),
        kubernetes: state.kubernetes.as_ref().map(|k| k.status()),
    }
}
