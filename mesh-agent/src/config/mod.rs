//! The node-local configuration directory: the agent's only control plane.
//!
//! Every file is parsed and validated in full before anything is used, so a bad
//! file never half-applies.

mod error;
pub mod mesh;
mod node;
mod pods;
mod services;
pub mod source;
pub mod watch;
mod workloads;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

pub use error::ConfigError;
pub use node::{
    CniSettings, Discovery, HttpSettings, KubernetesSettings, Limits, NodeConfig, OnStop,
    OtlpProtocol, TracingSettings, default_admin_address,
};
pub use pods::{CaptureExclusions, KubeletProbes, PodConfig, PodsFile};
pub use services::{
    EndpointConfig, HashKey, LocalityConfig, OutlierDetectionConfig, RetriesConfig, RouteConfig,
    ServiceConfig, ServicePort, ServicesFile, SubsetConfig, port_key,
};
pub use workloads::{RemoteWorkload, WorkloadsFile};

pub const NODE_FILE: &str = "node.yaml";
pub const PODS_FILE: &str = "pods.yaml";
pub const WORKLOADS_FILE: &str = "workloads.yaml";
pub const SERVICES_FILE: &str = "services.yaml";
/// Istio `AuthorizationPolicy` documents: every `*.yaml` / `*.yml` in here.
pub const POLICIES_DIR: &str = "policies";
/// Gateway API `HTTPRoute` documents: every `*.yaml` / `*.yml` in here.
pub const ROUTES_DIR: &str = "routes";

use crate::desired::Desired;

/// Parses every policy file once. Without `last_good`, all-or-nothing:
/// the first error rejects. With it (the policy files of the last load
/// that succeeded), a file that does not load is replaced by its last good
/// version, or left out if it never loaded, and the others load: one bad
/// file no longer holds back every other policy change. Returns the errors
/// of the files so kept back.
fn load_policies(
    mut files: Vec<(PathBuf, String)>,
    last_good: Option<&[(PathBuf, String)]>,
) -> Result<(crate::desired::Policies, Vec<ConfigError>), ConfigError> {
    let mut kept_back: Vec<ConfigError> = Vec::new();
    loop {
        let error = match crate::policy::load(files.iter().map(|(p, t)| (p, t.as_str()))) {
            Ok(set) => {
                let policies = crate::desired::Policies {
                    files,
                    set: std::sync::Arc::new(set),
                };
                return Ok((policies, kept_back));
            }
            Err(error) => document_error(error),
        };
        let Some(last_good) = last_good else {
            return Err(error);
        };
        let Some(at) = files.iter().position(|(path, _)| *path == error.file) else {
            return Err(error);
        };
        let tried_before = kept_back.iter().any(|k| k.file == error.file);
        let previous = last_good
            .iter()
            .find(|(path, _)| *path == error.file)
            .map(|(_, text)| text);
        // Each file is put back at most once, then left out: bounded.
        match previous {
            Some(text) if !tried_before && *text != files[at].1 => files[at].1 = text.clone(),
            _ => {
                files.remove(at);
            }
        }
        if !tried_before {
            kept_back.push(error);
        }
    }
}

fn document_error(e: crate::policy::LoadError) -> ConfigError {
    let field = match &e.field {
        Some(field) => format!("document {} ({}): {field}", e.document, e.policy),
        None => format!("document {} ({})", e.document, e.policy),
    };
    let mut error = ConfigError::new(&e.file, e.message.clone())
        .with_field(field)
        .with_line(e.line);
    error.column = e.column;
    error
}

/// Every YAML file of a directory (policies, routes), in name order; hidden entries (Kubernetes' `..data`
/// machinery) are skipped, symlinks followed.
fn read_yaml_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| ConfigError::new(dir, format!("cannot list: {e}")))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| read(&p).map(|text| (p, text)))
        .collect()
}

/// Kubernetes' ConfigMap volumes: every file is a symlink through this one,
/// which is swapped in a single rename when the ConfigMap changes.
const CONFIGMAP_VERSION_LINK: &str = "..data";

