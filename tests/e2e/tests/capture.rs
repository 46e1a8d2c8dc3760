//! Transparent capture: every TCP connection of an enrolled pod goes through the
//! agent, in and out, and still behaves like a direct connection. Real kernel
//! programs, real processes, real sockets.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::{NodeAgent, pod_yaml, pods_yaml, traffic_servers, two_nodes};
use mesh_testbed::{
    Pod, Topology, e2e_enabled,
    traffic::{
        TrafficServer, bulk_big_both_ways, bulk_download, bulk_upload, client_reset,
        concurrent_echo, expect_reset, getpeername_after_connect, half_close, many_small_writes,
        peer_seen_by_server, server_first,
    },
    wait_until,
};

const PORT: u16 = 7100;
const MIB: u64 = 1 << 20;
/// Where an agent delivers connections inside a pod from (see mesh_common).
const AGENT_SOURCE_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));

fn ips(pod: &Pod) -> [IpAddr; 2] {
    [IpAddr::V4(pod.ipv4()), IpAddr::V6(pod.ipv6())]
}

#[test]
fn outbound_connections_are_captured_with_their_destination_and_delivered_intact() {
    if !e2e_enabled("outbound_connections_are_captured_with_their_destination_and_delivered_intact")
    {
        return;
    }
    let topo = two_nodes("outbound");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _servers = traffic_servers(&[b, c], PORT);
    let agent1 = NodeAgent::enrolling(&topo, topo.node("n1"), &[a, b]).unwrap();
    let agent2 = NodeAgent::enrolling(&topo, topo.node("n2"), &[c]).unwrap();

    let mut app_connections = 0;
    for (target, same_node) in [(b, true), (c, false)] {
        for ip in ips(target) {
            let dst = SocketAddr::new(ip, PORT);
            bulk_upload(a, ip, PORT, 8 * MIB).unwrap();
            bulk_download(a, ip, PORT, 8 * MIB, 42).unwrap();
            // The application still sees the address it dialled.
            assert_eq!(
                getpeername_after_connect(a, ip, PORT).unwrap(),
                dst,
                "getpeername"
            );
            // The server sees a's own address, same node and across nodes:
            // the agent delivers from the client's address.
            let a_ip = if ip.is_ipv4() {
                IpAddr::V4(a.ipv4())
            } else {
                IpAddr::V6(a.ipv6())
            };
            assert_eq!(peer_seen_by_server(a, ip, PORT).unwrap().ip(), a_ip);
            app_connections += 4;

            // The agent of the source node saw it, with the right destination
            // and source pod (from kernel state, not from an address).
            let seen = agent1
                .wait_for_connection(&format!("an outbound record for {dst}"), |r| {
                    r.direction == Direction::Outbound
                        && r.original_dst == dst
                        && r.pod == "default/a"
                })
                .unwrap();
            let expected_upstream = if same_node {
                "pod:default/b".to_string()
            } else {
                "direct".to_string()
            };
            assert_eq!(seen.upstream, expected_upstream, "{seen:?}");
            if !same_node {
                // Across nodes, the destination's agent captured it inbound too,
                // coming from a's own address.
                let inbound = agent2
                    .wait_for_connection(&format!("an inbound record for {dst}"), |r| {
                        r.direction == Direction::Inbound && r.original_dst == dst
                    })
                    .unwrap();
                assert_eq!(inbound.pod, "default/c");
                assert_eq!(inbound.client.ip(), a_ip, "{inbound:?}");
            }
        }
    }
    // Exactly the application's connections were captured: the agent's own
    // upstream connections (made from a's namespace) were not.
    let counters = agent1.counters(a).unwrap();
    assert_eq!(counters.captured_outbound, app_connections, "{counters:?}");
    assert_eq!(
        counters.connect4 + counters.connect6,
        app_connections,
        "{counters:?}"
    );
    assert_eq!(
        counters.refused_agent_absent + counters.refused_map_full,
        0,
        "{counters:?}"
    );
    let records = agent1.connections().unwrap();
    let bulk = records
        .iter()
        .find(|r| r.bytes_sent >= 8 * MIB)
        .expect("an upload record");
    assert!(bulk.outcome == "closed", "{bulk:?}");
}

