//! What the running agent knows, shared by the daemon loop and the admin API.

use parking_lot::{Mutex, RwLock};
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    admin::metrics::Metrics, capture::Enroller, config::NodeConfig, desired::Desired,
    proxy::ProxyContext,
};

/// One configured pod and whether the kernel programs cover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub enrolled: bool,
    /// Why it is not enrolled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<PodCountersView>,
    /// Whether deliveries into the pod come from clients' addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_address: Option<crate::proxy::source_address::SourceAddressView>,
}

/// A pod's kernel counters, summed over CPUs (see `mesh_common::PodCounters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCountersView {
    pub connect4: u64,
    pub connect6: u64,
    pub captured_outbound: u64,
    pub captured_inbound: u64,
    pub excluded: u64,
    pub refused_agent_absent: u64,
    pub refused_map_full: u64,
}

/// The summary behind `/status` and `mesh-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub node: String,
    pub version: String,
    pub config_dir: PathBuf,
    pub ready: bool,
    /// Why `/readyz` says no, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
    pub programs: Vec<String>,
    pub attachments: usize,
    pub pods: Vec<PodStatus>,
    /// Successful configuration loads since start (the first included).
    pub config_generation: u64,
    /// Why the last reload was rejected, if it was (the previous configuration
    /// keeps serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    /// Authorization policies that cannot be enforced as written (file,
    /// line, field and why); each denies all traffic to what it selects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unenforceable_policies: Vec<String>,
    /// The SPIFFE trust domain.
    #[serde(default)]
    pub trust_domain: String,
    /// Workload certificates held (never keys).
    #[serde(default)]
    pub certificates: Vec<CertificateView>,
    /// Refused tunnel handshakes and requests, by reason.
    #[serde(default)]
    pub tunnel_rejections: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub tunnel_pooled_connections: usize,
    /// Roots in the trust bundle (two during a CA rotation).
    #[serde(default)]
    pub trust_roots: usize,
    /// With certificates asked from a CA: how asking goes, and how long the
    /// certificates held last if it stays away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<CaView>,
    /// Authorization decisions so far.
    #[serde(default)]
    pub authorization: Vec<DecisionCount>,
    /// The kernel probe's findings: release, missing features and the
    /// fallbacks taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::ebpf::probe::KernelSupport>,
    /// With `discovery: kubernetes`: the watches' health, pods of the mesh
    /// waiting to be enrolled and Services not served, with reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kubernetes::KubernetesStatus>,
}

/// How often a policy rule decided (`-` for "allowed").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionCount {
    pub policy: String,
    /// `allow`, `deny` or `dry_run_deny`.
    pub decision: String,
    pub count: u64,
}

/// The certificate authority as the agent sees it (`signingRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaView {
    pub address: String,
    pub requests_succeeded: u64,
    pub requests_failed: u64,
    /// Failed requests since the last success (0: the CA answers).
    pub consecutive_failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Seconds until the first held certificate expires (0 when one has),
    /// None while none is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_left: Option<u64>,
}

impl CaView {
    /// A warning while the CA fails but the certificates still serve.
    pub fn warning(&self) -> Option<String> {
        if self.consecutive_failures == 0 {
            return None;
        }
        let left = self
            .seconds_left
            .map(|s| format!("; the certificates held expire in {s}s"))
            .unwrap_or_default();
        Some(format!(
            "the CA at {} is failing ({} requests in a row: {}){left}",
            self.address,
            self.consecutive_failures,
            self.last_error.as_deref().unwrap_or("unknown error")
        ))
    }
}

/// A workload certificate as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateView {
    pub identity: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    pub serial: String,
    /// `minted` or `file`.
    pub source: String,
}

pub struct AgentState {
    pub config_dir: PathBuf,
    ready: AtomicBool,
    /// A successor has asked for this agent's listeners.
    handing_over: AtomicBool,
    pub enroller: Mutex<Enroller>,
    pub proxy: Arc<ProxyContext>,
    pub metrics: Metrics,
    /// Why the last change was refused or failed, until one succeeds.
    last_reload_error: Mutex<Option<String>>,
    /// The node settings the agent started with (they apply at start only).
    running_node: NodeConfig,
    /// The desired state in force (the last one applied without error).
    pub desired: RwLock<Arc<Desired>>,
    /// Node settings that differ from the running ones: they wait for a
    /// restart.
    pub pending_node: RwLock<Option<NodeConfig>>,
    /// How full the kernel's hash maps are (empty if they could not be opened).
    map_gauges: Vec<crate::ebpf::occupancy::MapGauge>,
    /// What the kernel probe found at start.
    kernel: Option<crate::ebpf::probe::KernelSupport>,
    /// The Kubernetes source, with `discovery: kubernetes`.
    pub kubernetes: Option<Arc<crate::kubernetes::KubeSource>>,
    /// Woken each time a desired state has been applied (or failed to).
    pub applied: tokio::sync::Notify,
}

