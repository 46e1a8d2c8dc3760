//! Kubernetes mode end to end, with a MODEL of the API server: pods are
//! real pod sandboxes made through a real containerd's CRI API (runc, the
//! CNI plugins), as the kubelet makes them; their Pod objects (and the
//! namespace, Service and EndpointSlice) are served by the stand-in API
//! server (`mesh_testbed::kube_api`, the API's list/watch protocol over HTTP,
//! on the test bed's control-plane address; not a real API server, none can
//! be installed here). The agents run with `discovery: kubernetes` and no
//! pods.yaml: they find, enrol and capture the pods themselves.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::{agent::NodeAgent, kube::*};
use mesh_testbed::{Process, Topology, cri::cri_enabled, wait_until};

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
