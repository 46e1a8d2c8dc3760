//! The parts of the CNI specification the plugin uses
//! (<https://www.cni.dev/docs/spec/>, version 1.0.0): the plugin's network
//! configuration from stdin, the `CNI_*` environment, the previous
//! plugin's result (`prevResult`), and the error and version answers.
//!
//! `prevResult` is kept as the JSON it came as and given back unchanged: a
//! chained plugin that adds nothing must not lose what the others said.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The CNI versions this plugin reads and answers in.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes the specification reserves (section "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    /// "Try again later": the runtime retries (the agent is not there yet).
    TryAgainLater = 11,
}

/// A CNI error, written to stdout as the specification's error result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error result, in `version`.
    pub fn to_json(&self, version: &str) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The plugin's own configuration in the conflist (besides `type`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginSettings {
    /// The agent's socket.
    pub agent_socket: std::path::PathBuf,
    /// The namespaces the agent last saw labelled for the mesh: read only
    /// when the agent cannot be reached, to let other pods start.
    pub enrolled_namespaces_file: std::path::PathBuf,
    /// How long ADD waits for the agent in all (default 30 s, within the
    /// kubelet's 4 minutes for a sandbox).
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

fn default_timeout_seconds() -> u64 {
    30
}

/// The network configuration on stdin: the conflist's common fields, this
/// plugin's entry, and the result of the plugins before it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(flatten)]
    pub settings: PluginSettings,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network configuration on stdin is not valid for mesh-cni",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// The pod's addresses from `prevResult`: those on interfaces in the
    /// sandbox `netns` (all of them if the result names no interface).
    pub fn pod_ips(&self, netns: &str) -> Result<Vec<IpAddr>, CniError> {
        let prev = self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "mesh-cni has no prevResult: it must be chained after the plugin that gives the pod its address",
                "",
            )
        })?;
        prev_result_ips(prev, netns).map_err(|why| {
            CniError::new(
                ErrorCode::Decode,
                "prevResult has no usable pod address",
                why,
            )
        })
    }
}

/// See [`NetConf::pod_ips`]. The result format of 0.3.x, 0.4.0 and 1.x:
/// `ips[].address` (CIDR), `ips[].interface` (index into `interfaces`),
/// `interfaces[].sandbox` (the netns path for the container's side).
pub fn prev_result_ips(prev: &Value, netns: &str) -> Result<Vec<IpAddr>, String> {
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let in_sandbox = |index: Option<u64>| -> bool {
        match index.and_then(|i| interfaces.get(usize::try_from(i).ok()?)) {
            Some(interface) => interface["sandbox"]
                .as_str()
                .is_some_and(|s| s.is_empty() || s == netns),
            None => true,
        }
    };
    let mut ips = Vec::new();
    for entry in prev["ips"].as_array().into_iter().flatten() {
        let address = entry["address"]
            .as_str()
            .ok_or_else(|| format!("an entry of ips has no address: {entry}"))?;
        let ip = address.split('/').next().unwrap_or(address);
        let ip: IpAddr = ip
            .parse()
            .map_err(|e| format!("ips[].address {address:?}: {e}"))?;
        if in_sandbox(entry["interface"].as_u64()) && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(format!("no address in {prev}"));
    }
    Ok(ips)
}

/// The pod's identity as the runtime gives it in `CNI_ARGS`
/// (`K8S_POD_NAMESPACE=...;K8S_POD_NAME=...;K8S_POD_UID=...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodArgs {
    /// None when `CNI_ARGS` says nothing of a Kubernetes pod (a sandbox
    /// made by something else than a kubelet): not the mesh's business.
    pub fn parse(cni_args: &str) -> Option<Self> {
        let mut args = PodArgs::default();
        for pair in cni_args.split(';') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            match key {
                "K8S_POD_NAMESPACE" => args.namespace = value.to_string(),
                "K8S_POD_NAME" => args.name = value.to_string(),
                "K8S_POD_UID" => args.uid = value.to_string(),
                _ => {}
            }
        }
        (!args.namespace.is_empty() && !args.name.is_empty()).then_some(args)
    }
}

/// The answer to `VERSION`.
pub fn version_result(version: &str) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_ips_are_those_in_its_sandbox() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "br0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [
                {"address": "10.1.200.7/16", "interface": 2, "gateway": "10.1.0.1"},
                {"address": "fd00::7/64", "interface": 2},
                {"address": "10.9.9.9/32", "interface": 0}
            ]
        });
        assert_eq!(
            prev_result_ips(&prev, "/var/run/netns/cni-1").unwrap(),
            vec![
                "10.1.200.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert!(prev_result_ips(&serde_json::json!({"ips": []}), "x").is_err());
        assert!(
            prev_result_ips(&serde_json::json!({"ips": [{"address": "nope"}]}), "x")
                .unwrap_err()
                .contains("nope")
        );
    }

    #[test]
    fn cni_args_name_the_pod_or_nothing() {
        let args = PodArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .unwrap();
        assert_eq!(
            args,
            PodArgs {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u-1".into()
            }
        );
        assert_eq!(PodArgs::parse("IgnoreUnknown=1"), None);
        assert_eq!(PodArgs::parse(""), None);
    }

    #[test]
    fn configuration_errors_say_what_is_wrong() {
        let err = NetConf::parse(br#"{"cniVersion":"0.2.0","type":"mesh-cni","agentSocket":"/s","enrolledNamespacesFile":"/f"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion as u32);
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","type":"mesh-cni"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::Decode as u32);
        assert!(err.details.contains("agentSocket"), "{err}");
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni","agentSocket":"/s","enrolledNamespacesFile":"/f"}"#).unwrap();
        assert_eq!(conf.settings.timeout_seconds, 30);
        assert_eq!(
            conf.pod_ips("x").unwrap_err().code,
            ErrorCode::InvalidConfig as u32
        );
    }
}
