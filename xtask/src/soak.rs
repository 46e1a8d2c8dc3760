//! `cargo xtask soak`: the demo's mesh under a steady mixed load for a while
//! (10 minutes unless told), with a policy reload and a certificate rotation
//! every minute, sampling both agents' RSS and open descriptors.
//!
//! The load, from real clients in the pods, all of it allowed by policy:
//! - HTTP: frontend -> the backend service (balanced per request over
//!   backend-1 on the same node and backend-2 across nodes), keep-alive;
//! - TCP: backend-1 -> database (across nodes) and backend-2 -> database
//!   (same node), a new connection per exchange.
//!
//! Every minute each node's policy file is rewritten (a rule is added or
//! removed that this traffic never matches), and certificates are minted
//! with a two-minute lifetime renewed at half of it, so each workload's
//! certificate rotates every minute under the load.
//!
//! It fails if anything failed, an agent panicked, exited or stopped
//! renewing, or RSS or descriptors grow from the first half to the second.
//! Figures go to target/soak/samples.csv and the end of the output.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::{Node, Pod, Process, Topology, e2e_preflight, traffic::start_echo_server};

use crate::{
    demo::{
        self, BACKEND_POLICY, BACKEND_VIP, BACKEND_VIP_PORT, DB_PORT, admin_get, start_agent,
        start_http_server, stop_agents,
    },
    setup, step,
};

/// How often both agents are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How often policies are rewritten.
const RELOAD_EVERY: Duration = Duration::from_secs(60);
/// Minted certificates live 2 minutes and are renewed at half: every minute.
const ISSUER_LINES: &str = "    lifetime: 2m\n    renewAt: 0.5\n";

/// One load generator: what it runs, from where.
struct Load {
    name: &'static str,
    process: Process,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    sent: u64,
    ok: u64,
    failed: u64,
}

/// The latest `progress` or `total` line of a load generator.
fn counts(output: &str) -> Counts {
    output
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 5 && (f[0] == "progress" || f[0] == "total") {
                Some(Counts {
                    sent: f[2].parse().ok()?,
                    ok: f[3].parse().ok()?,
                    failed: f[4].parse().ok()?,
                })
            } else {
                None
            }
        })
        .unwrap_or_default()
}

struct Sample {
    at_s: f64,
    rss_kib: [u64; 2],
    fds: [usize; 2],
}