#[test]
fn the_proxied_path_keeps_tcp_semantics() {
    if !e2e_enabled("the_proxied_path_keeps_tcp_semantics") {
        return;
    }
    let topo = two_nodes("semantics");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let servers = traffic_servers(&[b, c], PORT);
    let agent1 = NodeAgent::enrolling(&topo, topo.node("n1"), &[a, b]).unwrap();
    let agent2 = NodeAgent::enrolling(&topo, topo.node("n2"), &[c]).unwrap();

    for (server, target) in servers.iter().zip([b, c]) {
        let ip = IpAddr::V4(target.ipv4());
        half_close(a, ip, PORT).unwrap();
        server_first(a, ip, server.banner_port()).unwrap();
        // A reset by the server reaches the client as a reset...
        expect_reset(a, ip, PORT).unwrap();
        // ...and a reset by the client reaches the server as one.
        let tag = client_reset(a, ip, PORT).unwrap();
        server
            .wait_for_client_reset(&tag, Duration::from_secs(10))
            .unwrap();
        many_small_writes(a, ip, PORT, 10_000).unwrap();
    }
    // Thousands at once, and a large transfer both ways with checksums, across
    // nodes (two agents on the path).
    concurrent_echo(a, IpAddr::V4(c.ipv4()), PORT, 2000, 1024).unwrap();
    assert!(servers[1].stats().unwrap().max_active >= 2000);
    // BIG_BULK_BYTES (300 MiB) each way.
    bulk_big_both_ways(a, IpAddr::V4(c.ipv4()), PORT).unwrap();
    // All of it went through the agents: 5 checks per target (the reset
    // check counts one connection each side), 10k writes on one connection,
    // 2000 concurrent connections (+1 stats query, not captured: it comes from
    // the test process), 2 bulk connections.
    let a_out = agent1.counters(a).unwrap().captured_outbound;
    assert!(
        a_out >= 2 * 5 + 2000 + 2,
        "only {a_out} connections of a were captured"
    );
    let c_in = agent2.counters(c).unwrap().captured_inbound;
    assert!(
        c_in >= 5 + 2000 + 2,
        "only {c_in} connections into c were captured"
    );
}

#[test]
fn inbound_connections_from_outside_the_mesh_are_captured() {
    if !e2e_enabled("inbound_connections_from_outside_the_mesh_are_captured") {
        return;
    }
    let topo = Topology::builder("inbound")
        .node("n1", &["a", "outsider"])
        .node("n2", &["far"])
        .build()
        .unwrap();
    let (a, outsider, far) = (topo.pod("a"), topo.pod("outsider"), topo.pod("far"));
    let _server = TrafficServer::start(a, PORT).unwrap();
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();

    // A pod on the same node that is not enrolled, and one on another node.
    for client in [outsider, far] {
        for ip in ips(a) {
            bulk_upload(client, ip, PORT, 4 * MIB).unwrap();
            let client_ip = if ip.is_ipv4() {
                IpAddr::V4(client.ipv4())
            } else {
                IpAddr::V6(client.ipv6())
            };
            // The server sees the client's own address (delivered from it).
            let peer = peer_seen_by_server(client, ip, PORT).unwrap();
            assert_eq!(peer.ip(), client_ip, "server saw {peer}");
            let seen = agent
                .wait_for_connection(&format!("inbound from {}", client.name()), |r| {
                    r.direction == Direction::Inbound
                        && r.client.ip() == client_ip
                        && r.original_dst.ip() == ip
                })
                .unwrap();
            assert_eq!(seen.pod, "default/a");
        }
    }
    // The node itself.
    let node = topo.node("n1");
    let dst = SocketAddr::new(IpAddr::V4(a.ipv4()), PORT);
    let echoed = node.in_netns(move || echo_once(dst));
    assert_eq!(echoed.unwrap(), b"ECHO\nfrom the node\n"[5..].to_vec());
    let bridge = IpAddr::V4(node.bridge_ipv4());
    agent
        .wait_for_connection("inbound from the node", |r| {
            r.direction == Direction::Inbound && r.client.ip() == bridge
        })
        .unwrap();
    let counters = agent.counters(a).unwrap();
    assert_eq!(
        counters.captured_inbound, 9,
        "4 uploads + 4 peer checks + 1 from the node: {counters:?}"
    );
}

