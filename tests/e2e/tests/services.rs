//! Services: applications dial a virtual IP; the agent picks an endpoint per
//! connection (power of two choices over open connections), prefers local ones
//! when asked, and fails fast when a service has none.

use std::time::Duration;

use mesh_e2e::{NodeAgent, pods_yaml};
use mesh_testbed::{Pod, Topology, e2e_enabled, traffic::TrafficServer};

/// `count` connections, one after the other, each an ECHO exchange with the
/// traffic server behind `vip:80`.
fn connections(client: &Pod, vip: &str, count: u32) -> anyhow::Result<()> {
    let script = format!(
        r#"
import socket
for i in range({count}):
    c = socket.create_connection(("{vip}", 80), timeout=5)
    c.sendall(b"ECHO\nhi\n")
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        k = c.recv(100)
        if not k:
            break
        got += k
    c.close()
    assert got == b"hi\n", got
print("ok")
"#
    );
    client
        .run("python3", &["-c", &script], Duration::from_secs(60))
        .map(|_| ())
}

const PORT: u16 = 7100;

#[test]
fn connections_to_a_service_vip_are_spread_over_its_endpoints() {
    if !e2e_enabled("connections_to_a_service_vip_are_spread_over_its_endpoints") {
        return;
    }
    let topo = Topology::builder("services")
        .node("n1", &["a", "b"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, b, c, d) = (topo.pod("a"), topo.pod("b"), topo.pod("c"), topo.pod("d"));
    let servers: Vec<TrafficServer> = [b, c, d]
        .iter()
        .map(|p| TrafficServer::start(p, PORT).unwrap())
        .collect();
    let endpoint = |p: &Pod| {
        format!(
            "      - {{name: {}, address: {}, node: {}}}\n",
            p.name(),
            p.ipv4(),
            p.node_name()
        )
    };
    let services = format!(
        "services:\n  - name: spread\n    namespace: default\n    vips: [10.96.0.10]\n    ports: [{{port: 80, targetPort: {PORT}}}]\n    locality: none\n    endpoints:\n{}{}{}  - name: local\n    namespace: default\n    vips: [10.96.0.11]\n    ports: [{{port: 80, targetPort: {PORT}}}]\n    locality: preferNode\n    endpoints:\n{}{}  - name: empty\n    namespace: default\n    vips: [10.96.0.12]\n    ports: [{{port: 80}}]\n",
        endpoint(b),
        endpoint(c),
        endpoint(d),
        endpoint(b),
        endpoint(c)
    );
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "",
        &[("services.yaml", services)],
    )
    .unwrap();

    let before: Vec<u64> = servers
        .iter()
        .map(|s| s.stats().unwrap().connections)
        .collect();
    connections(a, "10.96.0.10", 600).unwrap();
    // (`stats` itself is a connection to the server: the one that read `before`.)
    let served: Vec<u64> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.stats().unwrap().connections - b - 1)
        .collect();
    eprintln!("600 connections to the VIP, served by b, c, d: {served:?}");
    assert_eq!(served.iter().sum::<u64>(), 600);
    for (name, n) in ["b", "c", "d"].iter().zip(&served) {
        // Expected 200 each; 3 standard deviations of a fair split is about ±35.
        assert!(
            (160..=240).contains(n),
            "endpoint {name} served {n} of 600: {served:?}"
        );
    }

    // preferNode: the healthy endpoint on a's own node gets all of it.
    let before_b = servers[0].stats().unwrap().connections;
    connections(a, "10.96.0.11", 50).unwrap();
    assert_eq!(
        servers[0].stats().unwrap().connections - before_b - 1,
        50,
        "all to the same-node endpoint"
    );

    // No endpoint: the client is refused at once, and the agent says why.
    assert!(connections(a, "10.96.0.12", 1).is_err());
    mesh_testbed::wait_until(
        "the agent to report the empty service",
        Duration::from_secs(5),
        || Ok(agent.log().contains("no endpoint for the service")),
    )
    .unwrap();
}