pub fn run(workspace: &Path, minutes: u32) -> Result<()> {
    ensure!(minutes >= 2, "a soak needs at least 2 minutes");
    e2e_preflight().map_err(|why| {
        anyhow::anyhow!("the soak builds network namespaces and loads kernel programs: {why}")
    })?;
    step("kernel programs and the agent (release)");
    setup::build_ebpf(workspace)?;
    let agent_bin = setup::build_agent_release(workspace)?;
    // Its servers, shared with the demo, and its load are pod-tool's.
    setup::build_pod_tool(workspace)?;

    step("test bed: node1 {frontend, backend-1}, node2 {backend-2, database}");
    let topo = Topology::builder("soak")
        .node("node1", &["frontend", "backend1"])
        .node("node2", &["backend2", "database"])
        .build()?;
    let mut servers = vec![
        start_http_server(topo.pod("backend1"))?,
        start_http_server(topo.pod("backend2"))?,
        start_echo_server(topo.pod("database"), DB_PORT)?,
    ];
    let pki = topo.tmp_dir().join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = crate::pki::BenchCa::new()?;
    std::fs::write(pki.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(pki.join("ca.key"), &ca.key_pem)?;
    let mut agents = Vec::new();
    for node in topo.nodes() {
        agents.push(start_agent(&agent_bin, node, &topo, &pki, ISSUER_LINES)?);
    }

    let result = soak(workspace, &topo, &mut agents, minutes);
    step("tearing down");
    stop_agents(&topo, &mut agents);
    servers.clear();
    drop(agents);
    drop(topo);
    result
}

fn soak(workspace: &Path, topo: &Topology, agents: &mut [Process], minutes: u32) -> Result<()> {
    let duration = Duration::from_secs(u64::from(minutes) * 60);
    let seconds = duration.as_secs().to_string();
    let database = topo.pod("database").ipv4().to_string();
    let spawn = |name, pod: &Pod, args: &[&str]| -> Result<Load> {
        let mut all = vec!["load"];
        all.extend_from_slice(args);
        Ok(Load {
            name,
            process: pod.spawn_tool(&all)?,
        })
    };
    let db_port = DB_PORT.to_string();
    let vip_port = BACKEND_VIP_PORT.to_string();
    step(format!(
        "{minutes} minutes of load: HTTP frontend -> backend service, TCP backend-1 -> database (cross-node) and backend-2 -> database (same node); policies rewritten and certificates renewed every minute"
    ));
    let loads = [
        spawn(
            "HTTP frontend -> backend (service)",
            topo.pod("frontend"),
            &["http", BACKEND_VIP, &vip_port, &seconds, "4"],
        )?,
        spawn(
            "TCP backend-1 -> database (cross-node)",
            topo.pod("backend1"),
            &["tcp", &database, &db_port, &seconds, "2"],
        )?,
        spawn(
            "TCP backend-2 -> database (same node)",
            topo.pod("backend2"),
            &["tcp", &database, &db_port, &seconds, "2"],
        )?,
    ];

    // Renewals show as new expiry timestamps of the workloads' certificates.
    let mut certificates_seen = std::collections::BTreeSet::new();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_reload = started + RELOAD_EVERY;
    let mut reloads = 0u32;
    let mut csv =
        String::from("seconds,rss_kib_node1,rss_kib_node2,fds_node1,fds_node2,sent,failed\n");
    println!(
        "    {:>6} {:>12} {:>12} {:>9} {:>9} {:>9} {:>7}",
        "time", "RSS node1", "RSS node2", "fds n1", "fds n2", "sent", "failed"
    );
    while started.elapsed() < duration + Duration::from_secs(15) {
        for (node, agent) in topo.nodes().iter().zip(agents.iter_mut()) {
            if let Some(status) = agent.try_status()? {
                bail!(
                    "the agent on {} exited ({status}) during the soak",
                    node.name()
                );
            }
        }
        if Instant::now() >= next_reload && started.elapsed() < duration {
            reloads += 1;
            for node in topo.nodes() {
                rewrite_policy(topo, node, reloads)?;
            }
            next_reload += RELOAD_EVERY;
        }
        for (i, node) in topo.nodes().iter().enumerate() {
            for expiry in certificate_expiries(node)? {
                certificates_seen.insert((i, expiry));
            }
        }
        let (sent, failed) = loads.iter().fold((0, 0), |(s, f), l| {
            let c = counts(&l.process.stdout_so_far());
            (s + c.sent, f + c.failed)
        });
        let sample = Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib: [rss_kib(agents[0].pid())?, rss_kib(agents[1].pid())?],
            fds: [open_fds(agents[0].pid())?, open_fds(agents[1].pid())?],
        };
        println!(
            "    {:>5.0}s {:>9} KiB {:>9} KiB {:>9} {:>9} {:>9} {:>7}",
            sample.at_s,
            sample.rss_kib[0],
            sample.rss_kib[1],
            sample.fds[0],
            sample.fds[1],
            sent,
            failed
        );
        let _ = writeln!(
            csv,
            "{:.0},{},{},{},{},{},{}",
            sample.at_s,
            sample.rss_kib[0],
            sample.rss_kib[1],
            sample.fds[0],
            sample.fds[1],
            sent,
            failed
        );
        samples.push(sample);
        if loads
            .iter()
            .all(|l| l.process.stdout_so_far().contains("done"))
        {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let out_dir = workspace.join("target").join("soak");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("samples.csv"), &csv)?;

    // The verdict.
    let mut problems = Vec::new();
    let mut total = Counts::default();
    for load in &loads {
        let out = load.process.stdout_so_far();
        ensure!(
            out.contains("done"),
            "{} did not finish: {}",
            load.name,
            load.process.output_report()
        );
        let c = counts(&out);
        println!(
            "    {:<40} {:>8} sent {:>8} ok {:>6} failed",
            load.name, c.sent, c.ok, c.failed
        );
        for failure in out.lines().filter(|l| l.starts_with("failure:")) {
            println!("        {failure}");
        }
        total.sent += c.sent;
        total.ok += c.ok;
        total.failed += c.failed;
    }
    if total.failed > 0 {
        problems.push(format!(
            "{} of {} exchanges failed",
            total.failed, total.sent
        ));
    }
    for (i, node) in topo.nodes().iter().enumerate() {
        // Each workload's first certificate is not a renewal.
        let renewed =
            (certificates_seen.iter().filter(|(n, _)| *n == i).count() as u64).saturating_sub(2);
        println!(
            "    {}: {renewed} certificate renewals, {reloads} policy rewrites",
            node.name()
        );
        // Two workloads per node, one renewal a minute each.
        if renewed < u64::from(minutes - 1) * 2 {
            problems.push(format!(
                "{}: only {renewed} certificate renewals",
                node.name()
            ));
        }
        let panics = metric(node, "mesh_agent_panics_total")?;
        if panics > 0 {
            problems.push(format!("{}: {panics} panics", node.name()));
        }
    }
    // Growth: the mean of the first half's samples (after the first minute,
    // while things warm up) against the last half's.
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= 60.0).collect();
    let (first, second) = warm.split_at(warm.len() / 2);
    ensure!(!first.is_empty() && !second.is_empty(), "too few samples");
    let mean = |set: &[&Sample], f: &dyn Fn(&Sample) -> f64| {
        set.iter().map(|s| f(s)).sum::<f64>() / set.len() as f64
    };
    for (i, node) in topo.nodes().iter().enumerate() {
        let rss = [
            mean(first, &|s| s.rss_kib[i] as f64),
            mean(second, &|s| s.rss_kib[i] as f64),
        ];
        let fds = [
            mean(first, &|s| s.fds[i] as f64),
            mean(second, &|s| s.fds[i] as f64),
        ];
        let growth = (rss[1] - rss[0]) / rss[0] * 100.0;
        println!(
            "    {}: RSS {:.1} MiB -> {:.1} MiB ({growth:+.1} %), descriptors {:.0} -> {:.0} (means of the first and second half)",
            node.name(),
            rss[0] / 1024.0,
            rss[1] / 1024.0,
            fds[0],
            fds[1]
        );
        if growth > 10.0 {
            problems.push(format!("{}: RSS grew {growth:.1} %", node.name()));
        }
        if fds[1] - fds[0] > 20.0 {
            problems.push(format!(
                "{}: descriptors grew from {:.0} to {:.0}",
                node.name(),
                fds[0],
                fds[1]
            ));
        }
    }
    println!("    samples: {}", out_dir.join("samples.csv").display());
    if !problems.is_empty() {
        bail!("the soak found problems:\n  {}", problems.join("\n  "));
    }
    step(format!(
        "soak passed: {} exchanges, none failed, over {minutes} minutes",
        total.sent
    ));
    Ok(())
}