/// How many times a read that spanned a ConfigMap swap is started again.
const CONFIGMAP_READ_ATTEMPTS: usize = 5;

/// The node's name given at start, in place of node.yaml's `name`.
static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the node's name for every later load (`--node-name`, or
/// `NODE_NAME` from the downward API's `spec.nodeName`): one ConfigMap then
/// serves every node. The first call wins.
pub fn set_node_name(name: String) {
    let _ = NODE_NAME.set(name);
}

/// Loads and validates the configuration directory, as one version of it: a
/// read that spans a ConfigMap update (some files old, some new) is never
/// returned; it is read again.
pub fn load_dir(dir: &Path) -> Result<Desired, ConfigError> {
    read_one_version(dir, |dir| load_dir_once(dir, None)).map(|(desired, _)| desired)
}

/// [`load_dir`] for a reload: a policy file that does not load keeps its
/// version in `last_good` (the policy files in force), or stays out if it
/// never loaded, while every other change applies. Returns the errors of
/// the policy files kept back; any other bad file still rejects the load.
pub fn load_dir_keeping_policies(
    dir: &Path,
    last_good: &[(PathBuf, String)],
) -> Result<(Desired, Vec<ConfigError>), ConfigError> {
    read_one_version(dir, |dir| load_dir_once(dir, Some(last_good)))
}

/// What a reload reports for policy files kept back (see
/// [`load_dir_keeping_policies`]).
pub fn kept_back_reason(kept_back: &[ConfigError]) -> String {
    let errors: Vec<String> = kept_back.iter().map(ToString::to_string).collect();
    format!(
        "{} (this file keeps its last good version, or stays out if it never loaded; the other changes applied)",
        errors.join("; ")
    )
}

/// Runs `read` until the ConfigMap version (`..data`'s target) is the same
/// before and after it; a directory without one is read once.
fn read_one_version<T>(dir: &Path, mut read: impl FnMut(&Path) -> T) -> T {
    let version = || std::fs::read_link(dir.join(CONFIGMAP_VERSION_LINK)).ok();
    let mut before = version();
    for _ in 1..CONFIGMAP_READ_ATTEMPTS {
        let result = read(dir);
        let after = version();
        if after == before {
            return result;
        }
        before = after;
    }
    // Swapped under every attempt: this last read is as good as any; a mix
    // of versions that does not validate is rejected like any bad change,
    // and the swap's own event brings another read.
    read(dir)
}

