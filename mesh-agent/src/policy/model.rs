//! The Istio `AuthorizationPolicy` schema as written in YAML. Every struct
//! denies unknown fields: a typo (`notPort`, `namespace` under `source`) must
//! fail the load, never widen or narrow a policy silently. Fields that Istio
//! has but mesh-agent does not implement are modelled (as raw YAML) so the
//! loader can reject them with a precise message instead of "unknown field".

use std::collections::BTreeMap;

use serde::{Deserialize, de::IgnoredAny};
use serde_yaml::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPolicy {
    #[allow(dead_code)] // checked on the lenient first pass
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: RawMetadata,
    /// Absent or null means `spec: {}` (the proto default): allow-nothing.
    #[serde(default)]
    pub spec: Option<RawSpec>,
    /// Written by the API server (`kubectl get -o yaml` prints it): not
    /// policy, accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawMetadata {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Object labels are Kubernetes metadata, not policy: accepted, ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub labels: Option<BTreeMap<String, String>>,
    // What the API server sets on every object, as `kubectl get -o yaml`
    // prints it: not policy, accepted and ignored (an unknown field stays
    // an error).
    #[serde(default)]
    #[allow(dead_code)]
    uid: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    resource_version: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    creation_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    deletion_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    deletion_grace_period_seconds: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    managed_fields: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    self_link: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    finalizers: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    owner_references: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    generate_name: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSpec {
    pub selector: Option<RawSelector>,
    pub target_ref: Option<Value>,
    pub target_refs: Option<Value>,
    pub action: Option<String>,
    pub provider: Option<Value>,
    pub rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub from: Option<Vec<RawFrom>>,
    pub to: Option<Vec<RawTo>>,
    pub when: Option<Vec<RawCondition>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFrom {
    pub source: Option<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTo {
    pub operation: Option<RawOperation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSource {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawOperation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawCondition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}
