//! `node.yaml`: facts about this node and the agent's own settings.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The node configuration. Unknown fields are errors, never ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    /// The Kubernetes node name. `--node-name` (or `NODE_NAME`, set from
    /// the downward API's `spec.nodeName`) takes its place, so one ConfigMap
    /// serves every node.
    #[serde(default)]
    pub name: String,
    /// The node's zone (Kubernetes' `topology.kubernetes.io/zone` label):
    /// services with `locality: preferZone` prefer endpoints in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Where the admin API (health, readiness, metrics, status) listens.
    /// Loopback by default: it is for the node's own probes and operators.
    #[serde(default = "default_admin_address")]
    pub admin_address: SocketAddr,
    /// Mount point of the BPF filesystem (mounted by the agent if it is not).
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// Where this agent pins its maps and program links (on the BPF filesystem).
    /// Pinned state outlives the process: that is what keeps enrolled pods
    /// captured (fail-closed) while no agent runs, and what a restarted agent
    /// takes over. Default: `<bpffs>/mesh`.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Most captured connections alive at once on this node; beyond it new
    /// connections of enrolled pods are refused and counted (never let through).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// What an orderly stop (SIGTERM, SIGINT) does to the kernel programs.
    #[serde(default)]
    pub on_stop: OnStop,
    /// The cluster's DNS domain (the kubelet's `clusterDomain`): the DNS
    /// proxy answers `<service>.<namespace>.svc.<clusterDomain>`.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// The SPIFFE trust domain of this mesh.
    #[serde(default = "super::mesh::default_trust_domain")]
    pub trust_domain: String,
    /// Where workload certificates come from. Without it the agent has no
    /// identities: traffic to mesh workloads on other nodes is refused (never
    /// sent in the clear), and the tunnel port accepts nothing.
    #[serde(default)]
    pub identity: Option<super::mesh::IdentityConfig>,
    #[serde(default)]
    pub tunnel: super::mesh::TunnelConfig,
    /// Authorization policies in this namespace apply to every workload.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// The same-node fast path in the kernel (docs/fastpath.md).
    #[serde(default)]
    pub fast_path: FastPathConfig,
    /// Connections delivered into a pod come from the client's own address
    /// (the application's `getpeername()` returns the client), not from the
    /// agent's 127.0.0.6 / ::1 (default true; docs/capture.md).
    #[serde(default = "preserve_source_address_default")]
    pub preserve_source_address: bool,
    /// One log line per connection on the `access` target (default true).
    #[serde(default = "access_log_default")]
    pub access_log: bool,
    /// On SIGTERM/SIGINT: how long connections in flight may take to finish
    /// once readiness is off and no new connection is accepted (default 5 s).
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: std::time::Duration,
    /// What one pod, or the whole node's tunnel port, may hold at once.
    #[serde(default)]
    pub limits: Limits,
    /// Timeouts of the HTTP connections the agent serves and makes.
    #[serde(default)]
    pub http: HttpSettings,
    /// Where pods, remote workloads and services come from: `files`
    /// (pods.yaml, workloads.yaml, services.yaml; the default) or
    /// `kubernetes` (the API server; docs/kubernetes.md). Policies are
    /// node-local files either way.
    #[serde(default)]
    pub discovery: Discovery,
    /// Settings of `discovery: kubernetes`.
    #[serde(default)]
    pub kubernetes: KubernetesSettings,
    /// Spans of the HTTP requests the agent handles, sent to an OTLP
    /// collector (docs/operations.md, "Tracing"). Absent: no spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
}

/// `discovery`: the source of pods, remote workloads and services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Discovery {
    #[default]
    Files,
    Kubernetes,
}