fn load_dir_once(
    dir: &Path,
    last_good_policies: Option<&[(PathBuf, String)]>,
) -> Result<(Desired, Vec<ConfigError>), ConfigError> {
    if !dir.is_dir() {
        return Err(ConfigError::new(
            dir,
            "the configuration directory does not exist or is not a directory",
        ));
    }
    let node_path = dir.join(NODE_FILE);
    let node_text = read(&node_path)?;
    let mut node: NodeConfig =
        serde_yaml::from_str(&node_text).map_err(|e| ConfigError::from_yaml(&node_path, &e))?;
    if let Some(name) = NODE_NAME.get() {
        node.name = name.clone();
    }
    if node.name.trim().is_empty() {
        return Err(ConfigError::new(
            &node_path,
            "must not be empty (or give the node's name with --node-name or NODE_NAME)",
        )
        .with_field("name")
        .with_line(error::find_line(&node_text, "name", &node.name)));
    }

    let pods_path = dir.join(PODS_FILE);
    // A node may have no pods yet: a missing pods file means none.
    let pods = if pods_path.exists() {
        let text = read(&pods_path)?;
        let file: PodsFile = if text.trim().is_empty() {
            PodsFile::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::from_yaml(&pods_path, &e))?
        };
        validate_pods(&pods_path, &text, &file.pods)?;
        file.pods
    } else {
        Vec::new()
    };
    validate_node(&node_path, &node_text, &node)?;

    let workloads_path = dir.join(WORKLOADS_FILE);
    let workloads = if workloads_path.exists() {
        let text = read(&workloads_path)?;
        let file: WorkloadsFile = if text.trim().is_empty() {
            WorkloadsFile::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::from_yaml(&workloads_path, &e))?
        };
        validate_workloads(&workloads_path, &text, &file.workloads, &pods)?;
        file.workloads
    } else {
        Vec::new()
    };
    let policy_files = read_yaml_files(&dir.join(POLICIES_DIR))?;
    let services_path = dir.join(SERVICES_FILE);
    let services = if services_path.exists() {
        let text = read(&services_path)?;
        let file: ServicesFile = if text.trim().is_empty() {
            ServicesFile::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::from_yaml(&services_path, &e))?
        };
        validate_services(&services_path, &text, &file.services)?;
        file.services
    } else {
        Vec::new()
    };
    let (policies, kept_back) = load_policies(policy_files, last_good_policies)?;
    let route_files = read_yaml_files(&dir.join(ROUTES_DIR))?;
    let loaded = crate::routes::load(route_files.iter().map(|(p, t)| (p, t.as_str())))
        .map_err(document_error)?;
    let routes = crate::routes::Routes {
        files: route_files,
        routes: std::sync::Arc::new(loaded.routes),
        destination_rules: std::sync::Arc::new(loaded.destination_rules),
    };
    let desired = Desired {
        dir: dir.to_path_buf(),
        node,
        pods,
        workloads,
        policies,
        services,
        routes,
    };
    Ok((desired, kept_back))
}

fn validate_services(
    path: &Path,
    text: &str,
    services: &[ServiceConfig],
) -> Result<(), ConfigError> {
    let mut vips = HashSet::new();
    let mut keys = HashSet::new();
    for (i, svc) in services.iter().enumerate() {
        let err = |field: &str, value: &str, msg: String| {
            ConfigError::new(path, msg)
                .with_field(format!("services[{i}].{field}"))
                .with_line(error::find_line(text, field, value))
        };
        if !keys.insert(svc.key()) {
            return Err(err(
                "name",
                &svc.name,
                format!("service {} is listed twice", svc.key()),
            ));
        }
        if svc.vips.is_empty() || svc.ports.is_empty() {
            return Err(err(
                "name",
                &svc.name,
                "needs at least one VIP and one port".into(),
            ));
        }
        for vip in &svc.vips {
            if !vips.insert(*vip) {
                return Err(err(
                    "vips",
                    &vip.to_string(),
                    format!("VIP {vip} belongs to two services"),
                ));
            }
        }
        for (k, endpoint) in svc.endpoints.iter().enumerate() {
            if let Some(sa) = &endpoint.service_account {
                let namespace = endpoint.namespace.as_deref().unwrap_or(&svc.namespace);
                if let Err(e) = crate::identity::SpiffeId::new("cluster.local", namespace, sa) {
                    return Err(ConfigError::new(path, e.to_string())
                        .with_field(format!("services[{i}].endpoints[{k}].serviceAccount"))
                        .with_line(error::find_line(text, "serviceAccount", sa)));
                }
            }
        }
        for (k, route) in svc.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                return Err(ConfigError::new(path, "must start with /")
                    .with_field(format!("services[{i}].routes[{k}].pathPrefix"))
                    .with_line(error::find_line(text, "pathPrefix", &route.path_prefix)));
            }
        }
        let outlier = &svc.outlier_detection;
        if outlier.consecutive_failures == 0 {
            return Err(ConfigError::new(path, "must be at least 1")
                .with_field(format!(
                    "services[{i}].outlierDetection.consecutiveFailures"
                ))
                .with_line(error::find_line(text, "consecutiveFailures", "0")));
        }
        if outlier.max_ejection_percent > 100 {
            return Err(ConfigError::new(path, "must be at most 100")
                .with_field(format!("services[{i}].outlierDetection.maxEjectionPercent"))
                .with_line(error::find_line(
                    text,
                    "maxEjectionPercent",
                    &outlier.max_ejection_percent.to_string(),
                )));
        }
        if svc.connect_timeout.is_zero() {
            return Err(ConfigError::new(path, "must be longer than zero")
                .with_field(format!("services[{i}].connectTimeout"))
                .with_line(error::find_line(text, "connectTimeout", "0s")));
        }
        for (j, port) in svc.ports.iter().enumerate() {
            if !matches!(port.protocol.as_str(), "tcp" | "http" | "http2" | "grpc") {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "unknown protocol {:?} (tcp, http, http2, grpc)",
                        port.protocol
                    ),
                )
                .with_field(format!("services[{i}].ports[{j}].protocol"))
                .with_line(error::find_line(text, "protocol", &port.protocol)));
            }
        }
    }
    Ok(())
}

