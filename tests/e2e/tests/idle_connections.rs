//! Memory under many idle connections: 10,000 connections held open from a
//! pod on one node to a pod on another, through both agents and the mTLS
//! tunnel. Each agent's RSS must grow by a bounded amount per connection,
//! every connection must still work, and once they close the descriptors
//! and most of the memory must go back, with nothing accumulating from one
//! round to the next.

use std::{net::IpAddr, time::Duration};

use mesh_e2e::{
    NodeAgent,
    mesh::{TestCa, node_issuers, start_mesh_with},
};
use mesh_testbed::{Pod, Process, Topology, e2e_enabled, traffic::start_echo_server, wait_until};

const PORT: u16 = 7300;
const CONNECTIONS: u32 = 10_000;
const ROUNDS: u32 = 3;
/// What one idle connection may cost an agent. The release build measures
/// about 4 KiB (cargo xtask bench); this is a debug build, and the bound is
/// there to catch per-connection buffers or leaks, which cost far more.
const MAX_KIB_PER_CONNECTION: f64 = 16.0;

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn rss_kib(agent: &NodeAgent) -> f64 {
    let pid = agent.pid().expect("agent running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn open_descriptors(agent: &NodeAgent) -> usize {
    let pid = agent.pid().expect("agent running");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn active(agent: &NodeAgent, direction: &str) -> u64 {
    agent.metric_sum("mesh_proxy_active_connections", &[("direction", direction)])
}

/// The test process, and so the agents and pods it starts, may open as many
/// descriptors as the hard limit allows: each agent holds one per connection
/// (the tunnel's streams share a connection), plus its own.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let needed = u64::from(CONNECTIONS) + 2048;
    assert!(
        limit.rlim_max >= needed,
        "this test needs a hard RLIMIT_NOFILE of at least {needed}; it is {}",
        limit.rlim_max
    );
}

/// `pod-tool hold`: opens `count` connections to `c_ip:PORT` (plain echo)
/// and prints `opened ok=<count> ...`; once the file `go` exists, checks
/// that every hundredth one still echoes, closes them all and prints
/// `rechecked ok=<checked> bad=0`. A connection that fails ends it.
fn spawn_holder(pod: &Pod, c_ip: &str, count: u32, go: &std::path::Path) -> Process {
    pod.spawn_tool(&[
        "hold",
        c_ip,
        &PORT.to_string(),
        "--count",
        &count.to_string(),
        "--timeout-secs",
        "10",
        "--go",
        &go.display().to_string(),
        "--go-timeout-secs",
        "300",
        "--recheck-every",
        "100",
        "--close",
        "--then-secs",
        "300",
    ])
    .unwrap()
}

#[test]
fn ten_thousand_idle_connections_cost_each_agent_a_bounded_few_kib() {
    if !e2e_enabled("ten_thousand_idle_connections_cost_each_agent_a_bounded_few_kib") {
        return;
    }
    raise_open_file_limit();
    let topo = Topology::builder("idle10k")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    // Holds every accepted connection and echoes what comes; one thread.
    let _server = start_echo_server(c, PORT).unwrap();
    let ca = TestCa::new(&topo, "idle10k").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    // Pooled tunnel connections (a hundred streams each) close after 3 s
    // unused, so the descriptors are all back soon after the test's close.
    let agents = start_mesh_with(&topo, &issuers, "1h", "tunnel:\n  idleTimeout: 3s\n").unwrap();
    let (client_agent, server_agent) = (&agents[0], &agents[1]);

    // Warm up: the tunnel, its TLS sessions and the allocator's first arenas
    // are not what an idle connection costs.
    let go_warm = topo.tmp_dir().join("idle10k-warm");
    std::fs::write(&go_warm, "").unwrap();
    let c_ip = IpAddr::V4(c.ipv4()).to_string();
    let mut warm = spawn_holder(a, &c_ip, 100, &go_warm);
    wait_until("the warm-up", Duration::from_secs(60), || {
        if let Some(status) = warm.try_status()? {
            anyhow::bail!("the warm-up exited: {status}\n{}", warm.output_report());
        }
        Ok(warm.stdout_so_far().contains("rechecked ok=1 bad=0"))
    })
    .unwrap();
    warm.kill();
    wait_until("the warm-up closed", Duration::from_secs(30), || {
        Ok(active(client_agent, "outbound") == 0 && active(server_agent, "inbound") == 0)
    })
    .unwrap();
    let before = [rss_kib(client_agent), rss_kib(server_agent)];
    let fds_before = [
        open_descriptors(client_agent),
        open_descriptors(server_agent),
    ];
    let agents = [client_agent, server_agent];

    // Three rounds: each of 10,000 new connections within a minute of the
    // last (TIME_WAIT lasts a minute; the receiving agent dials every one
    // from the same address, see `bind_address_no_port`), and the last
    // shows whether anything is left over from one round to the next.
    let mut after_round = Vec::new();
    let mut peak_round_one = [0.0; 2];
    for round in 1..=ROUNDS {
        let held = hold_idle_connections(&topo, a, &c_ip, agents, round);
        for (i, name) in ["client side (n1)", "server side (n2)"].iter().enumerate() {
            let per_connection = (held[i] - before[i]) / f64::from(CONNECTIONS);
            eprintln!(
                "round {round}, {name}: RSS {:.1} MiB idle, {:.1} MiB with 10,000 connections: {per_connection:.2} KiB each",
                before[i] / 1024.0,
                held[i] / 1024.0,
            );
            assert!(
                per_connection < MAX_KIB_PER_CONNECTION,
                "{name}: {per_connection:.2} KiB per idle connection (bound {MAX_KIB_PER_CONNECTION})"
            );
        }
        // Closed, they leave no descriptor behind (the pooled tunnel
        // connections close after their idle timeout).
        for (i, agent) in agents.into_iter().enumerate() {
            wait_until("the descriptors back", Duration::from_secs(30), || {
                Ok(open_descriptors(agent) <= fds_before[i] + 8)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "agent {i}: {e:#}: {} descriptors before, {} now",
                    fds_before[i],
                    open_descriptors(agent)
                )
            });
        }
        // The agent gives freed memory back every 5 s.
        std::thread::sleep(Duration::from_secs(6));
        let after = [rss_kib(client_agent), rss_kib(server_agent)];
        eprintln!(
            "round {round}: after closing, RSS {:.1} MiB (client side), {:.1} MiB (server side)",
            after[0] / 1024.0,
            after[1] / 1024.0
        );
        for i in 0..2 {
            // Freed memory mostly goes back (the allocator keeps some).
            let allowed = before[i] + (held[i] - before[i]) / 2.0;
            assert!(
                after[i] <= allowed,
                "agent {i}: RSS {:.1} MiB before, {:.1} MiB with the connections, {:.1} MiB after",
                before[i] / 1024.0,
                held[i] / 1024.0,
                after[i] / 1024.0
            );
        }
        after_round.push(after);
        if round == 1 {
            peak_round_one = held;
        }
    }
    // Nothing accumulates from one round to the next: the allocator's noise
    // is a few hundred bytes per connection, so the bound is a tenth of what
    // the connections took (a leak of ~1 KiB per connection fails it).
    for i in 0..2 {
        let growth = after_round[ROUNDS as usize - 1][i] - after_round[ROUNDS as usize - 2][i];
        let bound = (peak_round_one[i] - before[i]) / 10.0;
        assert!(
            growth < bound,
            "agent {i}: RSS grew {growth:.0} KiB from one round of 10,000 connections to the next (bound {bound:.0} KiB)"
        );
    }
}

