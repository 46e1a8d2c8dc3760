//! A real container runtime on a test-bed node: Debian's containerd (1.6,
//! CRI plugin), runc and the CNI plugins, driven through the CRI gRPC API
//! exactly as a kubelet drives it, so that tests can make Kubernetes pod
//! sandboxes whose netns, cgroups and addresses come from the runtime and
//! not from the test bed.
//!
//! One [`ContainerRuntime`] per node: containerd runs inside the node's
//! netns (joined with setns before exec, in the node's `system` cgroup), with
//! its root, state, socket, config, CNI config and IPAM data in
//! `<topology temp dir>/cri-<node>/`. Its pods are attached by the CNI
//! `bridge` plugin to the node's existing bridge `br0`, so they share the L2
//! of the test bed's own pods and are reached from other nodes over the test
//! bed's routes. IPv4 only: the pods get one address from a [`PodIpRange`]
//! (by default `10.<i>.200.1`–`10.<i>.200.254` on node `i`), gateway
//! `10.<i>.0.1`; no masquerading.
//!
//! Where runc puts a pod: with `cgroup_parent = P` (cgroupfs driver, the
//! kubelet's `cgroupDriver: cgroupfs`), the pause process runs in the cgroup
//! `P/<sandbox id>` (containerd appends the sandbox id), i.e. the directory
//! `<cgroup2 mount>/P/<sandbox id>`; on a hybrid host also in
//! `<v1 mount>/P/<sandbox id>` of every cgroup v1 hierarchy. See
//! [`Sandbox::cgroup`] and [`kubelet_cgroup_parent`].
//!
//! Nothing is pulled (no registry is reachable): the sandbox image is the
//! test bed's own pause program, built once per machine (see `image.rs`)
//! and imported into each containerd with `ctr images import`.
//!
//! The runtime is removed on drop, also while unwinding from a panic: its
//! sandboxes are stopped and removed, containerd gets SIGTERM (then SIGKILL),
//! and everything the runtime made outside the test bed's objects is
//! removed (see `cleanup.rs`; [`sweep_leftovers`] removes what a killed test
//! process left). It borrows its [`Topology`], so it goes first.
//!
//! Needs root and the packages `containerd runc containernetworking-plugins
//! gcc libc6-dev` (`xtask`'s `setup::ensure_container_runtime` installs
//! them); tests start with [`cri_enabled`].

mod api;
mod cleanup;
mod image;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::naming::proc_start_time;
use crate::process::Process;
use crate::topology::MAX_PODS_PER_NODE;
use crate::{Node, Topology, cgroup, wait_until};
use api::CriClient;
pub use cleanup::sweep_leftovers;
use cleanup::{Entry, Ledger};

/// What the runtime runs; checked by [`preflight`].
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const SHIM: &str = "/usr/bin/containerd-shim-runc-v2";
const RUNC: &str = "/usr/sbin/runc";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// `gcc -static` needs the static C library (Debian's multiarch path).
fn static_libc() -> String {
    format!("/usr/lib/{}-linux-gnu/libc.a", std::env::consts::ARCH)
}
/// The packages, for messages.
const PACKAGES: &str = "containerd runc containernetworking-plugins gcc libc6-dev";

/// How long containerd may take to serve CRI with its network ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// Per CRI call: making a sandbox runs runc and the CNI plugins.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// SIGTERM to SIGKILL, for containerd.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// How long shims get to exit after their sandboxes were removed.
const SHIM_GRACE: Duration = Duration::from_secs(5);

/// The IPv4 addresses the runtime's pods get on a node: a range inside the
/// node's `10.<i>.0.0/16` that the test bed never gives its own pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIpRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl PodIpRange {
    /// `10.<i>.200.1`–`10.<i>.200.254` for node `i`.
    pub fn default_for(node: &Node) -> PodIpRange {
        let i = node.index();
        PodIpRange {
            first: Ipv4Addr::new(10, i, 200, 1),
            last: Ipv4Addr::new(10, i, 200, 254),
        }
    }

    /// Inside the node's /16, above the test bed's pods (which take
    /// `10.<i>.0.2` upwards, [`MAX_PODS_PER_NODE`] at most), below its
    /// broadcast address.
    fn check(&self, node: &Node) -> anyhow::Result<()> {
        let i = node.index();
        let last_testbed_block = u8::try_from((MAX_PODS_PER_NODE - 1) / 253).expect("small");
        let lowest = u32::from(Ipv4Addr::new(10, i, last_testbed_block + 1, 0));
        let highest = u32::from(Ipv4Addr::new(10, i, 255, 254));
        let (first, last) = (u32::from(self.first), u32::from(self.last));
        anyhow::ensure!(
            lowest <= first && first <= last && last <= highest,
            "pod range {}-{} for node `{}` must lie within {}-{} (the node's /16 minus the \
             test bed's own pods)",
            self.first,
            self.last,
            node.name(),
            Ipv4Addr::from(lowest),
            Ipv4Addr::from(highest)
        );
        Ok(())
    }
}

