//! The Kubernetes API as a source of the desired state: node settings and
//! policies still from the configuration directory; pods of this node,
//! workloads on other nodes and services from the watches. Every change of
//! either is sent whole, as the files source does.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_cni::protocol::{EnrolledNamespaces, PodSandbox};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::{
    cgroup::{self, pod_cgroup},
    cluster::{ClusterView, Parts, Placement},
    netns::NetnsFinder,
    pods::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, NotEnrolled, PodFacts},
    watch::{self, KindHealth, WatchHealth},
};
use crate::{
    config::{self, KubernetesSettings, watch::Changes},
    desired::{Desired, Update},
};

/// A pod of the mesh on this node waits this long between looks for its
/// network namespace and cgroup (the runtime makes them as the pod starts).
const PLACEMENT_RETRY: Duration = Duration::from_millis(100);
/// The saved state is written at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What the source shares with `/status`, the metrics and the daemon.
pub struct KubeSource {
    settings: KubernetesSettings,
    node: String,
    view: Arc<Mutex<ClusterView>>,
    changed: Arc<Notify>,
    pub health: Arc<WatchHealth>,
    report: Mutex<Report>,
    /// Pod UID → where it was found, with the addresses it was found by.
    placements: Mutex<HashMap<String, (Vec<std::net::IpAddr>, Placement)>>,
    finder: Mutex<NetnsFinder>,
    cgroup_root: PathBuf,
    /// Sandboxes the CNI plugin announced and did not delete yet, by
    /// sandbox id: their pods are enrolled from the first packet.
    sandboxes: Mutex<BTreeMap<String, PodSandbox>>,
    /// The namespaces labelled for the mesh as last written for the plugin.
    namespaces_written: Mutex<Option<Vec<String>>>,
    /// Route resources from the API, each loaded once per version.
    api_routes: Mutex<super::routes::ApiRoutes>,
}

/// What the last pass made of the cluster, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The state came from the saved file and no watch has listed yet.
    pub from_saved_state: bool,
    /// Pods of the mesh on this node not enrolled yet, and why.
    pub waiting: Vec<(String, String)>,
    /// Services not served, and why.
    pub skipped_services: Vec<(String, String)>,
    /// Route resources from the API refused (`HTTPRoute namespace/name`),
    /// and why.
    #[serde(default)]
    pub refused_routes: Vec<(String, String)>,
}

/// The Kubernetes part of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesStatus {
    /// Every watch has listed at least once.
    pub synced: bool,
    pub watches: std::collections::BTreeMap<String, KindHealth>,
    #[serde(flatten)]
    pub report: Report,
}

impl KubeSource {
    /// The source for `node`, with the saved state (if any) as the view to
    /// start from.
    pub fn new(settings: &KubernetesSettings, node: &str) -> Result<Arc<Self>> {
        let cgroup_root = cgroup::cgroup2_mount()?.join(
            settings
                .kubelet_cgroup_root
                .strip_prefix("/")
                .unwrap_or(&settings.kubelet_cgroup_root),
        );
        let (view, from_saved_state) = match load_saved(&settings.state_file) {
            Ok(Some(view)) => {
                tracing::info!(file = %settings.state_file.display(), pods = view.pods.len(), services = view.services.len(), "serving the saved Kubernetes state until the API answers");
                (view, true)
            }
            Ok(None) => (ClusterView::default(), false),
            Err(err) => {
                tracing::warn!(file = %settings.state_file.display(), error = format!("{err:#}"), "the saved Kubernetes state is unreadable; starting from the API alone");
                (ClusterView::default(), false)
            }
        };
        Ok(Arc::new(Self {
            settings: settings.clone(),
            node: node.to_string(),
            view: Arc::new(Mutex::new(view)),
            changed: Arc::new(Notify::new()),
            health: Arc::default(),
            report: Mutex::new(Report {
                from_saved_state,
                ..Report::default()
            }),
            placements: Mutex::default(),
            finder: Mutex::new(NetnsFinder::new(&settings.netns_dir)),
            cgroup_root,
            sandboxes: Mutex::new(load_sandboxes(&settings.cni.sandboxes_file())),
            namespaces_written: Mutex::new(None),
            api_routes: Mutex::default(),
        }))
    }

