//! The manifests in `deploy/` against the agent they install.
//!
//! Every document of `daemonset.yaml`, `configmap.yaml` and `signer.yaml` is
//! parsed into the
//! Kubernetes API types of `k8s-openapi` (an unknown kind or an unknown field
//! fails), then checked against the agent itself: its command line parser
//! (`mesh_agent::cli::Cli`), its admin API paths and port, its configuration
//! loader (`mesh_agent::config::load_dir`, on the ConfigMap laid out as the
//! DaemonSet mounts it), the paths it opens and the ports it serves. Renaming a
//! flag, a path or a port on either side makes a test here fail.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::Parser;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Probe, Service, ServiceAccount, Volume,
            VolumeMount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use mesh_agent::{
    admin,
    cli::{Cli, Command},
    config,
    desired::Desired,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

const DAEMONSET_FILE: &str = "daemonset.yaml";
const CONFIGMAP_FILE: &str = "configmap.yaml";
const SIGNER_FILE: &str = "signer.yaml";
const CONTAINERFILE: &str = "Containerfile";
const README: &str = "README.md";
/// The node name the checks give the agent, as the downward API would.
const NODE_NAME_FROM_DOWNWARD_API: &str = "node-from-downward-api";

/// Capabilities the agent may be given, and what for. Anything else in the
/// DaemonSet fails: a new capability needs a reason here first.
const ALLOWED_CAPABILITIES: &[(&str, &str)] = &[
    ("BPF", "bpf(): creating maps, loading and pinning programs"),
    (
        "PERFMON",
        "the verifier's trust for privileged loaders (pointer comparisons, no Spectre-v1 masking)",
    ),
    (
        "NET_ADMIN",
        "network program types and the sockmap/sockhash maps (MESH_INBOUND_LISTENERS, MESH_SOCKS); delivering from the client's address (IP_TRANSPARENT, SO_MARK, a routing rule and the delivery sysctls in each pod)",
    ),
    (
        "SYS_ADMIN",
        "setns() into pods' network namespaces; mounting bpffs if the node has none",
    ),
];

/// Capabilities without which the agent cannot work at all.
const REQUIRED_CAPABILITIES: &[(&str, &str)] = &[
    (
        "SYS_ADMIN",
        "setns() into a pod's network namespace needs it: no pod could be enrolled",
    ),
    (
        "NET_ADMIN",
        "creating sockmap/sockhash maps checks it without a CAP_SYS_ADMIN fallback on many kernels",
    ),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy/manifest-check lies in deploy/")
        .to_path_buf()
}

fn workspace_dir() -> PathBuf {
    deploy_dir()
        .parent()
        .expect("deploy/ lies in the workspace")
        .to_path_buf()
}

fn read_deploy_file(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Parsing: every document into its Kubernetes type
// ---------------------------------------------------------------------------

/// The objects of deploy/, one of each kind.
struct Manifests {
    namespace: Namespace,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    cluster_role_binding: ClusterRoleBinding,
    daemonset: DaemonSet,
    configmap: ConfigMap,
}

enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(Box<DaemonSet>),
    ConfigMap(ConfigMap),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
}

/// Parses one document into `K`, and fails on a field `K` does not have:
/// k8s-openapi skips unknown fields, so a typo (`mountPropogation`) would
/// otherwise pass every check here while the cluster ignores or refuses it.
/// The check: every key of the document is still there after a round trip
/// through `K`.
fn typed<K: Resource + DeserializeOwned + Serialize>(
    document: serde_json::Value,
    place: &str,
) -> K {
    let object: K = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{place}: not a valid {} {}: {e}", K::API_VERSION, K::KIND));
    let back = serde_json::to_value(&object).expect("k8s-openapi objects serialize");
    if let Some(field) = unknown_field(&document, &back, "") {
        panic!(
            "{place}: `{field}` is not a field of {} {} (a typo?)",
            K::API_VERSION,
            K::KIND
        );
    }
    object
}

/// The first key of `original` that `parsed` lacks, as a dotted path.
fn unknown_field(
    original: &serde_json::Value,
    parsed: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (original, parsed) {
        (Value::Object(original), Value::Object(parsed)) => {
            original.iter().find_map(|(key, value)| {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match parsed.get(key) {
                    None => Some(here),
                    Some(parsed) => unknown_field(value, parsed, &here),
                }
            })
        }
        (Value::Array(original), Value::Array(parsed)) => original
            .iter()
            .zip(parsed)
            .enumerate()
            .find_map(|(i, (o, p))| unknown_field(o, p, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn parse_file(name: &str) -> Vec<Object> {
    let text = read_deploy_file(name);
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let place = format!("deploy/{name}, document {}", index + 1);
        let value = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{place}: not YAML: {e}"));
        if value.is_null() {
            continue;
        }
        let json: serde_json::Value = serde_json::to_value(&value)
            .unwrap_or_else(|e| panic!("{place}: not representable as JSON: {e}"));
        let field = |key: &str| json.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let place = format!(
            "{place} ({kind} {})",
            json.pointer("/metadata/name")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
        );
        let is = |api: &str, k: &str| api_version == api && kind == k;
        objects.push(if is(Namespace::API_VERSION, Namespace::KIND) {
            Object::Namespace(typed(json, &place))
        } else if is(ServiceAccount::API_VERSION, ServiceAccount::KIND) {
            Object::ServiceAccount(typed(json, &place))
        } else if is(ClusterRole::API_VERSION, ClusterRole::KIND) {
            Object::ClusterRole(typed(json, &place))
        } else if is(ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND) {
            Object::ClusterRoleBinding(typed(json, &place))
        } else if is(DaemonSet::API_VERSION, DaemonSet::KIND) {
            Object::DaemonSet(Box::new(typed(json, &place)))
        } else if is(ConfigMap::API_VERSION, ConfigMap::KIND) {
            Object::ConfigMap(typed(json, &place))
        } else if is(Deployment::API_VERSION, Deployment::KIND) {
            Object::Deployment(Box::new(typed(json, &place)))
        } else if is(Service::API_VERSION, Service::KIND) {
            Object::Service(Box::new(typed(json, &place)))
        } else {
            panic!(
                "{place}: unknown kind `{api_version}` `{kind}`: this check knows Namespace, \
                 ServiceAccount, ClusterRole, ClusterRoleBinding, apps/v1 DaemonSet and \
                 Deployment, Service and ConfigMap; teach it the new kind first"
            )
        });
    }
    objects
}

fn manifests() -> Manifests {
    let mut namespaces = Vec::new();
    let mut service_accounts = Vec::new();
    let mut cluster_roles = Vec::new();
    let mut cluster_role_bindings = Vec::new();
    let mut daemonsets = Vec::new();
    let mut configmaps = Vec::new();
    for file in [DAEMONSET_FILE, CONFIGMAP_FILE] {
        for object in parse_file(file) {
            match object {
                Object::Namespace(o) => namespaces.push(o),
                Object::ServiceAccount(o) => service_accounts.push(o),
                Object::ClusterRole(o) => cluster_roles.push(o),
                Object::ClusterRoleBinding(o) => cluster_role_bindings.push(o),
                Object::DaemonSet(o) => daemonsets.push(*o),
                Object::ConfigMap(o) => configmaps.push(o),
                Object::Deployment(_) | Object::Service(_) => {
                    panic!("deploy/{file}: the signer's Deployment and Service go in {SIGNER_FILE}")
                }
            }
        }
    }
    fn one<T>(mut found: Vec<T>, kind: &str) -> T {
        assert_eq!(
            found.len(),
            1,
            "deploy/{DAEMONSET_FILE} and deploy/{CONFIGMAP_FILE} must hold exactly one {kind}, not {}",
            found.len()
        );
        found.remove(0)
    }
    Manifests {
        namespace: one(namespaces, "Namespace"),
        service_account: one(service_accounts, "ServiceAccount"),
        cluster_role: one(cluster_roles, "ClusterRole"),
        cluster_role_binding: one(cluster_role_bindings, "ClusterRoleBinding"),
        daemonset: one(daemonsets, "DaemonSet"),
        configmap: one(configmaps, "ConfigMap"),
    }
}

impl Manifests {
    fn pod(&self) -> &PodSpec {
        self.daemonset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("the DaemonSet has a pod template with a spec")
    }

    fn container(&self) -> &Container {
        let containers = &self.pod().containers;
        assert_eq!(
            containers.len(),
            1,
            "the DaemonSet's pod runs the agent alone; the checks here assume one container"
        );
        &containers[0]
    }

    fn mounts(&self) -> &[VolumeMount] {
        self.container()
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
    }

    fn volume(&self, name: &str) -> &Volume {
        self.pod()
            .volumes
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("the container mounts volume `{name}`, which the pod lacks"))
    }

    /// The volume holding the ConfigMap, and where the container mounts it.
    fn config_volume(&self) -> (&Volume, &VolumeMount) {
        let name = self.configmap.metadata.name.as_deref().unwrap_or_default();
        let volume = self
            .pod()
            .volumes
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|v| v.config_map.as_ref().is_some_and(|c| c.name == name))
            .unwrap_or_else(|| panic!("no volume of the DaemonSet holds the ConfigMap `{name}`"));
        let mount = self
            .mounts()
            .iter()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| {
                panic!(
                    "the container does not mount volume `{}` (ConfigMap `{name}`)",
                    volume.name
                )
            });
        (volume, mount)
    }

    /// The mount under which `path` lies (the deepest one), with its volume.
    fn covering_mount(&self, path: &Path) -> Option<(&VolumeMount, &Volume)> {
        self.mounts()
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| Path::new(&m.mount_path).components().count())
            .map(|m| (m, self.volume(&m.name)))
    }

    /// The ConfigMap written out as the DaemonSet mounts it, and loaded with the
    /// agent's own loader. The directory lives as long as the returned guard.
    fn mounted_config(&self) -> (tempfile::TempDir, Desired) {
        let (volume, _) = self.config_volume();
        let source = volume.config_map.as_ref().expect("a ConfigMap volume");
        let data = self.configmap.data.clone().unwrap_or_default();
        assert!(
            self.configmap
                .binary_data
                .as_ref()
                .is_none_or(|b| b.is_empty()),
            "the agent's configuration is text: binaryData is not mounted by this check"
        );
        // Without `items` every key is a file of the directory; with them,
        // only the keys listed, each at its path.
        let files: Vec<(String, String)> = match &source.items {
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            Some(items) => {
                for key in data.keys() {
                    assert!(
                        items.iter().any(|i| &i.key == key),
                        "key `{key}` of the ConfigMap is not in the `items` of volume `{}`: the \
                         agent would never see it",
                        volume.name
                    );
                }
                items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect()
            }
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        for (key, path) in files {
            let text = data.get(&key).unwrap_or_else(|| {
                panic!(
                    "volume `{}` maps key `{key}`, which the ConfigMap lacks",
                    volume.name
                )
            });
            assert!(
                Path::new(&path).is_relative() && !path.split('/').any(|p| p == ".."),
                "volume `{}`: item path `{path}` must be relative and stay in the volume",
                volume.name
            );
            let file = dir.path().join(&path);
            std::fs::create_dir_all(file.parent().expect("a file in the directory")).unwrap();
            std::fs::write(&file, text).unwrap();
        }
        // The DaemonSet gives the node's name (NODE_NAME), as on a node.
        config::set_node_name(NODE_NAME_FROM_DOWNWARD_API.to_string());
        let config = config::load_dir(dir.path()).unwrap_or_else(|e| {
            panic!(
                "the agent's configuration loader rejects deploy/{CONFIGMAP_FILE} as the \
                 DaemonSet mounts it (paths below are in a temporary copy):\n{e}"
            )
        });
        (dir, config)
    }
}

fn probe_port(probe: &Probe, which: &str) -> (String, u16) {
    let http = probe
        .http_get
        .as_ref()
        .unwrap_or_else(|| panic!("the {which} probe must be an httpGet on the admin API"));
    assert!(
        http.scheme.as_deref().is_none_or(|s| s == "HTTP"),
        "the {which} probe uses scheme {:?}; the admin API speaks plain HTTP",
        http.scheme
    );
    let port = match &http.port {
        IntOrString::Int(port) => u16::try_from(*port)
            .unwrap_or_else(|_| panic!("the {which} probe's port {port} is not a TCP port")),
        IntOrString::String(name) => panic!(
            "the {which} probe names port `{name}`: a named port needs a containerPort, which \
             this hostNetwork DaemonSet must not declare (see the `ports` check); give the number"
        ),
    };
    (http.path.clone().unwrap_or_default(), port)
}

/// Whether kubelet (in the node's network namespace, probing the pod's IP,
/// which is the node's, or `host`) reaches an admin API bound to `admin`.
fn reachable_by_kubelet(admin: SocketAddr, host: Option<&str>) -> Result<(), String> {
    let ip = admin.ip();
    if ip.is_unspecified() {
        return Ok(());
    }
    if ip.is_loopback() {
        return match host.and_then(|h| h.parse::<IpAddr>().ok()) {
            Some(h) if h.is_loopback() => Ok(()),
            _ => Err(format!(
                "node.yaml's adminAddress {admin} is loopback: kubelet probes the node's IP and \
                 would never reach it (set the probe's host to {ip}, or bind all addresses)"
            )),
        };
    }
    Err(format!(
        "node.yaml's adminAddress {admin} is one fixed address, but the ConfigMap is shared by \
         every node: bind all addresses (0.0.0.0 or [::])"
    ))
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

#[test]
fn every_document_is_a_known_kubernetes_object() {
    let m = manifests();
    let namespace = m.namespace.metadata.name.as_deref().unwrap_or_default();
    assert_eq!(namespace, "mesh-system");
    for (kind, meta) in [
        ("ServiceAccount", &m.service_account.metadata),
        ("DaemonSet", &m.daemonset.metadata),
        ("ConfigMap", &m.configmap.metadata),
    ] {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(namespace),
            "the {kind} must be in the Namespace the manifests create ({namespace})"
        );
    }
    // hostNetwork, hostPath and CAP_SYS_ADMIN are beyond the "baseline" Pod
    // Security Standard: a namespace enforcing it would refuse the pods.
    let enforce = m
        .namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
    assert_eq!(
        enforce.map(String::as_str),
        Some("privileged"),
        "the Namespace must allow privileged pods (pod-security.kubernetes.io/enforce: privileged)"
    );
}

#[test]
fn the_pod_runs_as_its_service_account_with_read_only_rbac_on_what_the_agent_watches() {
    let m = manifests();
    let spec = m.daemonset.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.get(key),
            Some(value),
            "the DaemonSet's selector {key}={value} does not select its own pods"
        );
    }
    assert_eq!(
        m.pod().service_account_name,
        m.service_account.metadata.name,
        "the pod must run as the ServiceAccount of the manifests"
    );
    // The agent reads the API with the pod's token (in-cluster configuration).
    assert_ne!(
        m.service_account.automount_service_account_token,
        Some(false),
        "ServiceAccount: the token must be mounted (the agent watches the API)"
    );
    assert_ne!(
        m.pod().automount_service_account_token,
        Some(false),
        "pod: the token must be mounted (the agent watches the API)"
    );
    // The ClusterRole grants exactly list and watch on exactly what the
    // agent watches, and the binding gives it to the pod's ServiceAccount.
    let mut granted = BTreeSet::new();
    for rule in m.cluster_role.rules.iter().flatten() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(
            verbs,
            ["list", "watch"],
            "the ClusterRole may only list and watch, not {:?}",
            rule.verbs
        );
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "the ClusterRole's rules name kinds, nothing else"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert((group.clone(), resource.clone()));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = mesh_agent::kubernetes::watch::Kind::ALL
        .iter()
        .map(|k| (k.api_group().to_string(), k.name().to_string()))
        .collect();
    assert_eq!(
        granted, watched,
        "the ClusterRole must grant list/watch on exactly what the agent watches"
    );
    let binding = &m.cluster_role_binding;
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            Some(binding.role_ref.name.as_str())
        ),
        ("ClusterRole", m.cluster_role.metadata.name.as_deref())
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && Some(s.name.as_str()) == m.service_account.metadata.name.as_deref()
            && s.namespace.as_deref() == m.service_account.metadata.namespace.as_deref()),
        "the ClusterRoleBinding must bind the agent's ServiceAccount: {subjects:?}"
    );
    // The node's name from the downward API, in the variable the agent reads.
    let env = m.container().env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == mesh_agent::cli::NODE_NAME_ENV)
        .unwrap_or_else(|| {
            panic!(
                "the container must set {} (the agent's node name)",
                mesh_agent::cli::NODE_NAME_ENV
            )
        });
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("spec.nodeName"),
        "{} must come from the downward API's spec.nodeName",
        mesh_agent::cli::NODE_NAME_ENV
    );
    let image = m.container().image.as_deref().unwrap_or_default();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        image.ends_with(&format!(":{version}")),
        "the DaemonSet's image `{image}` should be tagged with the agent's version {version}"
    );
}

