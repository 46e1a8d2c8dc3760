//! Kubernetes mode end to end, with a MODEL of the API server: pods are
//! real pod sandboxes made through a real containerd's CRI API (runc, the
//! CNI plugins), as the kubelet makes them; their Pod objects (and the
//! namespace, Service and EndpointSlice) are served by the stand-in API
//! server (`mesh_testbed::kube_api`, the API's list/watch protocol over HTTP,
//! on the test bed's control-plane address; not a real API server, none can
//! be installed here). The agents run with `discovery: kubernetes` and no
//! pods.yaml: they find, enrol and capture the pods themselves.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::{
    agent::NodeAgent,
    mesh::{TestCa, node_issuers},
};
use mesh_testbed::{
    Node, Process, Topology,
    cri::{ContainerRuntime, PodIpRange, Sandbox, cri_enabled, kubelet_cgroup_parent},
    kube_api::StandInApi,
    wait_until,
};
use serde_json::json;

const NAMESPACE: &str = "shop";
const ECHO_PORT: u16 = 7300;
const LOAD_PORT: u16 = 7301;
/// A port of db that the kubelet does not probe.
const OTHER_PORT: u16 = 7302;
/// How long the agent may take to enrol a pod once its object is Running.
/// The figure measured is printed; the bound is loose for busy machines.
const ENROL_DEADLINE: Duration = Duration::from_secs(10);

/// db admits only the client's identity.
const DB_ALLOWS_ONLY_CLIENT: &str = r#"
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
struct KubeNode<'t> {
    node: &'t Node,
    runtime: ContainerRuntime<'t>,
    agent: NodeAgent<'t>,
}

/// A pod made through CRI, with its Pod object in the model.
struct KubePod {
    name: String,
    uid: String,
    sandbox: Sandbox,
}

impl KubePod {
    fn ip(&self) -> IpAddr {
        IpAddr::V4(self.sandbox.ip)
    }
}

/// The cluster: two nodes, a model API server, pods.
struct Cluster<'t> {
    topo: &'t Topology,
    runtime: tokio::runtime::Runtime,
    api: StandInApi,
    nodes: Vec<KubeNode<'t>>,
    next_uid: u32,
}

fn uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

/// Pod IPs of one test (`block`: the third octet), apart from every other
/// test's sandboxes on the machine: the agent finds a pod's namespace by its
/// IP among all of them, and refuses to guess between two (a node never
/// gives two pods one IP; parallel test beds would).
fn ip_range(node: &Node, block: u8) -> PodIpRange {
    let i = node.index();
    PodIpRange {
        first: std::net::Ipv4Addr::new(10, i, block, 1),
        last: std::net::Ipv4Addr::new(10, i, block, 254),
    }
}

impl<'t> Cluster<'t> {
    fn start(topo: &'t Topology, ip_block: u8) -> Self {
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
            let node_yaml = format!(
                "{}discovery: kubernetes\nkubernetes:\n  kubeconfig: {}\n  cgroupDriver: cgroupfs\n  kubeletCgroupRoot: /{}\n  stateFile: {}\n",
                issuer.node_yaml("1h"),
                kubeconfig.display(),
                kubelet_root.display(),
                state_file(topo, node).display(),
            );
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

    fn node(&self, name: &str) -> &KubeNode<'t> {
        self.nodes
            .iter()
            .find(|n| n.node.name() == name)
            .expect("a node of the test")
    }