/// `kubernetes`: how the agent reaches the API and finds pods on the node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesSettings {
    /// A kubeconfig file, for an agent outside the cluster; without it, the
    /// pod's service account (in-cluster configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubelet's cgroup driver (`systemd`, the default, or `cgroupfs`).
    #[serde(default)]
    pub cgroup_driver: crate::kubernetes::cgroup::CgroupDriver,
    /// The kubelet's `--cgroup-root` (default `/`), under the cgroup2 mount.
    #[serde(default = "default_kubelet_cgroup_root")]
    pub kubelet_cgroup_root: PathBuf,
    /// Where the container runtime keeps pod network namespaces.
    #[serde(default = "default_netns_dir")]
    pub netns_dir: PathBuf,
    /// Where the last state read from the API is kept, so a restarted agent
    /// serves its pods before the API answers.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    /// The CNI plugin's side of the agent (docs/kubernetes.md).
    #[serde(default)]
    pub cni: CniSettings,
}

/// `kubernetes.cni`: where the CNI plugin reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CniSettings {
    /// The socket the plugin asks on.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
    /// Where the agent keeps the sandboxes the plugin announced (for its
    /// next start) and the namespaces labelled for the mesh (for the
    /// plugin, when the agent is away).
    #[serde(default = "default_cni_state_dir")]
    pub state_dir: PathBuf,
    /// How long an ADD may wait for the pod to be described by the API and
    /// enrolled (the plugin's `timeoutSeconds` must be longer). Default 20s.
    #[serde(default = "default_cni_add_timeout", with = "humantime_serde")]
    pub add_timeout: std::time::Duration,
}

impl Default for CniSettings {
    fn default() -> Self {
        Self {
            socket: default_cni_socket(),
            state_dir: default_cni_state_dir(),
            add_timeout: default_cni_add_timeout(),
        }
    }
}

impl CniSettings {
    /// The namespaces labelled for the mesh, as last seen.
    pub fn namespaces_file(&self) -> PathBuf {
        self.state_dir.join("namespaces.json")
    }

    /// The sandboxes announced and not deleted.
    pub fn sandboxes_file(&self) -> PathBuf {
        self.state_dir.join("sandboxes.json")
    }
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from("/var/run/mesh-agent/cni.sock")
}

fn default_cni_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mesh-agent/cni")
}

fn default_cni_add_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(20)
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            cgroup_driver: Default::default(),
            kubelet_cgroup_root: default_kubelet_cgroup_root(),
            netns_dir: default_netns_dir(),
            state_file: default_state_file(),
            cni: CniSettings::default(),
        }
    }
}

fn default_kubelet_cgroup_root() -> PathBuf {
    PathBuf::from("/")
}

fn default_netns_dir() -> PathBuf {
    PathBuf::from("/var/run/netns")
}

fn default_state_file() -> PathBuf {
    PathBuf::from("/var/lib/mesh-agent/cluster.json")
}

/// `http`: timeouts of HTTP connections, the same on every path (into a
/// pod with HTTP rules, a service's HTTP port, the tunnel's streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    /// A client connection with no request in progress for this long is
    /// closed (HTTP/1) or sent GOAWAY (HTTP/2). Default 1h, Envoy's.
    #[serde(default = "default_http_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: std::time::Duration,
    /// A connection to an application that carried no byte for this long is
    /// closed. Default 1h.
    #[serde(default = "default_http_idle_timeout", with = "humantime_serde")]
    pub upstream_idle_timeout: std::time::Duration,
    /// An HTTP/1 request head must arrive whole within this time of its
    /// first byte (default 10s).
    #[serde(default = "default_request_headers_timeout", with = "humantime_serde")]
    pub request_headers_timeout: std::time::Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            idle_timeout: default_http_idle_timeout(),
            upstream_idle_timeout: default_http_idle_timeout(),
            request_headers_timeout: default_request_headers_timeout(),
        }
    }
}

fn default_http_idle_timeout() -> std::time::Duration {
    crate::l7::DEFAULT_IDLE_TIMEOUT
}