/// Opens 10,000 connections from `a` to the server, waits until both agents
/// carry all of them, measures both agents' RSS, checks every hundredth
/// connection still works, then closes them all and waits until the agents
/// have let go of them. Returns the RSS (KiB) with the connections held.
fn hold_idle_connections(
    topo: &Topology,
    a: &Pod,
    c_ip: &str,
    agents: [&NodeAgent; 2],
    round: u32,
) -> [f64; 2] {
    let go = topo.tmp_dir().join(format!("idle10k-go-{round}"));
    let mut holder = spawn_holder(a, c_ip, CONNECTIONS, &go);
    let expected = u64::from(CONNECTIONS);
    wait_until(
        "10,000 connections through both agents",
        Duration::from_secs(240),
        || {
            if let Some(status) = holder.try_status()? {
                anyhow::bail!("the client exited: {status}\n{}", holder.output_report());
            }
            Ok(holder.stdout_so_far().contains("opened")
                && active(agents[0], "outbound") == expected
                && active(agents[1], "inbound") == expected)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "round {round}: {e:#}: {} and {} connections in the agents; client: {}\nclient's agent:\n{}\nserver's agent:\n{}",
            active(agents[0], "outbound"),
            active(agents[1], "inbound"),
            holder.output_report(),
            tail(&agents[0].log()),
            tail(&agents[1].log())
        )
    });
    let held = [rss_kib(agents[0]), rss_kib(agents[1])];

    std::fs::write(&go, "").unwrap();
    wait_until("the check", Duration::from_secs(120), || {
        if let Some(status) = holder.try_status()? {
            anyhow::bail!("the client exited: {status}\n{}", holder.output_report());
        }
        Ok(holder.stdout_so_far().contains("rechecked ok=100 bad=0"))
    })
    .unwrap();
    holder.kill();
    wait_until("every connection closed", Duration::from_secs(60), || {
        Ok(active(agents[0], "outbound") == 0 && active(agents[1], "inbound") == 0)
    })
    .unwrap();
    held
}
