//! `/config_dump`: the configuration in force, as JSON, for operators (what
//! is enrolled, which services and policies apply and where each policy came
//! from, which certificates are held). Never a private key.

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
    pub node: NodeConfig,
    pub pods: Vec<PodConfig>,
    pub workloads: Vec<RemoteWorkload>,
    pub services: Vec<ServiceConfig>,
    pub policies: Vec<PolicyView>,
    pub certificates: Vec<CertificateView>,
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
}

pub fn dump(state: &AgentState) -> ConfigDump {
    let config = state.config.read().expect("config lock").clone();
    let mut policies = Vec::new();
    // Each file on its own, to say where each policy came from; they were
    // validated together when the configuration was loaded.
    for (path, text) in &config.policy_files {
        match crate::policy::load([(path, text.as_str())]) {
            Ok(set) => policies.extend(set.iter().map(|p| PolicyView {
                namespace: p.name().namespace.clone(),
                name: p.name().name.clone(),
                file: path.display().to_string(),
                action: p.action().to_string(),
                dry_run: p.dry_run(),
                selector: p.selector().cloned(),
                rules: p.rule_count(),
                http_rules: p.has_http_rules(),
            })),
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "policy file not shown in the config dump")
            }
        }
    }
    ConfigDump {
        config_generation: state
            .config_generation
            .load(std::sync::atomic::Ordering::SeqCst),
        node: config.node.clone(),
        pods: config.pods.clone(),
        workloads: config.workloads.clone(),
        services: config.services.clone(),
        policies,
        certificates: state.certificates(),
    }
}