fn validate_node(path: &Path, text: &str, node: &NodeConfig) -> Result<(), ConfigError> {
    if node.max_connections == 0 {
        return Err(ConfigError::new(path, "must be at least 1")
            .with_field("maxConnections")
            .with_line(error::find_line(text, "maxConnections", "0")));
    }
    if node.trust_domain.is_empty() || node.trust_domain.contains(['/', ':']) {
        return Err(
            ConfigError::new(path, "must be a trust domain name such as cluster.local")
                .with_field("trustDomain")
                .with_line(error::find_line(text, "trustDomain", &node.trust_domain)),
        );
    }
    if let Some(identity) = &node.identity
        && [
            identity.issuer.is_some(),
            identity.files.is_some(),
            identity.signing_request.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count()
            != 1
    {
        return Err(ConfigError::new(
            path,
            "give exactly one source: `signingRequest`, `issuer` or `files`",
        )
        .with_field("identity")
        .with_line(error::find_line(text, "identity", "")));
    }
    if let Some(issuer) = node.identity.as_ref().and_then(|i| i.issuer.as_ref()) {
        validate_renewal(path, text, "issuer", issuer.renew_at, issuer.lifetime)?;
    }
    if let Some(asked) = node
        .identity
        .as_ref()
        .and_then(|i| i.signing_request.as_ref())
    {
        validate_renewal(path, text, "signingRequest", asked.renew_at, asked.lifetime)?;
        if !asked.address.starts_with("https://") {
            return Err(ConfigError::new(
                path,
                "must be an https:// address (the CA is only asked over TLS)",
            )
            .with_field("identity.signingRequest.address")
            .with_line(error::find_line(text, "address", &asked.address)));
        }
    }
    if let Some(tracing) = &node.tracing {
        validate_tracing(path, text, tracing)?;
    }
    Ok(())
}

/// `renewAt` and `lifetime` of an identity source (`issuer` or
/// `signingRequest`): a fraction strictly between 0 and 1, a lifetime above zero.
fn validate_renewal(
    path: &Path,
    text: &str,
    source: &str,
    renew_at: f64,
    lifetime: std::time::Duration,
) -> Result<(), ConfigError> {
    if !(renew_at > 0.0 && renew_at < 1.0) {
        return Err(
            ConfigError::new(path, "must be between 0 and 1 (a fraction of the lifetime)")
                .with_field(format!("identity.{source}.renewAt"))
                .with_line(error::find_key_line(text, "renewAt")),
        );
    }
    if lifetime.is_zero() {
        return Err(ConfigError::new(path, "must be longer than zero")
            .with_field(format!("identity.{source}.lifetime"))
            .with_line(error::find_key_line(text, "lifetime")));
    }
    Ok(())
}

fn validate_tracing(path: &Path, text: &str, tracing: &TracingSettings) -> Result<(), ConfigError> {
    let endpoint_ok = tracing.endpoint.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
    });
    if !endpoint_ok {
        return Err(ConfigError::new(
            path,
            "must be an http:// or https:// URL naming the collector's host",
        )
        .with_field("tracing.endpoint")
        .with_line(error::find_key_line(text, "endpoint")));
    }
    let percentage = tracing.random_sampling_percentage;
    if !(0.0..=100.0).contains(&percentage) {
        return Err(ConfigError::new(path, "must be a percentage, 0 to 100")
            .with_field("tracing.randomSamplingPercentage")
            .with_line(error::find_key_line(text, "randomSamplingPercentage")));
    }
    if tracing.max_queued_spans == 0 {
        return Err(ConfigError::new(path, "must be at least 1")
            .with_field("tracing.maxQueuedSpans")
            .with_line(error::find_key_line(text, "maxQueuedSpans")));
    }
    if tracing.export_timeout.is_zero() {
        return Err(ConfigError::new(path, "must be longer than zero")
            .with_field("tracing.exportTimeout")
            .with_line(error::find_key_line(text, "exportTimeout")));
    }
    Ok(())
}

