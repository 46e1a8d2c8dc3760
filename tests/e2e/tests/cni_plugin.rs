//! The CNI plugin end to end, with a MODEL of the API server (see
//! `mesh_e2e::kube`): real containerd, runc and CNI plugins make the pod
//! sandboxes through CRI; `mesh-cni` is chained after the bridge plugin in
//! containerd's conflist by `mesh-agent cni-install`, and containerd runs it
//! for every sandbox.
//!
//! A pod's "first process" is started in the sandbox's network namespace
//! and cgroup the moment `RunPodSandbox` returns: the earliest any of the
//! pod's containers could run (the kubelet creates them after). It connects
//! at once to db on the other node, whose policy admits only identities of
//! the mesh's namespace: a connection that escaped capture arrives in
//! plaintext and is refused, one captured goes over mutual TLS and is let in.

use std::time::{Duration, Instant};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::kube::*;
use mesh_testbed::{Topology, cri::Sandbox, cri::cri_enabled, wait_until};
use nix::sys::signal::Signal;
use serde_json::json;

/// First connections tried with the plugin (each a new pod).
const WITH_PLUGIN: usize = 100;
/// First connections tried without it, to count the escapes.
const WITHOUT_PLUGIN: usize = 20;
/// Pods of a namespace outside the mesh, started with the plugin.
const OUTSIDE_THE_MESH: usize = 20;
const OTHER_NAMESPACE: &str = "batch";

/// db admits identities of the mesh's namespace only.
const DB_ADMITS_THE_MESH: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-admits-the-mesh
  namespace: shop
spec:
  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["shop"]
"#;

/// Two nodes, the plugin's agent socket on each, db on n2 with its policy
/// and an echo server.
fn cluster_with_db(topo: &Topology, ip_block: u8) -> (Cluster<'_>, KubePod) {
    let mut cluster = Cluster::start_with(topo, ip_block, true);
    cluster
        .api
        .put(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": OTHER_NAMESPACE}}));
    let db = cluster.create_pod("n2", "db");
    cluster.wait_enrolled("n2", &db);
    let n2 = &cluster.node("n2").agent;
    let generation = n2.status().unwrap().config_generation;
    n2.write_file("policies/db.yaml", DB_ADMITS_THE_MESH)
        .unwrap();
    n2.wait_generation_after(generation).unwrap();
    (cluster, db)
}

/// The pod's first process: `pod-tool send` to db, started the moment the
/// sandbox exists; whether db answered.
fn first_connection(cluster: &Cluster<'_>, sandbox: &Sandbox, db: &KubePod) -> bool {
    cluster
        .spawn(
            &KubePod::of(sandbox),
            &[
                "send",
                &db.ip().to_string(),
                &ECHO_PORT.to_string(),
                "first",
            ],
        )
        .wait_success(Duration::from_secs(15))
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .ends_with("|first")
        })
}

/// A pod of the mesh started as the kubelet would: its object (Pending) is
/// in the API, then its sandbox is made; how long `RunPodSandbox` took.
fn start_pod(cluster: &mut Cluster<'_>, name: &str) -> (anyhow::Result<Sandbox>, Duration) {
    let uid = cluster.new_uid();
    cluster.put_pending_pod("n1", name, &uid);
    let started = Instant::now();
    let sandbox = cluster.run_sandbox("n1", name, &uid);
    (sandbox, started.elapsed())
}

/// The sandbox's Pod object says Running with its IP (the kubelet reports
/// it once the containers run).
fn report_running(cluster: &Cluster<'_>, sandbox: &Sandbox) {
    cluster.put_pod("n1", &KubePod::of(sandbox));
}

fn remove_pod(cluster: &Cluster<'_>, sandbox: &Sandbox) {
    cluster.api.delete("Pod", &sandbox.namespace, &sandbox.name);
    cluster
        .node("n1")
        .runtime
        .stop_and_remove_pod(&sandbox.id)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut times: Vec<Duration>) -> String {
    times.sort();
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {}",
        percentile(&times, 50.0).as_secs_f64() * 1e3,
        percentile(&times, 99.0).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        times.len()
    )
}

/// The agent's own waits for ADDs, from its log (`waited_ms=`).
fn agent_waits(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("CNI ADD: pod enrolled"))
        .filter_map(|l| {
            let value = l.split("waited_ms=").nth(1)?.split_whitespace().next()?;
            value
                .parse::<f64>()
                .ok()
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
        })
        .collect()
}