/// The agent's address as a server in a pod sees it when the client's
/// cannot be used (see mesh_common).
const AGENT_SOURCE_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

#[test]
fn ip_policies_decide_by_the_preserved_client_address_and_a_marking_server_gets_the_agents() {
    if !e2e_enabled(
        "ip_policies_decide_by_the_preserved_client_address_and_a_marking_server_gets_the_agents",
    ) {
        return;
    }
    let topo = Topology::builder("srcaddr")
        .node("n1", &["a", "outsider"])
        .node("n2", &["far"])
        .build()
        .unwrap();
    let (a, outsider, far) = (topo.pod("a"), topo.pod("outsider"), topo.pod("far"));
    const MARKED: u16 = 7500;
    let _servers = [
        TrafficServer::start(a, PORT).unwrap(),
        TrafficServer::start_marked(a, MARKED, 0x1234).unwrap(),
    ];
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();
    let generation = agent.status().unwrap().config_generation;
    let deny_outsider_v4 = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-outsider\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n    to:\n    - operation:\n        ports: [\"{PORT}\"]\n",
        outsider.ipv4()
    );
    agent
        .write_file("policies/no-outsider.yaml", &deny_outsider_v4)
        .unwrap();
    agent.wait_generation_after(generation).unwrap();

    // The policy sees the real client, and so does the server.
    let a_v4 = IpAddr::V4(a.ipv4());
    assert!(
        peer_seen_by_server(outsider, a_v4, PORT).is_err(),
        "outsider's IPv4 address is denied"
    );
    assert_eq!(
        peer_seen_by_server(outsider, a.ipv6(), PORT).unwrap().ip(),
        IpAddr::V6(outsider.ipv6())
    );
    assert_eq!(
        peer_seen_by_server(far, a_v4, PORT).unwrap().ip(),
        IpAddr::V4(far.ipv4())
    );

    // A server that marks its listener routes its replies by its own mark,
    // so a delivery from the client's address gets no answer: it is made
    // from the agent's address instead, and counted.
    for (ip, agent_source) in [
        (a_v4, AGENT_SOURCE_V4),
        (IpAddr::V6(a.ipv6()), AGENT_SOURCE_V6),
    ] {
        assert_eq!(
            peer_seen_by_server(far, ip, MARKED).unwrap().ip(),
            agent_source
        );
    }
    let status = agent.status().unwrap();
    let view = status
        .pods
        .iter()
        .find(|p| p.name == "a")
        .and_then(|p| p.source_address.clone())
        .unwrap();
    assert!(view.preserved, "{view:?}");
    assert_eq!(view.fallbacks["no_answer"], 2, "{view:?}");
    assert_eq!(
        agent.metric_sum(
            "mesh_pod_deliveries_from_agent_address_total",
            &[("pod", "a"), ("reason", "no_answer")]
        ),
        2
    );
    // Other ports of the pod still get the client's address.
    assert_eq!(
        peer_seen_by_server(far, a.ipv6(), PORT).unwrap().ip(),
        IpAddr::V6(far.ipv6())
    );
}

