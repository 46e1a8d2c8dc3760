//! `cargo xtask demo --kubernetes`: the mesh as it runs on a cluster, with
//! no pods.yaml anywhere. Pods are real pod sandboxes made through a real
//! containerd's CRI API (runc, the CNI plugins), as the kubelet makes them;
//! their Pod objects, the namespace, a Service and its EndpointSlice are
//! served by a MODEL of the Kubernetes API server (`mesh_testbed::kube_api`:
//! the list/watch protocol over HTTP; none can be installed here). The
//! agents run with `discovery: kubernetes`: they find their node's pods by
//! IP and UID, enrol them, and learn the rest from the API. Their
//! certificates come from the mesh's signer (`mesh-agent ca`) on the control
//! plane by signing request, as the DaemonSet's default: no node holds the
//! signing key.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_testbed::{
    Node, Process, Topology,
    cri::{ContainerRuntime, PodIpRange, Sandbox, kubelet_cgroup_parent, kubelet_cgroup_root},
    e2e_preflight,
    kube_api::StandInApi,
    wait_until,
};
use serde_json::{Value, json};

use crate::{
    agents::{self, ADMIN},
    setup, step,
};

const NAMESPACE: &str = "shop";
const HTTP_PORT: u16 = 8080;
const DB_PORT: u16 = 5432;
const BACKEND_VIP: &str = "10.96.0.20";
const BACKEND_VIP_PORT: u16 = 80;

const DATABASE_FROM_BACKEND: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: database-from-backend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: database
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/backend"]
"#;

/// A pod of the demo: where, what, who.
struct DemoPod {
    name: &'static str,
    node: &'static str,
    app: &'static str,
    service_account: &'static str,
}

const PODS: [DemoPod; 4] = [
    DemoPod {
        name: "frontend",
        node: "node1",
        app: "frontend",
        service_account: "frontend",
    },
    DemoPod {
        name: "backend-1",
        node: "node1",
        app: "backend",
        service_account: "backend",
    },
    DemoPod {
        name: "backend-2",
        node: "node2",
        app: "backend",
        service_account: "backend",
    },
    DemoPod {
        name: "database",
        node: "node2",
        app: "database",
        service_account: "database",
    },
];