    /// The desired state from the files in `dir` (node settings, policies)
    /// and the view as it is now. Blocking: it may enter namespaces to
    /// place new pods.
    pub fn desired(&self, dir: &Path) -> Result<Desired, config::ConfigError> {
        Ok(self.with_cluster(read_files(dir, None)?.0))
    }

    /// `files` (node settings, policies, routes) with the pods, workloads,
    /// services and route resources of the view as it is now.
    fn with_cluster(&self, mut files: Desired) -> Desired {
        let (parts, routes) = self.parts();
        files.pods = parts.pods;
        files.workloads = parts.workloads;
        files.services = parts.services;
        let (routes, refused) = self.api_routes.lock().join(&routes, &files.routes);
        files.routes = routes;
        self.report.lock().refused_routes = refused;
        files
    }

    /// The parts of the desired state from the view, and its route
    /// resources.
    fn parts(
        &self,
    ) -> (
        Parts,
        BTreeMap<super::watch::Kind, BTreeMap<String, String>>,
    ) {
        let mut view = self.view.lock().clone();
        let sandboxes = self.sandboxes.lock().clone();
        for sandbox in sandboxes.values() {
            if let Some(pod) = pod_of_mut(&mut view, sandbox) {
                announced(pod, sandbox);
            }
        }
        let (placements, unplaced) = self.place(&view, &sandboxes);
        let mut parts = view.parts(&self.node, &placements);
        // Why each waiting pod waits, when the node says more than the view.
        for (key, why) in &mut parts.waiting {
            if let Some(reason) = view
                .pods
                .values()
                .find(|p| &p.key() == key)
                .and_then(|p| unplaced.get(&p.uid))
            {
                *why = reason.clone();
            }
        }
        let mut report = self.report.lock();
        report.from_saved_state = report.from_saved_state && !self.health.all_synced();
        report.waiting = parts.waiting.clone();
        report.skipped_services = parts.skipped.clone();
        (parts, view.routes)
    }

    /// Finds where each pod of the mesh on this node lives; a pod whose
    /// namespace or cgroup is not there yet is left out (and looked for
    /// again), with the reason kept for `/status`.
    fn place(
        &self,
        view: &ClusterView,
        sandboxes: &BTreeMap<String, PodSandbox>,
    ) -> (HashMap<String, Placement>, HashMap<String, String>) {
        let mut placements = self.placements.lock();
        let local: Vec<&PodFacts> = view.local_pods(&self.node).collect();
        placements.retain(|uid, _| local.iter().any(|p| &p.uid == uid));
        let mut placed = HashMap::new();
        let mut unplaced = HashMap::new();
        for pod in local {
            // A sandbox the CNI plugin announced says where the pod is.
            if let Some(sandbox) = sandboxes.values().find(|s| is_pod_of(pod, s)) {
                match self.cgroup_of(pod) {
                    Ok(cgroup) => {
                        placed.insert(
                            pod.uid.clone(),
                            Placement {
                                netns: PathBuf::from(&sandbox.netns),
                                cgroup,
                            },
                        );
                    }
                    Err(why) => {
                        unplaced.insert(pod.uid.clone(), why);
                    }
                }
                continue;
            }
            let ips: Vec<std::net::IpAddr> = pod.ips().collect();
            let known = placements
                .get(&pod.uid)
                .filter(|(found_by, place)| *found_by == ips && place.netns.exists())
                .map(|(_, place)| place.clone());
            let place = match known {
                Some(place) => Ok(place),
                None => self.find(pod, &ips),
            };
            match place {
                Ok(place) => {
                    placements.insert(pod.uid.clone(), (ips, place.clone()));
                    placed.insert(pod.uid.clone(), place);
                }
                Err(why) => {
                    unplaced.insert(pod.uid.clone(), why);
                }
            }
        }
        (placed, unplaced)
    }

