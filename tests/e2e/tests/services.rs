//! Services: applications dial a virtual IP; the agent picks an endpoint per
//! connection (power of two choices over open connections), prefers local ones
//! when asked, and fails fast when a service has none.

use std::time::Duration;

use mesh_e2e::{NodeAgent, pods_yaml};
use mesh_testbed::{Pod, Topology, e2e_enabled, traffic::TrafficServer};

/// `count` connections, one after the other, each an ECHO exchange with the
/// traffic server behind `vip:80`.
fn connections(client: &Pod, vip: &str, count: u32) -> anyhow::Result<()> {
    client
        .run_tool(
            &[
                "echo",
                vip,
                "80",
                "--line",
                "hi",
                "--shutdown",
                "--times",
                &count.to_string(),
            ],
            Duration::from_secs(60),
        )
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

/// `services.yaml` with one service at 10.96.0.20:80 over `endpoints`
/// (name, pod, version label), optionally split 95/5 by version.
fn split_service(endpoints: &[(&str, &Pod, &str)], split: bool) -> String {
    let mut yaml = format!(
        "services:\n  - name: canary\n    namespace: default\n    vips: [10.96.0.20]\n    ports: [{{port: 80, targetPort: {PORT}}}]\n    locality: none\n    endpoints:\n"
    );
    for (name, pod, version) in endpoints {
        yaml.push_str(&format!(
            "      - {{name: {name}, address: {}, node: {}, labels: {{version: {version}}}}}\n",
            pod.ipv4(),
            pod.node_name()
        ));
    }
    if split {
        yaml.push_str("    subsets:\n      - {name: stable, weight: 95, labels: {version: v1}}\n      - {name: canary, weight: 5, labels: {version: v2}}\n");
    }
    yaml
}

#[test]
fn a_95_5_split_is_honoured_and_endpoints_change_without_failures() {
    if !e2e_enabled("a_95_5_split_is_honoured_and_endpoints_change_without_failures") {
        return;
    }
    let topo = Topology::builder("canary")
        .node("n1", &["a", "b"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, b, c, d) = (topo.pod("a"), topo.pod("b"), topo.pod("c"), topo.pod("d"));
    let servers: Vec<TrafficServer> = [b, c, d]
        .iter()
        .map(|p| TrafficServer::start(p, PORT).unwrap())
        .collect();
    let count = |i: usize| servers[i].stats().unwrap().connections;
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "",
        &[(
            "services.yaml",
            split_service(&[("b", b, "v1"), ("c", c, "v1"), ("d", d, "v2")], true),
        )],
    )
    .unwrap();

    // 95/5 over 2,000 connections: the canary (d) gets 5% (100); four standard
    // deviations (~10 each) either way.
    let before: Vec<u64> = (0..3).map(count).collect();
    connections(a, "10.96.0.20", 2000).unwrap();
    let served: Vec<u64> = (0..3).map(|i| count(i) - before[i] - 1).collect();
    eprintln!("95/5 over 2000 connections, served by b, c (v1) and d (v2): {served:?}");
    assert_eq!(served.iter().sum::<u64>(), 2000);
    assert!(
        (60..=140).contains(&served[2]),
        "canary share {} of 2000",
        served[2]
    );

    // Endpoints change while a client keeps connecting: d removed, then b
    // removed and d back. No connection fails; a removed endpoint gets no new
    // connections. The client opens a connection every 2 ms, each an echo,
    // counting failures.
    let mut client = a
        .spawn_tool(&[
            "echo",
            "10.96.0.20",
            "80",
            "--line",
            "hi",
            "--shutdown",
            "--for-secs",
            "4",
            "--every-ms",
            "2",
            "--tally",
        ])
        .unwrap();
    mesh_testbed::wait_until("the client to start", Duration::from_secs(10), || {
        Ok(client.stdout_so_far().contains("started"))
    })
    .unwrap();
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file(
            "services.yaml",
            &split_service(&[("b", b, "v1"), ("c", c, "v1")], false),
        )
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    let d_after_removal = count(2);
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file(
            "services.yaml",
            &split_service(&[("c", c, "v1"), ("d", d, "v2")], false),
        )
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    let b_after_removal = count(0);
    let out = client.wait_with_deadline(Duration::from_secs(30)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().to_string();
    eprintln!("endpoints changing under traffic: {last}");
    assert!(
        last.starts_with("ok ") && last.ends_with(" failed 0"),
        "{stdout}"
    );
    // Removed endpoints got no new connections (each stats query adds one).
    assert!(
        count(0) <= b_after_removal + 2,
        "b got connections after its removal"
    );
    assert!(
        count(2) > d_after_removal + 1,
        "d got connections again after coming back"
    );
}