    /// Makes the pod's sandbox through CRI, then puts its Running Pod object.
    fn create_pod(&mut self, node: &str, name: &str) -> KubePod {
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

    fn put_pod(&self, node: &str, pod: &KubePod) {
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
    fn delete_pod(&self, node: &str, pod: &KubePod) {
        assert!(self.api.delete("Pod", NAMESPACE, &pod.name));
        self.node(node)
            .runtime
            .stop_and_remove_pod(&pod.sandbox.id)
            .unwrap();
    }

    /// Starts `pod-tool args` in the pod: its netns and its cgroup, so that
    /// its connections are the pod's (captured by the agent's programs).
    fn spawn(&self, pod: &KubePod, args: &[&str]) -> Process {
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

    /// `from` sends a line to the peer-echo server in `to`; the answer.
    fn send(&self, from: &KubePod, to: &KubePod) -> anyhow::Result<String> {
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
    fn wait_enrolled(&self, node: &str, pod: &KubePod) -> Duration {
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

fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

fn state_file(topo: &Topology, node: &Node) -> PathBuf {
    topo.tmp_dir()
        .join(format!("cluster-state-{}.json", node.name()))
}

fn netns_cookie(agent: &NodeAgent, pod: &str) -> Option<u64> {
    agent
        .status()
        .ok()?
        .pods
        .into_iter()
        .find(|p| p.name == pod && p.enrolled)
        .and_then(|p| p.netns_cookie)
}

#[test]
fn model_api_pods_made_through_cri_are_found_enrolled_captured_and_released() {
    if !cri_enabled("model_api_pods_made_through_cri_are_found_enrolled_captured_and_released") {
        return;
    }
    let topo = Topology::builder("kubernetes_cri")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&topo, 201);

    // Pods appear: each is enrolled by its node's agent, found by its IP
    // and UID alone, soon after its object is Running.
    let client = cluster.create_pod("n1", "client");
    let web = cluster.create_pod("n1", "web");
    let db = cluster.create_pod("n2", "db");
    let mut took = Vec::new();
    for (node, pod) in [("n1", &client), ("n1", &web), ("n2", &db)] {
        took.push(cluster.wait_enrolled(node, pod));
    }
    eprintln!("enrolled after the Pod object was Running: {took:?}");
    let n1 = &cluster.node("n1").agent;
    let n2 = &cluster.node("n2").agent;
    let status = n1.status().unwrap();
    let kubernetes = status.kubernetes.expect("the Kubernetes part of /status");
    assert!(kubernetes.synced, "{kubernetes:?}");
    assert!(kubernetes.report.waiting.is_empty(), "{kubernetes:?}");

    let generation = n2.status().unwrap().config_generation;
    n2.write_file("policies/db.yaml", DB_ALLOWS_ONLY_CLIENT)
        .unwrap();
    n2.wait_generation_after(generation).unwrap();
    let _servers: Vec<Process> = [&web, &db]
        .iter()
        .map(|p| cluster.spawn(p, &["peer-echo-server", &ECHO_PORT.to_string()]))
        .collect();

    // Same node: captured by n1's agent, delivered into web (from the
    // agent's own address in the pod: keeping the client's is issue 22).
    let answer = retry(|| cluster.send(&client, &web));
    assert!(answer.ends_with("|hello"), "{answer}");
    let local = n1
        .wait_for_connection("client -> web on n1", |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == web.ip()
        })
        .unwrap();
    assert_eq!(
        local.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/client")
    );
    // Across nodes: mutual TLS, and db's policy admits the client only.
    let answer = retry(|| cluster.send(&client, &db));
    assert!(answer.ends_with("|hello"), "{answer}");
    let tunnelled = n1
        .wait_for_connection("client -> db through the tunnel", |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == db.ip()
        })
        .unwrap();
    assert_eq!(tunnelled.security, "mutual_tls", "{tunnelled:?}");
    assert_eq!(
        tunnelled.peer_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/db")
    );
    assert!(
        cluster.send(&web, &db).is_err(),
        "web is not admitted into db"
    );

    // The kubelet's probe (db's readiness probe, TCP on ECHO_PORT) from
    // the node's address passes db's policy; the node's connection to
    // another port of db does not.
    let _other = cluster.spawn(&db, &["peer-echo-server", &OTHER_PORT.to_string()]);
    let from_node = |port: u16| {
        cluster
            .node("n2")
            .node
            .run_tool(
                &["send", &db.ip().to_string(), &port.to_string(), "probe"],
                Duration::from_secs(10),
            )
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let probed = from_node(ECHO_PORT).expect("the kubelet's probe reaches db");
    assert!(probed.ends_with("|probe"), "{probed}");
    let client_other = cluster
        .spawn(
            &client,
            &["send", &db.ip().to_string(), &OTHER_PORT.to_string(), "x"],
        )
        .wait_success(Duration::from_secs(10));
    assert!(
        client_other.is_ok(),
        "the client reaches db's other port: {client_other:?}"
    );
    assert!(
        from_node(OTHER_PORT).is_err(),
        "the node's connection to a port that is not probed must be refused by db's policy"
    );
    assert_eq!(
        n2.metric_sum(
            "mesh_authorization_decisions_total",
            &[("decision", "kubelet_probe")]
        ),
        1
    );

    // A deleted pod is released.
    cluster.delete_pod("n1", &web);
    wait_until("n1 to release web", Duration::from_secs(10), || {
        Ok(!n1.status()?.pods.iter().any(|p| p.name == "web"))
    })
    .unwrap();

    // Recreated under the same name: a new sandbox, a new namespace, and
    // the agent follows it there.
    let old_cookie = netns_cookie(n2, "db").expect("db enrolled");
    cluster.delete_pod("n2", &db);
    let db2 = cluster.create_pod("n2", "db");
    assert_ne!(db2.sandbox.netns_path, db.sandbox.netns_path);
    let n2 = &cluster.node("n2").agent;
    wait_until("db enrolled in its new namespace", ENROL_DEADLINE, || {
        Ok(netns_cookie(n2, "db").is_some_and(|c| c != old_cookie))
    })
    .unwrap();
    let _db2_server = cluster.spawn(&db2, &["peer-echo-server", &ECHO_PORT.to_string()]);
    let answer = retry_or(
        || cluster.send(&client, &db2),
        || {
            format!(
                "n1 connections: {:#?}\nn1 log: {}\nn2 connections: {:#?}\nn2 log: {}",
                cluster.node("n1").agent.connections(),
                tail(&cluster.node("n1").agent.log()),
                cluster.node("n2").agent.connections(),
                tail(&cluster.node("n2").agent.log())
            )
        },
    );
    assert!(answer.ends_with("|hello"), "{answer}");
    n2.wait_for_connection("client -> the recreated db, inbound on n2", |r| {
        r.direction == Direction::Inbound && r.original_dst.ip() == db2.ip()
    })
    .unwrap();
}

/// Runs `f` until it succeeds (a new server may take a moment to listen).
fn retry(f: impl FnMut() -> anyhow::Result<String>) -> String {
    retry_or(f, String::new)
}

/// Like [`retry`]; on failure `context` says what the agents saw.
fn retry_or(
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
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn model_api_away_for_a_minute_under_traffic_then_a_change_made_meanwhile_is_applied() {
    if !cri_enabled(
        "model_api_away_for_a_minute_under_traffic_then_a_change_made_meanwhile_is_applied",
    ) {
        return;
    }
    const OUTAGE: Duration = Duration::from_secs(60);
    let topo = Topology::builder("kubernetes_outage")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&topo, 203);
    let client = cluster.create_pod("n1", "client");
    let db = cluster.create_pod("n2", "db");
    cluster.wait_enrolled("n1", &client);
    cluster.wait_enrolled("n2", &db);
    // The state is saved once every watch has listed.
    for node in topo.nodes() {
        let file = state_file(&topo, node);
        wait_until("the state saved", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&file).is_ok_and(|s| s.contains("\"db\"")))
        })
        .unwrap();
    }
    let _echo = cluster.spawn(&db, &["echo-server", &LOAD_PORT.to_string()]);
    retry(|| {
        cluster
            .spawn(
                &client,
                &[
                    "echo",
                    &db.ip().to_string(),
                    &LOAD_PORT.to_string(),
                    "--plain",
                ],
            )
            .wait_success(Duration::from_secs(10))
            .map(|_| "ok".to_string())
    });

    // Traffic for the whole outage and a little after.
    let seconds = (OUTAGE + Duration::from_secs(15)).as_secs().to_string();
    let mut load = cluster.spawn(
        &client,
        &[
            "load",
            "tcp",
            &db.ip().to_string(),
            &LOAD_PORT.to_string(),
            &seconds,
            "2",
        ],
    );
    let outage_started = Instant::now();
    cluster.api.go_away();
    // While the API is away: n2's agent is replaced (as a DaemonSet
    // rolling update does, taking over its listeners) and the new one must
    // serve db from the saved state alone; a pod is created meanwhile.
    let retired = cluster.nodes[1].agent.replace().unwrap();
    retired.stop(Duration::from_secs(30)).unwrap();
    assert!(
        cluster.nodes[1]
            .agent
            .status()
            .unwrap()
            .pods
            .iter()
            .any(|p| p.name == "db" && p.enrolled),
        "the restarted agent serves db from the saved state"
    );
    // `mesh-agent check` shows what the saved state holds, API or not.
    let check = Command::new(mesh_e2e::agent::agent_binary())
        .args(["check", "--config"])
        .arg(cluster.nodes[1].agent.config_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.contains("saved state") && said.contains("1 pods of this node found on it"),
        "{said}"
    );
    let late = cluster.create_pod("n1", "late");
    let errors = |agent: &NodeAgent| -> u64 {
        agent
            .status()
            .ok()
            .and_then(|s| s.kubernetes)
            .map_or(0, |k| k.watches.values().map(|w| w.errors).sum())
    };
    wait_until(
        "watch errors during the outage",
        Duration::from_secs(20),
        || Ok(errors(&cluster.nodes[0].agent) > 0),
    )
    .unwrap();
    if let Some(left) = OUTAGE.checked_sub(outage_started.elapsed()) {
        std::thread::sleep(left);
    }
    assert!(
        !cluster.nodes[0]
            .agent
            .status()
            .unwrap()
            .pods
            .iter()
            .any(|p| p.name == "late"),
        "nothing reached the agent while the API was away"
    );
    cluster.runtime.block_on(cluster.api.come_back()).unwrap();
    // The change made meanwhile is applied once the API is back.
    let took = cluster.wait_enrolled("n1", &late);
    eprintln!("the pod created during the outage enrolled {took:?} after the API came back");

    let out = load.wait_success(Duration::from_secs(60)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total = stdout
        .lines()
        .find_map(|l| l.strip_prefix("total tcp "))
        .unwrap_or_else(|| panic!("no total line: {stdout}"));
    let counts: Vec<u64> = total.split(' ').map(|n| n.parse().unwrap()).collect();
    let (sent, ok, failed) = (counts[0], counts[1], counts[2]);
    eprintln!("during the outage: {sent} exchanges, {ok} ok, {failed} failed");
    assert!(sent > 100, "{stdout}");
    assert_eq!(failed, 0, "{stdout}");
    assert_eq!(sent, ok);
}