#[test]
fn the_agent_accepts_the_container_arguments() {
    let m = manifests();
    let container = m.container();
    assert!(
        container.command.is_none(),
        "the container sets `command`, which replaces the image's ENTRYPOINT (the agent); set `args`"
    );
    // Variables the agent's command line reads (clap `env`) would change its
    // arguments behind this check's back: arguments only.
    for env in container.env.iter().flatten() {
        assert!(
            !env.name.starts_with("MESH_"),
            "the container sets {}: pass it as an argument, where this test checks it with the \
             agent's own parser",
            env.name
        );
    }
    let args = container.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("mesh-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the agent refuses the DaemonSet's args {args:?}:\n{e}"));
    let Command::Run { config } = cli.command else {
        panic!("the DaemonSet's args {args:?} do not run the agent (`run --config DIR`)");
    };
    let (volume, mount) = m.config_volume();
    assert_eq!(
        config,
        PathBuf::from(&mount.mount_path),
        "the agent is given --config {}, but volume `{}` (the ConfigMap) is mounted at {}",
        config.display(),
        volume.name,
        mount.mount_path
    );
    // And what is mounted there is a configuration the agent accepts.
    m.mounted_config();
}

#[test]
fn the_containerfile_runs_what_the_daemonset_expects() {
    let m = manifests();
    let containerfile = Containerfile::parse(&read_deploy_file(CONTAINERFILE));
    let runtime = containerfile.stages.last().expect("a FROM line");
    let exec_form = |instruction: &'static str| -> Vec<String> {
        let line = runtime.get(instruction).unwrap_or_else(|| {
            panic!("deploy/{CONTAINERFILE}: the final stage has no {instruction}")
        });
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "deploy/{CONTAINERFILE}: `{instruction} {line}` must be in exec form \
                 (a JSON array of strings): {e}"
            )
        })
    };
    let entrypoint = exec_form("ENTRYPOINT");
    let cmd = exec_form("CMD");
    // The DaemonSet keeps the ENTRYPOINT (no `command`) and gives arguments.
    assert!(m.container().command.is_none());
    let args = m.container().args.clone().unwrap_or_default();
    assert_eq!(
        cmd, args,
        "deploy/{CONTAINERFILE}'s CMD and the DaemonSet's args differ: the image run by hand \
         and the image in the cluster would start differently"
    );
    // The ENTRYPOINT is the binary the final stage copies in...
    let copies = runtime.copies();
    let binary = entrypoint.first().expect("an ENTRYPOINT with a program");
    let copy = copies
        .iter()
        .find(|c| &c.destination == binary && c.from.is_some())
        .unwrap_or_else(|| {
            panic!("deploy/{CONTAINERFILE}: the ENTRYPOINT {binary} is not copied into the image")
        });
    // ... the release build of mesh-agent in the builder stage.
    let builder = &containerfile.stages[..containerfile.stages.len() - 1];
    let workdir = builder
        .iter()
        .flat_map(|s| s.all("WORKDIR"))
        .next_back()
        .unwrap_or("/");
    assert_eq!(
        copy.sources,
        [format!("{workdir}/target/release/mesh-agent")],
        "deploy/{CONTAINERFILE}: the image must hold the release build of mesh-agent"
    );
    let runs: Vec<&str> = builder.iter().flat_map(|s| s.all("RUN")).collect();
    let position = |what: &str| runs.iter().position(|r| r.contains(what));
    let kernel = position("cargo xtask build-ebpf").unwrap_or_else(|| {
        panic!("deploy/{CONTAINERFILE}: the builder must run `cargo xtask build-ebpf`")
    });
    let agent = position("cargo build --release").filter(|&i| runs[i].contains("-p mesh-agent"));
    assert!(
        agent.is_some_and(|agent| agent > kernel),
        "deploy/{CONTAINERFILE}: the builder must run `cargo build --release -p mesh-agent` \
         after `cargo xtask build-ebpf` (the build script needs the kernel toolchain)"
    );
    // Cargo loads the whole workspace: every member must be in the build.
    let copied: Vec<String> = builder
        .iter()
        .flat_map(|s| s.copies())
        .filter(|c| c.from.is_none())
        .flat_map(|c| c.sources)
        .collect();
    let manifest: toml::Table = std::fs::read_to_string(workspace_dir().join("Cargo.toml"))
        .expect("the workspace's Cargo.toml")
        .parse()
        .expect("the workspace's Cargo.toml is TOML");
    let workspace = manifest["workspace"].as_table().expect("[workspace]");
    let listed = |key: &str| -> Vec<String> {
        workspace
            .get(key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let needed = ["Cargo.toml", "Cargo.lock", ".cargo"]
        .into_iter()
        .map(str::to_string)
        .chain(listed("members"))
        // Of the excluded crates, the kernel one: the agent's build script
        // builds it (the fuzz targets are not part of the image).
        .chain(listed("exclude").into_iter().filter(|c| c == "mesh-ebpf"));
    for path in needed {
        assert!(
            copied
                .iter()
                .any(|c| Path::new(path.as_str()).starts_with(c.trim_end_matches('/'))),
            "deploy/{CONTAINERFILE}: the builder does not copy `{path}`, which the build needs \
             (workspace members and the kernel crate); copied: {copied:?}"
        );
    }
}

#[test]
fn probes_and_scrape_annotations_use_the_admin_api() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let admin_address = config.node.admin_address;
    let container = m.container();
    // With hostNetwork every containerPort becomes a hostPort, and the
    // scheduler would not place the surge pod of a rolling update next to the
    // old one: the update would never finish.
    assert!(
        container.ports.as_ref().is_none_or(|p| p.is_empty()),
        "the container declares ports {:?}: in a hostNetwork pod each becomes a hostPort, and \
         the surge pod (maxSurge) could never be scheduled next to the old one",
        container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        admin_address.port(),
        mesh_agent::ADMIN_PORT,
        "node.yaml's adminAddress port is not the agent's default admin port: `mesh-agent status` \
         (e.g. through kubectl exec) looks there"
    );
    let readiness = container
        .readiness_probe
        .as_ref()
        .expect("the container has a readiness probe");
    let liveness = container
        .liveness_probe
        .as_ref()
        .expect("the container has a liveness probe");
    let mut probes = vec![
        ("readiness", readiness, admin::PATH_READYZ),
        ("liveness", liveness, admin::PATH_HEALTHZ),
    ];
    if let Some(startup) = &container.startup_probe {
        probes.push(("startup", startup, admin::PATH_HEALTHZ));
    }
    for (which, probe, expected_path) in probes {
        let (path, port) = probe_port(probe, which);
        assert_eq!(
            path, expected_path,
            "the {which} probe asks {path}; the agent serves {expected_path}"
        );
        assert_eq!(
            port,
            admin_address.port(),
            "the {which} probe asks port {port}; node.yaml's adminAddress is {admin_address}"
        );
        let host = probe.http_get.as_ref().and_then(|h| h.host.as_deref());
        if let Err(why) = reachable_by_kubelet(admin_address, host) {
            panic!("the {which} probe cannot reach the admin API: {why}");
        }
    }
    let annotations = m
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|meta| meta.annotations.clone())
        .unwrap_or_default();
    let annotation = |key: &str| {
        annotations
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("the pod template lacks the annotation {key}"))
    };
    assert_eq!(annotation("prometheus.io/scrape"), "true");
    assert_eq!(
        annotation("prometheus.io/port"),
        admin_address.port().to_string(),
        "prometheus.io/port is not the port of node.yaml's adminAddress ({admin_address})"
    );
    assert_eq!(
        annotation("prometheus.io/path"),
        admin::PATH_METRICS,
        "prometheus.io/path is not where the agent serves its metrics"
    );
    assert!(
        !admin_address.ip().is_loopback(),
        "Prometheus scrapes the pod's IP (the node's), but adminAddress {admin_address} is loopback"
    );
}