    fn find(&self, pod: &PodFacts, ips: &[std::net::IpAddr]) -> Result<Placement, String> {
        let cgroup = self.cgroup_of(pod)?;
        let netns = self.finder.lock().find(ips)?.ok_or_else(|| {
            format!(
                "no network namespace in {} holds its IP yet",
                self.settings.netns_dir.display()
            )
        })?;
        tracing::info!(pod = %pod.key(), netns = %netns.display(), cgroup = %cgroup.display(), "pod found on the node");
        Ok(Placement { netns, cgroup })
    }

    /// The pod's cgroup, from its UID and QoS class, once the kubelet has
    /// made it.
    fn cgroup_of(&self, pod: &PodFacts) -> Result<PathBuf, String> {
        let qos = pod
            .qos
            .ok_or("its QoS class is not known yet (status.qosClass)")?;
        let cgroup = pod_cgroup(
            &self.cgroup_root,
            self.settings.cgroup_driver,
            qos,
            &pod.uid,
        );
        if !cgroup.is_dir() {
            return Err(format!(
                "its cgroup {} is not there yet (kubernetes.cgroupDriver: {:?})",
                cgroup.display(),
                self.settings.cgroup_driver
            ));
        }
        Ok(cgroup)
    }

    /// Whether the pod of a sandbox the CNI plugin announces is in the
    /// mesh, by the view as it is now.
    pub fn membership(&self, sandbox: &PodSandbox) -> Membership {
        let view = self.view.lock();
        let Some(mut pod) = view.pods.values().find(|p| is_pod_of(p, sandbox)).cloned() else {
            return Membership::Undescribed;
        };
        if pod.node.as_deref().is_some_and(|n| n != self.node) {
            return Membership::ElsewhereScheduled(pod.node.unwrap_or_default());
        }
        announced(&mut pod, sandbox);
        match view.enrolment(&pod) {
            Ok(()) => Membership::InMesh(pod.key()),
            Err(why) => Membership::NotInMesh(why),
        }
    }

    /// Keeps a sandbox the plugin announced (its pod is enrolled from it)
    /// and looks again at once.
    pub fn announce(&self, sandbox: PodSandbox) {
        let mut sandboxes = self.sandboxes.lock();
        // A pod has one sandbox: the newest ADD is the one in use.
        sandboxes.retain(|_, known| {
            !(known.uid == sandbox.uid
                && known.namespace == sandbox.namespace
                && known.name == sandbox.name)
        });
        sandboxes.insert(sandbox.container_id.clone(), sandbox);
        self.save_sandboxes(&sandboxes);
        drop(sandboxes);
        self.changed.notify_one();
    }

    /// Forgets a sandbox (deleted, or its pod not the mesh's); true if it
    /// was known.
    pub fn forget(&self, container_id: &str) -> bool {
        let mut sandboxes = self.sandboxes.lock();
        let known = sandboxes.remove(container_id).is_some();
        if known {
            self.save_sandboxes(&sandboxes);
            drop(sandboxes);
            self.changed.notify_one();
        }
        known
    }