#[test]
fn model_api_with_the_cni_plugin_every_first_connection_is_captured_and_mutual_tls() {
    if !cri_enabled(
        "model_api_with_the_cni_plugin_every_first_connection_is_captured_and_mutual_tls",
    ) {
        return;
    }
    let topo = Topology::builder("cni_first_connection")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let (mut cluster, db) = cluster_with_db(&topo, 204);
    let _server = cluster.spawn(&db, &["peer-echo-server", &ECHO_PORT.to_string()]);
    // db serves (a pod of n2 reaches it through n2's agent).
    let probe = cluster.create_pod("n2", "probe");
    cluster.wait_enrolled("n2", &probe);
    wait_until("db to serve", Duration::from_secs(10), || {
        Ok(cluster.send(&probe, &db).is_ok())
    })
    .unwrap();

    // Without the plugin: the agent learns of a pod from the API once it
    // runs, after its first process has connected.
    let plaintext_before = plaintext_into(&cluster, &db);
    let mut escaped = 0;
    let mut without_times = Vec::new();
    for i in 0..WITHOUT_PLUGIN {
        let (sandbox, took) = start_pod(&mut cluster, &format!("early-{i}"));
        let sandbox = sandbox.unwrap_or_else(|e| panic!("{e:#}"));
        without_times.push(took);
        if !first_connection(&cluster, &sandbox, &db) {
            escaped += 1;
        }
        report_running(&cluster, &sandbox);
        remove_pod(&cluster, &sandbox);
    }
    let refused_plaintext = plaintext_into(&cluster, &db) - plaintext_before;
    eprintln!(
        "without the plugin: {escaped} of {WITHOUT_PLUGIN} first connections escaped capture \
         (refused by db's policy as plaintext; n2 saw {refused_plaintext} plaintext connections into db); \
         RunPodSandbox {}",
        summary(without_times.clone())
    );
    assert_eq!(
        refused_plaintext, escaped,
        "each escaped connection reached db in plaintext"
    );

    // With the plugin chained after the bridge plugin.
    let installed = cluster
        .install_cni("n1")
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{installed}");
    let mut with_times = Vec::new();
    for i in 0..WITH_PLUGIN {
        let name = format!("client-{i}");
        let (sandbox, took) = start_pod(&mut cluster, &name);
        let sandbox = sandbox
            .unwrap_or_else(|e| panic!("{e:#}\nn1 log: {}", tail(&cluster.node("n1").agent.log())));
        with_times.push(took);
        let answered = first_connection(&cluster, &sandbox, &db);
        let n1 = &cluster.node("n1").agent;
        let pod_key = format!("shop/{name}");
        let record = n1.wait_for_connection(&format!("{name}'s first connection"), |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == db.ip() && r.pod == pod_key
        });
        assert!(
            answered,
            "{name}'s first connection was not answered (connection {record:?})\nn1 log: {}",
            tail(&n1.log())
        );
        let record = record.unwrap();
        assert_eq!(record.security, "mutual_tls", "{record:?}");
        assert_eq!(
            record.source_identity.as_deref(),
            Some(format!("spiffe://cluster.local/ns/shop/sa/{name}").as_str())
        );
        report_running(&cluster, &sandbox);
        remove_pod(&cluster, &sandbox);
    }
    let waits = agent_waits(&cluster.node("n1").agent.log());
    assert_eq!(waits.len(), WITH_PLUGIN, "one ADD answered per sandbox");
    eprintln!(
        "with the plugin: {WITH_PLUGIN} of {WITH_PLUGIN} first connections captured over mutual TLS; \
         the agent's wait per ADD {}; RunPodSandbox {}",
        summary(waits),
        summary(with_times)
    );

    // Pods outside the mesh are passed through, quickly.
    let mut outside = Vec::new();
    for i in 0..OUTSIDE_THE_MESH {
        let name = format!("job-{i}");
        let uid = cluster.new_uid();
        put_pending_in(&cluster, OTHER_NAMESPACE, &name, &uid);
        let started = Instant::now();
        let sandbox = cluster
            .run_sandbox_in("n1", OTHER_NAMESPACE, &name, &uid)
            .unwrap_or_else(|e| panic!("{e:#}"));
        outside.push(started.elapsed());
        cluster.api.delete("Pod", OTHER_NAMESPACE, &name);
        cluster
            .node("n1")
            .runtime
            .stop_and_remove_pod(&sandbox.id)
            .unwrap();
    }
    let n1 = &cluster.node("n1").agent;
    assert_eq!(
        n1.metric_sum(
            "mesh_cni_requests_total",
            &[("command", "ADD"), ("answer", "not_in_mesh")]
        ),
        OUTSIDE_THE_MESH as u64
    );
    assert!(
        !n1.status()
            .unwrap()
            .pods
            .iter()
            .any(|p| p.namespace == OTHER_NAMESPACE),
        "a pod outside the mesh is never enrolled"
    );
    eprintln!(
        "outside the mesh, with the plugin: RunPodSandbox {}",
        summary(outside)
    );
    // Every sandbox deleted was released.
    wait_until(
        "n1 to release the deleted pods",
        Duration::from_secs(10),
        || Ok(n1.status()?.pods.is_empty()),
    )
    .unwrap();
}

fn put_pending_in(cluster: &Cluster<'_>, namespace: &str, name: &str, uid: &str) {
    cluster.api.put(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"nodeName": "n1", "serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "localhost/mesh-pause:1"}]},
        "status": {"phase": "Pending", "qosClass": "BestEffort"}
    }));
}