#[test]
fn the_ports_readme_lists_are_the_agents() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let readme = read_deploy_file(README);
    for (port, what) in [
        (config.node.admin_address.port(), "admin"),
        (mesh_common::OUTBOUND_PORT, "outbound"),
        (mesh_common::INBOUND_PORT, "inbound"),
        (mesh_common::TUNNEL_PORT, "tunnel"),
    ] {
        let row = format!("| {port} |");
        assert!(
            readme
                .lines()
                .any(|l| l.starts_with(&row) && l.to_lowercase().contains(what)),
            "deploy/{README}'s port table has no row `{row} ... {what} ...`: the agent's {what} \
             port is {port}"
        );
    }
}

#[test]
fn bpffs_is_the_nodes_and_holds_the_pin_dir() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let bpffs = &config.node.bpffs;
    let pin_dir = config.node.pin_dir();
    assert!(
        pin_dir.starts_with(bpffs),
        "node.yaml's pinDir {} is not on the bpffs {}",
        pin_dir.display(),
        bpffs.display()
    );
    let mount = m
        .mounts()
        .iter()
        .find(|mount| Path::new(&mount.mount_path) == bpffs)
        .unwrap_or_else(|| {
            panic!(
                "nothing is mounted at node.yaml's bpffs ({}): pins would die with the container",
                bpffs.display()
            )
        });
    let host_path = m
        .volume(&mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume `{}` (bpffs) must be a hostPath", mount.name));
    assert_eq!(
        Path::new(&host_path.path),
        bpffs,
        "the bpffs volume must be the node's own {}: pins must outlive the pod, and the next \
         agent must find them",
        bpffs.display()
    );
    assert_ne!(
        mount.read_only,
        Some(true),
        "bpffs must be writable: maps and links are pinned there"
    );
    match mount.mount_propagation.as_deref() {
        Some("HostToContainer") => {}
        Some("Bidirectional") => assert_eq!(
            m.container()
                .security_context
                .as_ref()
                .and_then(|s| s.privileged),
            Some(true),
            "Kubernetes allows Bidirectional mount propagation only in privileged containers"
        ),
        other => panic!(
            "the bpffs mount has propagation {other:?}: use HostToContainer, so a bpffs the node \
             mounts later is seen"
        ),
    }
}