/// A pod sandbox the runtime made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The CRI sandbox id (64 hex digits).
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The pod's address on `eth0` (from the CNI result).
    pub ip: Ipv4Addr,
    /// The pod's netns, as containerd bind-mounted it:
    /// `/var/run/netns/cni-<uuid>`.
    pub netns_path: PathBuf,
    /// The pause process (in the root PID namespace).
    pub pause_pid: u32,
    /// As given to [`ContainerRuntime::run_pod`].
    pub cgroup_parent: String,
}

impl Sandbox {
    /// The pause process's cgroup as /proc/<pid>/cgroup shows it (`0::…`):
    /// `<cgroup_parent>/<id>`.
    pub fn cgroup(&self) -> String {
        format!("{}/{}", self.cgroup_parent.trim_end_matches('/'), self.id)
    }

    /// [`Sandbox::cgroup`] as a directory under the cgroup2 mount.
    pub fn cgroup_dir(&self) -> anyhow::Result<PathBuf> {
        let mount = cgroup::cgroup2_mount().context("no cgroup2 filesystem is mounted")?;
        Ok(mount.join(self.cgroup().trim_start_matches('/')))
    }
}

/// A sandbox as `ListPodSandbox` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPod {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// `SANDBOX_READY` (else not ready: stopped).
    pub ready: bool,
}

/// The `cgroup_parent` a kubelet with the cgroupfs driver would give pod
/// `uid` of QoS class `qos` (`besteffort`, `burstable`; `""` for
/// guaranteed), rooted in `node`'s cgroup so that the pods' cgroups go
/// with the topology: `/<node cgroup>/kubepods[/<qos>]/pod<uid>`, relative
/// to the cgroup2 mount.
pub fn kubelet_cgroup_parent(node: &Node, qos: &str, uid: &str) -> anyhow::Result<String> {
    let mut parent = format!("{}/kubepods", kubelet_cgroup_root(node)?);
    if !qos.is_empty() {
        let _ = write!(parent, "/{qos}");
    }
    let _ = write!(parent, "/pod{uid}");
    Ok(parent)
}

/// The node's cgroup relative to the cgroup2 mount, `/<node cgroup>`: the
/// `--cgroup-root` of this node's kubelet, and the agent's
/// `kubernetes.kubeletCgroupRoot`.
pub fn kubelet_cgroup_root(node: &Node) -> anyhow::Result<String> {
    let mount = cgroup::cgroup2_mount().context("no cgroup2 filesystem is mounted")?;
    let node_dir = node
        .cgroup_dir()
        .strip_prefix(mount)
        .context("the node's cgroup is not under the cgroup2 mount")?;
    Ok(format!("/{}", node_dir.display()))
}

/// Whether the container runtime's binaries are installed; the error names
/// each missing one and the packages to install. (Root, netns and cgroup2
/// are [`crate::e2e_preflight`]'s.)
pub fn preflight() -> Result<(), String> {
    let mut missing: Vec<String> = [CONTAINERD, CTR, SHIM, RUNC, "/usr/bin/gcc"]
        .into_iter()
        .map(str::to_string)
        .chain([static_libc()])
        .chain(CNI_PLUGINS.map(|p| format!("{CNI_BIN_DIR}/{p}")))
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort();
    Err(format!(
        "the container runtime is not installed: missing {}; install it with \
         `apt-get install -y --no-install-recommends {PACKAGES}` (or run `cargo xtask test`)",
        missing.join(", ")
    ))
}

/// Call at the top of every test that uses [`ContainerRuntime`], after (or
/// instead of) [`crate::e2e_enabled`]: whether it should run. As there,
/// with `CI=true` a missing prerequisite panics (CI never skips quietly);
/// otherwise it prints `SKIPPED <test>: <reason>` and returns false.
pub fn cri_enabled(test_name: &str) -> bool {
    crate::e2e_enabled(test_name)
        && crate::runs_or_skips(test_name, "container runtime missing", preflight())
}

