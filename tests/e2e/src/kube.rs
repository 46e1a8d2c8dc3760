//! A two-node Kubernetes cluster for the end-to-end tests, with a MODEL of
//! the API server: pods are real pod sandboxes made through a real
//! containerd's CRI API (runc, the CNI plugins), as the kubelet makes them;
//! their Pod objects (and namespaces, Services, EndpointSlices) are served by
//! the stand-in API server (`mesh_testbed::kube_api`: the API's list/watch
//! protocol over HTTP; not a real API server, none can be installed here).
//! The agents run with `discovery: kubernetes` and no pods.yaml.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use mesh_testbed::{
    Node, Process, Topology,
    cri::{ContainerRuntime, PodIpRange, Sandbox, kubelet_cgroup_parent},
    kube_api::StandInApi,
    wait_until,
};
use serde_json::json;

use crate::{
    agent::NodeAgent,
    mesh::{TestCa, node_issuers},
};

pub const NAMESPACE: &str = "shop";
pub const ECHO_PORT: u16 = 7300;
pub const LOAD_PORT: u16 = 7301;
/// A port of db that the kubelet does not probe.
pub const OTHER_PORT: u16 = 7302;
/// How long the agent may take to enrol a pod once its object is Running.
/// The figure measured is printed; the bound is loose for busy machines.
pub const ENROL_DEADLINE: Duration = Duration::from_secs(10);

/// db admits only the client's identity.
pub const DB_ALLOWS_ONLY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-allow-client
  namespace: shop
spec:
  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/client"]
"#;

/// A node of the test: its container runtime and agent.
pub struct KubeNode<'t> {
    pub node: &'t Node,
    pub runtime: ContainerRuntime<'t>,
    pub agent: NodeAgent<'t>,
}

/// A pod made through CRI, with its Pod object in the model.
pub struct KubePod {
    pub name: String,
    pub uid: String,
    pub sandbox: Sandbox,
}

impl KubePod {
    /// The pod of a sandbox made with [`Cluster::run_sandbox`].
    pub fn of(sandbox: &Sandbox) -> Self {
        Self {
            name: sandbox.name.clone(),
            uid: sandbox.uid.clone(),
            sandbox: sandbox.clone(),
        }
    }

    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.sandbox.ip)
    }
}

/// The cluster: two nodes, a model API server, pods.
pub struct Cluster<'t> {
    pub topo: &'t Topology,
    pub runtime: tokio::runtime::Runtime,
    pub api: StandInApi,
    pub nodes: Vec<KubeNode<'t>>,
    pub next_uid: u32,
}

pub fn uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

/// Pod IPs of one test (`block`: the third octet), apart from every other
/// test's sandboxes on the machine: the agent finds a pod's namespace by its
/// IP among all of them, and refuses to guess between two (a node never
/// gives two pods one IP; parallel test beds would).
pub fn ip_range(node: &Node, block: u8) -> PodIpRange {
    let i = node.index();
    PodIpRange {
        first: std::net::Ipv4Addr::new(10, i, block, 1),
        last: std::net::Ipv4Addr::new(10, i, block, 254),
    }
}

impl<'t> Cluster<'t> {
    pub fn start(topo: &'t Topology, ip_block: u8) -> Self {
        Self::start_with(topo, ip_block, false)
    }