/// One ECHO exchange with the traffic server, from the calling thread.
fn echo_once(dst: SocketAddr) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ECHO\nfrom the node\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn exclusions_in_pod_loopback_and_excluded_ports_and_cidrs_are_not_captured() {
    if !e2e_enabled("exclusions_in_pod_loopback_and_excluded_ports_and_cidrs_are_not_captured") {
        return;
    }
    let topo = Topology::builder("exclusions")
        .node("n1", &["a", "b", "d"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c, d) = (topo.pod("a"), topo.pod("b"), topo.pod("c"), topo.pod("d"));
    let _servers = [
        TrafficServer::start(b, PORT).unwrap(),
        TrafficServer::start(b, 7200).unwrap(),
        TrafficServer::start(c, PORT).unwrap(),
        TrafficServer::start(a, 7300).unwrap(),
        TrafficServer::start(a, 7400).unwrap(),
    ];
    let a_entry = pod_yaml(
        a,
        &format!(
            "    captureExclusions:\n      outboundPorts: [7200]\n      outboundCidrs: [\"{}/32\"]\n      inboundPorts: [7300]\n",
            c.ipv4()
        ),
    );
    // Only a is enrolled: b, c and d are outside the mesh.
    let agent = NodeAgent::start(&topo, topo.node("n1"), &format!("pods:\n{a_entry}"), "").unwrap();
    let outbound_records = || {
        agent
            .connections()
            .unwrap()
            .into_iter()
            .filter(|r| r.direction == Direction::Outbound)
            .map(|r| r.original_dst)
            .collect::<Vec<_>>()
    };
    let b_ip = IpAddr::V4(b.ipv4());

    // Not excluded: captured (the agent records it).
    peer_seen_by_server(a, b_ip, PORT).unwrap();
    agent
        .wait_for_connection("a -> b captured", |r| {
            r.original_dst == SocketAddr::new(b_ip, PORT)
        })
        .unwrap();
    // Excluded destination port, excluded destination CIDR: never reach the agent.
    assert_eq!(
        peer_seen_by_server(a, b_ip, 7200).unwrap().ip(),
        IpAddr::V4(a.ipv4())
    );
    assert_eq!(
        peer_seen_by_server(a, c.ipv4(), PORT).unwrap().ip(),
        IpAddr::V4(a.ipv4())
    );
    // In-pod loopback is the pod's own business.
    assert!(
        peer_seen_by_server(a, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7400)
            .unwrap()
            .ip()
            .is_loopback()
    );
    assert_eq!(
        outbound_records(),
        vec![SocketAddr::new(b_ip, PORT)],
        "only the non-excluded connection"
    );
    // Excluded inbound port of a: d reaches it directly; other ports are captured.
    assert_eq!(
        peer_seen_by_server(d, a.ipv4(), 7300).unwrap().ip(),
        IpAddr::V4(d.ipv4())
    );
    // Captured (counted below), and delivered from d's own address.
    assert_eq!(
        peer_seen_by_server(d, a.ipv4(), 7400).unwrap().ip(),
        IpAddr::V4(d.ipv4())
    );

    let counters = agent.counters(a).unwrap();
    assert_eq!(counters.captured_outbound, 1, "{counters:?}");
    assert_eq!(
        counters.excluded, 3,
        "port, CIDR, inbound port: {counters:?}"
    );
    assert_eq!(counters.captured_inbound, 1, "{counters:?}");
    assert_eq!(
        counters.connect4, 4,
        "every connect is seen, captured or not: {counters:?}"
    );
}

#[test]
fn pods_are_enrolled_and_released_at_run_time_without_disturbing_others() {
    if !e2e_enabled("pods_are_enrolled_and_released_at_run_time_without_disturbing_others") {
        return;
    }
    let topo = two_nodes("runtime");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();
    // A connection of a that stays open (and busy) across both changes.
    let long_lived = start_long_lived_echo(a, c.ipv4().into(), PORT, Duration::from_secs(4));

    let b_captured =
        || peer_seen_by_server(b, c.ipv4(), PORT).unwrap().ip() != IpAddr::V4(b.ipv4());
    assert!(!b_captured(), "b is not enrolled yet");

    let changed = Instant::now();
    agent.write_pods(&pods_yaml(&[a, b])).unwrap();
    wait_until("b to be enrolled", Duration::from_secs(1), || {
        Ok(agent
            .status()?
            .pods
            .iter()
            .any(|p| p.name == "b" && p.enrolled))
    })
    .unwrap();
    eprintln!("b enrolled {:?} after the file changed", changed.elapsed());
    // c's traffic server sees the connection arriving from b's own address in
    // both cases (b leaves from its namespace); the agent's record tells.
    let _ = b_captured();
    agent
        .wait_for_connection("b's connection captured", |r| {
            r.pod == "default/b" && r.direction == Direction::Outbound
        })
        .unwrap();

    let changed = Instant::now();
    agent.write_pods(&pods_yaml(&[a])).unwrap();
    wait_until("b to be released", Duration::from_secs(1), || {
        Ok(agent.status()?.pods.iter().all(|p| p.name != "b"))
    })
    .unwrap();
    eprintln!("b released {:?} after the file changed", changed.elapsed());
    let before = agent
        .connections()
        .unwrap()
        .iter()
        .filter(|r| r.pod == "default/b")
        .count();
    peer_seen_by_server(b, c.ipv4(), PORT).unwrap();
    let after = agent
        .connections()
        .unwrap()
        .iter()
        .filter(|r| r.pod == "default/b")
        .count();
    assert_eq!(
        before, after,
        "b's traffic no longer goes through the agent"
    );

    let mut long_lived = long_lived.unwrap();
    let out = long_lived
        .wait_with_deadline(Duration::from_secs(20))
        .unwrap();
    assert!(
        out.status.success(),
        "the open connection of a was disturbed: {}",
        long_lived.output_report()
    );
}

/// A connection from `pod` that exchanges a line every 20 ms for `duration`;
/// the process exits 0 only if every exchange succeeded.
fn start_long_lived_echo(
    pod: &Pod,
    ip: IpAddr,
    port: u16,
    duration: Duration,
) -> anyhow::Result<mesh_testbed::Process> {
    pod.spawn_tool(&[
        "chat",
        &ip.to_string(),
        &port.to_string(),
        "--every-ms",
        "20",
        "--for-secs",
        &duration.as_secs_f64().to_string(),
    ])
}

#[test]
fn capture_needs_no_iptables_or_nftables_rule_in_any_namespace() {
    if !e2e_enabled("capture_needs_no_iptables_or_nftables_rule_in_any_namespace") {
        return;
    }
    let topo = two_nodes("norules");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _servers = traffic_servers(&[b, c], PORT);
    let agent1 = NodeAgent::enrolling(&topo, topo.node("n1"), &[a, b]).unwrap();
    let agent2 = NodeAgent::enrolling(&topo, topo.node("n2"), &[c]).unwrap();

    // Capture is working, in and out, on both nodes...
    bulk_upload(a, IpAddr::V4(b.ipv4()), PORT, MIB).unwrap();
    bulk_upload(a, IpAddr::V6(c.ipv6()), PORT, MIB).unwrap();
    assert_eq!(agent1.counters(a).unwrap().captured_outbound, 2);
    assert_eq!(agent2.counters(c).unwrap().captured_inbound, 1);
    // ...and no namespace of the topology (fabric, nodes, pods) holds a single
    // nftables or iptables table, let alone a rule.
    mesh_testbed::netfilter::assert_no_packet_filter_rules(&topo).unwrap();
}

#[test]
fn a_bad_pods_file_is_rejected_and_the_last_good_config_keeps_capturing() {
    if !e2e_enabled("a_bad_pods_file_is_rejected_and_the_last_good_config_keeps_capturing") {
        return;
    }
    let topo = Topology::builder("badfile")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();

    // A typo in a field name: rejected, with file, line and field.
    let bad = pods_yaml(&[a]).replace("    cgroup:", "    cgruop:");
    agent.write_pods(&bad).unwrap();
    let mut error = String::new();
    wait_until("the reload to be rejected", Duration::from_secs(5), || {
        error = agent.status()?.last_reload_error.unwrap_or_default();
        Ok(!error.is_empty())
    })
    .unwrap();
    assert!(
        error.contains("pods.yaml:9") && error.contains("cgruop"),
        "{error}"
    );
    // Still enrolled, still captured.
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, MIB).unwrap();
    assert_eq!(agent.counters(a).unwrap().captured_outbound, 1);
    assert_eq!(agent.status().unwrap().config_generation, 1);

    // Fixed again: accepted, error cleared.
    agent.write_pods(&pods_yaml(&[a])).unwrap();
    wait_until(
        "the fixed file to be accepted",
        Duration::from_secs(5),
        || Ok(agent.status()?.last_reload_error.is_none()),
    )
    .unwrap();
}
