//! What enrolled pods get when the agent is not there, or its map is full:
//! fail-closed, fast, counted — never a silent bypass. And a restarted agent
//! takes over.

use std::{net::IpAddr, time::Duration};

use mesh_e2e::{
    NodeAgent,
    echo::{echo_once, start_chatty_connection},
    mesh::{TestCa, node_issuers, start_mesh},
    pods_yaml,
};
use mesh_testbed::{
    Pod, Process, Topology, e2e_enabled,
    traffic::{ConnectOutcome, TrafficServer, bulk_upload, connect_result, peer_seen_by_server},
    wait_until,
};
use nix::sys::signal::Signal;

const PORT: u16 = 7100;

/// Holds `count` connections to `ip:port` open for `secs`, each sent `ECHO`;
/// returns once all are connected (the holder prints `opened ...`).
fn hold_connections(pod: &Pod, ip: IpAddr, count: u32, secs: u32) -> Process {
    let holder = pod
        .spawn_tool(&[
            "hold",
            &ip.to_string(),
            &PORT.to_string(),
            "--count",
            &count.to_string(),
            "--echo",
            "--then-secs",
            &secs.to_string(),
        ])
        .unwrap();
    wait_until("the holder's connections", Duration::from_secs(10), || {
        Ok(holder.stdout_so_far().contains("opened"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", holder.output_report()));
    holder
}

#[test]
fn a_stopped_agent_means_refused_connections_and_a_restarted_one_serves_again() {
    if !e2e_enabled("a_stopped_agent_means_refused_connections_and_a_restarted_one_serves_again") {
        return;
    }
    let topo = Topology::builder("stopped")
        .node("n1", &["a", "outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, outsider, c) = (topo.pod("a"), topo.pod("outsider"), topo.pod("c"));
    let _servers = [
        TrafficServer::start(a, PORT).unwrap(),
        TrafficServer::start(c, PORT).unwrap(),
    ];
    let mut agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    let a_ip = IpAddr::V4(a.ipv4());
    assert_eq!(
        connect_result(a, c_ip, PORT).unwrap(),
        ConnectOutcome::Connected
    );
    let chatty = start_chatty_connection(a, c_ip, PORT);

    agent.stop(Signal::SIGTERM).unwrap();
    // Open connections went with the agent (documented: no drain yet).
    let mut chatty = chatty;
    let out = chatty.wait_with_deadline(Duration::from_secs(10)).unwrap();
    assert!(
        !out.status.success(),
        "the proxied connection ended when the agent stopped"
    );
    // New connections fail at once, both ways, instead of bypassing the agent.
    assert_eq!(
        connect_result(a, c_ip, PORT).unwrap(),
        ConnectOutcome::PermissionDenied,
        "outbound"
    );
    assert_eq!(
        connect_result(a, IpAddr::V6(c.ipv6()), PORT).unwrap(),
        ConnectOutcome::PermissionDenied
    );
    let inbound = connect_result(outsider, a_ip, PORT).unwrap();
    assert!(
        matches!(inbound, ConnectOutcome::Refused | ConnectOutcome::Reset),
        "inbound: {inbound:?}"
    );

    agent.restart().unwrap();
    // The kernel counted the refusals while no agent ran, and the new agent
    // took over the same counters.
    let counters = agent.counters(a).unwrap();
    assert_eq!(counters.refused_agent_absent, 3, "{counters:?}");
    bulk_upload(a, c_ip, PORT, 1 << 20).unwrap();
    bulk_upload(outsider, a_ip, PORT, 1 << 20).unwrap();
    let status = agent.status().unwrap();
    // One pod: each program attached once.
    assert_eq!(
        status.attachments,
        status.programs.len(),
        "one set of programs, not two: {status:?}"
    );
}

#[test]
fn a_killed_agent_leaves_pods_captured_and_a_restart_recovers() {
    if !e2e_enabled("a_killed_agent_leaves_pods_captured_and_a_restart_recovers") {
        return;
    }
    let topo = Topology::builder("killed")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let mut agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[a]).unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    let mut chatty = start_chatty_connection(a, c_ip, PORT);

    agent.kill().unwrap();
    let out = chatty.wait_with_deadline(Duration::from_secs(10)).unwrap();
    assert!(
        !out.status.success(),
        "a connection in flight breaks with a killed agent"
    );
    assert_eq!(
        connect_result(a, c_ip, PORT).unwrap(),
        ConnectOutcome::PermissionDenied
    );

    agent.restart().unwrap();
    bulk_upload(a, c_ip, PORT, 1 << 20).unwrap();
    let counters = agent.counters(a).unwrap();
    assert!(counters.refused_agent_absent >= 1, "{counters:?}");
    assert!(counters.captured_outbound >= 2, "{counters:?}");
}

#[test]
fn a_full_connection_map_refuses_new_connections_and_counts_them() {
    if !e2e_enabled("a_full_connection_map_refuses_new_connections_and_counts_them") {
        return;
    }
    let topo = Topology::builder("mapfull")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::start(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "maxConnections: 4\n",
    )
    .unwrap();
    let c_ip = IpAddr::V4(c.ipv4());

    let mut holder = hold_connections(a, c_ip, 4, 30);
    assert_eq!(
        connect_result(a, c_ip, PORT).unwrap(),
        ConnectOutcome::PermissionDenied
    );
    let counters = agent.counters(a).unwrap();
    assert_eq!(
        (counters.refused_map_full, counters.captured_outbound),
        (1, 4),
        "{counters:?}"
    );
    // Operators see it coming: the map's occupancy is exposed.
    let pending = [("map", "MESH_PENDING")];
    assert_eq!(agent.metric_sum("mesh_bpf_map_capacity", &pending), 4);
    assert_eq!(agent.metric_sum("mesh_bpf_map_entries", &pending), 4);

    holder.kill();
    wait_until(
        "room in the connection map again",
        Duration::from_secs(10),
        || Ok(connect_result(a, c_ip, PORT)? == ConnectOutcome::Connected),
    )
    .unwrap();
    wait_until("an empty connection map", Duration::from_secs(10), || {
        Ok(agent.metric_sum("mesh_bpf_map_entries", &pending) == 0)
    })
    .unwrap();
}

/// A second agent on the node takes over from the first (tests/restart.rs).
/// One that cannot reach the first (another network namespace, so no
/// handover socket) but shares its pinned state must not touch it.
#[test]
fn a_second_agent_on_the_same_pinned_state_that_cannot_take_over_refuses_to_start() {
    if !e2e_enabled(
        "a_second_agent_on_the_same_pinned_state_that_cannot_take_over_refuses_to_start",
    ) {
        return;
    }
    let topo = Topology::builder("second")
        .node("n1", &["a"])
        .node("n2", &[])
        .build()
        .unwrap();
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[topo.pod("a")]).unwrap();
    let config = agent.config_dir().to_str().unwrap().to_string();
    let err = topo
        .node("n2")
        .run(
            mesh_e2e::agent_binary(),
            &["run", "--config", &config],
            Duration::from_secs(10),
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("another agent is running"),
        "{err:#}"
    );
    // The first one is unharmed.
    assert!(agent.status().unwrap().pods.iter().all(|p| p.enrolled));
}

#[test]
fn a_pods_connection_limit_resets_new_connections_and_spares_open_ones() {
    if !e2e_enabled("a_pods_connection_limit_resets_new_connections_and_spares_open_ones") {
        return;
    }
    let topo = Topology::builder("podlimit")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::start(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a, b]),
        "limits: {connectionsPerPod: 4}\n",
    )
    .unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    // Four of a's connections open: three idle, one busy.
    let mut holder = hold_connections(a, c_ip, 3, 30);
    let mut chatty = start_chatty_connection(a, c_ip, PORT);
    let active = [("direction", "outbound")];
    wait_until(
        "a's four connections in the agent",
        Duration::from_secs(10),
        || Ok(agent.metric_sum("mesh_proxy_active_connections", &active) == 4),
    )
    .unwrap();

    // A fifth is reset at once, and counted.
    let started = std::time::Instant::now();
    let fifth = echo_once(a, c_ip, PORT);
    assert!(fifth.is_err(), "the fifth connection must fail");
    assert!(started.elapsed() < Duration::from_secs(5), "refused fast");
    let refused = [("limit", "connections_per_pod")];
    wait_until("the refusal counted", Duration::from_secs(5), || {
        Ok(agent.metric_sum("mesh_limit_refusals_total", &refused) >= 1)
    })
    .unwrap();
    // Another pod is not limited by a's share.
    echo_once(b, c_ip, PORT).unwrap();
    // The open ones carry on.
    assert!(
        chatty.try_status().unwrap().is_none(),
        "the busy connection broke: {}",
        chatty.output_report()
    );

    holder.kill();
    wait_until("room for a again", Duration::from_secs(10), || {
        Ok(echo_once(a, c_ip, PORT).is_ok())
    })
    .unwrap();
    chatty.kill();
}

/// The config directory misbehaving under a running agent: a file cut off
/// mid-write, then the whole directory gone for a while. The last good
/// configuration keeps serving, the error is reported with its file, and
/// the agent follows the directory again once it is back.
#[test]
fn a_truncated_file_or_a_vanished_config_dir_leaves_the_last_good_config_serving() {
    if !e2e_enabled("a_truncated_file_or_a_vanished_config_dir_leaves_the_last_good_config_serving")
    {
        return;
    }
    let topo = Topology::builder("cfgfault")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let agent = NodeAgent::start(&topo, topo.node("n1"), &pods_yaml(&[a]), "").unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    echo_once(a, c_ip, PORT).unwrap();
    let captured = |agent: &NodeAgent| agent.counters(a).unwrap().captured_outbound;
    let before = captured(&agent);

    // pods.yaml written in place and cut off half-way (no atomic rename).
    let full = pods_yaml(&[a, b]);
    let pods = agent.config_dir().join("pods.yaml");
    std::fs::write(&pods, &full[..full.len() / 2 + 7]).unwrap();
    wait_until(
        "the truncated file to be rejected",
        Duration::from_secs(10),
        || Ok(agent.status()?.last_reload_error.is_some()),
    )
    .unwrap();
    let status = agent.status().unwrap();
    let error = status.last_reload_error.clone().unwrap();
    assert!(error.contains("pods.yaml"), "{error}");
    assert!(
        status.pods.iter().all(|p| p.name == "a" && p.enrolled),
        "the last good set serves: {:?}",
        status.pods
    );
    echo_once(a, c_ip, PORT).unwrap();
    assert!(captured(&agent) > before, "a is still captured");

    // The whole directory gone, then back (an operator's mistake, a volume
    // remount): still serving meanwhile, following it again afterwards.
    let dir = agent.config_dir().to_path_buf();
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    echo_once(a, c_ip, PORT).unwrap();
    assert_eq!(agent.get("/readyz").unwrap().0, 200);
    std::fs::rename(&away, &dir).unwrap();
    let generation = agent.status().unwrap().config_generation;
    agent.write_pods(&full).unwrap();
    agent
        .wait_generation_after(generation)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    let status = agent.status().unwrap();
    assert!(status.last_reload_error.is_none(), "{status:?}");
    assert!(
        status.pods.iter().all(|p| p.enrolled) && status.pods.len() == 2,
        "{:?}",
        status.pods
    );
    echo_once(b, c_ip, PORT).unwrap();
}

/// Opens up to `count` echo connections to `ip:PORT` one after the other
/// (each checked with an exchange) and keeps those that worked; prints
/// `opened ok=.. failed=.. slow=..` (slow: a failure that took over 3 s).
/// Once `go` exists it checks every kept one again and prints `rechecked
/// ok=.. bad=..`.
fn open_until_refused(pod: &Pod, ip: IpAddr, count: u32, go: &std::path::Path) -> Process {
    pod.spawn_tool(&[
        "hold",
        &ip.to_string(),
        &PORT.to_string(),
        "--count",
        &count.to_string(),
        "--echo",
        "--probe",
        "--tolerate-failures",
        "--go",
        &go.display().to_string(),
        "--go-timeout-secs",
        "60",
        "--then-secs",
        "60",
    ])
    .unwrap()
}

/// A `key=value` count from a line the holder printed.
fn printed_count(output: &str, line_start: &str, key: &str) -> Option<u32> {
    let line = output.lines().find(|l| l.starts_with(line_start))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// Opens connections from `pod` to `ip` until the agent runs out of
/// descriptors, checks that each refusal was fast and that the connections
/// already open carry on, then closes them and waits until new connections
/// work again. Returns how many were refused.
fn exhaust_descriptors(
    topo: &Topology,
    agent: &NodeAgent,
    pod: &Pod,
    ip: IpAddr,
    phase: &str,
) -> u32 {
    let go = topo.tmp_dir().join(format!("fdlimit-go-{phase}"));
    let mut holder = open_until_refused(pod, ip, FD_LIMIT as u32, &go);
    wait_until("the holder's connections", Duration::from_secs(60), || {
        Ok(holder.stdout_so_far().contains("opened"))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{phase}: {e:#}\n{}\nagent: {}",
            holder.output_report(),
            agent.log()
        )
    });
    let out = holder.stdout_so_far();
    eprintln!("{phase}: {out}");
    let opened = printed_count(&out, "opened", "ok").unwrap();
    let failed = printed_count(&out, "opened", "failed").unwrap();
    let slow = printed_count(&out, "opened", "slow").unwrap();
    assert!(
        opened >= 20,
        "{phase}: too few connections before exhaustion: {out}"
    );
    assert!(
        failed >= 20,
        "{phase}: the descriptors never ran out: {out}"
    );
    assert_eq!(slow, 0, "{phase}: refusals must be fast, not hang: {out}");

    // Out of descriptors, the open connections still carry data.
    std::fs::write(&go, "").unwrap();
    wait_until("the recheck", Duration::from_secs(60), || {
        Ok(holder.stdout_so_far().contains("rechecked"))
    })
    .unwrap_or_else(|e| panic!("{phase}: {e:#}\n{}", holder.output_report()));
    let out = holder.stdout_so_far();
    assert_eq!(
        printed_count(&out, "rechecked", "bad"),
        Some(0),
        "{phase}: {out}"
    );
    assert_eq!(
        printed_count(&out, "rechecked", "ok"),
        Some(opened),
        "{phase}: {out}"
    );

    holder.kill();
    wait_until(
        "new connections work again",
        Duration::from_secs(20),
        || Ok(echo_once(pod, ip, PORT).is_ok()),
    )
    .unwrap_or_else(|e| panic!("{phase}: {e:#}"));
    failed
}

/// The agent out of file descriptors, both ways it can happen: with no
/// descriptor for the upstream connection (a plain destination costs two per
/// connection, so the accept takes the last one), and with none to accept
/// (a tunnel destination costs one: its streams share a connection).
#[test]
fn running_out_of_file_descriptors_resets_new_connections_and_spares_open_ones() {
    if !e2e_enabled("running_out_of_file_descriptors_resets_new_connections_and_spares_open_ones") {
        return;
    }
    let topo = Topology::builder("fdlimit")
        .node("n1", &["a", "b"])
        .node("n2", &["c", "outsider"])
        .build()
        .unwrap();
    let (a, b, c, outsider) = (
        topo.pod("a"),
        topo.pod("b"),
        topo.pod("c"),
        topo.pod("outsider"),
    );
    let _servers = [c, outsider].map(|p| TrafficServer::start(p, PORT).unwrap());
    let ca = TestCa::new(&topo, "fdlimit").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let mut agents = start_mesh(&topo, &issuers, "1h").unwrap();
    // n1's agent again, with room for its own descriptors and a few hundred
    // connections; the per-pod limit is far above.
    let agent = &mut agents[0];
    agent.stop(Signal::SIGTERM).unwrap();
    agent.limit_open_files(FD_LIMIT);
    agent.restart().unwrap();

    let refused_plain = exhaust_descriptors(&topo, agent, a, IpAddr::V4(outsider.ipv4()), "plain");
    let refused_tunnel = exhaust_descriptors(&topo, agent, a, IpAddr::V4(c.ipv4()), "tunnel");
    let counted = agent.metric_sum(
        "mesh_limit_refusals_total",
        &[("limit", "file_descriptors")],
    );
    assert!(
        counted >= u64::from(refused_plain + refused_tunnel),
        "{refused_plain} + {refused_tunnel} connections refused, {counted} counted as out of descriptors"
    );
    echo_once(b, IpAddr::V4(c.ipv4()), PORT).unwrap();
    assert!(agent.status().unwrap().pods.iter().all(|p| p.enrolled));
}

/// RLIMIT_NOFILE of the agent in the descriptor test.
const FD_LIMIT: u64 = 320;

/// Short connections leave their ports in TIME_WAIT for a minute. The
/// agent's connections into a pod leave from the client's address with a
/// port drawn at bind from its own range (SO_REUSEADDR: a port in TIME_WAIT
/// may serve again for another connection, or after a second for the same
/// one), or, with `preserveSourceAddress: false`, all from 127.0.0.6 with
/// the port picked at connect (with the port picked at bind a pod would run
/// out at a few hundred connections a second). Here the pod's port range is
/// cut to 500, and 1,500 short connections at 250 a second must all work
/// both ways (with ports picked at bind from that range, the 501st fails).
#[test]
fn short_connections_into_a_pod_do_not_run_out_of_source_ports() {
    if !e2e_enabled("short_connections_into_a_pod_do_not_run_out_of_source_ports") {
        return;
    }
    for (node_extra, source) in [
        ("", IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        (
            "preserveSourceAddress: false\n",
            IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6)),
        ),
    ] {
        short_connections(node_extra, source);
    }
}

/// `source`: the address b's server must see a's connections from
/// (unspecified: a's own).
fn short_connections(node_extra: &str, source: IpAddr) {
    let topo = Topology::builder("ports")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    b.run(
        "sysctl",
        &["-w", "net.ipv4.ip_local_port_range=40000 40499"],
        Duration::from_secs(5),
    )
    .unwrap();
    let _server = TrafficServer::start(b, PORT).unwrap();
    let _agent = NodeAgent::start(&topo, topo.node("n1"), &pods_yaml(&[a, b]), node_extra).unwrap();
    let expected = if source.is_unspecified() {
        IpAddr::V4(a.ipv4())
    } else {
        source
    };
    assert_eq!(
        peer_seen_by_server(a, b.ipv4(), PORT).unwrap().ip(),
        expected,
        "{node_extra}"
    );
    let out = a
        .run_tool(
            &[
                "echo",
                &b.ipv4().to_string(),
                &PORT.to_string(),
                "--line",
                "ping",
                "--times",
                "1500",
                "--every-ms",
                "4",
                "--tally",
            ],
            Duration::from_secs(120),
        )
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.lines().last(),
        Some("ok 1500 failed 0"),
        "{printed}"
    );
}
