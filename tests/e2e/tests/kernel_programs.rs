//! The agent loads real kernel programs, attaches them to the pods it enrols,
//! and they act on real TCP connections made by real processes.

use mesh_e2e::{
    NodeAgent,
    kernel::{AttachType, attached_programs},
    pod_yaml, pods_yaml,
};
use mesh_testbed::{
    Topology, e2e_enabled,
    traffic::{echo_round_trips, start_echo_server},
};
use nix::sys::signal::Signal;

const ECHO_PORT: u16 = 7000;

/// The kernel frees a link whose last reference (descriptor or pin) went
/// away in deferred work: detachment is seen a moment later.
fn wait_detached(cgroup: &std::path::Path, what: &str) {
    let mut seen = Vec::new();
    mesh_testbed::wait_until(what, std::time::Duration::from_secs(5), || {
        seen = attached(cgroup);
        Ok(seen == vec![0; 5])
    })
    .unwrap_or_else(|e| panic!("{e:#}: {seen:?}"));
}

#[test]
fn connects_of_enrolled_pods_are_counted_per_pod_and_family() {
    if !e2e_enabled("connects_of_enrolled_pods_are_counted_per_pod_and_family") {
        return;
    }
    let topo = Topology::builder("counts")
        .node("n1", &["client", "server", "bystander"])
        .build()
        .unwrap();
    let (client, server, bystander) = (
        topo.pod("client"),
        topo.pod("server"),
        topo.pod("bystander"),
    );
    let _echo = start_echo_server(server, ECHO_PORT).unwrap();
    let agent = NodeAgent::enrolling(&topo, topo.node("n1"), &[client, server]).unwrap();

    // Real connections from real processes: 5 over IPv4, 3 over IPv6, and 2 from
    // a pod the agent does not enrol.
    echo_round_trips(client, &server.ipv4().to_string(), ECHO_PORT, 5).unwrap();
    echo_round_trips(client, &server.ipv6().to_string(), ECHO_PORT, 3).unwrap();
    echo_round_trips(bystander, &server.ipv4().to_string(), ECHO_PORT, 2).unwrap();

    let counted = agent.counters(client).unwrap();
    assert_eq!(
        (counted.connect4, counted.connect6),
        (5, 3),
        "the kernel programs must count exactly the client's connects; agent log:\n{}",
        agent.log()
    );
    let server_counted = agent.counters(server).unwrap();
    assert_eq!(
        (server_counted.connect4, server_counted.connect6),
        (0, 0),
        "the server made no connects"
    );
    let status = agent.status().unwrap();
    assert!(status.ready);
    assert!(
        status.pods.iter().all(|p| p.name != "bystander"),
        "bystander is not enrolled"
    );

    // The same figures reach Prometheus.
    let (code, metrics) = agent.get("/metrics").unwrap();
    assert_eq!(code, 200);
    for line in [
        r#"mesh_pod_tcp_connects_total{family="ipv4",namespace="default",pod="client"} 5"#,
        r#"mesh_pod_tcp_connects_total{family="ipv6",namespace="default",pod="client"} 3"#,
        "mesh_pods_enrolled 2",
        "mesh_agent_ready 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing metric line {line:?} in:\n{metrics}"
        );
    }
    // Kernel log records are forwarded into the agent's log stream.
    assert!(
        agent.log().contains("connect to port 7000 captured"),
        "no kernel log line in:\n{}",
        agent.log()
    );
}

const ALL_HOOKS: [AttachType; 5] = [
    AttachType::CgroupInet4Connect,
    AttachType::CgroupInet6Connect,
    AttachType::CgroupInet4Getpeername,
    AttachType::CgroupInet6Getpeername,
    AttachType::CgroupSockOps,
];

fn attached(cgroup: &std::path::Path) -> Vec<u32> {
    ALL_HOOKS
        .iter()
        .map(|&t| attached_programs(cgroup, t).unwrap())
        .collect()
}