impl AgentState {
    pub fn new(
        config_dir: PathBuf,
        enroller: Enroller,
        proxy: Arc<ProxyContext>,
        running_node: NodeConfig,
    ) -> Self {
        // Nothing is in force until the first desired state is applied.
        let empty = Desired {
            dir: config_dir.clone(),
            node: running_node.clone(),
            pods: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            policies: Default::default(),
            routes: Default::default(),
        };
        Self {
            config_dir,
            ready: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            enroller: Mutex::new(enroller),
            proxy,
            metrics: Metrics::new(),
            last_reload_error: Mutex::new(None),
            running_node,
            desired: RwLock::new(Arc::new(empty)),
            pending_node: RwLock::new(None),
            map_gauges: Vec::new(),
            kernel: None,
            kubernetes: None,
            applied: tokio::sync::Notify::new(),
        }
    }

    /// The node settings in force.
    pub fn node_config(&self) -> NodeConfig {
        self.running_node.clone()
    }

    /// The desired state in force.
    pub fn desired(&self) -> Arc<Desired> {
        self.desired.read().clone()
    }

    /// The generation of the snapshot in force (1 after the first load).
    pub fn config_generation(&self) -> u64 {
        self.proxy.snapshot().generation
    }

    /// Records how the last change went: `None` for applied, else why not.
    pub fn set_reload_result(&self, error: Option<String>) {
        let result = if error.is_none() { "ok" } else { "failed" };
        self.metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
        *self.last_reload_error.lock() = error;
    }

    /// A refusal that still stands after a change from elsewhere applied
    /// (shown in `/status`; not counted again).
    pub fn keep_refusal(&self, reason: String) {
        *self.last_reload_error.lock() = Some(reason);
    }