    /// Why the pod of `key` waits, if it does.
    pub fn waiting_reason(&self, key: &str) -> Option<String> {
        self.report
            .lock()
            .waiting
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, why)| why.clone())
    }

    fn save_sandboxes(&self, sandboxes: &BTreeMap<String, PodSandbox>) {
        let path = self.settings.cni.sandboxes_file();
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(sandboxes)?)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(err) = written {
            tracing::warn!(file = %path.display(), error = %err, "saving the announced sandboxes failed: after a restart their pods wait for the API to say they run");
        }
    }

    /// Writes the namespaces labelled for the mesh for the plugin, when
    /// they changed and the view is whole (listed, or saved from a whole
    /// one).
    fn write_enrolled_namespaces(&self) {
        let from_saved = self.report.lock().from_saved_state;
        if !self.health.all_synced() && !from_saved {
            return;
        }
        let namespaces: Vec<String> = self
            .view
            .lock()
            .namespaces
            .iter()
            .filter(|(_, labels)| {
                labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_AMBIENT)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut written = self.namespaces_written.lock();
        if written.as_ref() == Some(&namespaces) {
            return;
        }
        let path = self.settings.cni.namespaces_file();
        match (EnrolledNamespaces {
            namespaces: namespaces.clone(),
        })
        .write(&path)
        {
            Ok(()) => *written = Some(namespaces),
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "writing the namespaces in the mesh for the CNI plugin failed")
            }
        }
    }

    /// The Kubernetes part of `/status`.
    pub fn status(&self) -> KubernetesStatus {
        KubernetesStatus {
            synced: self.health.all_synced(),
            watches: self
                .health
                .snapshot()
                .into_iter()
                .map(|(kind, health)| (kind.name().to_string(), health))
                .collect(),
            report: self.report.lock().clone(),
        }
    }

    /// The view as last seen (for `/config_dump`).
    pub fn view(&self) -> ClusterView {
        self.view.lock().clone()
    }

    /// Follows the API and the files until the receiver goes: every change
    /// sends the whole desired state (or why the files were refused).
    pub async fn run(
        self: Arc<Self>,
        dir: PathBuf,
        mut files: Option<Changes>,
        updates: mpsc::Sender<Update>,
    ) {
        let client = match client(&self.settings).await {
            Ok(client) => client,
            Err(err) => {
                tracing::error!(
                    error = format!("{err:#}"),
                    "no Kubernetes client: pods, workloads and services stay as they are"
                );
                let _ = updates
                    .send(Update::Rejected(format!("no Kubernetes client: {err:#}")))
                    .await;
                return;
            }
        };
        let watches = tokio::spawn(watch::follow_all(
            client,
            watch::Sink {
                view: self.view.clone(),
                changed: self.changed.clone(),
                health: self.health.clone(),
            },
        ));
        let _stop_watches = AbortOnDrop(watches);
        let mut last_sent: Option<Desired> = None;
        let mut last_saved: Option<(Instant, ClusterView)> = None;
        // The last files that read well, and why the ones now are refused.
        let mut last_good: Option<Desired> = None;
        let mut refused: Option<String> = None;
        let mut save_due = false;
        loop {
            let waiting = !self.report.lock().waiting.is_empty();
            tokio::select! {
                _ = self.changed.notified() => {}
                more = async {
                    match files.as_mut() {
                        Some(files) => files.changed().await,
                        None => std::future::pending().await,
                    }
                } => if !more { files = None },
                _ = tokio::time::sleep(PLACEMENT_RETRY), if waiting => {}
                _ = tokio::time::sleep(SAVE_EVERY), if save_due => {}
            }
            // The files are read whole at every pass; a bad edit is refused
            // once (named in /status until fixed) while the cluster's
            // changes keep flowing with the last good files.
            let read_dir = dir.clone();
            let last_good_policies = last_good.as_ref().map(|d| d.policies.files.clone());
            let read = tokio::task::spawn_blocking(move || {
                read_files(&read_dir, last_good_policies.as_deref())
            })
            .await
            .unwrap_or_else(|err| {
                Err(config::ConfigError::new(
                    &dir,
                    format!("reading failed: {err}"),
                ))
            });
            let mut out = Vec::new();
            let mut send_anyway = false;
            match read {
                Ok((good, kept_back)) if kept_back.is_empty() => {
                    send_anyway = refused.take().is_some();
                    last_good = Some(good);
                }
                Ok((good, kept_back)) => {
                    // Policy files kept back: the rest of the files' change
                    // applies, the refusal stays shown.
                    let reason = config::kept_back_reason(&kept_back);
                    send_anyway = refused.as_deref() != Some(reason.as_str());
                    refused = Some(reason);
                    last_good = Some(good);
                }
                Err(err) => {
                    let reason = err.to_string();
                    if refused.as_deref() != Some(reason.as_str()) {
                        out.push(Update::Rejected(reason.clone()));
                    }
                    refused = Some(reason);
                }
            }
            if let Some(good) = last_good.clone() {
                let source = self.clone();
                let desired = tokio::task::spawn_blocking(move || source.with_cluster(good))
                    .await
                    .expect("placing pods does not panic");
                if send_anyway || last_sent.as_ref() != Some(&desired) {
                    last_sent = Some(desired.clone());
                    out.push(match &refused {
                        None => Update::Desired(Box::new(desired)),
                        Some(reason) => {
                            Update::DesiredFilesRefused(Box::new(desired), reason.clone())
                        }
                    });
                }
            }
            for update in out {
                if updates.send(update).await.is_err() {
                    return;
                }
            }
            self.write_enrolled_namespaces();
            save_due = self.save(&mut last_saved).await;
        }
    }

    /// Writes the view to the state file when it changed, at most every
    /// [`SAVE_EVERY`], and only once every watch has listed (a partial
    /// view is never saved over a whole one).
    /// True when a save is still due (too soon since the last one).
    async fn save(&self, last: &mut Option<(Instant, ClusterView)>) -> bool {
        if !self.health.all_synced() {
            return false;
        }
        if last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < SAVE_EVERY)
        {
            // Too soon: the run loop comes back once SAVE_EVERY is up.
            return true;
        }
        let view = self.view.lock().clone();
        if last.as_ref().is_some_and(|(_, saved)| *saved == view) {
            return false;
        }
        let path = self.settings.state_file.clone();
        let to_write = view.clone();
        match tokio::task::spawn_blocking(move || save(&path, &to_write)).await {
            Ok(Ok(())) => *last = Some((Instant::now(), view)),
            Ok(Err(err)) => {
                tracing::warn!(file = %self.settings.state_file.display(), error = format!("{err:#}"), "saving the Kubernetes state failed")
            }
            Err(err) => tracing::warn!(error = %err, "saving the Kubernetes state failed"),
        }
        false
    }
}