#[test]
fn every_path_the_config_names_is_mounted() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let host_pid = m.pod().host_pid == Some(true);
    /// The mount of a node path: a hostPath volume mounted at the same path,
    /// so that the path means the same inside the container.
    fn node_path<'m>(m: &'m Manifests, path: &Path, what: &str) -> &'m VolumeMount {
        let (mount, volume) = m
            .covering_mount(path)
            .unwrap_or_else(|| panic!("{what} {} lies under no volume mount", path.display()));
        let host = volume.host_path.as_ref().unwrap_or_else(|| {
            panic!(
                "{what} {} is a node path, but volume `{}` is not a hostPath",
                path.display(),
                volume.name
            )
        });
        assert_eq!(
            host.path,
            mount.mount_path,
            "{what} {} is the node's path, but volume `{}` mounts the node's {} at {}",
            path.display(),
            volume.name,
            host.path,
            mount.mount_path
        );
        mount
    }
    // Pods come from the API: their network namespaces are found in
    // kubernetes.netnsDir, their cgroups under the cgroup tree.
    assert_eq!(
        config.node.discovery,
        config::Discovery::Kubernetes,
        "the example node.yaml should take pods from the API"
    );
    assert!(
        config.pods.is_empty() && config.workloads.is_empty() && config.services.is_empty(),
        "with the API as the source, the ConfigMap lists no pods, workloads or services"
    );
    let kube = &config.node.kubernetes;
    let netns_dir = kube.netns_dir.join("cni-example");
    if netns_dir.starts_with("/proc") {
        assert!(
            host_pid,
            "kubernetes.netnsDir is in /proc: needs hostPID: true"
        );
    } else {
        let mount = node_path(&m, &netns_dir, "kubernetes.netnsDir");
        assert!(
            matches!(
                mount.mount_propagation.as_deref(),
                Some("HostToContainer" | "Bidirectional")
            ),
            "kubernetes.netnsDir {} is under mount `{}` without HostToContainer propagation: \
             namespaces the runtime makes after the agent starts would show as empty files",
            kube.netns_dir.display(),
            mount.name
        );
    }
    node_path(
        &m,
        Path::new("/sys/fs/cgroup/kubepods.slice"),
        "pod cgroups",
    );
    // The saved state outlives the container: a writable node directory.
    let state = node_path(&m, &kube.state_file, "kubernetes.stateFile");
    assert_ne!(
        state.read_only,
        Some(true),
        "kubernetes.stateFile {} must be writable",
        kube.state_file.display()
    );
    assert_eq!(
        config.node.name, NODE_NAME_FROM_DOWNWARD_API,
        "node.yaml must leave the node's name to NODE_NAME (one ConfigMap for every node)"
    );
    let cgroup_root = m
        .mounts()
        .iter()
        .find(|mount| mount.mount_path == "/sys/fs/cgroup")
        .expect("the cgroup tree is mounted at /sys/fs/cgroup");
    assert_eq!(
        cgroup_root.read_only,
        Some(true),
        "the cgroup tree is only opened (attaching takes a directory descriptor): mount it read-only"
    );
    // Identity material node.yaml names, each a file of a mounted volume; for
    // a Secret with `items`, one of the items.
    let identity = config.node.identity.as_ref();
    let issuer = identity.and_then(|i| i.issuer.as_ref());
    let files = identity.and_then(|i| i.files.as_ref());
    let asked = identity.and_then(|i| i.signing_request.as_ref());
    let named: Vec<(&str, &Path)> = [
        asked.map(|a| ("identity.signingRequest.caRoots", a.ca_roots.as_path())),
        asked.map(|a| ("identity.signingRequest.tokenFile", a.token_file.as_path())),
        issuer.map(|i| ("identity.issuer.cert", i.cert.as_path())),
        issuer.map(|i| ("identity.issuer.key", i.key.as_path())),
        issuer
            .and_then(|i| i.trust_bundle.as_deref())
            .map(|p| ("identity.issuer.trustBundle", p)),
        files.map(|f| ("identity.files.trustBundle", f.trust_bundle.as_path())),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (field, path) in named {
        let (mount, volume) = m.covering_mount(path).unwrap_or_else(|| {
            panic!(
                "node.yaml {field}: {} lies under no volume mount",
                path.display()
            )
        });
        let relative = path.strip_prefix(&mount.mount_path).unwrap();
        let items = volume
            .secret
            .as_ref()
            .and_then(|s| s.items.as_ref())
            .or_else(|| volume.config_map.as_ref().and_then(|c| c.items.as_ref()));
        if let Some(items) = items {
            assert!(
                items.iter().any(|i| Path::new(&i.path) == relative),
                "node.yaml {field}: {} is not one of the items of volume `{}`",
                path.display(),
                volume.name
            );
        }
        if let Some(projected) = &volume.projected {
            assert!(
                projected.sources.iter().flatten().any(|source| source
                    .service_account_token
                    .as_ref()
                    .is_some_and(|t| Path::new(&t.path) == relative)),
                "node.yaml {field}: {} is no projected file of volume `{}`",
                path.display(),
                volume.name
            );
        }
    }
    if let Some(files) = files {
        m.covering_mount(&files.dir).unwrap_or_else(|| {
            panic!(
                "node.yaml identity.files.dir {} is not mounted",
                files.dir.display()
            )
        });
    }
}