    /// The source is valid again, and says what is in force already.
    pub fn clear_reload_error(&self) {
        *self.last_reload_error.lock() = None;
    }

    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error.lock().clone()
    }

    /// The Kubernetes source, for `/status` and the metrics.
    pub fn with_kubernetes(mut self, source: Option<Arc<crate::kubernetes::KubeSource>>) -> Self {
        if let Some(source) = &source {
            self.metrics.register(source.health.collectors());
        }
        self.kubernetes = source;
        self
    }

    /// Gauges of the kernel maps, exposed at every scrape.
    pub fn with_map_gauges(mut self, gauges: Vec<crate::ebpf::occupancy::MapGauge>) -> Self {
        self.map_gauges = gauges;
        self
    }

    pub fn with_kernel(mut self, kernel: crate::ebpf::probe::KernelSupport) -> Self {
        self.kernel = Some(kernel);
        self
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Why `/readyz` says no, if it does: still starting or draining; pods
    /// enrolled but no kernel program attached; with mutual TLS, an enrolled
    /// pod without a certificate in force (its peers could not verify it).
    pub fn unready_reason(&self) -> Option<String> {
        if !self.is_ready() {
            return Some("starting or draining".into());
        }
        // Both agents answer on the admin socket during a handover: only
        // the new one may say ready.
        if self.handing_over() {
            return Some("handing over to a new agent".into());
        }
        let enroller = self.enroller.lock();
        let enrolled = enroller.enrolled_count();
        if enrolled > 0 && enroller.programs.attachment_count() == 0 {
            return Some(format!(
                "{enrolled} pods enrolled but no kernel program attached"
            ));
        }
        drop(enroller);
        if let Some(identities) = &self.proxy.mtls.identities {
            let now = std::time::SystemTime::now();
            let valid: std::collections::HashSet<String> = identities
                .certificates()
                .into_iter()
                .filter(|c| c.not_before <= now && now < c.not_after)
                .map(|c| c.identity.to_string())
                .collect();
            let mut missing: Vec<String> = self
                .proxy
                .local_identities()
                .into_iter()
                .map(|id| id.to_string())
                .filter(|id| !valid.contains(id))
                .collect();
            if !missing.is_empty() {
                missing.sort();
                missing.dedup();
                let why = self
                    .certificate_authority()
                    .and_then(|ca| ca.warning())
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default();
                return Some(format!(
                    "no valid certificate for {}{why}",
                    missing.join(", ")
                ));
            }
        }
        None
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    pub fn set_handing_over(&self, handing_over: bool) {
        self.handing_over.store(handing_over, Ordering::SeqCst);
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }

    /// Pod statuses with fresh counters from the kernel maps.
    pub fn pods_with_counters(&self) -> Vec<PodStatus> {
        self.enroller.lock().statuses()
    }

    pub fn status(&self) -> StatusReport {
        let not_ready_reason = self.unready_reason();
        let enroller = self.enroller.lock();
        StatusReport {
            node: self.running_node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_dir: self.config_dir.clone(),
            ready: not_ready_reason.is_none(),
            not_ready_reason,
            programs: enroller
                .programs
                .program_names()
                .into_iter()
                .map(String::from)
                .collect(),
            attachments: enroller.programs.attachment_count(),
            pods: enroller.statuses(),
            config_generation: self.config_generation(),
            last_reload_error: self.last_reload_error(),
            unenforceable_policies: self
                .desired()
                .policies
                .set
                .unenforceable()
                .filter_map(|p| p.unenforceable().map(ToString::to_string))
                .chain(
                    self.proxy
                        .snapshot()
                        .policies
                        .unmapped_targets()
                        .iter()
                        .cloned(),
                )
                .collect(),
            trust_domain: self.proxy.mtls.trust_domain.clone(),
            certificates: self.certificates(),
            tunnel_rejections: self.proxy.mtls.rejections(),
            tunnel_pooled_connections: self.proxy.mtls.tunnel.pooled_connections(),
            trust_roots: self
                .proxy
                .mtls
                .identities
                .as_ref()
                .map_or(0, |m| m.trust_bundle_len()),
            certificate_authority: self.certificate_authority(),
            authorization: self
                .proxy
                .authorizer
                .decisions()
                .into_iter()
                .map(|((policy, decision), count)| DecisionCount {
                    policy,
                    decision,
                    count,
                })
                .collect(),
            kubernetes: self.kubernetes.as_ref().map(|k| k.status()),
            kernel: self.kernel.clone(),
        }
    }

    /// How asking the CA goes, when certificates are asked from one.
    pub fn certificate_authority(&self) -> Option<CaView> {
        let manager = self.proxy.mtls.identities.as_ref()?;
        let health = manager.request_health()?;
        let crate::identity::IdentitySource::SigningRequest(source) = manager.source() else {
            return None;
        };
        let now = std::time::SystemTime::now();
        let seconds_left = manager
            .certificates()
            .iter()
            .map(|c| c.not_after.duration_since(now).map_or(0, |d| d.as_secs()))
            .min();
        Some(CaView {
            address: source.address.clone(),
            requests_succeeded: health.succeeded,
            requests_failed: health.failed,
            consecutive_failures: health.consecutive_failures,
            last_error: health.last_error,
            seconds_left,
        })
    }

    pub fn certificates(&self) -> Vec<CertificateView> {
        let Some(manager) = &self.proxy.mtls.identities else {
            return Vec::new();
        };
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        manager
            .certificates()
            .into_iter()
            .map(|c| CertificateView {
                identity: c.identity.to_string(),
                not_before: secs(c.not_before),
                not_after: secs(c.not_after),
                serial: c.serial.clone(),
                source: c.source.as_str().to_string(),
            })
            .collect()
    }

    /// Brings the metrics up to date; called on every scrape.
    pub fn refresh_metrics(&self) {
        let (pods, attachments) = {
            let enroller = self.enroller.lock();
            (enroller.statuses(), enroller.programs.attachment_count())
        };
        let m = &self.metrics;
        m.pods_enrolled
            .set(pods.iter().filter(|p| p.enrolled).count() as i64);
        m.pods_failed
            .set(pods.iter().filter(|p| !p.enrolled).count() as i64);
        m.programs_attached.set(attachments as i64);
        for pod in &pods {
            if let Some(c) = pod.counters {
                m.sync_pod_counters(&pod.namespace, &pod.name, &c);
            }
            if let Some(view) = &pod.source_address {
                m.sync_pod_source_address(&pod.namespace, &pod.name, view);
            }
        }
        m.sync_proxy(&self.proxy.connections);
        m.sync_dns(&self.proxy.dns);
        m.config_generation.set(self.config_generation() as i64);
        m.policies_unenforceable.set(
            (self.desired().policies.set.unenforceable().count()
                + self.proxy.snapshot().policies.unmapped_targets().len()) as i64,
        );
        m.sync_mtls(
            &self.certificates(),
            &self.proxy.mtls.rejections(),
            crate::admin::metrics::TunnelCounts {
                pooled: self.proxy.mtls.tunnel.pooled_connections(),
                inbound: self.proxy.tunnel_connections(),
                pending_handshakes: self.proxy.pending_handshakes(),
            },
            self.certificate_authority().as_ref(),
        );
        m.sync_decisions(&self.proxy.authorizer.decisions());
        let services: Vec<_> = self
            .proxy
            .snapshot()
            .services
            .entries()
            .iter()
            .map(|entry| (entry.key.clone(), entry.stats()))
            .collect();
        m.sync_services(&services, self.proxy.http_pool.pooled());
        if let Some(fast_path) = &self.proxy.fast_path {
            m.sync_fast_path(&fast_path.stats());
        }
        m.sync_maps(&self.map_gauges);
        m.sync_panics();
    }
}
