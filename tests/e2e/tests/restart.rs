//! Restart without an outage: while clients keep making requests, the agent
//! of the client's node and then the agent of the server's node are
//! replaced, as a rolling update does (the new process starts next to the
//! old one, takes over its listeners, then the old one gets SIGTERM). Not a
//! request may fail.
//!
//! The mesh: client `a` and server `b` on n1, server `c` on n2, an agent on
//! each node, mTLS between them. Two `http-load` clients in `a`, one to `b`
//! (same node) and one to `c` (through the tunnel), each opening a new
//! connection per request, so connections are being made at every moment of
//! the handover.

use std::time::Duration;

use mesh_e2e::{
    NodeAgent,
    backend::HttpBackend,
    load::{Load, load},
    mesh::{TestCa, node_issuers, start_mesh},
};
use mesh_testbed::{Topology, e2e_enabled, wait_until};

const PORT: u16 = 8080;
/// Requests per second of each client.
const RATE: &str = "100";
/// Long enough for both replacements, which the test waits for by condition.
const LOAD_MS: &str = "20000";

fn opened(agent: &NodeAgent, reporter: &str) -> u64 {
    agent.metric_sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", reporter)],
    )
}

/// Replaces `agent` under traffic and waits until the new process has served
/// `at_least` new connections as `reporter`; the old one must drain and exit
/// cleanly on SIGTERM.
fn replace_under_traffic(agent: &mut NodeAgent, reporter: &str, at_least: u64) {
    let old = agent.replace().unwrap_or_else(|e| panic!("{e:#}"));
    wait_until(
        "the new agent to serve connections",
        Duration::from_secs(10),
        || Ok(opened(agent, reporter) >= at_least),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nnew agent log:\n{}", agent.log()));
    let old_log = old
        .stop(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        old_log.contains("listeners handed to a new agent"),
        "old agent log:\n{old_log}"
    );
    assert!(
        old_log.contains("drained: no connection in flight"),
        "the old agent finished what it had in flight:\n{old_log}"
    );
    assert!(
        agent.log().contains("taking over its listeners"),
        "new agent log:\n{}",
        agent.log()
    );
}

#[test]
fn agents_are_replaced_under_traffic_without_a_failed_request() {
    if !e2e_enabled("agents_are_replaced_under_traffic_without_a_failed_request") {
        return;
    }
    let topo = Topology::builder("restart")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let mut agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _b = HttpBackend::start(topo.pod("b"), PORT, "b").unwrap();
    let _c = HttpBackend::start(topo.pod("c"), PORT, "c").unwrap();
    let a = topo.pod("a");
    let args = [
        "--new-connection-per-request",
        "--rate",
        RATE,
        "--duration-ms",
        LOAD_MS,
        "--connections",
        "4",
    ];
    let local_url = format!("http://{}:{PORT}/", topo.pod("b").ipv4());
    let remote_url = format!("http://{}:{PORT}/", topo.pod("c").ipv4());

    let (local, remote) = std::thread::scope(|s| {
        let local = s.spawn(|| load(a, &local_url, &args));
        let remote = s.spawn(|| load(a, &remote_url, &args));
        let (n1, rest) = agents.split_at_mut(1);
        let (n1, n2) = (&mut n1[0], &mut rest[0]);
        // Traffic flows through both agents before anything is replaced.
        wait_until("traffic through n1", Duration::from_secs(10), || {
            Ok(opened(n1, "source") >= 100)
        })
        .unwrap();
        wait_until("traffic through n2", Duration::from_secs(10), || {
            Ok(opened(n2, "destination") >= 50)
        })
        .unwrap_or_else(|e| panic!("{e:#}: {}", n2.get("/metrics").unwrap().1));
        // The client's node: outbound capture, local delivery, tunnel client.
        replace_under_traffic(n1, "source", 100);
        // The server's node: tunnel server, delivery to `c`.
        replace_under_traffic(n2, "destination", 50);
        (local.join().unwrap(), remote.join().unwrap())
    });
    report("same node", &local);
    report("across nodes", &remote);
    for (what, load) in [("same node", &local), ("across nodes", &remote)] {
        assert!(load.requests() >= 1000, "{what}: {load}");
        assert!(load.all_ok(), "{what}: a request failed: {load}");
    }
}

fn report(what: &str, load: &Load) {
    eprintln!("{what}: {load}");
}