#[test]
fn model_api_with_the_agent_stopped_mesh_pods_wait_others_start_and_uninstall_restores_the_conflist()
 {
    if !cri_enabled(
        "model_api_with_the_agent_stopped_mesh_pods_wait_others_start_and_uninstall_restores_the_conflist",
    ) {
        return;
    }
    let topo = Topology::builder("cni_agent_away")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let (mut cluster, db) = cluster_with_db(&topo, 205);
    let _server = cluster.spawn(&db, &["peer-echo-server", &ECHO_PORT.to_string()]);
    let conflist = cluster
        .node("n1")
        .runtime
        .cni_conf_dir()
        .join("10-mesh-testbed.conflist");
    let original = std::fs::read(&conflist).unwrap();
    let mut keeper = cluster
        .keep_cni_installed("n1")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(std::fs::read(&conflist).unwrap(), original);
    // The pod network rewrites its conflist: the plugin is put back.
    std::fs::write(&conflist, &original).unwrap();
    wait_until(
        "the keeper to put mesh-cni back",
        Duration::from_secs(20),
        || {
            Ok(keeper.stdout_so_far().contains("put back")
                && std::fs::read_to_string(&conflist)?.contains("mesh-cni"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", keeper.output_report()));
    cluster.wait_plugin_loaded("n1", true).unwrap();

    // A pod enrolled through the plugin.
    let (sandbox, _) = start_pod(&mut cluster, "web");
    let web = sandbox.unwrap_or_else(|e| panic!("{e:#}"));
    report_running(&cluster, &web);
    wait_until("web's first connection", Duration::from_secs(10), || {
        Ok(first_connection(&cluster, &web, &db))
    })
    .unwrap();

    // The agent stops.
    let log = cluster
        .nodes
        .iter_mut()
        .find(|n| n.node.name() == "n1")
        .unwrap()
        .agent
        .stop(Signal::SIGTERM)
        .unwrap();
    assert!(log.contains("serving the CNI plugin"), "{}", tail(&log));
    // A new pod of the mesh does not start: its sandbox is refused, saying why.
    let uid = cluster.new_uid();
    cluster.put_pending_pod("n1", "late", &uid);
    let refused = cluster
        .run_sandbox("n1", "late", &uid)
        .expect_err("a pod of the mesh must not start while the agent is away");
    let message = format!("{refused:#}");
    assert!(
        message.contains("is in the mesh and the node's mesh agent is not reachable"),
        "{message}"
    );
    // A pod outside the mesh starts.
    let job_uid = cluster.new_uid();
    put_pending_in(&cluster, OTHER_NAMESPACE, "job", &job_uid);
    let job = cluster
        .run_sandbox_in("n1", OTHER_NAMESPACE, "job", &job_uid)
        .unwrap_or_else(|e| panic!("a pod outside the mesh must start: {e:#}"));
    // The enrolled pod stays captured: its connections are refused, none
    // reaches db in plaintext.
    let plaintext_before = plaintext_into(&cluster, &db);
    assert!(
        !first_connection(&cluster, &web, &db),
        "web's connection must be refused while its agent is away"
    );
    assert_eq!(plaintext_into(&cluster, &db), plaintext_before);

    // The agent is back: the same pod starts (the runtime's retry), enrolled.
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.node.name() == "n1")
        .unwrap()
        .agent
        .restart()
        .unwrap();
    let late = cluster
        .run_sandbox("n1", "late", &uid)
        .unwrap_or_else(|e| panic!("the retried sandbox must start: {e:#}"));
    assert!(
        first_connection(&cluster, &late, &db),
        "late's first connection, after the agent is back"
    );
    assert!(first_connection(&cluster, &web, &db), "web again");

    // Uninstalled: the conflist is byte for byte what it was, and
    // containerd has loaded it.
    keeper.signal(Signal::SIGTERM).unwrap();
    let stopped = keeper.wait_with_deadline(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", keeper.output_report());
    remove_pod(&cluster, &late);
    remove_pod(&cluster, &web);
    cluster.api.delete("Pod", OTHER_NAMESPACE, "job");
    cluster
        .node("n1")
        .runtime
        .stop_and_remove_pod(&job.id)
        .unwrap();
    let said = cluster
        .uninstall_cni("n1")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(said.contains("as it was before"), "{said}");
    assert_eq!(std::fs::read(&conflist).unwrap(), original);
    assert!(
        !cluster
            .node("n1")
            .runtime
            .cni_bin_dir()
            .join("mesh-cni")
            .exists()
    );
}

/// Plaintext connections db's agent has seen (each one escaped a capture).
fn plaintext_into(cluster: &Cluster<'_>, db: &KubePod) -> usize {
    cluster
        .node("n2")
        .agent
        .connections()
        .unwrap()
        .iter()
        .filter(|r| r.direction == Direction::Inbound && r.original_dst.ip() == db.ip())
        .count()
}