#[test]
fn the_pod_shares_the_nodes_network_and_outlives_the_drain() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let pod = m.pod();
    // The handover socket is an abstract Unix socket in the node's network
    // namespace; the admin API listens on the node's address.
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent needs the node's network namespace (hostNetwork: true): its handover socket \
         lives there"
    );
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "a hostNetwork pod needs dnsPolicy ClusterFirstWithHostNet to resolve cluster names"
    );
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let drain = config.node.drain_timeout;
    assert!(
        u128::try_from(grace).unwrap_or(0) * 1000 > drain.as_millis(),
        "terminationGracePeriodSeconds ({grace} s) must exceed node.yaml's drainTimeout \
         ({drain:?}): Kubernetes would kill the agent while connections drain"
    );
}

#[test]
fn upgrades_start_the_new_agent_next_to_the_old_one() {
    let m = manifests();
    let strategy = m
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .expect("the DaemonSet states its updateStrategy");
    assert_eq!(
        strategy.type_.as_deref(),
        Some("RollingUpdate"),
        "updateStrategy.type must be RollingUpdate"
    );
    let rolling = strategy
        .rolling_update
        .as_ref()
        .expect("updateStrategy.rollingUpdate");
    let amount = |value: Option<&IntOrString>| match value {
        Some(IntOrString::Int(n)) => i64::from(*n),
        Some(IntOrString::String(s)) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("`{s}` is neither a number nor a percentage")),
        None => panic!("rollingUpdate must set maxSurge and maxUnavailable"),
    };
    assert_eq!(
        amount(rolling.max_unavailable.as_ref()),
        0,
        "maxUnavailable must be 0: the old agent serves until the new one has taken over"
    );
    assert!(
        amount(rolling.max_surge.as_ref()) >= 1,
        "maxSurge must be at least 1: the new agent takes over from the old one on the same node"
    );
}