/// Whether a pod announced by the CNI plugin is in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// The API has not described the pod yet (as far as the watch says).
    Undescribed,
    /// The pod is scheduled to another node (a wrong `NODE_NAME`?).
    ElsewhereScheduled(String),
    NotInMesh(NotEnrolled),
    /// In the mesh: enrolled as `namespace/name`.
    InMesh(String),
}

/// Whether `sandbox` is `pod`'s: by UID, or by name when the runtime gave
/// no UID.
fn is_pod_of(pod: &PodFacts, sandbox: &PodSandbox) -> bool {
    if sandbox.uid.is_empty() {
        pod.namespace == sandbox.namespace && pod.name == sandbox.name
    } else {
        pod.uid == sandbox.uid
    }
}

fn pod_of_mut<'a>(view: &'a mut ClusterView, sandbox: &PodSandbox) -> Option<&'a mut PodFacts> {
    view.pods.values_mut().find(|p| is_pod_of(p, sandbox))
}

/// A pod whose sandbox the plugin announced is enrolled before the API
/// says it runs: the sandbox's addresses are its own.
fn announced(pod: &mut PodFacts, sandbox: &PodSandbox) {
    pod.running = true;
    if let Some(v4) = sandbox.ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(*v4),
        std::net::IpAddr::V6(_) => None,
    }) {
        pod.ipv4 = Some(v4);
    }
    if let Some(v6) = sandbox.ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V6(v6) => Some(*v6),
        std::net::IpAddr::V4(_) => None,
    }) {
        pod.ipv6 = Some(v6);
    }
}

