//! `cargo xtask bench`: data paths against a direct connection, measured in the
//! same run, alternating, on the test bed (release agent).
//!
//! Topology: node n1 with pods a, b (and x, never enrolled), node n2 with pod c.
//! Modes, switched live through pods.yaml / workloads.yaml:
//! - direct: the agents run but enrol nothing;
//! - passthrough: a, b, c enrolled, no mesh workloads known: a->b is one agent
//!   hop, a->c two plaintext hops;
//! - mtls: as passthrough, and each node knows the other's pods: a->c goes
//!   through the HBONE tunnel (mutual TLS 1.3, HTTP/2 CONNECT).
//!
//! Loads per path: connection set-up p50, request/response latency p50/p99 on
//! one connection (64-byte messages), one bulk stream. For the tunnel also:
//! mutual-TLS handshakes per second on the tunnel port, and the receiving
//! agent's memory per idle tunnel connection.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Node, Pod, Process, Topology, e2e_preflight, wait_until};

use crate::{
    agents::{self, ADMIN},
    setup, step,
};

const SCRIPT: &str = include_str!("bench.py");
const PORT: u16 = 9000;
const TUNNEL_PORT: u16 = 15008;

struct Plan {
    rounds: usize,
    setups: u32,
    round_trips: u32,
    bulk_mib: u32,
    handshake_secs: u32,
    idle_tls: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Passthrough,
    Mtls,
    /// The experimental same-node fast path: loopback legs in the kernel.
    FastLoopback,
    /// ... and the authorized L4 flow spliced application to application.
    FastSplice,
}

const MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Passthrough,
    Mode::Mtls,
    Mode::FastLoopback,
    Mode::FastSplice,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Passthrough => "passthrough",
            Mode::Mtls => "mtls",
            Mode::FastLoopback => "fast loopback",
            Mode::FastSplice => "fast splice",
        }
    }

    /// node.yaml lines of the agents in this mode.
    fn node_extra(self) -> &'static str {
        match self {
            Mode::FastLoopback => "fastPath: {loopback: true, splice: false}\n",
            Mode::FastSplice => "fastPath: {loopback: true, splice: true}\n",
            _ => "",
        }
    }
}

#[derive(Default, Clone)]
struct Samples {
    setup_us: Vec<f64>,
    rr_p50_us: Vec<f64>,
    rr_p99_us: Vec<f64>,
    mib_s: Vec<f64>,
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    e2e_preflight().map_err(|why| anyhow::anyhow!("the benchmark uses the test bed: {why}"))?;
    let plan = if quick {
        Plan {
            rounds: 1,
            setups: 300,
            round_trips: 2000,
            bulk_mib: 200,
            handshake_secs: 2,
            idle_tls: 200,
        }
    } else {
        Plan {
            rounds: 5,
            setups: 2000,
            round_trips: 10000,
            bulk_mib: 1000,
            handshake_secs: 5,
            idle_tls: 1000,
        }
    };
    setup::build_ebpf(workspace)?;
    step("building mesh-agent (release)");
    let agent_bin = setup::build_agent_release(workspace)?;