pub fn run(workspace: &Path) -> Result<()> {
    let started = Instant::now();
    e2e_preflight().map_err(|why| {
        anyhow::anyhow!("the demo builds network namespaces and loads kernel programs: {why}")
    })?;
    step(
        "[1/6] kernel programs, mesh-agent (release), pod-tool; containerd, runc and the CNI plugins",
    );
    setup::build_ebpf(workspace)?;
    let agent_bin = setup::build_agent_release(workspace)?;
    setup::build_pod_tool(workspace)?;
    setup::ensure_container_runtime()?;
    mesh_testbed::cri::preflight().map_err(anyhow::Error::msg)?;

    step(
        "[2/6] two nodes, each with its own containerd; a MODEL of the Kubernetes API on the control plane",
    );
    let topo = Topology::builder("demo_kubernetes")
        .node("node1", &[])
        .node("node2", &[])
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let api = runtime.block_on(StandInApi::start_with(topo.control_plane_binder()))?;
    api.put(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    let kubeconfig = topo.tmp_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    println!(
        "    API server (model)  {}  namespace {NAMESPACE} labelled istio.io/dataplane-mode=ambient",
        api.url()
    );
    let runtimes = topo
        .nodes()
        .iter()
        .map(|node| {
            let range = PodIpRange {
                first: Ipv4Addr::new(10, node.index(), 202, 1),
                last: Ipv4Addr::new(10, node.index(), 202, 254),
            };
            let runtime = ContainerRuntime::start(&topo, node, range)?;
            println!(
                "    {}: containerd {} (pid {})",
                node.name(),
                runtime.version()?,
                runtime.containerd_pid()
            );
            Ok(runtime)
        })
        .collect::<Result<Vec<_>>>()?;

    let ca = crate::pki::BenchCa::new()?;
    let signer_dir = topo.tmp_dir().join("signer");
    let mut signer = crate::signer::start(&agent_bin, &topo, &api, &signer_dir, &ca, "info")?;
    println!(
        "    signer (mesh-agent ca, pid {}) on the control plane, {}:{}: the only holder of the mesh's signing key",
        signer.pid(),
        mesh_testbed::CONTROL_PLANE_IPV4,
        crate::signer::CA_PORT
    );

    step("[3/6] an agent on each node: discovery: kubernetes, no pods.yaml; one policy file");
    // Not read: agents ask the signer; the issuer block is not written.
    let pki = topo.tmp_dir().join("pki");
    let mut agents = Vec::new();
    for node in topo.nodes() {
        // What the DaemonSet projects into the agent's pod: its token (the
        // model accepts it for mesh-system/mesh-agent on this node) and the
        // signer's root.
        let token = crate::signer::register_agent(&api, node)?;
        let identity = crate::signer::agent_identity(
            &topo.tmp_dir().join(format!("projected-{}", node.name())),
            &token,
            &ca,
        )?;
        let kubelet_root = kubelet_cgroup_root(node)?;
        let node_extra = format!(
            "discovery: kubernetes\nkubernetes:\n  kubeconfig: {}\n  cgroupDriver: cgroupfs\n  kubeletCgroupRoot: {}\n  stateFile: {}\n",
            kubeconfig.display(),
            kubelet_root,
            topo.tmp_dir()
                .join(format!("state-{}.json", node.name()))
                .display()
        );
        let dir = topo.tmp_dir().join(format!("config-{}", node.name()));
        let policies = [("policies/database.yaml", DATABASE_FROM_BACKEND.to_string())];
        std::fs::create_dir_all(dir.join("policies"))?;
        let agent = agents::start(
            &agent_bin,
            &topo,
            node,
            &pki,
            &agents::AgentConfig {
                dir: &dir,
                pods_yaml: "pods: []\n",
                extra_files: &policies,
                log: "info",
                node_extra: &node_extra,
                issuer_extra: "",
                identity: Some(&identity),
            },
        )?;
        println!("    agent on {} ready (pid {})", node.name(), agent.pid());
        agents.push(agent);
    }

    step(
        "[4/6] pods made through CRI, as the kubelet makes them; their objects Running in the API",
    );
    let mut pods = Vec::new();
    for (i, pod) in PODS.iter().enumerate() {
        let node = topo.node(pod.node);
        let runtime = &runtimes[usize::from(node.index()) - 1];
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), i + 1);
        let sandbox = runtime.run_pod(
            pod.name,
            NAMESPACE,
            &uid,
            &kubelet_cgroup_parent(node, "besteffort", &uid)?,
        )?;
        let put = Instant::now();
        api.put(pod_object(pod, &uid, &sandbox, node));
        let enrolled = wait_enrolled(node, pod.name)?;
        println!(
            "    {:<6} {:<10} {:<14} sa {:<9} {}  enrolled {:.1} ms after its object was Running",
            pod.node,
            pod.name,
            sandbox.ip,
            pod.service_account,
            sandbox.netns_path.display(),
            (enrolled - put).as_secs_f64() * 1000.0
        );
        pods.push((pod, sandbox));
    }
    let sandbox = |name: &str| {
        &pods
            .iter()
            .find(|(p, _)| p.name == name)
            .expect("a demo pod")
            .1
    };
    api.put(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "backend", "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": BACKEND_VIP, "clusterIPs": [BACKEND_VIP],
                 "ports": [{"name": "http", "port": BACKEND_VIP_PORT, "protocol": "TCP", "targetPort": HTTP_PORT}]}}));
    let endpoints: Vec<Value> = pods
        .iter()
        .filter(|(p, _)| p.app == "backend")
        .map(|(p, s)| json!({"addresses": [s.ip.to_string()], "conditions": {"ready": true},
            "nodeName": p.node, "targetRef": {"kind": "Pod", "name": p.name, "namespace": NAMESPACE}}))
        .collect();
    api.put(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "backend-x1", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": "backend"}},
        "endpoints": endpoints, "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}]}));
    println!(
        "    Service shop/backend {BACKEND_VIP}:{BACKEND_VIP_PORT} (port name http: HTTP, balanced per request) -> backend-1, backend-2"
    );

    let mut servers: Vec<Process> = Vec::new();
    for (pod, s) in &pods {
        let args: Vec<String> = match pod.app {
            "backend" => vec![
                "http-server".into(),
                format!("0.0.0.0:{HTTP_PORT}"),
                "--body".into(),
                format!("{}\n", pod.name),
            ],
            "database" => vec!["echo-server".into(), DB_PORT.to_string()],
            _ => continue,
        };
        let server = spawn_in(&topo, pod.name, s, &args)?;
        if pod.app == "backend" {
            wait_until("the HTTP server", Duration::from_secs(10), || {
                Ok(server.stdout_so_far().contains("ready"))
            })?;
        }
        servers.push(server);
    }

    // Ready: a certificate for every pod's identity, signed on request.
    for node in topo.nodes() {
        wait_until(
            &format!("{}'s certificates from the signer", node.name()),
            Duration::from_secs(20),
            || Ok(node.http_get(ADMIN.parse()?, "/readyz")?.0 == 200),
        )?;
    }

    step("[5/6] real traffic from inside the pods");
    let frontend = sandbox("frontend");
    wait_until(
        "the backend service on node1's agent",
        Duration::from_secs(10),
        || {
            let (_, dump) = topo
                .node("node1")
                .http_get(ADMIN.parse()?, "/config_dump")?;
            Ok(dump.contains(BACKEND_VIP))
        },
    )?;
    let out = spawn_in(
        &topo,
        "frontend",
        frontend,
        &[
            "http-client".into(),
            BACKEND_VIP.into(),
            BACKEND_VIP_PORT.to_string(),
            "/api/items".into(),
            "--count".into(),
            "20".into(),
        ],
    )?
    .wait_success(Duration::from_secs(30))?;
    let answers = String::from_utf8_lossy(&out.stdout).to_string();
    let by: Vec<&str> = answers
        .lines()
        .filter_map(|l| l.strip_prefix("200 "))
        .collect();
    println!(
        "    frontend -> backend service: 20 requests, 200 from backend-1 x{}, backend-2 x{} (across nodes through mTLS)",
        by.iter().filter(|b| b.trim() == "backend-1").count(),
        by.iter().filter(|b| b.trim() == "backend-2").count()
    );
    if by.len() != 20 {
        bail!("not every request was answered 200:\n{answers}");
    }
    let db = format!("{}", sandbox("database").ip);
    spawn_in(
        &topo,
        "backend-1",
        sandbox("backend-1"),
        &[
            "echo".into(),
            db.clone(),
            DB_PORT.to_string(),
            "--plain".into(),
        ],
    )?
    .wait_success(Duration::from_secs(15))
    .context("backend-1 -> database (allowed by policy)")?;
    println!(
        "    backend-1 -> database {db}:{DB_PORT}: allowed (sa backend), node1 -> node2 in mutual TLS"
    );
    let denied = spawn_in(
        &topo,
        "frontend",
        frontend,
        &[
            "echo".into(),
            db.clone(),
            DB_PORT.to_string(),
            "--plain".into(),
        ],
    )?
    .wait_success(Duration::from_secs(15));
    if denied.is_ok() {
        bail!("frontend reached the database: the policy was not enforced");
    }
    println!("    frontend  -> database {db}:{DB_PORT}: refused (database admits sa backend only)");

    step("[6/6] what the agents know");
    for node in topo.nodes() {
        let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
        let status: Value = serde_json::from_str(&status)?;
        let enrolled: Vec<String> = status["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["enrolled"] == true)
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .collect();
        let k = &status["kubernetes"];
        println!(
            "    {}: enrolled {enrolled:?}; API watches synced: {}; waiting: {}; skipped services: {}",
            node.name(),
            k["synced"],
            k["waiting"],
            k["skippedServices"]
        );
        let certificates: Vec<String> = status["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} ({})",
                    c["identity"].as_str().unwrap_or_default(),
                    c["source"].as_str().unwrap_or_default()
                )
            })
            .collect();
        println!(
            "    {}: certificates {certificates:?}, {} signed by the CA",
            node.name(),
            status["certificateAuthority"]["requestsSucceeded"]
        );
    }
    let (_, metrics) = topo
        .node("node1")
        .http_get(crate::signer::admin_address(), "/metrics")?;
    let signed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_ca_requests_total"))
        .collect();
    println!("    signer: {}", signed.join(", "));
    println!(
        "    deleting pod backend-2 (object, then sandbox): released by node2's agent and removed from the service"
    );
    api.delete("Pod", NAMESPACE, "backend-2");
    runtimes[1].stop_and_remove_pod(&sandbox("backend-2").id)?;
    wait_until(
        "node2 to release backend-2",
        Duration::from_secs(10),
        || {
            let (_, status) = topo.node("node2").http_get(ADMIN.parse()?, "/status")?;
            Ok(!status.contains("\"backend-2\""))
        },
    )?;
    drop(servers);
    drop(agents);
    signer.kill();
    drop(runtimes);
    drop(api);
    step(format!(
        "demo (Kubernetes mode) done in {:.0} s; everything it made is removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn pod_object(pod: &DemoPod, uid: &str, sandbox: &Sandbox, node: &Node) -> Value {
    let host = node.bridge_ipv4().to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NAMESPACE, "uid": uid, "labels": {"app": pod.app}},
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                 "containers": [{"name": pod.app, "image": "localhost/mesh-pause:1"}]},
        "status": {"phase": "Running", "podIP": sandbox.ip.to_string(), "podIPs": [{"ip": sandbox.ip.to_string()}],
                   "hostIP": host, "hostIPs": [{"ip": host}], "qosClass": "BestEffort"}
    })
}

/// When the node's agent reported the pod enrolled.
fn wait_enrolled(node: &Node, pod: &str) -> Result<Instant> {
    wait_until(
        &format!("{}'s agent to enrol {pod}", node.name()),
        Duration::from_secs(10),
        || {
            let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
            let status: Value = serde_json::from_str(&status)?;
            Ok(status["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == pod && p["enrolled"] == true))
        },
    )?;
    Ok(Instant::now())
}

/// pod-tool in a runtime-made pod: its netns and cgroup (so it is captured).
fn spawn_in(topo: &Topology, name: &str, sandbox: &Sandbox, args: &[String]) -> Result<Process> {
    let mut cmd = Command::new(mesh_testbed::tool::path()?);
    cmd.args(args);
    topo.spawn_in(
        &format!("pod {name}"),
        &sandbox.netns_path,
        &sandbox.cgroup_dir()?,
        cmd,
    )
}