fn load_sandboxes(path: &Path) -> BTreeMap<String, PodSandbox> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            tracing::warn!(file = %path.display(), error = %err, "the announced sandboxes are unreadable: their pods wait for the API to say they run");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// The files' part of the desired state (node settings, policies); the
/// files that only the files source reads must be absent.
fn read_files(
    dir: &Path,
    last_good_policies: Option<&[(PathBuf, String)]>,
) -> Result<(Desired, Vec<config::ConfigError>), config::ConfigError> {
    let (desired, kept_back) = match last_good_policies {
        Some(files) => config::load_dir_keeping_policies(dir, files)?,
        None => (config::load_dir(dir)?, Vec::new()),
    };
    for (file, listed) in [
        (config::PODS_FILE, !desired.pods.is_empty()),
        (config::WORKLOADS_FILE, !desired.workloads.is_empty()),
        (config::SERVICES_FILE, !desired.services.is_empty()),
    ] {
        if listed {
            return Err(config::ConfigError::new(
                dir.join(file),
                "is not read with `discovery: kubernetes` (pods, workloads and services come from the API); remove it",
            ));
        }
    }
    Ok((desired, kept_back))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn client(settings: &KubernetesSettings) -> Result<kube::Client> {
    crate::kubernetes::client(settings.kubeconfig.as_deref()).await
}

fn load_saved(path: &Path) -> Result<Option<ClusterView>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Written to a temporary file and renamed over the old one: a crash leaves
/// the old state or the new, never half of one.
fn save(path: &Path, view: &ClusterView) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(view)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_pod(uid: &str, name: &str, node: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            node: Some(node.into()),
            service_account: name.into(),
            labels: Default::default(),
            ipv4: None,
            ipv6: None,
            running: false,
            host_network: false,
            qos: None,
            host_ips: Vec::new(),
            probe_ports: Vec::new(),
        }
    }

    fn sandbox(uid: &str, name: &str) -> PodSandbox {
        PodSandbox {
            container_id: format!("sandbox-{name}"),
            netns: format!("/var/run/netns/cni-{name}"),
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            ips: vec!["10.1.200.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    }

    #[test]
    fn an_announced_sandbox_makes_its_pending_pod_a_member_by_the_apis_labels() {
        let dir = tempfile::tempdir().unwrap();
        let settings = KubernetesSettings {
            state_file: dir.path().join("cluster.json"),
            cni: config::CniSettings {
                state_dir: dir.path().join("cni"),
                ..Default::default()
            },
            ..Default::default()
        };
        let source = KubeSource::new(&settings, "n1").unwrap();
        {
            let mut view = source.view.lock();
            view.namespaces.insert(
                "shop".into(),
                [(
                    DATAPLANE_MODE_LABEL.to_string(),
                    DATAPLANE_MODE_AMBIENT.to_string(),
                )]
                .into(),
            );
            view.pods
                .insert("u1".into(), pending_pod("u1", "web", "n1"));
            let mut opted_out = pending_pod("u2", "batch", "n1");
            opted_out.labels = std::collections::BTreeMap::from([(
                DATAPLANE_MODE_LABEL.to_string(),
                "none".to_string(),
            )])
            .into();
            view.pods.insert("u2".into(), opted_out);
            view.pods
                .insert("u3".into(), pending_pod("u3", "away", "n2"));
        }
        // Pending, no IP: a member all the same, by its sandbox.
        assert_eq!(
            source.membership(&sandbox("u1", "web")),
            Membership::InMesh("shop/web".into())
        );
        assert_eq!(
            source.membership(&sandbox("u2", "batch")),
            Membership::NotInMesh(NotEnrolled::OptedOut)
        );
        assert_eq!(
            source.membership(&sandbox("u3", "away")),
            Membership::ElsewhereScheduled("n2".into())
        );
        assert_eq!(
            source.membership(&sandbox("u9", "new")),
            Membership::Undescribed
        );
        // Announced sandboxes are kept on disk for the next start, and the
        // newest sandbox of a pod replaces the one before.
        source.announce(sandbox("u1", "web"));
        let mut again = sandbox("u1", "web");
        again.container_id = "sandbox-web-2".into();
        source.announce(again.clone());
        let saved = load_sandboxes(&settings.cni.sandboxes_file());
        assert_eq!(saved.into_values().collect::<Vec<_>>(), vec![again.clone()]);
        assert!(source.forget("sandbox-web-2"));
        assert!(!source.forget("sandbox-web-2"));
        assert!(load_sandboxes(&settings.cni.sandboxes_file()).is_empty());
        // The overlay: the pod runs with the sandbox's addresses.
        let mut pod = pending_pod("u1", "web", "n1");
        announced(&mut pod, &again);
        assert!(pod.running);
        assert_eq!(pod.ipv4, Some("10.1.200.7".parse().unwrap()));
        assert_eq!(pod.ipv6, Some("fd00::7".parse().unwrap()));
    }

    #[test]
    fn the_saved_state_round_trips_and_a_missing_file_is_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/cluster.json");
        assert_eq!(load_saved(&path).unwrap(), None);
        let mut view = ClusterView::default();
        view.namespaces
            .insert("shop".into(), [("a".to_string(), "b".to_string())].into());
        save(&path, &view).unwrap();
        assert_eq!(load_saved(&path).unwrap(), Some(view));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load_saved(&path).is_err());
    }
}