    let topo = Topology::builder("bench")
        .node("n1", &["a", "b", "x"])
        .node("n2", &["c"])
        .build()?;
    let (a, b, c, x) = (topo.pod("a"), topo.pod("b"), topo.pod("c"), topo.pod("x"));
    let ca = crate::pki::BenchCa::new()?;
    let pki = topo.tmp_dir().join("pki");
    std::fs::create_dir_all(&pki)?;
    std::fs::write(pki.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(pki.join("ca.key"), &ca.key_pem)?;
    let (client_cert, client_key) = (pki.join("client.crt"), pki.join("client.key"));
    ca.write_workload(
        "spiffe://cluster.local/ns/bench/sa/x",
        &client_cert,
        &client_key,
    )?;

    let _servers: Vec<Process> = [b, c]
        .into_iter()
        .map(start_server)
        .collect::<Result<_>>()?;
    let mut agents = Vec::new();
    for node in topo.nodes() {
        agents.push(start_agent(&agent_bin, node, &topo, &pki, "")?);
    }
    let mut agents_extra = "";

    let paths: [(&str, &Pod, &[Mode]); 2] = [
        (
            "same node a->b",
            b,
            &[
                Mode::Direct,
                Mode::Passthrough,
                Mode::FastLoopback,
                Mode::FastSplice,
            ],
        ),
        (
            "across nodes a->c",
            c,
            &[Mode::Direct, Mode::Passthrough, Mode::Mtls],
        ),
    ];
    let mut results: Vec<Vec<Samples>> = vec![vec![Samples::default(); MODES.len()]; paths.len()];
    for round in 0..plan.rounds {
        for mode in MODES {
            // The fast path is a node setting read at start: restart the agents.
            if mode != Mode::Direct && mode.node_extra() != agents_extra {
                agents.clear();
                for node in topo.nodes() {
                    agents.push(start_agent(
                        &agent_bin,
                        node,
                        &topo,
                        &pki,
                        mode.node_extra(),
                    )?);
                }
                agents_extra = mode.node_extra();
            }
            set_mode(&topo, mode)?;
            for (i, (name, target, modes)) in paths.iter().enumerate() {
                if !modes.contains(&mode) {
                    continue;
                }
                let host = target.ipv4().to_string();
                let port = PORT.to_string();
                let s = &mut results[i][mode as usize];
                let out = run_client(a, &["setup", &host, &port, &plan.setups.to_string()])?;
                s.setup_us.push(field(&out, "p50_us")?);
                let out = run_client(a, &["rr", &host, &port, &plan.round_trips.to_string()])?;
                s.rr_p50_us.push(field(&out, "p50_us")?);
                s.rr_p99_us.push(field(&out, "p99_us")?);
                let out = run_client(a, &["bulk", &host, &port, &plan.bulk_mib.to_string()])?;
                s.mib_s.push(field(&out, "mib_per_s")?);
                step(format!(
                    "round {}/{} {:<11} {name}: set-up {:.0} µs, rr p50 {:.0} µs p99 {:.0} µs, bulk {:.0} MiB/s",
                    round + 1,
                    plan.rounds,
                    mode.name(),
                    s.setup_us.last().unwrap(),
                    s.rr_p50_us.last().unwrap(),
                    s.rr_p99_us.last().unwrap(),
                    s.mib_s.last().unwrap()
                ));
            }
        }
    }

    // HTTP requests a -> c through the tunnel: with no policy, then with ten
    // ALLOW policies with HTTP rules, the request matching the last one (L7:
    // the agent parses and decides every request).
    if !agents_extra.is_empty() {
        agents.clear();
        for node in topo.nodes() {
            agents.push(start_agent(&agent_bin, node, &topo, &pki, "")?);
        }
    }
    set_mode(&topo, Mode::Mtls)?;
    let n2 = topo.node("n2");
    let (mut http_plain, mut http_l7) = (Vec::new(), Vec::new());
    for round in 0..plan.rounds {
        for (with_policies, samples) in [(false, &mut http_plain), (true, &mut http_l7)] {
            set_policies(&topo, n2, with_policies)?;
            let out = run_client(
                a,
                &[
                    "http_rr",
                    &c.ipv4().to_string(),
                    &PORT.to_string(),
                    &plan.round_trips.to_string(),
                    "/api/v10/item",
                ],
            )?;
            samples.push((field(&out, "p50_us")?, field(&out, "p99_us")?));
            step(format!(
                "round {}/{} http a->c {}: p50 {:.0} µs p99 {:.0} µs",
                round + 1,
                plan.rounds,
                if with_policies {
                    "with L7 authorization"
                } else {
                    "no policy"
                },
                samples.last().unwrap().0,
                samples.last().unwrap().1
            ));
        }
    }
    // The L7 samples mean something only if the agent decided those requests.
    let (_, status) = n2.http_get(ADMIN.parse()?, "/status")?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let decided = status["authorization"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["policy"] == "bench/p10 rule[0]" && d["decision"] == "allow");
    if !decided {
        bail!("the L7 policies were not applied on n2 (no allow by bench/p10): {status}");
    }
    set_policies(&topo, n2, false)?;
    let http = HttpFigures {
        plain: (
            median(&http_plain.iter().map(|s| s.0).collect::<Vec<_>>()),
            median(&http_plain.iter().map(|s| s.1).collect::<Vec<_>>()),
        ),
        l7: (
            median(&http_l7.iter().map(|s| s.0).collect::<Vec<_>>()),
            median(&http_l7.iter().map(|s| s.1).collect::<Vec<_>>()),
        ),
    };

    // The tunnel port itself, on n2 (c's address), from x (outside the mesh).
    let c_host = c.ipv4().to_string();
    let (cert, key) = (
        client_cert.to_string_lossy().into_owned(),
        client_key.to_string_lossy().into_owned(),
    );
    let out = run_client(
        x,
        &[
            "handshakes",
            &c_host,
            &TUNNEL_PORT.to_string(),
            &plan.handshake_secs.to_string(),
            &cert,
            &key,
        ],
    )?;
    let handshakes_per_s = field(&out, "per_s")?;
    let n2_agent = agents[1].pid();
    let rss_before = rss_kib(n2_agent)?;
    let holder = x.spawn(
        "python3",
        &[
            "-c",
            SCRIPT,
            "hold_tls",
            &c_host,
            &TUNNEL_PORT.to_string(),
            &plan.idle_tls.to_string(),
            &cert,
            &key,
        ],
    )?;
    wait_until("idle tunnel connections", Duration::from_secs(120), || {
        Ok(holder.stdout_so_far().contains("ready"))
    })
    .with_context(|| holder.output_report())?;
    let rss_after = rss_kib(n2_agent)?;
    drop(holder);
    let per_idle_kib = (rss_after as f64 - rss_before as f64) / plan.idle_tls as f64;
    step(format!(
        "tunnel: {handshakes_per_s:.0} handshakes/s; {per_idle_kib:.1} KiB per idle connection"
    ));
    set_mode(&topo, Mode::Direct)?;

    let mut table = render(
        &plan,
        &paths,
        &results,
        handshakes_per_s,
        per_idle_kib,
        rss_before,
    );
    let _ = writeln!(
        table,
        "\nHTTP/1.1 GET, 1 kB responses, one keep-alive connection, a->c through the tunnel: no policy p50 {:.0} µs p99 {:.0} µs; \
         with L7 authorization (10 ALLOW policies with HTTP rules, the request matching the last) p50 {:.0} µs p99 {:.0} µs: \
         L7 adds {:+.0} µs at p50, {:+.0} µs at p99.",
        http.plain.0,
        http.plain.1,
        http.l7.0,
        http.l7.1,
        http.l7.0 - http.plain.0,
        http.l7.1 - http.plain.1
    );
    println!("\n{table}");
    let out_dir = workspace.join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("results.md"), &table)?;
    step(format!(
        "written to {}",
        out_dir.join("results.md").display()
    ));
    drop(agents);
    Ok(())
}