fn validate_workloads(
    path: &Path,
    text: &str,
    workloads: &[RemoteWorkload],
    pods: &[PodConfig],
) -> Result<(), ConfigError> {
    let mut addresses: HashSet<std::net::IpAddr> = pods
        .iter()
        .flat_map(|p| {
            p.ipv4
                .map(std::net::IpAddr::V4)
                .into_iter()
                .chain(p.ipv6.map(std::net::IpAddr::V6))
        })
        .collect();
    let mut keys = HashSet::new();
    for (i, w) in workloads.iter().enumerate() {
        let err = |field: &str, value: &str, msg: String| {
            ConfigError::new(path, msg)
                .with_field(format!("workloads[{i}].{field}"))
                .with_line(error::find_line(text, field, value))
        };
        for (field, value) in [
            ("name", &w.name),
            ("namespace", &w.namespace),
            ("node", &w.node),
        ] {
            if value.trim().is_empty() {
                return Err(err(field, value, "must not be empty".into()));
            }
        }
        if !keys.insert(w.key()) {
            return Err(err(
                "name",
                &w.name,
                format!("workload {} is listed twice", w.key()),
            ));
        }
        if w.ipv4.is_none() && w.ipv6.is_none() {
            return Err(err("name", &w.name, "needs an ipv4 or ipv6 address".into()));
        }
        let ips = w
            .ipv4
            .map(std::net::IpAddr::V4)
            .into_iter()
            .chain(w.ipv6.map(std::net::IpAddr::V6));
        for ip in ips {
            if !addresses.insert(ip) {
                let field = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
                return Err(err(
                    field,
                    &ip.to_string(),
                    format!("address {ip} is already a pod or workload"),
                ));
            }
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))
}

fn validate_pods(path: &Path, text: &str, pods: &[PodConfig]) -> Result<(), ConfigError> {
    let mut keys = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, pod) in pods.iter().enumerate() {
        let err = |field: &str, key: &str, value: &str, msg: String| {
            ConfigError::new(path, msg)
                .with_field(format!("pods[{i}].{field}"))
                .with_line(error::find_line(text, key, value))
        };
        for (field, value) in [("name", &pod.name), ("namespace", &pod.namespace)] {
            if value.trim().is_empty() {
                return Err(err(field, field, value, "must not be empty".into()));
            }
        }
        if !keys.insert(pod.key()) {
            return Err(err(
                "name",
                "name",
                &pod.name,
                format!("pod {} is listed twice", pod.key()),
            ));
        }
        for (field, value) in [("netns", &pod.netns), ("cgroup", &pod.cgroup)] {
            if !value.is_absolute() {
                let shown = value.display().to_string();
                return Err(err(
                    field,
                    field,
                    &shown,
                    format!("must be an absolute path, not {shown:?}"),
                ));
            }
        }
        let ips = pod
            .ipv4
            .map(std::net::IpAddr::V4)
            .into_iter()
            .chain(pod.ipv6.map(std::net::IpAddr::V6));
        for ip in ips {
            if !addresses.insert(ip) {
                let field = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
                return Err(err(
                    field,
                    field,
                    &ip.to_string(),
                    format!("address {ip} belongs to two pods"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