#[test]
fn the_agent_runs_with_named_capabilities_only() {
    let m = manifests();
    let context = m
        .container()
        .security_context
        .as_ref()
        .expect("the container has a securityContext");
    assert_ne!(
        context.privileged,
        Some(true),
        "the agent runs unprivileged, with the capabilities listed"
    );
    let capabilities = context
        .capabilities
        .as_ref()
        .expect("securityContext.capabilities");
    assert_eq!(
        capabilities.drop.as_deref().unwrap_or_default(),
        ["ALL"],
        "drop ALL capabilities, then add back the ones needed"
    );
    let added: Vec<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut seen = BTreeSet::new();
    for capability in &added {
        assert!(
            seen.insert(capability),
            "capability {capability} is added twice"
        );
        assert!(
            ALLOWED_CAPABILITIES.iter().any(|(c, _)| c == capability),
            "capability {capability} is not one the agent is known to need; known: {}",
            ALLOWED_CAPABILITIES
                .iter()
                .map(|(c, why)| format!("{c} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (capability, why) in REQUIRED_CAPABILITIES {
        assert!(
            added.contains(capability),
            "capability {capability} is missing: {why}"
        );
    }
    assert_eq!(
        context.read_only_root_filesystem,
        Some(true),
        "the agent writes only to bpffs: the root filesystem can be read-only"
    );
    assert_eq!(
        context.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined"),
        "the runtime's default AppArmor profile denies writes and locks under /sys/fs/bpf"
    );
    assert_ne!(
        m.pod().host_pid,
        Some(true),
        "hostPID is not needed: pods' namespaces are opened by path from the netns mounts"
    );
}

// ---------------------------------------------------------------------------
// A Containerfile, read simply
// ---------------------------------------------------------------------------

/// Instructions per stage, in order (`FROM` starts a stage). Comments and line
/// continuations are handled; heredocs and parser directives are not.
struct Containerfile {
    stages: Vec<Stage>,
}

#[derive(Default)]
struct Stage {
    instructions: Vec<(String, String)>,
}

struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    destination: String,
}

impl Containerfile {
    fn parse(text: &str) -> Self {
        let mut stages: Vec<Stage> = Vec::new();
        let mut logical = String::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    logical.push_str(part);
                    logical.push(' ');
                }
                None => {
                    logical.push_str(trimmed);
                    lines.push(std::mem::take(&mut logical));
                }
            }
        }
        for line in lines {
            let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let instruction = instruction.to_ascii_uppercase();
            if instruction == "FROM" {
                stages.push(Stage::default());
            }
            if let Some(stage) = stages.last_mut() {
                stage
                    .instructions
                    .push((instruction, rest.trim().to_string()));
            }
        }
        Self { stages }
    }
}

impl Stage {
    fn all(&self, instruction: &'static str) -> impl DoubleEndedIterator<Item = &str> {
        self.instructions
            .iter()
            .filter(move |(i, _)| i == instruction)
            .map(|(_, rest)| rest.as_str())
    }

    /// The last such instruction (the one in force).
    fn get(&self, instruction: &'static str) -> Option<&str> {
        self.all(instruction).next_back()
    }