/// containerd on one test-bed node, with a CRI client. See the module docs.
pub struct ContainerRuntime<'t> {
    /// Borrowed so that the runtime is dropped before the topology, whose
    /// teardown would kill containerd before it removed its sandboxes.
    node: &'t Node,
    what: String,
    /// The CNI network's name, `<topology id>-<node>`.
    network: String,
    dir: PathBuf,
    socket: PathBuf,
    containerd: Process,
    inner: Mutex<Inner>,
    torn_down: bool,
}

struct Inner {
    client: CriClient,
    ledger: Ledger,
    /// Sandboxes made and not removed yet.
    sandboxes: Vec<String>,
}

impl Inner {
    /// The processes noted: containerd, shims, pause processes.
    fn pids(&self) -> Vec<(u32, u64)> {
        self.ledger
            .entries()
            .iter()
            .filter_map(|e| match e {
                Entry::Pid(pid, start) => Some((*pid, *start)),
                _ => None,
            })
            .collect()
    }
}

impl std::fmt::Debug for ContainerRuntime<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRuntime")
            .field("what", &self.what)
            .field("dir", &self.dir)
            .field("containerd", &self.containerd.pid())
            .finish_non_exhaustive()
    }
}

impl<'t> ContainerRuntime<'t> {
    /// Starts containerd in `node` (a node of `topology`) and waits until
    /// it serves CRI with its pod network ready; pods get addresses from
    /// `range` (see [`PodIpRange::default_for`]).
    pub fn start(
        topology: &'t Topology,
        node: &'t Node,
        range: PodIpRange,
    ) -> anyhow::Result<ContainerRuntime<'t>> {
        let what = format!(
            "containerd on node `{}` (test `{}`, {})",
            node.name(),
            topology.test_name(),
            topology.id()
        );
        Self::start_inner(topology, node, range, &what).with_context(|| format!("{what}: start"))
    }

    fn start_inner(
        topology: &'t Topology,
        node: &'t Node,
        range: PodIpRange,
        what: &str,
    ) -> anyhow::Result<ContainerRuntime<'t>> {
        preflight().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            topology
                .nodes()
                .iter()
                .any(|n| n.netns_name() == node.netns_name()),
            "node `{}` is not a node of this topology",
            node.name()
        );
        range.check(node)?;
        sweep_leftovers();
        let image = image::pause_image()?;

        // `<topology id>-<node>`: unique, and sweepable by its owner.
        let name = node.netns_name().to_string();
        let dir = topology.tmp_dir().join(format!("cri-{}", node.name()));
        let mut ledger = Ledger::create(&name)?;
        ledger.record(Entry::Dir(dir.clone()));
        ledger.record(Entry::CniNetwork(name.clone()));
        // Made by the shims and libcni if missing; removed again if empty.
        for shared in [
            "/run/containerd",
            "/run/containerd/s",
            "/var/lib/cni",
            "/var/lib/cni/results",
        ] {
            if !Path::new(shared).exists() {
                ledger.record(Entry::EmptyDir(shared.into()));
            }
        }
        let socket = dir.join("containerd.sock");
        let started = Instant::now();
        let spawned = Self::configure(&dir, &socket, &name, node, range, &image.reference)
            .and_then(|config| {
                let client = CriClient::new(&socket)?;
                let mut cmd = Command::new(CONTAINERD);
                cmd.arg("--config").arg(&config);
                // The shim and runc are found through PATH.
                cmd.env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                );
                Ok((client, node.spawn_with(cmd)?))
            });
        let (client, containerd) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                ledger.clean_up();
                return Err(e);
            }
        };
        if let Some(start) = proc_start_time(containerd.pid()) {
            ledger.record(Entry::Pid(containerd.pid(), start));
        }
        // From here on, drop cleans up whatever fails.
        let mut runtime = ContainerRuntime {
            node,
            what: what.to_string(),
            network: name,
            dir,
            inner: Mutex::new(Inner {
                client,
                ledger,
                sandboxes: Vec::new(),
            }),
            socket,
            containerd,
            torn_down: false,
        };
        runtime.wait_ready(started)?;
        runtime.import(&image.tarball, &image.reference)?;
        Ok(runtime)
    }

    /// Writes containerd's config and the CNI config under `dir`; returns
    /// the config's path.
    fn configure(
        dir: &Path,
        socket: &Path,
        network: &str,
        node: &Node,
        range: PodIpRange,
        sandbox_image: &str,
    ) -> anyhow::Result<PathBuf> {
        for sub in ["net.d", "ipam", "logs", "cni-bin"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
        }
        // The runtime's own plugin directory, holding the system's plugins,
        // so that a test can install one of its own (a CNI plugin) there.
        for plugin in CNI_PLUGINS {
            let link = dir.join("cni-bin").join(plugin);
            std::os::unix::fs::symlink(Path::new(CNI_BIN_DIR).join(plugin), &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
        }
        let config = dir.join("config.toml");
        std::fs::write(&config, containerd_config(dir, socket, sandbox_image))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let conflist = dir.join("net.d").join("10-mesh-testbed.conflist");
        std::fs::write(&conflist, cni_conflist(network, node, range, dir)?)
            .with_context(|| format!("cannot write {}", conflist.display()))?;
        Ok(config)
    }
}

