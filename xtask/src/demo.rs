//! `cargo xtask demo`: builds what is needed, brings up a small mesh in the test
//! bed (two nodes, an agent on each), sends real traffic, prints what the agents
//! captured and proxied, and tears everything down.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_testbed::{
    Node, Pod, Process, Topology, e2e_preflight,
    traffic::{echo_round_trips, start_echo_server},
};
use serde_json::Value;

use crate::{
    agents::{self, ADMIN},
    setup, step,
};

const PORT: u16 = 8080;

pub fn run(workspace: &Path) -> Result<()> {
    let started = Instant::now();
    e2e_preflight().map_err(|why| {
        anyhow::anyhow!("the demo builds network namespaces and loads kernel programs: {why}")
    })?;
    step("[1/5] kernel toolchain and programs");
    setup::build_ebpf(workspace)?;
    step("[2/5] building mesh-agent (release)");
    let agent_bin = setup::build_agent_release(workspace)?;

    step("[3/5] test bed: node1 {frontend, backend}, node2 {database}");
    let topo = Topology::builder("demo")
        .node("node1", &["frontend", "backend"])
        .node("node2", &["database"])
        .build()?;
    let (frontend, backend, database) = (
        topo.pod("frontend"),
        topo.pod("backend"),
        topo.pod("database"),
    );
    for pod in [frontend, backend, database] {
        println!(
            "    pod {:<9} on {}  {} / {}",
            pod.name(),
            pod.node_name(),
            pod.ipv4(),
            pod.ipv6()
        );
    }
    let _servers: Vec<Process> = [backend, database]
        .into_iter()
        .map(|p| start_echo_server(p, PORT))
        .collect::<Result<_>>()?;

    step("[4/5] starting an agent on each node (certificates minted from a demo CA)");
    let pki = topo.tmp_dir().join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = crate::pki::BenchCa::new()?;
    std::fs::write(pki.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(pki.join("ca.key"), &ca.key_pem)?;
    let mut agents = Vec::new();
    for node in topo.nodes() {
        let agent = start_agent(&agent_bin, node, &topo, &pki)?;
        println!("    agent on {} ready (pid {})", node.name(), agent.pid());
        agents.push(agent);
    }

    step("[5/5] real traffic (echo round trips, bytes checked)");
    let calls: [(&Pod, &Pod, bool, u32); 4] = [
        (frontend, backend, false, 3),
        (frontend, backend, true, 2),
        (frontend, database, false, 2),
        (backend, database, true, 1),
    ];
    for (from, to, ipv6, count) in calls {
        let host = if ipv6 {
            to.ipv6().to_string()
        } else {
            to.ipv4().to_string()
        };
        if let Err(err) = echo_round_trips(from, &host, PORT, count) {
            for (node, agent) in topo.nodes().iter().zip(&agents) {
                eprintln!(
                    "--- agent log on {} ---\n{}",
                    node.name(),
                    agent.stderr_so_far()
                );
            }
            return Err(err);
        }
        let where_ = if from.node_name() == to.node_name() {
            "same node"
        } else {
            "across nodes"
        };
        println!(
            "    {} -> {} {}:{PORT} x{count} ({where_}): ok",
            from.name(),
            to.name(),
            host,
        );
    }

    println!();
    println!("What the kernel programs counted, per enrolled pod:");
    println!(
        "    {:<10} {:<7} {:>9} {:>13} {:>12} {:>8}",
        "pod", "node", "connects", "captured out", "captured in", "refused"
    );
    for node in topo.nodes() {
        let status = admin_json(node, "/status")?;
        for pod in status["pods"].as_array().into_iter().flatten() {
            let c = &pod["counters"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            println!(
                "    {:<10} {:<7} {:>9} {:>13} {:>12} {:>8}",
                pod["name"].as_str().unwrap_or("?"),
                node.name(),
                n("connect4") + n("connect6"),
                n("capturedOutbound"),
                n("capturedInbound"),
                n("refusedAgentAbsent") + n("refusedMapFull")
            );
        }
    }
    println!();
    println!("What the agents proxied (latest connections, from /debug/connections):");
    for node in topo.nodes() {
        let records = admin_json(node, "/debug/connections")?;
        for r in records.as_array().into_iter().flatten().rev().take(4) {
            println!(
                "    {}: {:<8} {:<15} {} -> {} via {} [{}{}] ({} bytes out, {} back, {})",
                node.name(),
                r["direction"].as_str().unwrap_or("?"),
                r["pod"].as_str().unwrap_or("?"),
                r["client"].as_str().unwrap_or("?"),
                r["originalDst"].as_str().unwrap_or("?"),
                r["upstream"].as_str().unwrap_or("?"),
                r["security"].as_str().unwrap_or("?"),
                r["sourceIdentity"]
                    .as_str()
                    .map(|id| format!(", from {id}"))
                    .unwrap_or_default(),
                r["bytesSent"],
                r["bytesReceived"],
                r["outcome"].as_str().unwrap_or("?"),
            );
        }
    }
    println!();
    println!("`mesh-agent status` on node1:");
    let out = topo.node("node1").run(
        &agent_bin,
        &["status", "--admin", ADMIN],
        Duration::from_secs(10),
    )?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    println!();
    println!("A few metric lines from node1's /metrics:");
    let (_, metrics) = topo.node("node1").http_get(ADMIN.parse()?, "/metrics")?;
    let shown = [
        "mesh_pod_captured_connections_total",
        "mesh_proxy_connections_total",
        "mesh_pods_enrolled",
    ];
    for line in metrics
        .lines()
        .filter(|l| shown.iter().any(|m| l.starts_with(m)))
    {
        println!("    {line}");
    }
    println!();
    step("tearing down (agents detach their programs; namespaces and cgroups removed)");
    drop(agents);
    drop(topo);
    step(format!(
        "demo done in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Starts the agent of `node`, enrolling all its pods; the other nodes' pods
/// are mesh workloads, reached through mTLS.
fn start_agent(bin: &Path, node: &Node, topo: &Topology, pki: &Path) -> Result<Process> {
    let mut pods = String::from("pods:\n");
    for pod in node.pods() {
        pods.push_str(&format!(
            "  - name: {name}\n    namespace: demo\n    serviceAccount: {name}\n    ipv4: {}\n    ipv6: \"{}\"\n    netns: {}\n    cgroup: {}\n",
            pod.ipv4(),
            pod.ipv6(),
            pod.netns_path().display(),
            pod.cgroup_dir().display(),
            name = pod.name(),
        ));
    }
    // The pods of the other nodes are mesh workloads: reached through mTLS.
    let mut workloads = String::from("workloads:\n");
    for pod in topo
        .nodes()
        .iter()
        .filter(|n| n.name() != node.name())
        .flat_map(|n| n.pods())
    {
        workloads.push_str(&format!(
            "  - name: {name}\n    namespace: demo\n    serviceAccount: {name}\n    node: {}\n    ipv4: {}\n    ipv6: \"{}\"\n",
            pod.node_name(),
            pod.ipv4(),
            pod.ipv6(),
            name = pod.name(),
        ));
    }
    let dir = topo.tmp_dir().join(format!("config-{}", node.name()));
    let extra = [("workloads.yaml", workloads)];
    let config = agents::AgentConfig {
        dir: &dir,
        pods_yaml: &pods,
        extra_files: &extra,
        log: "info",
        node_extra: "",
    };
    agents::start(bin, topo, node, pki, &config)
}

fn admin_json(node: &Node, path: &str) -> Result<Value> {
    let (code, body) = node.http_get(ADMIN.parse()?, path)?;
    if code != 200 {
        bail!("{path} on {} answered {code}: {body}", node.name());
    }
    serde_json::from_str(&body).with_context(|| format!("parsing {path} of {}", node.name()))
}