    fn copies(&self) -> Vec<Copy> {
        self.all("COPY")
            .map(|rest| {
                let mut from = None;
                let mut words: Vec<String> = Vec::new();
                for word in rest.split_whitespace() {
                    if let Some(stage) = word.strip_prefix("--from=") {
                        from = Some(stage.to_string());
                    } else if !word.starts_with("--") {
                        words.push(word.to_string());
                    }
                }
                let destination = words.pop().expect("COPY has a destination");
                Copy {
                    from,
                    sources: words,
                    destination,
                }
            })
            .collect()
    }
}

/// Every manifest validates strictly (unknown fields are errors) against
/// the Kubernetes 1.35 schemas, with `kubernetes-validate` from PyPI, which
/// `cargo xtask test` installs under .tools/ and names in
/// `MESH_KUBERNETES_VALIDATE`. Under CI its absence fails the test.
#[test]
fn the_manifests_validate_strictly_against_the_kubernetes_schemas() {
    let Some(tool) = std::env::var_os("MESH_KUBERNETES_VALIDATE") else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "CI=true but MESH_KUBERNETES_VALIDATE is not set: run the suite with `cargo xtask test`, \
             which installs kubernetes-validate"
        );
        eprintln!(
            "SKIPPED: MESH_KUBERNETES_VALIDATE is not set (cargo xtask test installs kubernetes-validate and sets it)"
        );
        return;
    };
    let files = [DAEMONSET_FILE, CONFIGMAP_FILE, SIGNER_FILE].map(|f| deploy_dir().join(f));
    let output = std::process::Command::new(&tool)
        .args(["--strict", "-k", "1.35.0"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", Path::new(&tool).display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "kubernetes-validate --strict:\n{text}"
    );
    // One "passed" line per object: nothing was left unchecked.
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, 12, "every object validated:\n{text}");
}

#[test]
fn the_cni_sidecar_installs_into_the_nodes_cni_dirs_and_the_socket_is_the_nodes() {
    let m = manifests();
    let (_dir, config) = m.mounted_config();
    let cni = &config.node.kubernetes.cni;
    let sidecar = m
        .pod()
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "cni-install")
        .expect("an init container `cni-install`");
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "cni-install keeps the plugin installed: a sidecar (restartPolicy: Always)"
    );
    assert_eq!(
        sidecar.image,
        m.container().image,
        "the sidecar runs the agent's image"
    );
    let args = sidecar.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("mesh-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the agent refuses the sidecar's args {args:?}:\n{e}"));
    let Command::CniInstall {
        config: config_dir,
        dirs,
        plugin,
        keep,
    } = cli.command
    else {
        panic!("the sidecar's args {args:?} are not `cni-install`");
    };
    assert!(
        keep.is_some(),
        "the sidecar keeps the plugin installed (--keep)"
    );
    assert!(
        plugin.is_none(),
        "the plugin comes from the image, beside the agent"
    );
    let mounts = sidecar.volume_mounts.as_deref().unwrap_or_default();
    // Each of the node's directories mounted at its own path from the node.
    let node_dir = |path: &Path, what: &str| {
        let mount = mounts
            .iter()
            .filter(|mount| path.starts_with(&mount.mount_path))
            .max_by_key(|mount| Path::new(&mount.mount_path).components().count())
            .unwrap_or_else(|| panic!("the sidecar does not mount {what} {}", path.display()));
        let host = m
            .volume(&mount.name)
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{what} {} is not a hostPath", path.display()));
        assert_eq!(host.path, mount.mount_path, "{what} is the node's own path");
        assert_ne!(mount.read_only, Some(true), "{what} is written");
    };
    node_dir(&dirs.bin_dir, "--bin-dir");
    node_dir(&dirs.conf_dir, "--conf-dir");
    node_dir(
        &cni.state_dir,
        "kubernetes.cni.stateDir (the conflist's backup)",
    );
    assert!(
        mounts
            .iter()
            .any(|mount| Path::new(&mount.mount_path) == config_dir.as_path()),
        "the sidecar reads node.yaml from --config {}",
        config_dir.display()
    );
    // The agent makes the socket where the plugin, on the node, looks.
    let socket_dir = cni.socket.parent().expect("a socket path");
    let (mount, volume) = m.covering_mount(&cni.socket).unwrap_or_else(|| {
        panic!(
            "kubernetes.cni.socket {} is not mounted",
            cni.socket.display()
        )
    });
    let host = volume
        .host_path
        .as_ref()
        .expect("the socket's directory is a hostPath");
    assert_eq!(host.path, mount.mount_path);
    assert!(socket_dir.starts_with(&mount.mount_path));
    assert_ne!(
        mount.read_only,
        Some(true),
        "the agent binds the socket there"
    );
    let state = m
        .covering_mount(&cni.state_dir)
        .expect("kubernetes.cni.stateDir is mounted in the agent")
        .0;
    assert_ne!(
        state.read_only,
        Some(true),
        "kubernetes.cni.stateDir is written"
    );
}

// ---------------------------------------------------------------------------
// The signer (signer.yaml)
// ---------------------------------------------------------------------------

/// The objects of deploy/signer.yaml.
struct SignerManifests {
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    cluster_role_binding: ClusterRoleBinding,
    configmap: ConfigMap,
    deployment: Deployment,
    service: Service,
}

fn signer_manifests() -> SignerManifests {
    let (mut sa, mut role, mut binding, mut cm, mut deploy, mut svc) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for object in parse_file(SIGNER_FILE) {
        match object {
            Object::ServiceAccount(o) => sa.push(o),
            Object::ClusterRole(o) => role.push(o),
            Object::ClusterRoleBinding(o) => binding.push(o),
            Object::ConfigMap(o) => cm.push(o),
            Object::Deployment(o) => deploy.push(*o),
            Object::Service(o) => svc.push(*o),
            Object::Namespace(_) | Object::DaemonSet(_) => {
                panic!("deploy/{SIGNER_FILE} holds the signer's objects only")
            }
        }
    }
    fn one<T>(mut found: Vec<T>, kind: &str) -> T {
        assert_eq!(found.len(), 1, "deploy/{SIGNER_FILE}: one {kind}");
        found.remove(0)
    }
    SignerManifests {
        service_account: one(sa, "ServiceAccount"),
        cluster_role: one(role, "ClusterRole"),
        cluster_role_binding: one(binding, "ClusterRoleBinding"),
        configmap: one(cm, "ConfigMap"),
        deployment: one(deploy, "Deployment"),
        service: one(svc, "Service"),
    }
}