fn render(
    plan: &Plan,
    paths: &[(&str, &Pod, &[Mode])],
    results: &[Vec<Samples>],
    handshakes_per_s: f64,
    per_idle_kib: f64,
    rss_idle_kib: u64,
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Machine: {} cores, kernel {}",
        num_cpus(),
        kernel_release()
    );
    let _ = writeln!(
        t,
        "Rounds: {}; per path, mode and round: {} set-ups, {} request/responses of 64 B on one connection, one {} MiB stream. Medians over rounds; ratios against direct on the same path in the same run.\n",
        plan.rounds, plan.setups, plan.round_trips, plan.bulk_mib
    );
    let _ = writeln!(
        t,
        "| path | mode | set-up p50 | x direct | rr p50 | rr p99 | +p99 vs direct | bulk | x direct |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
    for (i, (name, _, modes)) in paths.iter().enumerate() {
        let d = &results[i][Mode::Direct as usize];
        for &mode in modes.iter() {
            let s = &results[i][mode as usize];
            let _ = writeln!(
                t,
                "| {name} | {} | {:.0} µs | {:.2} | {:.0} µs | {:.0} µs | {:+.0} µs | {:.0} MiB/s | {:.2} |",
                mode.name(),
                median(&s.setup_us),
                median(&s.setup_us) / median(&d.setup_us),
                median(&s.rr_p50_us),
                median(&s.rr_p99_us),
                median(&s.rr_p99_us) - median(&d.rr_p99_us),
                median(&s.mib_s),
                median(&s.mib_s) / median(&d.mib_s)
            );
        }
    }
    let _ = writeln!(
        t,
        "\nTunnel port (agent on n2, python client on n1): {handshakes_per_s:.0} mutual-TLS 1.3 handshakes/s \
         (client-bound: one python client); {per_idle_kib:.1} KiB of agent RSS per idle tunnel connection \
         ({} connections, agent RSS before: {} KiB).",
        plan.idle_tls, rss_idle_kib
    );
    t
}

struct HttpFigures {
    /// (p50, p99) in µs.
    plain: (f64, f64),
    l7: (f64, f64),
}

/// Ten ALLOW policies for c with HTTP rules; only the last matches the
/// benchmark's request (principal a, GET /api/v10/...).
fn set_policies(topo: &Topology, node: &Node, enabled: bool) -> Result<()> {
    let dir = config_dir(topo, node).join("policies");
    std::fs::create_dir_all(&dir)?;
    let mut yaml = String::new();
    if enabled {
        for i in 1..=10 {
            let _ = write!(
                yaml,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: c}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/bench/sa/a\"]}}}}]\n    to: [{{operation: {{methods: [\"GET\"], paths: [\"/api/v{i}/*\"]}}}}]\n"
            );
        }
    }
    std::fs::write(dir.join(".tmp"), yaml)?;
    std::fs::rename(dir.join(".tmp"), dir.join("bench.yaml"))?;
    settle(topo)
}