fn default_request_headers_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// `limits`: beyond them new connections are refused at once (reset) and
/// counted in `mesh_limit_refusals_total{limit}`; the ones open carry on.
/// The node-wide limit of captured connections is `maxConnections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Connections of one pod being proxied at once (in and out): one busy
    /// pod cannot take the whole node's share (default 16384).
    #[serde(default = "default_connections_per_pod")]
    pub connections_per_pod: u32,
    /// Tunnel connections from other nodes open at once, handshakes
    /// included (default 4096).
    #[serde(default = "default_tunnel_connections")]
    pub tunnel_connections: u32,
    /// Tunnel TLS handshakes in progress at once (default 256): handshakes
    /// cost CPU, and a peer that stalls one holds it for `handshakeTimeout`.
    #[serde(default = "default_pending_handshakes")]
    pub pending_handshakes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_pod: default_connections_per_pod(),
            tunnel_connections: default_tunnel_connections(),
            pending_handshakes: default_pending_handshakes(),
        }
    }
}

fn default_connections_per_pod() -> u32 {
    16384
}

fn default_tunnel_connections() -> u32 {
    4096
}

fn default_pending_handshakes() -> u32 {
    256
}

fn default_drain_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn access_log_default() -> bool {
    true
}

/// `fastPath`: what moves between local sockets inside the kernel.
/// EXPERIMENTAL and off by default: with an application's socket in a
/// sockmap, the kernel (6.18) can make a *blocking* read return EAGAIN when a
/// reset (or any other wake-up without data) arrives; see docs/fastpath.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FastPathConfig {
    /// Loopback legs: application <-> agent, agent <-> local pod.
    #[serde(default)]
    pub loopback: bool,
    /// Authorized L4 flows between two pods of this node go straight from one
    /// application socket to the other (needs `loopback`).
    #[serde(default)]
    pub splice: bool,
}

fn default_cluster_domain() -> String {
    "cluster.local".to_string()
}

fn preserve_source_address_default() -> bool {
    true
}

fn default_root_namespace() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.to_string()
}

/// Behaviour on an orderly stop. A crash always leaves capture in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OnStop {
    /// Programs stay attached: enrolled pods cannot open connections (they are
    /// refused at once, and counted) until an agent is back. Mesh users expect
    /// this: no traffic escapes policy while the agent is away.
    #[default]
    KeepCapture,
    /// Programs are detached: pods connect directly, without the agent (and so
    /// without policy or mTLS). For uninstalling, or a deliberate fail-open choice.
    Release,
}

impl NodeConfig {
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| self.bpffs.join("mesh"))
    }
}

pub fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::ADMIN_PORT))
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}

fn default_max_connections() -> u32 {
    mesh_common::DEFAULT_MAX_PENDING
}

/// `tracing`: where request spans go, and how many traces are sampled.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSettings {
    /// The OTLP collector: `http://otel-collector.observability:4317` for
    /// gRPC; for `http/protobuf` the base URL (`...:4318`, spans are posted
    /// to `/v1/traces`) or the full URL of the traces endpoint.
    pub endpoint: String,
    /// `grpc` (default) or `http/protobuf`, as `OTEL_EXPORTER_OTLP_PROTOCOL`
    /// names them.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Of the requests that come without a trace context, the percentage
    /// that start a sampled trace (0 to 100; default 1, Istio's). A request
    /// whose context says sampled, or not, is followed.
    #[serde(default = "default_random_sampling_percentage")]
    pub random_sampling_percentage: f64,
    /// Spans waiting for the collector at most (default 2048); when the
    /// queue is full, new spans are dropped and counted.
    #[serde(default = "default_max_queued_spans")]
    pub max_queued_spans: usize,
    /// One export's time limit, retries included (default 10s).
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: std::time::Duration,
}

/// How spans are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl TracingSettings {
    /// Where `http/protobuf` posts: the endpoint as given if it names a
    /// path, else its `/v1/traces` (the OTLP specification's rule for a
    /// base URL).
    pub fn traces_url(&self) -> String {
        match self.endpoint.parse::<http::Uri>() {
            Ok(uri) if uri.path() != "/" && !uri.path().is_empty() => self.endpoint.clone(),
            _ => format!("{}/v1/traces", self.endpoint.trim_end_matches('/')),
        }
    }
}

fn default_random_sampling_percentage() -> f64 {
    1.0
}

fn default_max_queued_spans() -> usize {
    2048
}

fn default_export_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