/// Rewrites the backend policy on `node`: every other time with an extra
/// rule no soak traffic matches, so the compiled policies really change.
fn rewrite_policy(topo: &Topology, node: &Node, round: u32) -> Result<()> {
    let dir = topo
        .tmp_dir()
        .join(format!("config-{}", node.name()))
        .join("policies");
    let mut policy = BACKEND_POLICY.to_string();
    if round % 2 == 1 {
        policy.push_str(&format!(
            "  - from: [{{source: {{principals: [\"cluster.local/ns/{}/sa/soak-{round}\"]}}}}]\n    to: [{{operation: {{methods: [\"DELETE\"]}}}}]\n",
            demo::NAMESPACE
        ));
    }
    let path = dir.join("backend.yaml");
    let tmp = dir.join(".backend.yaml.tmp");
    std::fs::write(&tmp, policy)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// The expiry-timestamp samples of `node`'s certificates, whole lines:
/// one per identity and certificate.
fn certificate_expiries(node: &Node) -> Result<Vec<String>> {
    let text = admin_get(node, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("mesh_certificate_expiry_timestamp_seconds{"))
        .map(str::to_string)
        .collect())
}

/// The sum of a metric's samples on `node`'s agent.
fn metric(node: &Node, name: &str) -> Result<u64> {
    let text = admin_get(node, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}