fn start_server(pod: &Pod) -> Result<Process> {
    let server = pod.spawn("python3", &["-c", SCRIPT, "serve", &PORT.to_string()])?;
    wait_until(
        &format!("bench server in {}", pod.name()),
        Duration::from_secs(10),
        || Ok(server.stdout_so_far().contains("ready")),
    )?;
    Ok(server)
}

fn run_client(pod: &Pod, args: &[&str]) -> Result<String> {
    let mut argv = vec!["-c", SCRIPT];
    argv.extend_from_slice(args);
    let out = pod.run("python3", &argv, Duration::from_secs(300))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, name: &str) -> Result<f64> {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().context("value")?.parse().context("number");
        }
    }
    bail!("no {name} in {out:?}")
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn config_dir(topo: &Topology, node: &Node) -> PathBuf {
    topo.tmp_dir().join(format!("bench-config-{}", node.name()))
}

fn start_agent(
    bin: &Path,
    node: &Node,
    topo: &Topology,
    pki: &Path,
    node_extra: &str,
) -> Result<Process> {
    let dir = config_dir(topo, node);
    let config = agents::AgentConfig {
        dir: &dir,
        pods_yaml: "pods: []\n",
        extra_files: &[],
        log: "warn",
        node_extra,
    };
    agents::start(bin, topo, node, pki, &config)
}

/// Switches every node to `mode` and waits until the agents agree.
fn set_mode(topo: &Topology, mode: Mode) -> Result<()> {
    for node in topo.nodes() {
        let enrol = mode != Mode::Direct;
        let mut pods = String::from("pods:\n");
        let mut enrolled = 0;
        for pod in node.pods().iter().filter(|p| enrol && p.name() != "x") {
            enrolled += 1;
            let _ = write!(pods, "{}", pod_entry(pod, "pods"));
        }
        if enrolled == 0 {
            pods.push_str("  []\n");
        }
        let mut workloads = String::from("workloads:\n");
        let remote: Vec<&Pod> = topo
            .nodes()
            .iter()
            .filter(|n| n.name() != node.name())
            .flat_map(|n| n.pods().iter())
            .filter(|p| mode == Mode::Mtls && p.name() != "x")
            .collect();
        for pod in &remote {
            let _ = write!(workloads, "{}", pod_entry(pod, "workloads"));
        }
        if remote.is_empty() {
            workloads.push_str("  []\n");
        }
        let dir = config_dir(topo, node);
        for (name, content) in [("workloads.yaml", workloads), ("pods.yaml", pods)] {
            std::fs::write(dir.join(".tmp"), content)?;
            std::fs::rename(dir.join(".tmp"), dir.join(name))?;
        }
        wait_until(
            &format!("{} to be in mode {}", node.name(), mode.name()),
            Duration::from_secs(10),
            || {
                let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
                let status: serde_json::Value = serde_json::from_str(&status)?;
                let pods = status["pods"]
                    .as_array()
                    .map_or(0, |p| p.iter().filter(|p| p["enrolled"] == true).count());
                Ok(pods == enrolled && status["configGeneration"].as_u64().unwrap_or(0) > 0)
            },
        )?;
    }
    // The workloads file has no visible effect in /status: give the watcher a
    // moment's debounce by checking that the config generation settled.
    settle(topo)
}

/// Waits until no node's config generation changes for 300 ms.
fn settle(topo: &Topology) -> Result<()> {
    let generation = |node: &Node| -> Result<u64> {
        let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        Ok(status["configGeneration"].as_u64().unwrap_or(0))
    };
    let mut last: Vec<u64> = topo.nodes().iter().map(generation).collect::<Result<_>>()?;
    let mut stable_since = std::time::Instant::now();
    wait_until(
        "the configuration to settle",
        Duration::from_secs(10),
        || {
            let now: Vec<u64> = topo.nodes().iter().map(generation).collect::<Result<_>>()?;
            if now != last {
                last = now;
                stable_since = std::time::Instant::now();
            }
            Ok(stable_since.elapsed() >= Duration::from_millis(300))
        },
    )
}

fn pod_entry(pod: &Pod, kind: &str) -> String {
    let mut entry = format!(
        "  - name: {}\n    namespace: bench\n    serviceAccount: {}\n    ipv4: {}\n    ipv6: \"{}\"\n",
        pod.name(),
        pod.name(),
        pod.ipv4(),
        pod.ipv6()
    );
    if kind == "pods" {
        let _ = write!(
            entry,
            "    labels: {{app: {}}}\n    netns: {}\n    cgroup: {}\n",
            pod.name(),
            pod.netns_path().display(),
            pod.cgroup_dir().display()
        );
    } else {
        let _ = writeln!(entry, "    node: {}", pod.node_name());
    }
    entry
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    line.split_whitespace()
        .nth(1)
        .context("value")?
        .parse()
        .context("number")
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