impl ContainerRuntime<'_> {
    /// The node containerd runs in.
    pub fn node(&self) -> &Node {
        self.node
    }

    /// containerd's CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `<topology temp dir>/cri-<node>`: config, root, state, IPAM data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's CNI plugin directory (the system's plugins, linked).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }

    /// containerd's CNI configuration directory (one conflist: the bridge
    /// network).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    /// The CNI configuration containerd has loaded (`Status`, verbose:
    /// `cniconfig`), as JSON text. containerd reloads it when the
    /// configuration directory changes.
    pub fn loaded_cni_config(&self) -> anyhow::Result<String> {
        let response: api::StatusResponse =
            self.call("Status", api::StatusRequest { verbose: true })?;
        response
            .info
            .get("cniconfig")
            .cloned()
            .context("Status(verbose) has no `cniconfig`")
    }

    /// Waits until containerd has loaded a CNI configuration for which
    /// `loaded` holds (given its JSON text).
    pub fn wait_cni_config(
        &self,
        what: &str,
        deadline: Duration,
        loaded: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        wait_until(what, deadline, || {
            let config = self.loaded_cni_config()?;
            if loaded(&config) {
                Ok(true)
            } else {
                anyhow::bail!("loaded now: {config}")
            }
        })
    }

    /// containerd's PID.
    pub fn containerd_pid(&self) -> u32 {
        self.containerd.pid()
    }

    /// The last `lines` lines containerd logged (for messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.containerd.stderr_so_far();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `<runtime name> <runtime version>` (CRI `Version`).
    pub fn version(&self) -> anyhow::Result<String> {
        let response: api::VersionResponse = self.call(
            "Version",
            api::VersionRequest {
                version: "v1".into(),
            },
        )?;
        Ok(format!(
            "{} {} (CRI {})",
            response.runtime_name, response.runtime_version, response.runtime_api_version
        ))
    }

    /// Makes a pod sandbox as a kubelet does (`RunPodSandbox`: pause
    /// container, netns with `eth0` on the node bridge, loopback) and reads
    /// back its address, netns and pause PID (`PodSandboxStatus`, verbose).
    /// `cgroup_parent` is relative to the cgroup roots, e.g. from
    /// [`kubelet_cgroup_parent`]; the pause process lands in
    /// `<cgroup_parent>/<sandbox id>` ([`Sandbox::cgroup`]).
    pub fn run_pod(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        cgroup_parent: &str,
    ) -> anyhow::Result<Sandbox> {
        self.run_pod_inner(name, namespace, uid, cgroup_parent)
            .with_context(|| format!("{}: RunPodSandbox {namespace}/{name}", self.what))
    }

    fn run_pod_inner(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        cgroup_parent: &str,
    ) -> anyhow::Result<Sandbox> {
        anyhow::ensure!(
            cgroup_parent.starts_with('/') && !cgroup_parent.contains(".."),
            "cgroup_parent {cgroup_parent:?} must be an absolute cgroup path"
        );
        // The cgroup dirs runc will make (any that do not exist yet), noted
        // before it makes them; the sandbox's own leaf is noted once its id
        // is known.
        for hierarchy in hierarchies() {
            let mut dir = hierarchy.clone();
            for part in cgroup_parent.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                if !dir.exists() {
                    self.lock().ledger.record(Entry::Cgroup(dir.clone()));
                }
            }
        }
        // The kubelet makes the pod's cgroup before it asks for the sandbox
        // (so a CNI plugin sees it); the same here, on the unified hierarchy.
        let mount = cgroup::cgroup2_mount().context("no cgroup2 filesystem is mounted")?;
        let pod_cgroup = mount.join(cgroup_parent.trim_start_matches('/'));
        std::fs::create_dir_all(&pod_cgroup)
            .with_context(|| format!("cannot create {}", pod_cgroup.display()))?;
        let labels: HashMap<String, String> = [
            ("io.kubernetes.pod.name", name),
            ("io.kubernetes.pod.namespace", namespace),
            ("io.kubernetes.pod.uid", uid),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .dir
                .join("logs")
                .join(format!("{namespace}_{name}_{uid}"))
                .display()
                .to_string(),
            labels,
            annotations: HashMap::from([("kubernetes.io/config.source".into(), "api".into())]),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
                // What a kubelet sends for a pod without hostNetwork,
                // hostPID or hostIPC.
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NAMESPACE_POD,
                        pid: api::NAMESPACE_CONTAINER,
                        ipc: api::NAMESPACE_POD,
                    }),
                }),
            }),
        };
        let response: api::RunPodSandboxResponse = self
            .call(
                "RunPodSandbox",
                api::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                },
            )
            .map_err(|e| self.with_log(e))?;
        let id = response.pod_sandbox_id;
        self.lock().sandboxes.push(id.clone());
        {
            let mut inner = self.lock();
            for hierarchy in hierarchies() {
                let leaf = hierarchy
                    .join(cgroup_parent.trim_start_matches('/'))
                    .join(&id);
                inner.ledger.record(Entry::Cgroup(leaf));
            }
            // libcni's caches: ours, and containerd's own loopback network's.
            let results = Path::new(cleanup::CNI_RESULTS);
            let network = self.network.as_str();
            inner
                .ledger
                .record(Entry::File(results.join(format!("{network}-{id}-eth0"))));
            inner
                .ledger
                .record(Entry::File(results.join(format!("cni-loopback-{id}-lo"))));
        }
        self.note_shims();

        let status: api::PodSandboxStatusResponse = self.call(
            "PodSandboxStatus",
            api::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            },
        )?;
        let (pause_pid, netns_path) = sandbox_info(&status.info)?;
        {
            let mut inner = self.lock();
            inner.ledger.record(Entry::Netns(netns_path.clone()));
            if let Some(start) = proc_start_time(pause_pid) {
                inner.ledger.record(Entry::Pid(pause_pid, start));
            }
        }
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("sandbox {id} has no IPv4 address ({ip:?})"))?;
        Ok(Sandbox {
            id,
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            ip,
            netns_path,
            pause_pid,
            cgroup_parent: cgroup_parent.into(),
        })
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (containerd tears down the
    /// pod network and removes the netns), then removes the pod's cgroup
    /// dirs that runc made, as a kubelet would (parents shared with other
    /// pods are kept).
    pub fn stop_and_remove_pod(&self, id: &str) -> anyhow::Result<()> {
        let request = || api::PodSandboxIdRequest {
            pod_sandbox_id: id.into(),
        };
        let removed = self
            .call::<_, api::Empty>("StopPodSandbox", request())
            .and_then(|_| self.call::<_, api::Empty>("RemovePodSandbox", request()))
            .map_err(|e| self.with_log(e))
            .with_context(|| format!("{}: removing sandbox {id}", self.what));
        if removed.is_ok() {
            let mut inner = self.lock();
            inner.sandboxes.retain(|s| s != id);
            // Shims of sandboxes removed earlier have exited by now: reaped
            // here rather than piling up as zombies until the drop.
            cleanup::reap_exited(&inner.pids());
            let ledger = &inner.ledger;
            let mut cgroups: Vec<&PathBuf> = ledger
                .entries()
                .iter()
                .filter_map(|e| match e {
                    Entry::Cgroup(p) if is_empty_cgroup(p) => Some(p),
                    _ => None,
                })
                .collect();
            cleanup::remove_cgroups(&mut cgroups);
        }
        removed.map(|_| ())
    }

    /// Every sandbox containerd knows (`ListPodSandbox`).
    pub fn list_pods(&self) -> anyhow::Result<Vec<ListedPod>> {
        let response: api::ListPodSandboxResponse =
            self.call("ListPodSandbox", api::ListPodSandboxRequest {})?;
        Ok(response
            .items
            .into_iter()
            .map(|p| {
                let meta = p.metadata.unwrap_or_default();
                ListedPod {
                    id: p.id,
                    name: meta.name,
                    namespace: meta.namespace,
                    uid: meta.uid,
                    ready: p.state == api::SANDBOX_READY,
                }
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call<Req, Resp>(&self, method: &str, request: Req) -> anyhow::Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.lock().client.call(method, request, CALL_TIMEOUT)
    }

    fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "containerd's log ends with:\n{}",
            self.log_tail(30)
        ))
    }

    /// Waits for the socket, then for `Status` to report the runtime and
    /// its network ready (the CNI config loaded); fails at once if
    /// containerd exits, and with its log tail on timeout.
    fn wait_ready(&mut self, started: Instant) -> anyhow::Result<()> {
        let mut containerd_exited = None;
        let ready = wait_until(
            "containerd to serve CRI with RuntimeReady and NetworkReady",
            READY_DEADLINE,
            || {
                if let Some(status) = self.containerd.try_status()? {
                    containerd_exited = Some(status);
                    return Ok(true);
                }
                if !self.socket.exists() {
                    anyhow::bail!("{} does not exist yet", self.socket.display());
                }
                let response: api::StatusResponse = self.lock().client.call(
                    "Status",
                    api::StatusRequest { verbose: false },
                    Duration::from_secs(5),
                )?;
                let conditions = response.status.unwrap_or_default().conditions;
                let not_ready: Vec<String> = ["RuntimeReady", "NetworkReady"]
                    .into_iter()
                    .filter(|t| !conditions.iter().any(|c| c.r#type == *t && c.status))
                    .map(|t| {
                        let why = conditions.iter().find(|c| c.r#type == t);
                        format!(
                            "{t} false ({})",
                            why.map(|c| format!("{}: {}", c.reason, c.message))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                if not_ready.is_empty() {
                    Ok(true)
                } else {
                    anyhow::bail!("{}", not_ready.join("; "))
                }
            },
        );
        if let Some(status) = containerd_exited {
            bail!(
                "containerd exited ({status}) after {:?}; its log ends with:\n{}",
                started.elapsed(),
                self.log_tail(30)
            );
        }
        ready.map_err(|e| self.with_log(e))
    }

    /// Imports the pause image (`ctr images import`, into the CRI's
    /// `k8s.io` namespace, unpacked for the overlayfs snapshotter).
    fn import(&self, tarball: &Path, reference: &str) -> anyhow::Result<()> {
        let socket = self.socket.display().to_string();
        let tarball = tarball.display().to_string();
        self.node
            .run(
                CTR,
                &["-a", &socket, "-n", "k8s.io", "images", "import", &tarball],
                CALL_TIMEOUT,
            )
            .map_err(|e| self.with_log(e))
            .with_context(|| format!("importing the pause image {reference}"))?;
        Ok(())
    }

    /// Records the shims serving this containerd (our children once their
    /// `start` parent exited: the test process is a subreaper) and their
    /// sockets, which live outside our directory.
    fn note_shims(&self) {
        let needle = format!("\0-address\0{}\0", self.socket.display());
        let mut inner = self.lock();
        if let Ok(proc_dir) = std::fs::read_dir("/proc") {
            for entry in proc_dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                    continue;
                };
                let mut cmdline = cmdline;
                cmdline.insert(0, 0);
                if cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
                    && let Some(start) = proc_start_time(pid)
                {
                    inner.ledger.record(Entry::Pid(pid, start));
                }
            }
        }
        // Unix sockets of containerd's netns (the node's): its shims'.
        let unix = std::fs::read_to_string(format!("/proc/{}/net/unix", self.containerd.pid()))
            .unwrap_or_default();
        for path in unix.lines().filter_map(|l| l.split_whitespace().nth(7)) {
            if path.starts_with("/run/containerd/s/") {
                inner.ledger.record(Entry::File(path.into()));
            }
        }
    }

    /// Sandboxes removed, containerd stopped, everything else removed; see
    /// the module docs. Best-effort: failures are printed.
    fn teardown(&mut self) {
        if std::mem::replace(&mut self.torn_down, true) {
            return;
        }
        let report = |what: &str, e: anyhow::Error| {
            eprintln!("mesh-testbed: teardown of {}: {what}: {e:#}", self.what);
        };
        if matches!(self.containerd.try_status(), Ok(None)) {
            // Those we made, and any a test made with its own client.
            let mut ids = self.lock().sandboxes.clone();
            if let Ok(listed) = self.list_pods() {
                ids.extend(listed.into_iter().map(|p| p.id));
            }
            ids.sort();
            ids.dedup();
            for id in ids {
                if let Err(e) = self.stop_and_remove_pod(&id) {
                    report("removing a sandbox", e);
                }
            }
            self.note_shims();
            if let Err(e) = self.containerd.signal(Signal::SIGTERM) {
                report("stopping containerd", e);
            }
        }
        if let Err(e) = self.containerd.wait_with_deadline(STOP_DEADLINE) {
            report("stopping containerd", e);
        }
        // Shims exit once their sandbox is gone: give them a moment.
        cleanup::kill_and_reap(&self.lock().pids(), SHIM_GRACE);
        self.lock().ledger.clean_up();
    }
}

impl Drop for ContainerRuntime<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The cgroup hierarchies runc puts a container in: the cgroup2 mount and,
/// on a hybrid host, every cgroup v1 hierarchy mounted at its root.
fn hierarchies() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let fields: Vec<&str> = before.split_whitespace().collect();
            let (root, mount) = (*fields.get(3)?, *fields.get(4)?);
            ((fstype == "cgroup" || fstype == "cgroup2") && root == "/")
                .then(|| PathBuf::from(mount))
        })
        .collect()
}

fn is_empty_cgroup(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
}

/// The pause PID and the netns path from `PodSandboxStatus`'s verbose
/// `info` (containerd's JSON: `pid`, `runtimeSpec.linux.namespaces`).
fn sandbox_info(info: &HashMap<String, String>) -> anyhow::Result<(u32, PathBuf)> {
    let json = info
        .get("info")
        .context("PodSandboxStatus(verbose) has no `info`")?;
    let value: serde_json::Value =
        serde_json::from_str(json).context("PodSandboxStatus `info` is not JSON")?;
    let pid = value["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
        .with_context(|| format!("no pause `pid` in {json}"))?;
    let netns = value["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|namespaces| {
            namespaces
                .iter()
                .find(|n| n["type"] == "network")
                .and_then(|n| n["path"].as_str())
        })
        .filter(|p| !p.is_empty())
        .with_context(|| format!("no network namespace path in {json}"))?;
    Ok((pid, PathBuf::from(netns)))
}

/// containerd's config: everything under `dir`, the CRI plugin set up for
/// this machine (see TOOLCHAIN.md: no systemd, no AppArmor, oom_score_adj
/// cannot be lowered), runc's state under `dir` too.
fn containerd_config(dir: &Path, socket: &Path, sandbox_image: &str) -> String {
    let d = |sub: &str| dir.join(sub).display().to_string();
    format!(
        r#"# Written by mesh-testbed (tests/src/cri/mod.rs).
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{sandbox_image}"
    disable_apparmor = true
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{cni_bin_dir}"
      conf_dir = "{conf_dir}"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "{RUNC}"
          Root = "{runc_root}"
"#,
        root = d("root"),
        state = d("state"),
        socket = socket.display(),
        opt = d("opt"),
        conf_dir = d("net.d"),
        cni_bin_dir = d("cni-bin"),
        runc_root = d("runc"),
    )
}

/// The pod network: CNI `bridge` on the node's existing `br0` (no gateway
/// address of its own, no masquerading), `host-local` addresses from
/// `range` in the node's /16 with a default route via the node, loopback.
fn cni_conflist(name: &str, node: &Node, range: PodIpRange, dir: &Path) -> anyhow::Result<String> {
    let i = node.index();
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "br0",
                "isGateway": false,
                "isDefaultGateway": false,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": format!("10.{i}.0.0/16"),
                        "rangeStart": range.first.to_string(),
                        "rangeEnd": range.last.to_string(),
                        "gateway": node.bridge_ipv4().to_string(),
                    }]],
                    "routes": [{ "dst": "0.0.0.0/0", "gw": node.bridge_ipv4().to_string() }],
                    "dataDir": dir.join("ipam").display().to_string(),
                },
            },
            { "type": "loopback" },
        ],
    });
    Ok(serde_json::to_string_pretty(&conflist)?)
}
