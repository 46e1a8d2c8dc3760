//! Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1) as written in a
//! file or printed by `kubectl get -o yaml`. Every field of the
//! specification's `spec` is known here: the supported ones are read, the
//! others are kept as raw values so that the loader can name them as not
//! supported (never ignored). `metadata` beyond name, namespace and
//! creation time, and `status`, are the API server's and are skipped.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_yaml::Value;

use super::filters::RawFilter;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawHttpRoute {
    #[allow(dead_code)] // checked on the lenient pass
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: RawMetadata,
    #[serde(default)]
    pub spec: RawSpec,
    /// Written by controllers; what this agent thinks is in `/config_dump`.
    #[serde(default)]
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawMetadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// RFC 3339, as the API server prints it: the older route wins a tie.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSpec {
    #[serde(default)]
    pub parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Absent: one rule matching every path, with no backend (the
    /// specification's default).
    #[serde(default)]
    pub rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Option<Vec<RawMatch>>,
    #[serde(default)]
    pub backend_refs: Vec<RawBackendRef>,
    #[serde(default)]
    pub filters: Vec<RawFilter>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    // Not supported yet: named at load when present and not empty.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    #[serde(default)]
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub path: Option<RawPathMatch>,
    #[serde(default)]
    pub headers: Vec<RawNameMatch>,
    #[serde(default)]
    pub query_params: Vec<RawNameMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPathMatch {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawNameMatch {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<RawFilter>,
}

/// Gateway API durations (GEP-2257): `1h`, `500ms`, `1m30s`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// GEP-1731 (`HTTPRouteRetry`): codes, attempts, backoff.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}