#[test]
fn on_stop_release_detaches_every_program() {
    if !e2e_enabled("on_stop_release_detaches_every_program") {
        return;
    }
    let topo = Topology::builder("release")
        .node("n1", &["client", "server"])
        .build()
        .unwrap();
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let _echo = start_echo_server(server, ECHO_PORT).unwrap();
    let cgroup = client.cgroup_dir();

    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut agent = NodeAgent::start(
            &topo,
            topo.node("n1"),
            &pods_yaml(&[client]),
            "onStop: release\n",
        )
        .unwrap();
        assert_eq!(
            attached(cgroup),
            vec![1; 5],
            "one of each hook on the pod's cgroup"
        );
        let log = agent.stop(signal).unwrap();
        assert!(
            log.contains("kernel programs detached"),
            "{signal:?}: no detach line in log:\n{log}"
        );
        wait_detached(cgroup, &format!("nothing attached after {signal:?}"));
        // The pod connects directly now.
        echo_round_trips(client, &server.ipv4().to_string(), ECHO_PORT, 1).unwrap();
    }
}

#[test]
fn on_stop_keep_capture_leaves_programs_until_release() {
    if !e2e_enabled("on_stop_keep_capture_leaves_programs_until_release") {
        return;
    }
    let topo = Topology::builder("keep")
        .node("n1", &["client"])
        .build()
        .unwrap();
    let client = topo.pod("client");
    let mut agent = NodeAgent::start(&topo, topo.node("n1"), &pod_yaml_list(client), "").unwrap();
    let config_dir = agent.config_dir().to_path_buf();
    let log = agent.stop(Signal::SIGTERM).unwrap();
    assert!(log.contains("stay attached"), "{log}");
    assert_eq!(
        attached(client.cgroup_dir()),
        vec![1; 5],
        "still attached after SIGTERM (fail-closed)"
    );

    // `mesh-agent release` is how an operator uninstalls.
    let out = topo
        .node("n1")
        .run(
            mesh_e2e::agent_binary(),
            &["release", "--config", config_dir.to_str().unwrap()],
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("released"),
        "{out:?}"
    );
    wait_detached(client.cgroup_dir(), "detached by mesh-agent release");
}

fn pod_yaml_list(pod: &mesh_testbed::Pod) -> String {
    format!("pods:\n{}", pod_yaml(pod, ""))
}

#[test]
fn a_pod_that_cannot_be_enrolled_is_reported_and_the_others_work() {
    if !e2e_enabled("a_pod_that_cannot_be_enrolled_is_reported_and_the_others_work") {
        return;
    }
    let topo = Topology::builder("ghost")
        .node("n1", &["client", "server"])
        .build()
        .unwrap();
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let _echo = start_echo_server(server, ECHO_PORT).unwrap();
    let ghost = format!(
        "  - name: ghost\n    namespace: default\n    netns: /run/netns/{}-no-such-netns\n    cgroup: {}\n",
        topo.id(),
        client.cgroup_dir().display()
    );
    let pods = format!("{}{ghost}", pods_yaml(&[client]));
    let agent = NodeAgent::start(&topo, topo.node("n1"), &pods, "").unwrap();
    let status = agent.status().unwrap();
    let ghost = status
        .pods
        .iter()
        .find(|p| p.name == "ghost")
        .expect("ghost pod in status");
    assert!(!ghost.enrolled);
    let error = ghost.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no-such-netns") && error.contains("No such file"),
        "unclear error: {error}"
    );
    assert!(
        agent.log().contains("pod NOT enrolled"),
        "log must say so:\n{}",
        agent.log()
    );

    echo_round_trips(client, &server.ipv4().to_string(), ECHO_PORT, 2).unwrap();
    assert_eq!(agent.counters(client).unwrap().connect4, 2);
}

