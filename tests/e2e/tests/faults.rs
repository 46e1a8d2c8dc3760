//! Faults under open connections: a pod's network namespace deleted, and
//! certificates expiring. The agent must not panic (every NodeAgent fails
//! its test if the log shows one), other pods carry on, and what the agent
//! holds of a gone pod is let go.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use mesh_e2e::{
    NodeAgent,
    echo::{assert_still_going, echo_once, start_chatty_connection},
    mesh::{TestCa, pod_identity, workloads_yaml},
    pods_yaml,
};
use mesh_testbed::{Node, Pod, Topology, e2e_enabled, traffic::TrafficServer, wait_until};

const PORT: u16 = 7400;

/// Whether the node-side end of a pod's veth (`p<k>`, k counting the node's
/// pods from 1) is still there: it goes when the pod's namespace is freed.
fn node_veth_exists(node: &Node, k: usize) -> bool {
    node.run(
        "ip",
        &["link", "show", &format!("p{k}")],
        Duration::from_secs(5),
    )
    .is_ok()
}

/// What happens when a pod goes away under the agent: its namespace is
/// deleted while the pod has a connection open through the agent, then its
/// processes end, then it leaves pods.yaml. Other pods must not notice, and
/// once the pod is gone from the config the agent must hold nothing of its
/// namespace: the namespace is freed (its veth disappears).
#[test]
fn a_pod_namespace_deleted_under_open_connections_is_let_go() {
    if !e2e_enabled("a_pod_namespace_deleted_under_open_connections_is_let_go") {
        return;
    }
    let topo = Topology::builder("netnsgone")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let n1 = topo.node("n1");
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::start(&topo, n1, &pods_yaml(&[a, b]), "").unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    let mut a_chatty = start_chatty_connection(a, c_ip, PORT);
    let mut b_chatty = start_chatty_connection(b, c_ip, PORT);
    let outbound = [("direction", "outbound")];
    wait_until(
        "both connections in the agent",
        Duration::from_secs(10),
        || Ok(agent.metric_sum("mesh_proxy_active_connections", &outbound) == 2),
    )
    .unwrap();
    assert!(node_veth_exists(n1, 1), "a's veth is there to begin with");

    // The namespace goes (as the runtime removes it), then a's process.
    n1.run(
        "ip",
        &["netns", "del", a.netns_name()],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!a.netns_path().exists());
    a_chatty.kill();
    wait_until("a's connection closed", Duration::from_secs(10), || {
        Ok(agent.metric_sum("mesh_proxy_active_connections", &outbound) == 1)
    })
    .unwrap();
    assert_still_going(&mut b_chatty, "b's connection");
    echo_once(b, c_ip, PORT).unwrap();

    // a leaves the config: the agent lets go of its namespace.
    let generation = agent.status().unwrap().config_generation;
    agent.write_pods(&pods_yaml(&[b])).unwrap();
    agent.wait_generation_after(generation).unwrap();
    wait_until(
        "a's namespace freed (its veth gone)",
        Duration::from_secs(20),
        || Ok(!node_veth_exists(n1, 1)),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: the agent still holds a's namespace\n{}",
            agent.log()
        )
    });
    assert_still_going(&mut b_chatty, "b's connection");
    echo_once(b, c_ip, PORT).unwrap();
    assert!(agent.status().unwrap().pods.iter().all(|p| p.enrolled));
}

/// Writes `<namespace>.<serviceAccount>.crt/.key` for `pod` into `dir`, valid
/// until `not_after`.
fn install_certificate(ca: &TestCa, dir: &Path, pod: &Pod, not_after: SystemTime) {
    let (chain, key) = ca
        .ca
        .issue(
            &pod_identity(pod),
            SystemTime::now() - Duration::from_secs(3600),
            not_after,
        )
        .unwrap();
    let stem = format!("default.{}", pod.name());
    // Key first, each by rename: the agent never reads half a file.
    for (ext, content) in [("key", key), ("crt", chain)] {
        let tmp = dir.join(format!(".{stem}.{ext}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
    }
}

/// A workload certificate expires, not renewed, while the pod has a
/// connection open across nodes. The open connection carries on (TLS checks
/// certificates when a connection is made), new connections fail (the
/// pooled tunnel connection takes no new stream past the expiry, and a new
/// one is refused by the peer, counted as `expired`), and once a valid
/// certificate appears new connections work again.
#[test]
fn a_certificate_expiring_under_an_open_connection() {
    if !e2e_enabled("a_certificate_expiring_under_an_open_connection") {
        return;
    }
    let topo = Topology::builder("certexpiry")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let ca = TestCa::new(&topo, "expiry").unwrap();
    let hour = Duration::from_secs(3600);
    let expires = SystemTime::now() + Duration::from_secs(12);
    let mut agents = Vec::new();
    for (node, pod, other, not_after) in [
        (topo.node("n1"), a, c, expires),
        (topo.node("n2"), c, a, SystemTime::now() + hour),
    ] {
        let certs = topo.tmp_dir().join(format!("certs-{}", node.name()));
        std::fs::create_dir_all(&certs).unwrap();
        install_certificate(&ca, &certs, pod, not_after);
        let identity = format!(
            "identity:\n  files: {{dir: {}, trustBundle: {}}}\n",
            certs.display(),
            ca.cert_path().display()
        );
        agents.push(
            NodeAgent::start_with(
                &topo,
                node,
                &pods_yaml(&[pod]),
                &identity,
                &[("workloads.yaml", workloads_yaml(&[other], None))],
            )
            .unwrap(),
        );
    }
    let c_ip = IpAddr::V4(c.ipv4());
    echo_once(a, c_ip, PORT).unwrap();
    let mut chatty = start_chatty_connection(a, c_ip, PORT);

    // Past the expiry.
    let now = SystemTime::now();
    std::thread::sleep(
        expires
            .duration_since(now)
            .unwrap_or_default()
            .saturating_add(Duration::from_secs(1)),
    );
    let expired = [("reason", "expired")];
    let rejected_before = agents[1].metric_sum("mesh_tunnel_rejections_total", &expired);
    assert!(
        echo_once(a, c_ip, PORT).is_err(),
        "a new connection with an expired certificate must fail"
    );
    wait_until(
        "the peer's rejection counted",
        Duration::from_secs(10),
        || Ok(agents[1].metric_sum("mesh_tunnel_rejections_total", &expired) > rejected_before),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}",
            agents[1]
                .get("/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default()
        )
    });
    assert_still_going(&mut chatty, "the connection opened before the expiry");

    // A valid certificate appears: new connections work again.
    let certs = topo.tmp_dir().join("certs-n1");
    install_certificate(&ca, &certs, a, SystemTime::now() + hour);
    wait_until(
        "connections with the new certificate",
        Duration::from_secs(30),
        || Ok(echo_once(a, c_ip, PORT).is_ok()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log()));
    assert_still_going(&mut chatty, "the connection opened before the expiry");
}