/// The signer's Deployment runs `mesh-agent ca` on its ConfigMap, which the
/// signer's own loader accepts; the issuer files are items of the Secret
/// only it mounts; its ports, probes and Service are the configuration's;
/// its RBAC is TokenReview and reading pods; the agents' node.yaml reaches
/// it by a name on its serving certificate, with the token audience it
/// checks, as the account it trusts; and no volume of the DaemonSet is a
/// Secret: no node holds a signing key.
#[test]
fn the_signer_runs_with_its_config_and_only_it_holds_the_signing_key() {
    use mesh_agent::signer::config::SignerConfig;
    let s = signer_manifests();
    let pod = s
        .deployment
        .spec
        .as_ref()
        .and_then(|d| d.template.spec.as_ref())
        .expect("a pod template");
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert!(container.command.is_none(), "set args, not command");
    let args = container.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("mesh-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the signer refuses the Deployment's args {args:?}:\n{e}"));
    let Command::Ca {
        config: config_path,
    } = cli.command
    else {
        panic!("the Deployment's args {args:?} do not run the signer (`ca --config FILE`)");
    };
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let covering = |path: &Path| {
        let mount = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{} lies under no mount of the signer", path.display()));
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .expect("a mounted volume");
        (
            path.strip_prefix(&mount.mount_path).unwrap().to_path_buf(),
            volume,
        )
    };
    // The ConfigMap, written out as mounted, loads with the signer's loader.
    let (file, volume) = covering(&config_path);
    let cm_name = s.configmap.metadata.name.clone().unwrap();
    let source = volume
        .config_map
        .as_ref()
        .expect("the config is a ConfigMap volume");
    assert_eq!(source.name, cm_name);
    let item = source
        .items
        .iter()
        .flatten()
        .find(|i| Path::new(&i.path) == file)
        .expect("the config file is an item of the ConfigMap volume");
    let text = s.configmap.data.as_ref().unwrap()[&item.key].clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("signer.yaml"), &text).unwrap();
    let config = SignerConfig::load(&dir.path().join("signer.yaml"))
        .unwrap_or_else(|e| panic!("deploy/{SIGNER_FILE}'s signer.yaml: {e}"));
    // The issuer's files: items of the Secret volume, nowhere else.
    let mut key_secret = None;
    for path in [&config.issuer_cert, &config.issuer_key]
        .into_iter()
        .chain(config.trust_bundle.as_ref())
    {
        let (relative, volume) = covering(path);
        let secret = volume
            .secret
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not in a Secret volume", path.display()));
        assert!(
            secret
                .items
                .iter()
                .flatten()
                .any(|i| Path::new(&i.path) == relative),
            "{} is not an item of Secret `{:?}`",
            path.display(),
            secret.secret_name
        );
        key_secret = secret.secret_name.clone();
    }
    // Ports and probes are the configuration's; the Service reaches the pods.
    let port_of = |name: &str| {
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("container port `{name}`"))
            .container_port
    };
    assert_eq!(port_of("grpc-ca"), i32::from(config.listen.port()));
    assert_eq!(port_of("admin"), i32::from(config.admin.port()));
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    let probe = probe.expect("an HTTP readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    assert_eq!(probe.port, IntOrString::Int(i32::from(config.admin.port())));
    let labels = s
        .deployment
        .spec
        .as_ref()
        .and_then(|d| d.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let service = s.service.spec.as_ref().expect("a Service spec");
    for (k, v) in service.selector.iter().flatten() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service selects the signer's pods"
        );
    }
    let service_port = service.ports.iter().flatten().next().expect("a port");
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String("grpc-ca".into()))
    );
    // RBAC: create TokenReviews, get and list pods; bound to its account.
    let rules = s.cluster_role.rules.clone().unwrap_or_default();
    let mut granted: Vec<String> = rules
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let verbs = r.verbs.clone();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| format!("{g}/{res}:{v}"))
                })
            })
        })
        .collect();
    granted.sort();
    assert_eq!(
        granted,
        [
            "/pods:get",
            "/pods:list",
            "authentication.k8s.io/tokenreviews:create"
        ]
    );
    let account = s.service_account.metadata.name.clone().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(account.as_str()));
    assert!(
        s.cluster_role_binding
            .subjects
            .iter()
            .flatten()
            .any(|subject| subject.name == account)
    );
    // The agents: they reach the signer by a serving name, with a token for
    // its audience, as the account it trusts; and hold no Secret at all.
    let m = manifests();
    let (_dir, agent_config) = m.mounted_config();
    let asked = agent_config
        .node
        .identity
        .as_ref()
        .and_then(|i| i.signing_request.as_ref())
        .expect("the DaemonSet's default is identity.signingRequest");
    let authority = asked
        .address
        .strip_prefix("https://")
        .expect("an https address");
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    assert!(
        config.serving_names.iter().any(|n| n == host),
        "node.yaml's CA {host} is not among the signer's serving names {:?}",
        config.serving_names
    );
    assert_eq!(port, service_port.port.to_string());
    let service_name = s.service.metadata.name.clone().unwrap();
    let service_ns = s.service.metadata.namespace.clone().unwrap();
    assert_eq!(host, format!("{service_name}.{service_ns}.svc"));
    let agent_account = format!(
        "{}/{}",
        m.service_account.metadata.namespace.clone().unwrap(),
        m.service_account.metadata.name.clone().unwrap()
    );
    assert!(config.trusted_node_accounts.contains(&agent_account));
    let token = m
        .pod()
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| asked.token_file.ends_with(&t.path))
        .expect("the agent's token is a projected service-account token");
    assert!(
        token
            .audience
            .as_ref()
            .is_some_and(|a| config.token_audiences.contains(a)),
        "the agent's token audience {:?} is not the signer's {:?}",
        token.audience,
        config.token_audiences
    );
    for volume in m.pod().volumes.iter().flatten() {
        assert!(
            volume.secret.is_none(),
            "the DaemonSet mounts Secret volume `{}`: no node may hold signing material",
            volume.name
        );
    }
    assert_eq!(key_secret.as_deref(), Some("mesh-ca-issuer"));
}