/// The kernel probe at start: it reports this kernel as supported in
/// `/status`; a feature the agent cannot do without that is missing (here
/// masked: every kernel of the matrix has them all) stops the agent before
/// anything is attached, naming the feature and the Linux release that has
/// it, and `mesh-agent check` says the same; a feature only the fast path
/// needs turns the fast path off, shown in `/status`, and traffic flows.
#[test]
fn the_kernel_probe_refuses_a_missing_feature_by_name_and_takes_the_fast_path_fallback() {
    if !e2e_enabled(
        "the_kernel_probe_refuses_a_missing_feature_by_name_and_takes_the_fast_path_fallback",
    ) {
        return;
    }
    let topo = Topology::builder("probe")
        .node("n1", &["client", "server"])
        .build()
        .unwrap();
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let _echo = start_echo_server(server, ECHO_PORT).unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let pods = pods_yaml(&[client, server]);
    let fast_path_on = "fastPath: {loopback: true, splice: true}\n";
    let mask = mesh_agent::ebpf::probe::MASK_ENV;

    // A required feature missing: no start, nothing attached.
    let mut agent = NodeAgent::configure(&topo, topo.node("n1"), &pods, fast_path_on, &[]).unwrap();
    agent.set_env(mask, "sk_lookup");
    agent.start_process().unwrap();
    let refused = agent
        .wait_exit(std::time::Duration::from_secs(20))
        .expect_err("the agent must refuse to start")
        .to_string();
    assert!(
        refused.contains("lacks what the agent needs: sk_lookup programs (inbound capture) [sk_lookup] (Linux 5.9"),
        "the refusal must name the feature and its release:\n{refused}"
    );
    assert_eq!(
        attached(client.cgroup_dir()),
        vec![0; 5],
        "nothing may be attached"
    );
    let check = std::process::Command::new(mesh_e2e::agent_binary())
        .args(["check", "--config"])
        .arg(agent.config_dir())
        .env(mask, "getpeername_hook")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check must fail: {stderr}");
    assert!(
        stderr.contains("[getpeername_hook] (Linux 5.8"),
        "check must name the feature: {stderr}"
    );
    // Unmasked, check finds everything on this kernel.
    let check = std::process::Command::new(mesh_e2e::agent_binary())
        .args(["check", "--config"])
        .arg(agent.config_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && stdout.contains("has every feature the agent needs"),
        "check on this kernel: {stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A fast-path feature missing: the agent serves, the fast path is off.
    agent.set_env(mask, "netns_cookie_in_sk_msg");
    agent.restart().unwrap();
    let status = agent.status().unwrap();
    let kernel = status.kernel.expect("/status has the probe's findings");
    assert_eq!(kernel.release, release.trim());
    assert!(kernel.missing.is_empty(), "{:?}", kernel.missing);
    let fallbacks: Vec<(&str, &str)> = kernel
        .fallbacks
        .iter()
        .map(|f| (f.missing.id.as_str(), f.fallback.as_str()))
        .collect();
    assert_eq!(
        fallbacks,
        vec![(
            "netns_cookie_in_sk_msg",
            "the same-node fast path is off (connections are relayed by the agent)"
        )]
    );
    echo_round_trips(client, &server.ipv4().to_string(), ECHO_PORT, 3).unwrap();
    let (_, metrics) = agent.get("/metrics").unwrap();
    let joined = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"mesh_fastpath_total{event="sockets_added"} "#));
    assert!(
        joined.is_none_or(|n| n.trim() == "0"),
        "no socket may join a fast path that is off:\n{metrics}"
    );
    assert!(
        agent.log().contains("this kernel cannot run it"),
        "the log must say why the fast path is off:\n{}",
        agent.log()
    );
    assert_eq!(agent.counters(client).unwrap().connect4, 3);
    agent.stop(Signal::SIGTERM).unwrap();

    // Nothing missing: /status says so.
    agent.set_env(mask, "");
    agent.restart().unwrap();
    let kernel = agent.status().unwrap().kernel.unwrap();
    assert!(
        kernel.missing.is_empty() && kernel.fallbacks.is_empty(),
        "{kernel:?}"
    );
    assert!(kernel.features_checked >= 20, "{kernel:?}");
}