    /// Each agent serves the CNI plugin on [`cni_socket`] and keeps its CNI
    /// state in [`cni_state_dir`]; with `cni` a pod's CNI ADD may wait 10 s
    /// for the agent (the plugin is not installed: see
    /// [`Cluster::install_cni`]).
    pub fn start_with(topo: &'t Topology, ip_block: u8, cni: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let api = runtime
            .block_on(StandInApi::start_with(topo.control_plane_binder()))
            .unwrap();
        api.put(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}}}));
        let kubeconfig = topo.tmp_dir().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        let ca = TestCa::new(topo, "root").unwrap();
        let issuers = node_issuers(topo, &ca).unwrap();
        let cgroup2 = cgroup2_mount();
        let mut nodes = Vec::new();
        for (node, issuer) in topo.nodes().iter().zip(&issuers) {
            let runtime = ContainerRuntime::start(topo, node, ip_range(node, ip_block))
                .unwrap_or_else(|e| panic!("{e:#}"));
            let kubelet_root = node.cgroup_dir().strip_prefix(&cgroup2).unwrap();
            let mut node_yaml = format!(
                "{}discovery: kubernetes\nkubernetes:\n  kubeconfig: {}\n  cgroupDriver: cgroupfs\n  kubeletCgroupRoot: /{}\n  stateFile: {}\n",
                issuer.node_yaml("1h"),
                kubeconfig.display(),
                kubelet_root.display(),
                state_file(topo, node).display(),
            );
            // Every agent serves the CNI socket with `discovery: kubernetes`:
            // each cluster's own path, so tests running side by side never
            // race for the default one (`/var/run/mesh-agent/cni.sock`).
            node_yaml.push_str(&format!(
                "  cni:\n    socket: {}\n    stateDir: {}\n",
                cni_socket(topo, node).display(),
                cni_state_dir(topo, node).display()
            ));
            if cni {
                node_yaml.push_str("    addTimeout: 10s\n");
            }
            // No pods listed anywhere: an empty pods.yaml is all the files say.
            let agent = NodeAgent::start_with(topo, node, "pods: []\n", &node_yaml, &[]).unwrap();
            nodes.push(KubeNode {
                node,
                runtime,
                agent,
            });
        }
        Self {
            topo,
            runtime,
            api,
            nodes,
            next_uid: 0,
        }
    }

    pub fn node(&self, name: &str) -> &KubeNode<'t> {
        self.nodes
            .iter()
            .find(|n| n.node.name() == name)
            .expect("a node of the test")
    }

    /// Makes the pod's sandbox through CRI, then puts its Running Pod object.
    pub fn create_pod(&mut self, node: &str, name: &str) -> KubePod {
        self.next_uid += 1;
        let uid = uid(self.next_uid);
        let n = self.node(node);
        let parent = kubelet_cgroup_parent(n.node, "besteffort", &uid).unwrap();
        let sandbox = n
            .runtime
            .run_pod(name, NAMESPACE, &uid, &parent)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let pod = KubePod {
            name: name.to_string(),
            uid,
            sandbox,
        };
        self.put_pod(node, &pod);
        pod
    }

    /// Puts the Pod object of a pod scheduled to `node` whose sandbox is
    /// not made yet: Pending, no IP (what the kubelet sees as it starts it).
    pub fn put_pending_pod(&self, node: &str, name: &str, uid: &str) {
        let host_ip = self.node(node).node.bridge_ipv4().to_string();
        self.api.put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid,
                         "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name,
                     "containers": [{"name": "app", "image": "localhost/mesh-pause:1"}]},
            "status": {"phase": "Pending", "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                       "qosClass": "BestEffort"}
        }));
    }

    /// Makes a pod sandbox on `node` through CRI, as the kubelet does (the
    /// pod's cgroup first, then `RunPodSandbox`); no Pod object is put.
    pub fn run_sandbox(&self, node: &str, name: &str, uid: &str) -> anyhow::Result<Sandbox> {
        self.run_sandbox_in(node, NAMESPACE, name, uid)
    }

    /// [`Cluster::run_sandbox`] for a pod of `namespace`.
    pub fn run_sandbox_in(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> anyhow::Result<Sandbox> {
        let n = self.node(node);
        let parent = kubelet_cgroup_parent(n.node, "besteffort", uid)?;
        n.runtime.run_pod(name, namespace, uid, &parent)
    }

    /// Chains the CNI plugin into `node`'s containerd configuration with
    /// `mesh-agent cni-install`, and waits until containerd has loaded it.
    pub fn install_cni(&self, node: &str) -> anyhow::Result<String> {
        let out = self.run_agent_command(
            node,
            "cni-install",
            &[
                "--plugin",
                &crate::agent::cni_plugin_binary().display().to_string(),
            ],
        )?;
        self.wait_plugin_loaded(node, true)?;
        Ok(out)
    }

    /// Takes the plugin out again with `mesh-agent cni-uninstall`, and waits
    /// until containerd has loaded the conflist without it.
    pub fn uninstall_cni(&self, node: &str) -> anyhow::Result<String> {
        let out = self.run_agent_command(node, "cni-uninstall", &[])?;
        self.wait_plugin_loaded(node, false)?;
        Ok(out)
    }

    /// `mesh-agent cni-install --keep 1` in `node`, as the DaemonSet's
    /// sidecar runs it, once containerd has loaded the conflist with the
    /// plugin. Stopped with the returned process.
    pub fn keep_cni_installed(&self, node: &str) -> anyhow::Result<Process> {
        let n = self.node(node);
        let plugin = crate::agent::cni_plugin_binary().display().to_string();
        let keeper = n.node.spawn_with(self.agent_command(
            node,
            "cni-install",
            &["--plugin", &plugin, "--keep", "1"],
        ))?;
        self.wait_plugin_loaded(node, true)?;
        Ok(keeper)
    }

    /// Waits until `node`'s containerd has loaded its conflist with the
    /// plugin chained (`chained`) or without it.
    pub fn wait_plugin_loaded(&self, node: &str, chained: bool) -> anyhow::Result<()> {
        let what = if chained { "with" } else { "without" };
        self.node(node).runtime.wait_cni_config(
            &format!("containerd to load the conflist {what} mesh-cni"),
            Duration::from_secs(20),
            |config| config.contains("mesh-cni") == chained,
        )
    }

    /// `mesh-agent <command> --config <node's config> --bin-dir <containerd's>
    /// --conf-dir <containerd's> <args>`.
    fn agent_command(&self, node: &str, command: &str, args: &[&str]) -> Command {
        let n = self.node(node);
        let mut cmd = Command::new(crate::agent::agent_binary());
        cmd.arg(command)
            .arg("--config")
            .arg(n.agent.config_dir())
            .arg("--bin-dir")
            .arg(n.runtime.cni_bin_dir())
            .arg("--conf-dir")
            .arg(n.runtime.cni_conf_dir())
            .args(args);
        cmd
    }

    /// [`Cluster::agent_command`] run to completion; its stdout.
    fn run_agent_command(
        &self,
        node: &str,
        command: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let output = self.agent_command(node, command, args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "mesh-agent {command}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// A new pod UID.
    pub fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        uid(self.next_uid)
    }

    pub fn put_pod(&self, node: &str, pod: &KubePod) {
        let host_ip = self.node(node).node.bridge_ipv4().to_string();
        self.api.put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": NAMESPACE, "uid": pod.uid,
                         "labels": {"app": pod.name}},
            "spec": {"nodeName": node, "serviceAccountName": pod.name,
                     "containers": [{"name": "app", "image": "localhost/mesh-pause:1",
                                     "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}}}]},
            "status": {"phase": "Running", "podIP": pod.sandbox.ip.to_string(),
                       "podIPs": [{"ip": pod.sandbox.ip.to_string()}],
                       "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "qosClass": "BestEffort"}
        }));
    }

    /// Deletes the Pod object, then the sandbox (as the kubelet does).
    pub fn delete_pod(&self, node: &str, pod: &KubePod) {
        assert!(self.api.delete("Pod", NAMESPACE, &pod.name));
        self.node(node)
            .runtime
            .stop_and_remove_pod(&pod.sandbox.id)
            .unwrap();
    }

    /// Starts `pod-tool args` in the pod: its netns and its cgroup, so that
    /// its connections are the pod's (captured by the agent's programs).
    pub fn spawn(&self, pod: &KubePod, args: &[&str]) -> Process {
        let mut cmd = Command::new(mesh_testbed::tool::path().unwrap());
        cmd.args(args);
        self.topo
            .spawn_in(
                &format!("pod {}", pod.name),
                &pod.sandbox.netns_path,
                &pod.sandbox.cgroup_dir().unwrap(),
                cmd,
            )
            .unwrap()
    }

    /// `http-load --url url args` in the pod (its netns and cgroup).
    pub fn http_load(&self, pod: &KubePod, url: &str, args: &[&str]) -> crate::load::Load {
        let mut cmd = Command::new(crate::load::http_load_binary());
        cmd.args(["--url", url]).args(args);
        let out = self
            .topo
            .spawn_in(
                &format!("http-load in pod {}", pod.name),
                &pod.sandbox.netns_path,
                &pod.sandbox.cgroup_dir().unwrap(),
                cmd,
            )
            .unwrap()
            .wait_success(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("http-load: {e:#}"));
        crate::load::Load::parse(&out.stdout)
    }

    /// An HTTP server in the pod's network namespace, answering with
    /// `x-served-by: name`.
    pub fn http_backend(
        &self,
        pod: &KubePod,
        port: u16,
        name: &str,
    ) -> crate::backend::HttpBackend {
        crate::backend::HttpBackend::start_in(Some(pod.sandbox.netns_path.clone()), port, name)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Puts a ClusterIP Service `name` with one TCP port named `http` (so
    /// HTTP by Istio's port-name rule) and its EndpointSlice over `pods`.
    pub fn put_service(&self, name: &str, cluster_ip: &str, port: u16, pods: &[&KubePod]) {
        self.api.put(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": port}]}}));
        let endpoints: Vec<serde_json::Value> = pods
            .iter()
            .map(|pod| {
                json!({"addresses": [pod.ip().to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name, "uid": pod.uid}})
            })
            .collect();
        self.api.put(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-slice"), "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints}),
        );
    }

    /// `from` sends a line to the peer-echo server in `to`; the answer.
    pub fn send(&self, from: &KubePod, to: &KubePod) -> anyhow::Result<String> {
        let out = self
            .spawn(
                from,
                &[
                    "send",
                    &to.ip().to_string(),
                    &ECHO_PORT.to_string(),
                    "hello",
                ],
            )
            .wait_success(Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until the agent of `node` has `pod` enrolled; how long it took.
    pub fn wait_enrolled(&self, node: &str, pod: &KubePod) -> Duration {
        let started = Instant::now();
        let agent = &self.node(node).agent;
        wait_until(
            &format!("{node}'s agent to enrol {}", pod.name),
            ENROL_DEADLINE,
            || {
                Ok(agent
                    .status()?
                    .pods
                    .iter()
                    .any(|p| p.name == pod.name && p.enrolled))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nstatus: {:#?}",
                agent.status().map(|s| (s.pods, s.kubernetes))
            )
        });
        started.elapsed()
    }
}

pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

pub fn state_file(topo: &Topology, node: &Node) -> PathBuf {
    topo.tmp_dir()
        .join(format!("cluster-state-{}.json", node.name()))
}

/// The agent's CNI socket on `node` (with [`Cluster::start_with`]'s `cni`).
pub fn cni_socket(topo: &Topology, node: &Node) -> PathBuf {
    topo.tmp_dir().join(format!("cni-{}.sock", node.name()))
}

/// The agent's CNI state directory on `node`.
pub fn cni_state_dir(topo: &Topology, node: &Node) -> PathBuf {
    topo.tmp_dir().join(format!("cni-state-{}", node.name()))
}

pub fn netns_cookie(agent: &NodeAgent, pod: &str) -> Option<u64> {
    agent
        .status()
        .ok()?
        .pods
        .into_iter()
        .find(|p| p.name == pod && p.enrolled)
        .and_then(|p| p.netns_cookie)
}

/// Runs `f` until it succeeds (a new server may take a moment to listen).
pub fn retry(f: impl FnMut() -> anyhow::Result<String>) -> String {
    retry_or(f, String::new)
}

/// Like [`retry`]; on failure `context` says what the agents saw.
pub fn retry_or(
    mut f: impl FnMut() -> anyhow::Result<String>,
    context: impl FnOnce() -> String,
) -> String {
    let mut answer = String::new();
    if let Err(e) = wait_until("an answer", Duration::from_secs(10), || {
        answer = f()?;
        Ok(true)
    }) {
        panic!("{e:#}\n{}", context());
    }
    answer
}

/// The last lines of a log.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
