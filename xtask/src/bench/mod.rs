//! `cargo xtask bench`: every data path against a direct connection, measured
//! in the same run, on the test bed (release agent and tools).
//!
//! Topology: node n1 with pods a, b (and x, never enrolled), node n2 with pod
//! c. The paths, from a:
//! - direct, same node (a->b) and across nodes (a->c): the agents enrol nothing;
//! - agent, same node: a and b enrolled: one agent hop (userspace relay);
//! - agent, same node, fast path: the same with the experimental kernel fast
//!   path on (loopback legs and splicing; off by default, docs/fastpath.md);
//! - agent, across nodes, mTLS L4: each node knows the other's pods, so a->c
//!   goes through the HBONE tunnel (mutual TLS 1.3, HTTP/2 CONNECT);
//! - the same with L7 authorization: ten ALLOW policies with HTTP rules on c,
//!   the request matching the last.
//!
//! Loads per path: fixed-rate HTTP/1.1 (1 kB answers, 1,000 req/s over 16
//! connections, latency from each request's scheduled time, so no
//! coordinated omission), saturation (64 connections), one bulk TCP stream,
//! connection churn (connect, one request, close). For the agents: CPU seconds
//! per 1,000 requests and peak RSS during the fixed-rate load; memory per idle
//! connection and per pooled TLS connection. Scale: an agent with 100, then
//! 1,000 enrolled pods, 1,000 policies and 50 services: idle RSS, scrape
//! cost, and agent CPU and RSS per connection under connection churn.
//! Output: target/bench/results.{json,md,svg}.

mod ca_bench;
mod compare;
mod dns_bench;
mod latency_pairs;
mod plot;
mod routes_bench;
mod settings_cost;
mod tracing_bench;
mod ztunnel;

pub use compare::run as compare;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Node, Pod, Process, Topology, e2e_preflight, wait_until};
use serde_json::{Value, json};

use crate::{
    agents::{self, ADMIN},
    setup, step,
};

const SCRIPT: &str = include_str!("bench.py");
/// http-serve in b and c (1 kB answers).
const HTTP_PORT: u16 = 9000;
/// bench.py's servers in b and c (bulk).
const RAW_PORT: u16 = 9100;
const TUNNEL_PORT: u16 = 15008;
/// The request the L7 policies decide (it matches the last of ten rules).
const REQUEST_PATH: &str = "/api/v10/item";

struct Plan {
    rounds: usize,
    /// Fixed-rate load: this long at 1,000 req/s over 16 connections.
    rate_secs: u32,
    saturation_secs: u32,
    churn_secs: u32,
    bulk_mib: u32,
    handshake_secs: u32,
    idle_tls: u32,
    idle_tcp: u32,
    /// The scale measurements: an agent with this many enrolled pods, each.
    scale_pods: &'static [usize],
    /// Connections (one request each) opened for the per-connection cost.
    scale_connections: u32,
    idle_policies: usize,
    idle_services: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Passthrough,
    Mtls,
    /// mTLS, and ten L7 policies on c.
    MtlsL7,
    /// The experimental same-node fast path (loopback legs and splicing).
    FastSplice,
    /// Istio's ztunnel on both sides instead of the agents (which enrol
    /// nothing meanwhile).
    Ztunnel,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Passthrough => "passthrough",
            Mode::Mtls => "mtls",
            Mode::MtlsL7 => "mtls+l7",
            Mode::FastSplice => "fast path",
            Mode::Ztunnel => "ztunnel",
        }
    }

    /// node.yaml lines of the agents in this mode.
    fn node_extra(self) -> &'static str {
        match self {
            Mode::FastSplice => "fastPath: {loopback: true, splice: true}\n",
            _ => "",
        }
    }

    /// Which pods are enrolled, and whether the nodes know each other's pods.
    fn enrols(self) -> bool {
        !matches!(self, Mode::Direct | Mode::Ztunnel)
    }

    fn mesh(self) -> bool {
        matches!(self, Mode::Mtls | Mode::MtlsL7)
    }
}

/// Measured in this order each round.
const MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::Passthrough,
    Mode::Mtls,
    Mode::MtlsL7,
    Mode::Ztunnel,
    Mode::FastSplice,
];

struct BenchPath {
    name: &'static str,
    /// `b` (same node) or `c` (across nodes).
    target: &'static str,
    mode: Mode,
    /// Index of the direct path it is compared with.
    baseline: usize,
}

/// The index in [`PATHS`] of ztunnel's path, which every agent path is
/// also compared with.
const ZTUNNEL_PATH: usize = 6;

const PATHS: [BenchPath; 7] = [
    BenchPath {
        name: "direct, same node",
        target: "b",
        mode: Mode::Direct,
        baseline: 0,
    },
    BenchPath {
        name: "direct, across nodes",
        target: "c",
        mode: Mode::Direct,
        baseline: 1,
    },
    BenchPath {
        name: "agent, same node",
        target: "b",
        mode: Mode::Passthrough,
        baseline: 0,
    },
    BenchPath {
        name: "agent, same node, fast path (experimental)",
        target: "b",
        mode: Mode::FastSplice,
        baseline: 0,
    },
    BenchPath {
        name: "agent, across nodes, mTLS L4",
        target: "c",
        mode: Mode::Mtls,
        baseline: 1,
    },
    BenchPath {
        name: "agent, across nodes, mTLS + L7 authorization",
        target: "c",
        mode: Mode::MtlsL7,
        baseline: 1,
    },
    BenchPath {
        name: "ztunnel, across nodes, mTLS L4 (Istio ambient)",
        target: "c",
        mode: Mode::Ztunnel,
        baseline: 1,
    },
];

/// One round's figures of one path.
#[derive(Default, Clone)]
struct Sample {
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    rate_requests: f64,
    saturation_rps: f64,
    churn_per_s: f64,
    /// None where the path carries HTTP only (L7).
    bulk_gbit_s: Option<f64>,
    agent_cpu_s_per_1k: f64,
    /// The proxies' context switches (all threads, voluntary and not) per
    /// request during the fixed-rate load.
    context_switches_per_request: f64,
    agent_peak_rss_kib: u64,
    agent_steady_rss_kib: u64,
}

struct Tools {
    agent: PathBuf,
    http_load: PathBuf,
    ca_load: PathBuf,
}

/// The plan of a run: `--quick` or the full one.
fn plan(quick: bool) -> Plan {
    if quick {
        Plan {
            rounds: 1,
            rate_secs: 5,
            saturation_secs: 2,
            churn_secs: 1,
            bulk_mib: 200,
            handshake_secs: 2,
            idle_tls: 200,
            idle_tcp: 1_000,
            scale_pods: &[100, 1_000],
            scale_connections: 4_000,
            idle_policies: 1_000,
            idle_services: 50,
        }
    } else {
        Plan {
            rounds: 2,
            rate_secs: 30,
            saturation_secs: 5,
            churn_secs: 3,
            bulk_mib: 1_000,
            handshake_secs: 5,
            idle_tls: 1_000,
            idle_tcp: 1_000,
            scale_pods: &[100, 1_000],
            scale_connections: 10_000,
            idle_policies: 1_000,
            idle_services: 50,
        }
    }
}

/// The test bed of the paths: two nodes, their pods and servers, a CA.
struct Bed {
    topo: Topology,
    pki: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// The servers in b and c; they stop when dropped.
    _servers: Vec<Process>,
}

impl Bed {
    fn build(http_serve: &Path, ca: &crate::pki::BenchCa) -> Result<Self> {
        let topo = Topology::builder("bench")
            .node("n1", &["a", "b", "x"])
            .node("n2", &["c"])
            .build()?;
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
        let mut servers = Vec::new();
        for name in ["b", "c"] {
            servers.push(start_http_server(topo.pod(name), http_serve)?);
            servers.push(start_raw_server(topo.pod(name))?);
        }
        Ok(Self {
            topo,
            pki,
            client_cert,
            client_key,
            _servers: servers,
        })
    }
}

/// Builds the kernel programs, the release agent and the load tools.
fn build_tools(workspace: &Path) -> Result<(Tools, PathBuf)> {
    e2e_preflight().map_err(|why| anyhow::anyhow!("the benchmark uses the test bed: {why}"))?;
    setup::build_ebpf(workspace)?;
    step("building mesh-agent and the load tools (release)");
    let agent_bin = setup::build_agent_release(workspace)?;
    let (http_load, http_serve) = setup::build_load_tools_release(workspace)?;
    Ok((
        Tools {
            agent: agent_bin,
            http_load,
            ca_load: workspace.join("target/release/ca-load"),
        },
        http_serve,
    ))
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    let plan = plan(quick);
    let open_file_limit = raise_open_file_limit();
    let (tools, http_serve) = build_tools(workspace)?;
    let ca = crate::pki::BenchCa::new()?;
    let bed = Bed::build(&http_serve, &ca)?;
    let (topo, pki) = (&bed.topo, &bed.pki);
    let (client_cert, client_key) = (&bed.client_cert, &bed.client_key);
    let (a, c, x) = (topo.pod("a"), topo.pod("c"), topo.pod("x"));
    let mut agents: Vec<Process> = Vec::new();
    let mut agents_extra: Option<&str> = None;

    let ztunnel_bin = ztunnel::binary(workspace);
    match &ztunnel_bin {
        Some(path) => step(format!(
            "ztunnel: {} (its path is measured beside the agent's)",
            path.display()
        )),
        None => step(format!(
            "ztunnel: not found at {} nor ZTUNNEL_BIN: its path is SKIPPED, no ratios to it",
            workspace.join("../shared/peer/ztunnel").display()
        )),
    }
    // MESH_BENCH_MODES=mtls,ztunnel: only those modes, printed, no report
    // (for profiling one change quickly).
    let only: Option<Vec<String>> = std::env::var("MESH_BENCH_MODES")
        .ok()
        .map(|v| v.split(',').map(|m| m.trim().to_owned()).collect());
    if let Some(only) = &only {
        step(format!(
            "only the modes {only:?} (MESH_BENCH_MODES): no report"
        ));
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); PATHS.len()];
    for round in 0..plan.rounds {
        for mode in MODES {
            if only
                .as_ref()
                .is_some_and(|only| !only.iter().any(|m| m == mode.name()))
            {
                continue;
            }
            // The fast path is a node setting read at start: restart the agents.
            if agents_extra != Some(mode.node_extra()) {
                agents.clear();
                for node in topo.nodes() {
                    agents.push(start_agent(
                        &tools.agent,
                        node,
                        topo,
                        pki,
                        mode.node_extra(),
                    )?);
                }
                agents_extra = Some(mode.node_extra());
            }
            set_mode(topo, mode)?;
            set_policies(topo, topo.node("n2"), mode == Mode::MtlsL7)?;
            let mut pids: Vec<u32> = agents.iter().map(Process::pid).collect();
            let _ztunnels = if mode == Mode::Ztunnel {
                let Some(binary) = ztunnel_bin.as_deref() else {
                    continue;
                };
                let pair = ztunnel::Pair::start(binary, &topo.tmp_dir().join("ztunnel"), a, c)?;
                pids = pair.pids();
                Some(pair)
            } else {
                None
            };
            for (i, path) in PATHS.iter().enumerate().filter(|(_, p)| p.mode == mode) {
                let sample = measure(&plan, &tools, a, topo.pod(path.target), path, &pids)?;
                step(format!(
                    "round {}/{} {}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs; saturation {:.0} req/s; churn {:.0} conn/s; bulk {}; agents {:.2} CPU s/1k req, peak RSS {} KiB",
                    round + 1,
                    plan.rounds,
                    path.name,
                    sample.p50_us,
                    sample.p99_us,
                    sample.p999_us,
                    sample.saturation_rps,
                    sample.churn_per_s,
                    sample
                        .bulk_gbit_s
                        .map_or("-".to_string(), |g| format!("{g:.1} Gbit/s")),
                    sample.agent_cpu_s_per_1k,
                    sample.agent_peak_rss_kib,
                ));
                samples[i].push(sample);
            }
        }
    }
    let runs = |name: &str| {
        only.as_ref()
            .is_none_or(|only| only.iter().any(|m| m == name))
    };
    // Connection set-up with the client's address preserved against
    // without (MESH_BENCH_MODES=setup runs only this).
    let mut setup = latency_pairs::LatencyPairs::new(
        format!(
            "Connection set-up (connect to the first byte back, {} connections one at a time, python client; medians over rounds), deliveries from the client's address against from the agent's (`preserveSourceAddress: false`), alternated each round:",
            latency_pairs::COUNT
        ),
        ["client's address", "agent's address"],
    );
    if runs("setup") {
        for round in 0..plan.rounds {
            for (index, (name, extra)) in latency_pairs::SETUP_SETTINGS.iter().enumerate() {
                agents.clear();
                for node in topo.nodes() {
                    agents.push(start_agent(&tools.agent, node, topo, pki, extra)?);
                }
                set_mode(topo, Mode::Mtls)?;
                for (label, target) in [
                    ("a->b, same node", "b"),
                    ("a->c, across nodes, mTLS L4", "c"),
                ] {
                    let ip = topo.pod(target).ipv4().to_string();
                    let port = RAW_PORT.to_string();
                    let sample = latency_pairs::measure(run_script, a, "setup", &[&ip, &port])?;
                    step(format!(
                        "round {}/{} set-up {label}, from the {name}: p50 {:.0} µs, p99 {:.0} µs",
                        round + 1,
                        plan.rounds,
                        sample.p50_us,
                        sample.p99_us
                    ));
                    setup.push(label, index, sample);
                }
            }
        }
    }
    // A DNS lookup through the agent's DNS proxy against a direct one, to
    // dnsmasq in b (MESH_BENCH_MODES=dns runs only this).
    let mut dns = latency_pairs::LatencyPairs::new(
        format!(
            "DNS lookups (UDP, one at a time, {} per measurement, python client in a, dnsmasq in b on the same node; medians over rounds): a enrolled (through the agent's DNS proxy) against not enrolled (straight to dnsmasq), alternated each round:",
            latency_pairs::COUNT
        ),
        ["through the agent", "direct"],
    );
    if runs("dns") {
        let _resolver = dns_bench::start_dnsmasq(topo.pod("b"))?;
        dns_bench::write_services(topo, |node| config_dir(topo, node))?;
        agents.clear();
        for node in topo.nodes() {
            agents.push(start_agent(&tools.agent, node, topo, pki, "")?);
        }
        let resolver = topo.pod("b").ipv4().to_string();
        for round in 0..plan.rounds {
            for (index, mode) in [Mode::Passthrough, Mode::Direct].into_iter().enumerate() {
                set_mode(topo, mode)?;
                for (label, name) in dns_bench::NAMES {
                    let sample = latency_pairs::measure(run_script, a, "dns", &[&resolver, name])?;
                    step(format!(
                        "round {}/{} DNS {label}, {}: p50 {:.0} µs, p99 {:.0} µs",
                        round + 1,
                        plan.rounds,
                        mode.name(),
                        sample.p50_us,
                        sample.p99_us
                    ));
                    dns.push(label, index, sample);
                }
            }
        }
        dns_bench::remove_services(topo, |node| config_dir(topo, node))?;
    }
    // What request spans cost: off, 1%, 100%, 100% with the collector
    // away (MESH_BENCH_MODES=tracing runs only this).
    let mut traced = tracing_bench::cost(plan.rate_secs);
    if runs("tracing") {
        tracing_bench::write_services(topo, |node| config_dir(topo, node))?;
        let receivers = tracing_bench::start_receivers(topo)?;
        let rounds = tracing_bench::rounds(plan.rounds);
        for round in 0..rounds {
            for (name, extra) in tracing_bench::settings(round) {
                agents.clear();
                for node in topo.nodes() {
                    agents.push(start_agent(&tools.agent, node, topo, pki, &extra)?);
                }
                set_mode(topo, Mode::Mtls)?;
                set_policies(topo, topo.node("n2"), true)?;
                let pids: Vec<u32> = agents.iter().map(Process::pid).collect();
                let received: Vec<usize> = receivers.iter().map(|r| r.span_count()).collect();
                let sample = tracing_bench::measure(&tools, a, &pids, plan.rate_secs)?;
                step(format!(
                    "round {}/{} tracing {name}: p50 {:.0} µs, p99 {:.0} µs, agents {:.3} CPU s/1k req; spans n1 {}, n2 {}; received before this run {received:?}, now {:?}",
                    round + 1,
                    rounds,
                    sample.p50_us,
                    sample.p99_us,
                    sample.cpu_s_per_1k,
                    tracing_bench::spans_counted(topo.node("n1"))?,
                    tracing_bench::spans_counted(topo.node("n2"))?,
                    receivers.iter().map(|r| r.span_count()).collect::<Vec<_>>(),
                ));
                traced.push(name, sample);
            }
        }
        set_policies(topo, topo.node("n2"), false)?;
        dns_bench::remove_services(topo, |node| config_dir(topo, node))?;
    }
    // What a route costs: two header matches and a header modifier on the
    // client's node, against the same request with no route
    // (MESH_BENCH_MODES=routes runs only this).
    let mut routed = routes_bench::cost(plan.rate_secs);
    if runs("routes") {
        routes_bench::write_services(topo, |node| config_dir(topo, node))?;
        let rounds = routes_bench::rounds(plan.rounds);
        for round in 0..rounds {
            for (name, route) in routes_bench::settings(round) {
                routes_bench::write_route(topo, |node| config_dir(topo, node), route)?;
                agents.clear();
                for node in topo.nodes() {
                    agents.push(start_agent(&tools.agent, node, topo, pki, "")?);
                }
                set_mode(topo, Mode::Mtls)?;
                if route {
                    routes_bench::check_accepted(topo.node("n1"))?;
                }
                let pids: Vec<u32> = agents.iter().map(Process::pid).collect();
                let sample = routes_bench::measure(&tools, a, &pids, plan.rate_secs)?;
                step(format!(
                    "round {}/{} routes {name}: p50 {:.0} µs, p99 {:.0} µs, agents {:.3} CPU s/1k req",
                    round + 1,
                    rounds,
                    sample.p50_us,
                    sample.p99_us,
                    sample.cpu_s_per_1k,
                ));
                routed.push(name, sample);
            }
        }
        routes_bench::write_route(topo, |node| config_dir(topo, node), false)?;
        dns_bench::remove_services(topo, |node| config_dir(topo, node))?;
    }
    // The signer: certificates per second and signing latency
    // (MESH_BENCH_MODES=ca runs only this).
    let signer = if runs("ca") {
        ca_bench::measure(&tools.agent, &tools.ca_load, topo)?
    } else {
        Vec::new()
    };
    if only.is_some() {
        println!(
            "{}{}{}{}{}",
            setup.markdown(),
            dns.markdown(),
            traced.markdown("off"),
            routed.markdown(routes_bench::BASELINE),
            ca_bench::markdown(&signer)
        );
        return Ok(());
    }
    // The L7 figures mean something only if the agent decided those requests.
    set_mode(topo, Mode::MtlsL7)?;
    set_policies(topo, topo.node("n2"), true)?;
    check_l7_decided(&tools, a, c, topo.node("n2"))?;
    set_policies(topo, topo.node("n2"), false)?;

    // Memory: per idle connection through the agent (a->b), per idle tunnel
    // connection (x -> c's tunnel port), and the tunnel's handshake rate.
    agents.clear();
    for node in topo.nodes() {
        agents.push(start_agent(&tools.agent, node, topo, pki, "")?);
    }
    set_mode(topo, Mode::Mtls)?;
    let memory = measure_memory(
        &plan,
        &agents,
        a,
        topo.pod("b"),
        c,
        x,
        client_cert,
        client_key,
    )?;
    drop(agents);
    drop(bed);

    let mut scale: Vec<Scale> = Vec::new();
    let mut scale_skipped = Vec::new();
    for &pods in plan.scale_pods {
        // Descriptors per pod as the last size measured them, with a margin.
        let (files_then, pods_then) = scale.last().map_or((0, 1), |at| (at.open_files, at.pods));
        let needed = files_then * pods / pods_then * 11 / 10;
        if needed as u64 > open_file_limit {
            let why = format!(
                "{pods} pods not measured: an agent would need about {needed} open files \
                 ({} per pod at {pods_then} pods), above this machine's limit of {open_file_limit}",
                files_then / pods_then,
            );
            step(&why);
            scale_skipped.push(why);
            continue;
        }
        let at = agent_at_scale(&plan, &tools, &http_serve, &ca, pods)?;
        step(format!(
            "agent with {pods} pods, {} policies and {} services: {} open files; idle {} KiB RSS; a /metrics scrape takes {:.2} ms for {} bytes; {:.1} µs of agent CPU per connection, RSS {} KiB after {} connections",
            plan.idle_policies,
            plan.idle_services,
            at.open_files,
            at.rss_kib,
            at.scrape_ms,
            at.scrape_bytes,
            at.cpu_us_per_connection,
            at.rss_after_churn_kib,
            plan.scale_connections
        ));
        scale.push(at);
    }

    let report = Report {
        plan: &plan,
        samples: &samples,
        memory: &memory,
        scale: &scale,
        scale_skipped: &scale_skipped,
        setup: &setup,
        dns: &dns,
        tracing: &traced,
        routes: &routed,
        signer: &signer,
    };
    let out_dir = bench_dir();
    let table = report.markdown();
    println!("\n{table}");
    std::fs::write(out_dir.join("results.md"), &table)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    plot::latency_svg(
        "Request latency at 1,000 req/s (HTTP/1.1, 16 connections, 1 kB answers)",
        &report.latencies(),
        &out_dir.join("results.svg"),
    )?;
    step(format!(
        "written to {}",
        out_dir.join("results.{md,json,svg}").display()
    ));
    Ok(())
}

/// target/bench of the workspace (made if missing).
fn bench_dir() -> PathBuf {
    let dir = crate::workspace_root().join("target").join("bench");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Runs every load of one path.
fn measure(
    plan: &Plan,
    tools: &Tools,
    client: &Pod,
    target: &Pod,
    path: &BenchPath,
    agent_pids: &[u32],
) -> Result<Sample> {
    let url = format!("http://{}:{HTTP_PORT}{REQUEST_PATH}", target.ipv4());
    // ztunnel's client side goes through its SOCKS5 listener (it does not
    // capture by itself); the agent's is captured by its kernel programs.
    let http_load = |tools: &Tools, client: &Pod, args: &[&str]| {
        let mut args = args.to_vec();
        if path.mode == Mode::Ztunnel {
            args.extend(["--socks5", ztunnel::SOCKS5]);
        }
        http_load(tools, client, &args)
    };
    let rss_at_start: Vec<u64> = agent_pids
        .iter()
        .map(|p| rss_kib(*p).unwrap_or(0))
        .collect();
    let cpu_before = cpu_ticks(agent_pids)?;
    let switches_before = context_switches_by_thread(agent_pids);
    let perf = PerfStat::start(agent_pids, &bench_dir());
    let sampler = RssSampler::start(agent_pids.to_vec());
    let fixed_args = fixed_rate_args(&url, plan.rate_secs);
    let fixed = http_load(
        tools,
        client,
        &fixed_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let rss = RssFigures::of(&sampler.stop());
    let cpu_s = (cpu_ticks(agent_pids)? - cpu_before) as f64 / clock_ticks_per_second();
    let switches_after = context_switches_by_thread(agent_pids);
    let requests = fixed["requests"].as_f64().unwrap_or(0.0);
    if let Some(perf) = perf {
        step(format!("  perf per request: {}", perf.stop(requests)));
    }
    // Threads that ended during the load are not counted (none should).
    let by_thread: Vec<(String, f64)> = switches_after
        .iter()
        .map(|(name, after)| {
            let before = switches_before.get(name).copied().unwrap_or(0);
            (
                name.clone(),
                after.saturating_sub(before) as f64 / requests.max(1.0),
            )
        })
        .filter(|(_, per_request)| *per_request >= 0.01)
        .collect();
    let switches: u64 = switches_after
        .iter()
        .map(|(name, after)| after.saturating_sub(switches_before.get(name).copied().unwrap_or(0)))
        .sum();
    if !agent_pids.is_empty() {
        step(format!(
            "  agent RSS at the start of the fixed-rate load {rss_at_start:?} KiB; during it: peak {} KiB, steady {} KiB; context switches per request by thread: {}",
            rss.peak_kib,
            rss.steady_kib,
            by_thread
                .iter()
                .map(|(name, n)| format!("{name} {n:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let saturation = http_load(
        tools,
        client,
        &[
            "--url",
            &url,
            "--duration-ms",
            &(plan.saturation_secs * 1000).to_string(),
            "--connections",
            "64",
            "--concurrency",
            "64",
        ],
    )?;
    let churn = http_load(
        tools,
        client,
        &[
            "--url",
            &url,
            "--duration-ms",
            &(plan.churn_secs * 1000).to_string(),
            "--concurrency",
            "4",
            "--connections",
            "4",
            "--new-connection-per-request",
        ],
    )?;
    let bulk_gbit_s = if matches!(path.mode, Mode::MtlsL7 | Mode::Ztunnel) {
        // The L7 policies allow HTTP requests only: no raw stream. ztunnel's
        // client is reached through SOCKS5, which the bulk script does not
        // speak.
        None
    } else {
        let out = run_script(
            client,
            &[
                "bulk",
                &target.ipv4().to_string(),
                &RAW_PORT.to_string(),
                &plan.bulk_mib.to_string(),
            ],
        )?;
        Some(field(&out, "mib_per_s")? * 8.0 * 1.048_576 / 1000.0)
    };
    let latency = &fixed["latency_us"];
    let us = |name: &str| latency[name].as_f64().unwrap_or(f64::NAN);
    Ok(Sample {
        p50_us: us("p50"),
        p90_us: us("p90"),
        p99_us: us("p99"),
        p999_us: us("p999"),
        rate_requests: requests,
        saturation_rps: saturation["rps"].as_f64().unwrap_or(0.0),
        churn_per_s: churn["rps"].as_f64().unwrap_or(0.0),
        bulk_gbit_s,
        agent_cpu_s_per_1k: if agent_pids.is_empty() || requests == 0.0 {
            0.0
        } else {
            cpu_s / (requests / 1000.0)
        },
        context_switches_per_request: if requests == 0.0 {
            0.0
        } else {
            switches as f64 / requests
        },
        agent_peak_rss_kib: rss.peak_kib,
        agent_steady_rss_kib: rss.steady_kib,
    })
}

/// The fixed-rate load latency and CPU are measured with: 1,000 requests/s
/// over 16 connections to `url` for `secs`.
fn fixed_rate_args(url: &str, secs: u32) -> Vec<String> {
    [
        "--url",
        url,
        "--rate",
        "1000",
        "--connections",
        "16",
        "--duration-ms",
        &(u64::from(secs) * 1000).to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs http-load in `client` and returns its report; a request that failed
/// makes the whole benchmark fail (a broken path must not look fast).
fn http_load(tools: &Tools, client: &Pod, args: &[&str]) -> Result<Value> {
    let out = client
        .run(&tools.http_load, args, Duration::from_secs(600))
        .with_context(|| format!("http-load {}", args.join(" ")))?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("http-load output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if report["errors"].as_u64() != Some(0) || report["ok"] != report["requests"] {
        bail!(
            "http-load {}: not every request succeeded: {report}",
            args.join(" ")
        );
    }
    Ok(report)
}

fn check_l7_decided(tools: &Tools, client: &Pod, target: &Pod, node: &Node) -> Result<()> {
    let url = format!("http://{}:{HTTP_PORT}{REQUEST_PATH}", target.ipv4());
    http_load(tools, client, &["--url", &url, "--requests", "10"])?;
    let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
    let status: Value = serde_json::from_str(&status)?;
    let decided = status["authorization"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["policy"] == "bench/p10 rule[0]" && d["decision"] == "allow");
    if !decided {
        bail!("the L7 policies were not applied on n2 (no allow by bench/p10): {status}");
    }
    Ok(())
}

struct Memory {
    handshakes_per_s: f64,
    per_idle_tls_kib: f64,
    per_idle_tcp_kib: f64,
}

#[allow(clippy::too_many_arguments)]
fn measure_memory(
    plan: &Plan,
    agents: &[Process],
    a: &Pod,
    b: &Pod,
    c: &Pod,
    x: &Pod,
    cert: &Path,
    key: &Path,
) -> Result<Memory> {
    let (n1_agent, n2_agent) = (agents[0].pid(), agents[1].pid());
    // Idle TCP connections a->b through the agent (two sockets each).
    let before = rss_kib(n1_agent)?;
    let holder = a.spawn(
        "python3",
        &[
            "-c",
            SCRIPT,
            "hold_tcp",
            &b.ipv4().to_string(),
            &RAW_PORT.to_string(),
            &plan.idle_tcp.to_string(),
        ],
    )?;
    wait_until("idle connections", Duration::from_secs(120), || {
        Ok(holder.stdout_so_far().contains("ready"))
    })
    .with_context(|| holder.output_report())?;
    let after = rss_kib(n1_agent)?;
    drop(holder);
    let per_idle_tcp_kib = (after as f64 - before as f64) / f64::from(plan.idle_tcp);

    let c_host = c.ipv4().to_string();
    let (cert, key) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let out = run_script(
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
    let before = rss_kib(n2_agent)?;
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
    let after = rss_kib(n2_agent)?;
    drop(holder);
    let per_idle_tls_kib = (after as f64 - before as f64) / f64::from(plan.idle_tls);
    step(format!(
        "memory: {per_idle_tcp_kib:.1} KiB per idle proxied connection, {per_idle_tls_kib:.1} KiB per idle tunnel connection; {handshakes_per_s:.0} tunnel handshakes/s"
    ));
    Ok(Memory {
        handshakes_per_s,
        per_idle_tls_kib,
        per_idle_tcp_kib,
    })
}

/// The idle agent's figures.
/// An agent at one scale (pods enrolled).
struct Scale {
    pods: usize,
    /// Idle, settled.
    rss_kib: u64,
    /// Median time of a whole `/metrics` scrape (request to last byte).
    scrape_ms: f64,
    scrape_bytes: usize,
    /// User+system CPU of the agent per connection (one HTTP request each,
    /// same node, decided by L7 policy), over `scale_connections`.
    cpu_us_per_connection: f64,
    rss_after_churn_kib: u64,
    /// The agent's descriptors once every pod is enrolled.
    open_files: usize,
}

/// The agents inherit this process's open-file limit (they raise their soft
/// limit to the hard one), and an agent holds descriptors per enrolled pod
/// (its listeners in the pod, the kernel programs' cgroup links). A
/// DaemonSet pod gets containerd's 1,048,576: the bench asks for the same,
/// which needs CAP_SYS_RESOURCE; without it the limit stays as it is, and
/// scale sizes that would not fit are named, not measured. The hard limit
/// in effect.
fn raise_open_file_limit() -> u64 {
    const CONTAINERD_NOFILE: libc::rlim_t = 1_048_576;
    let wanted = libc::rlimit {
        rlim_cur: CONTAINERD_NOFILE,
        rlim_max: CONTAINERD_NOFILE,
    };
    // SAFETY: setrlimit only reads the struct passed to it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return CONTAINERD_NOFILE;
    }
    let why = std::io::Error::last_os_error();
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
    step(format!(
        "the open-file limit stays at {} (raising it to containerd's {CONTAINERD_NOFILE}: {why})",
        now.rlim_max
    ));
    now.rlim_max
}

/// How many scrapes the median is taken over.
const SCRAPES: usize = 21;

/// An agent on a node of its own with `pods` enrolled pods,
/// `idle_policies` policies and `idle_services` services: its RSS once
/// settled with no traffic, what a Prometheus scrape costs, then its CPU and
/// RSS per connection while connections (one request each) come and go
/// between two of its pods.
fn agent_at_scale(
    plan: &Plan,
    tools: &Tools,
    http_serve: &Path,
    ca: &crate::pki::BenchCa,
    pod_count: usize,
) -> Result<Scale> {
    let names: Vec<String> = (0..pod_count).map(|i| format!("p{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    step(format!("building a node with {pod_count} pods"));
    let topo = Topology::builder("bench-idle").node("m1", &refs).build()?;
    let node = topo.node("m1");
    let pki = topo.tmp_dir().join("pki");
    std::fs::create_dir_all(&pki)?;
    std::fs::write(pki.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(pki.join("ca.key"), &ca.key_pem)?;
    let mut pods = String::from("pods:\n");
    for pod in node.pods() {
        pods.push_str(&pod_entry(pod, "pods"));
    }
    let mut policies = String::new();
    for i in 0..plan.idle_policies {
        let app = &names[i % names.len()];
        let _ = write!(
            policies,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: idle-{i}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/bench/sa/p{:03}\"]}}}}]\n    to: [{{operation: {{methods: [\"GET\"], paths: [\"/v{i}/*\"]}}}}]\n",
            (i + 1) % names.len()
        );
    }
    let dir = topo.tmp_dir().join("idle-config");
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("policies").join("idle.yaml"), policies)?;
    // Services of two endpoints each, on pods of the node, HTTP and TCP ports.
    let mut services = String::from("services:\n");
    let pod_list = node.pods();
    for i in 0..plan.idle_services {
        let (a, b) = (
            &pod_list[(2 * i) % pod_list.len()],
            &pod_list[(2 * i + 1) % pod_list.len()],
        );
        let _ = write!(
            services,
            "  - name: svc-{i}\n    namespace: bench\n    vips: [10.97.{}.{}]\n    ports: [{{port: 80, targetPort: 8080, protocol: http}}, {{port: 5432, protocol: tcp}}]\n    endpoints:\n      - {{name: {}, address: {}, node: m1}}\n      - {{name: {}, address: {}, node: m1}}\n",
            i / 250,
            i % 250 + 1,
            a.name(),
            a.ipv4(),
            b.name(),
            b.ipv4()
        );
    }
    let extra = [("services.yaml", services)];
    let config = agents::AgentConfig {
        dir: &dir,
        pods_yaml: &pods,
        extra_files: &extra,
        log: "warn",
        node_extra: "",
        issuer_extra: "",
        identity: None,
    };
    let agent = agents::start(&tools.agent, &topo, node, &pki, &config)?;
    let pid = agent.pid();
    wait_until("every pod enrolled", Duration::from_secs(60), || {
        let (_, status) = node.http_get(ADMIN.parse()?, "/status")?;
        let status: Value = serde_json::from_str(&status)?;
        let pods = status["pods"].as_array().cloned().unwrap_or_default();
        if let Some(refused) = pods.iter().find(|p| p["error"].is_string()) {
            bail!("{} was not enrolled: {}", refused["name"], refused["error"]);
        }
        let enrolled = pods.iter().filter(|p| p["enrolled"] == true).count();
        Ok(enrolled == pod_count)
    })?;
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    // Settled: RSS stops moving (certificates minted, caches filled).
    let mut last = rss_kib(pid)?;
    let mut stable = 0;
    wait_until(
        "the idle agent's memory to settle",
        Duration::from_secs(30),
        || {
            std::thread::sleep(Duration::from_millis(200));
            let now = rss_kib(pid)?;
            stable = if now.abs_diff(last) < 64 {
                stable + 1
            } else {
                0
            };
            last = now;
            Ok(stable >= 5)
        },
    )?;
    let mut times = Vec::with_capacity(SCRAPES);
    let mut scrape_bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let (code, body) = node.http_get(ADMIN.parse()?, "/metrics")?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        scrape_bytes = body.len();
    }
    // Churn: p002 opens connections to p001, one GET each, which p001's
    // policy (`idle-1`) allows on L7 rules.
    let (server, client) = (&pod_list[1], &pod_list[2]);
    let _server = start_http_server(server, http_serve)?;
    let url = format!("http://{}:{HTTP_PORT}/v1/item", server.ipv4());
    let connections = plan.scale_connections.to_string();
    let cpu_before = cpu_ticks(&[pid])?;
    let churn = http_load(
        tools,
        client,
        &[
            "--url",
            &url,
            "--requests",
            &connections,
            "--concurrency",
            "4",
            "--connections",
            "4",
            "--new-connection-per-request",
        ],
    )?;
    let cpu_s = (cpu_ticks(&[pid])? - cpu_before) as f64 / clock_ticks_per_second();
    let made = churn["requests"].as_f64().unwrap_or(0.0);
    if made < 1.0 {
        bail!("no connection was made: {churn}");
    }
    Ok(Scale {
        pods: pod_count,
        rss_kib: last,
        scrape_ms: median(&times),
        scrape_bytes,
        cpu_us_per_connection: cpu_s * 1e6 / made,
        rss_after_churn_kib: rss_kib(pid)?,
        open_files,
    })
}

/// Samples the RSS of some processes until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u64>>>,
}

/// What the samples of one load say, over all the sampled processes.
struct RssFigures {
    /// The highest sample of any process.
    peak_kib: u64,
    /// The highest, over processes, of the median of the second half of each
    /// one's samples: memory in steady state under the load, once what an
    /// earlier burst left behind has been given back.
    steady_kib: u64,
}

impl RssFigures {
    fn of(samples: &[Vec<u64>]) -> Self {
        let peak_kib = samples.iter().flatten().copied().max().unwrap_or(0);
        let steady_kib = samples
            .iter()
            .map(|s| {
                let half: Vec<f64> = s[s.len() / 2..].iter().map(|&v| v as f64).collect();
                median(&half) as u64
            })
            .max()
            .unwrap_or(0);
        Self {
            peak_kib,
            steady_kib,
        }
    }
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = vec![Vec::new(); pids.len()];
            // Bounded: at most an hour of samples.
            for _ in 0..36_000 {
                for (pid, samples) in pids.iter().zip(samples.iter_mut()) {
                    samples.push(rss_kib(*pid).unwrap_or(0));
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// utime + stime of the processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or(&stat);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15; `rest` starts at field 3.
        let utime: u64 = fields.get(11).context("utime")?.parse()?;
        let stime: u64 = fields.get(12).context("stime")?.parse()?;
        total += utime + stime;
    }
    Ok(total)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

struct Report<'a> {
    plan: &'a Plan,
    samples: &'a [Vec<Sample>],
    memory: &'a Memory,
    scale: &'a [Scale],
    /// Sizes the open-file limit did not allow, and why.
    scale_skipped: &'a [String],
    setup: &'a latency_pairs::LatencyPairs,
    dns: &'a latency_pairs::LatencyPairs,
    tracing: &'a settings_cost::SettingsCost,
    routes: &'a settings_cost::SettingsCost,
    signer: &'a [ca_bench::Sample],
}

/// The median of a path's rounds, field by field.
fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(f).collect::<Vec<_>>())
}

impl Report<'_> {
    fn path(&self, i: usize) -> &[Sample] {
        &self.samples[i]
    }

    fn latencies(&self) -> Vec<plot::PathLatency> {
        PATHS
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.path(*i).is_empty())
            .map(|(i, p)| plot::PathLatency {
                name: p.name.to_string(),
                p50_us: med(self.path(i), |s| s.p50_us),
                p90_us: med(self.path(i), |s| s.p90_us),
                p99_us: med(self.path(i), |s| s.p99_us),
                p999_us: med(self.path(i), |s| s.p999_us),
            })
            .collect()
    }

    fn bulk(&self, i: usize) -> Option<f64> {
        let values: Vec<f64> = self.path(i).iter().filter_map(|s| s.bulk_gbit_s).collect();
        (!values.is_empty()).then(|| median(&values))
    }

    /// The goals of the issue, with the figure each is judged on.
    fn goals(&self) -> Vec<(String, String, bool)> {
        let p99 = |i| med(self.path(i), |s| s.p99_us);
        let p50 = |i| med(self.path(i), |s| s.p50_us);
        let sat = |i| med(self.path(i), |s| s.saturation_rps);
        let added_p99 = p99(4) - p99(1);
        let saturation = sat(4) / sat(1);
        let l7_p50 = p50(5) - p50(4);
        let spliced = self.bulk(3).unwrap_or(0.0) / self.bulk(0).unwrap_or(f64::INFINITY);
        let steady_rss = self
            .samples
            .iter()
            .enumerate()
            .filter(|(i, _)| PATHS[*i].mode != Mode::Direct)
            .map(|(_, s)| med(s, |x| x.agent_steady_rss_kib as f64))
            .fold(0.0, f64::max);
        vec![
            (
                "cross-node mTLS L4: added p99 at 1,000 req/s ≤ 0.25 ms".into(),
                format!("{:+.3} ms", added_p99 / 1000.0),
                added_p99 <= 250.0,
            ),
            (
                "cross-node mTLS L4: saturation ≥ 60% of direct".into(),
                format!("{:.0}%", saturation * 100.0),
                saturation >= 0.6,
            ),
            (
                "L7 authorization adds ≤ 0.1 ms at p50 over L4".into(),
                format!("{:+.3} ms", l7_p50 / 1000.0),
                l7_p50 <= 100.0,
            ),
            (
                "same-node spliced L4 (experimental fast path): ≥ 90% of direct throughput".into(),
                format!("{:.0}%", spliced * 100.0),
                spliced >= 0.9,
            ),
            (
                "agent RSS < 20 MB at 1,000 req/s (steady state, the largest agent on any path)"
                    .into(),
                format!("{:.1} MB", steady_rss / 1024.0),
                steady_rss < 20.0 * 1024.0,
            ),
        ]
    }

    fn markdown(&self) -> String {
        let plan = self.plan;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "Machine: {} cores, kernel {}. Rounds: {}; medians over rounds; ratios against the direct path (same node or across nodes) measured in the same run.\n",
            num_cpus(),
            kernel_release(),
            plan.rounds
        );
        let _ = writeln!(
            t,
            "Fixed rate: HTTP/1.1 GET, 1 kB answers, 1,000 req/s over 16 connections for {} s, latency from each request's scheduled time (no coordinated omission). Saturation: {} s over 64 connections, 64 in flight. Churn: {} s of requests each on a new connection (4 at a time). Bulk: one TCP stream of {} MiB. Agent CPU: user+system seconds of both agents during the fixed-rate load, per 1,000 requests. Agent RSS (from /proc, every 100 ms during the fixed-rate load, the largest agent): at 1k req/s is the median of the second half of the samples (steady state); peak is the highest sample, which includes what the previous path's saturation and bulk loads left.\n",
            plan.rate_secs, plan.saturation_secs, plan.churn_secs, plan.bulk_mib
        );
        let _ = writeln!(
            t,
            "| path | p50 | p90 | p99 | p99.9 | +p50 | +p99 | saturation | × direct | churn | × direct | bulk | × direct | proxy CPU s / 1k req | context switches / req | proxy RSS at 1k req/s | proxy peak RSS |"
        );
        let _ = writeln!(
            t,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (i, path) in PATHS.iter().enumerate() {
            let s = self.path(i);
            if s.is_empty() {
                let _ = writeln!(t, "| {} | not measured (no ztunnel binary) |", path.name);
                continue;
            }
            let d = self.path(path.baseline);
            let m = |f: &dyn Fn(&Sample) -> f64| med(s, f);
            let md = |f: &dyn Fn(&Sample) -> f64| med(d, f);
            let bulk = self.bulk(i);
            let bulk_base = self.bulk(path.baseline);
            let agent = path.mode != Mode::Direct;
            let _ = writeln!(
                t,
                "| {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:+.0} µs | {:+.0} µs | {:.0} req/s | {:.2} | {:.0} conn/s | {:.2} | {} | {} | {} | {} | {} | {} |",
                path.name,
                m(&|x| x.p50_us),
                m(&|x| x.p90_us),
                m(&|x| x.p99_us),
                m(&|x| x.p999_us),
                m(&|x| x.p50_us) - md(&|x| x.p50_us),
                m(&|x| x.p99_us) - md(&|x| x.p99_us),
                m(&|x| x.saturation_rps),
                m(&|x| x.saturation_rps) / md(&|x| x.saturation_rps),
                m(&|x| x.churn_per_s),
                m(&|x| x.churn_per_s) / md(&|x| x.churn_per_s),
                bulk.map_or("-".into(), |g| format!("{g:.1} Gbit/s")),
                match (bulk, bulk_base) {
                    (Some(g), Some(b)) => format!("{:.2}", g / b),
                    _ => "-".into(),
                },
                if agent {
                    format!("{:.3}", m(&|x| x.agent_cpu_s_per_1k))
                } else {
                    "-".into()
                },
                if agent {
                    format!("{:.1}", m(&|x| x.context_switches_per_request))
                } else {
                    "-".into()
                },
                if agent {
                    format!("{:.1} MB", m(&|x| x.agent_steady_rss_kib as f64) / 1024.0)
                } else {
                    "-".into()
                },
                if agent {
                    format!("{:.1} MB", m(&|x| x.agent_peak_rss_kib as f64) / 1024.0)
                } else {
                    "-".into()
                },
            );
        }
        let _ = write!(t, "{}", self.against_ztunnel());
        let _ = write!(
            t,
            "{}{}{}",
            self.setup.markdown(),
            self.dns.markdown(),
            self.tracing.markdown("off"),
        );
        let _ = write!(t, "{}", self.routes.markdown(routes_bench::BASELINE));
        let _ = write!(t, "{}", ca_bench::markdown(self.signer));
        let _ = writeln!(
            t,
            "\nMemory: {:.1} KiB of agent RSS per idle proxied connection (a->b, {} connections); {:.1} KiB per idle mutual-TLS tunnel connection ({} connections). Tunnel port: {:.0} mutual-TLS 1.3 handshakes/s (one python client).",
            self.memory.per_idle_tcp_kib,
            plan.idle_tcp,
            self.memory.per_idle_tls_kib,
            plan.idle_tls,
            self.memory.handshakes_per_s
        );
        let _ = writeln!(
            t,
            "\nScale: one agent with this many enrolled pods, {} policies (HTTP rules) and {} services. Idle RSS once settled; a whole `/metrics` scrape (median of {SCRAPES}, request to last byte, from the node); then {} connections of one GET each between two of its pods (4 at a time, L7 policy), with the agent's user+system CPU per connection and its RSS after them.\n\n| pods | open files | idle RSS | scrape | scrape size | agent CPU per connection | RSS after the connections |\n|---|---|---|---|---|---|---|",
            plan.idle_policies, plan.idle_services, plan.scale_connections,
        );
        for at in self.scale {
            let _ = writeln!(
                t,
                "| {} | {} | {:.1} MB | {:.2} ms | {:.1} KiB | {:.0} µs | {:.1} MB |",
                at.pods,
                at.open_files,
                at.rss_kib as f64 / 1024.0,
                at.scrape_ms,
                at.scrape_bytes as f64 / 1024.0,
                at.cpu_us_per_connection,
                at.rss_after_churn_kib as f64 / 1024.0
            );
        }
        for why in self.scale_skipped {
            let _ = writeln!(t, "\n{why}.");
        }
        let _ = writeln!(t, "\n| goal | measured | met |\n|---|---|---|");
        for (goal, measured, met) in self.goals() {
            let _ = writeln!(
                t,
                "| {goal} | {measured} | {} |",
                if met { "yes" } else { "no" }
            );
        }
        t
    }

    /// Every agent path as a ratio to ztunnel's (measured in the same
    /// rounds); empty when ztunnel was not measured.
    fn ratios_to_ztunnel(&self) -> Vec<(&'static str, [f64; 6])> {
        let z = self.path(ZTUNNEL_PATH);
        if z.is_empty() {
            return Vec::new();
        }
        let zm = |f: &dyn Fn(&Sample) -> f64| med(z, f);
        PATHS
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !matches!(p.mode, Mode::Direct | Mode::Ztunnel) && !self.path(*i).is_empty()
            })
            .map(|(i, p)| {
                let m = |f: &dyn Fn(&Sample) -> f64| med(self.path(i), f) / zm(f);
                (
                    p.name,
                    [
                        m(&|x| x.p50_us),
                        m(&|x| x.p99_us),
                        m(&|x| x.saturation_rps),
                        m(&|x| x.agent_cpu_s_per_1k),
                        m(&|x| x.context_switches_per_request),
                        m(&|x| x.agent_steady_rss_kib as f64),
                    ],
                )
            })
            .collect()
    }

    fn against_ztunnel(&self) -> String {
        let ratios = self.ratios_to_ztunnel();
        if ratios.is_empty() {
            return "\nztunnel was not measured (no binary at ../shared/peer/ztunnel nor ZTUNNEL_BIN): no ratios to it.\n".into();
        }
        let mut t = String::from(
            "\nAgainst ztunnel (Istio ambient's node proxy, dedicated mode on both sides, the same loads in the same rounds; its client connects through ztunnel's own SOCKS5 listener, since ztunnel does not capture by itself; no bulk stream for it). Ratios agent / ztunnel; below 1 is better for latency, CPU, context switches and memory, above 1 for saturation. The agents' CPU counts both agents, ztunnel's both ztunnels. Same-node paths compare the agent's single hop with ztunnel's two across nodes: read them as context, not as like for like.\n\n| path | p50 | p99 | saturation | CPU / req | context switches / req | RSS at 1k req/s |\n|---|---|---|---|---|---|---|\n",
        );
        for (name, [p50, p99, sat, cpu, switches, rss]) in ratios {
            let _ = writeln!(
                t,
                "| {name} | {p50:.2} | {p99:.2} | {sat:.2} | {cpu:.2} | {switches:.2} | {rss:.2} |"
            );
        }
        t
    }

    fn json(&self) -> Value {
        let paths: Vec<Value> = PATHS
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let rounds: Vec<Value> = self
                    .path(i)
                    .iter()
                    .map(|s| {
                        json!({
                            "p50_us": s.p50_us, "p90_us": s.p90_us, "p99_us": s.p99_us, "p999_us": s.p999_us,
                            "fixed_rate_requests": s.rate_requests,
                            "saturation_rps": s.saturation_rps,
                            "churn_connections_per_s": s.churn_per_s,
                            "bulk_gbit_s": s.bulk_gbit_s,
                            "agent_cpu_s_per_1k_requests": s.agent_cpu_s_per_1k,
                            "context_switches_per_request": s.context_switches_per_request,
                            "agent_peak_rss_kib": s.agent_peak_rss_kib,
                            "agent_steady_rss_kib": s.agent_steady_rss_kib,
                        })
                    })
                    .collect();
                json!({
                    "name": p.name,
                    "mode": p.mode.name(),
                    "baseline": PATHS[p.baseline].name,
                    "rounds": rounds,
                })
            })
            .collect();
        json!({
            "machine": {"cores": num_cpus(), "kernel": kernel_release()},
            "plan": {
                "rounds": self.plan.rounds,
                "fixed_rate": {"requests_per_s": 1000, "connections": 16, "seconds": self.plan.rate_secs, "response_bytes": 1024},
                "saturation": {"connections": 64, "seconds": self.plan.saturation_secs},
                "churn": {"seconds": self.plan.churn_secs, "concurrency": 4},
                "bulk_mib": self.plan.bulk_mib,
            },
            "paths": paths,
            "ratios_to_ztunnel": self.ratios_to_ztunnel().into_iter().map(|(name, [p50, p99, sat, cpu, switches, rss])| json!({
                "path": name, "p50": p50, "p99": p99, "saturation": sat,
                "cpu_per_request": cpu, "context_switches_per_request": switches, "rss": rss,
            })).collect::<Vec<_>>(),
            "connection_setup": self.setup.json(),
            "dns_lookup": self.dns.json(),
            "tracing": self.tracing.json(),
            "routes": self.routes.json(),
            "memory": {
                "per_idle_proxied_connection_kib": self.memory.per_idle_tcp_kib,
                "per_idle_tunnel_connection_kib": self.memory.per_idle_tls_kib,
            },
            "scale": {
                "policies": self.plan.idle_policies,
                "services": self.plan.idle_services,
                "connections": self.plan.scale_connections,
                "agents": self.scale.iter().map(|at| json!({
                    "pods": at.pods,
                    "idle_rss_kib": at.rss_kib,
                    "scrape_ms": at.scrape_ms,
                    "scrape_bytes": at.scrape_bytes,
                    "cpu_us_per_connection": at.cpu_us_per_connection,
                    "rss_after_connections_kib": at.rss_after_churn_kib,
                    "open_files": at.open_files,
                })).collect::<Vec<_>>(),
                "not_measured": self.scale_skipped,
            },
            "tunnel_handshakes_per_s": self.memory.handshakes_per_s,
            "goals": self.goals().into_iter().map(|(g, m, met)| json!({"goal": g, "measured": m, "met": met})).collect::<Vec<_>>(),
        })
    }
}

fn start_http_server(pod: &Pod, bin: &Path) -> Result<Process> {
    let p = pod.spawn(
        bin,
        &["--port", &HTTP_PORT.to_string(), "--body-bytes", "1024"],
    )?;
    wait_until("http-serve", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("ready"))
    })
    .with_context(|| p.output_report())?;
    Ok(p)
}

fn start_raw_server(pod: &Pod) -> Result<Process> {
    let p = pod.spawn("python3", &["-c", SCRIPT, "serve", &RAW_PORT.to_string()])?;
    wait_until("the bench server", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("ready"))
    })
    .with_context(|| p.output_report())?;
    Ok(p)
}

fn run_script(pod: &Pod, args: &[&str]) -> Result<String> {
    let mut all = vec!["-c", SCRIPT];
    all.extend_from_slice(args);
    let out = pod.run("python3", &all, Duration::from_secs(600))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

fn field(out: &str, name: &str) -> Result<f64> {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().context("value")?.parse().context("number");
        }
    }
    bail!("no {name} in {out:?}")
}

/// The median; of an even count, the mean of the middle two.
fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
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
        issuer_extra: "",
        identity: None,
    };
    agents::start(bin, topo, node, pki, &config)
}

/// Switches every node to `mode` and waits until the agents agree.
fn set_mode(topo: &Topology, mode: Mode) -> Result<()> {
    for node in topo.nodes() {
        let enrol = mode.enrols();
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
            .filter(|p| mode.mesh() && p.name() != "x")
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

/// `MESH_BENCH_PERF=stat`: the proxies' syscalls and scheduler events
/// during the fixed-rate load, counted by `perf stat` and printed per
/// request (`stat:<events>`: those events instead). `MESH_BENCH_PERF=record:<events>`: `perf record` (DWARF stacks:
/// build with `CARGO_PROFILE_RELEASE_DEBUG=1`) of those
/// events instead, into `target/bench/perf-<pids>.data`, for `perf report`.
/// A profile of where the per-request costs are, not a measurement.
struct PerfStat {
    child: std::process::Child,
    out: PathBuf,
    counting: bool,
}

const PERF_EVENTS: &str = "sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_writev";

impl PerfStat {
    fn start(pids: &[u32], out_dir: &Path) -> Option<Self> {
        let how = std::env::var("MESH_BENCH_PERF").ok()?;
        if pids.is_empty() {
            return None;
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut command = std::process::Command::new("perf");
        let (out, counting) = if let Some(events) = how.strip_prefix("record:") {
            let out = out_dir.join(format!("perf-{}.data", pids.join("-")));
            command
                .args(["record", "--call-graph", "dwarf,16384", "-o"])
                .arg(&out)
                .args(["-e", events]);
            (out, false)
        } else {
            let events = how.strip_prefix("stat:").unwrap_or(PERF_EVENTS);
            let out = out_dir.join(format!("perf-{}.csv", pids.join("-")));
            command
                .args(["stat", "-x", ",", "-o"])
                .arg(&out)
                .args(["-e", events]);
            (out, true)
        };
        let child = command
            .args(["-p", &pids.join(",")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| step(format!("  perf: {e}")))
            .ok()?;
        // perf attaches asynchronously; a moment's grace (a profile only).
        std::thread::sleep(Duration::from_millis(300));
        Some(Self {
            child,
            out,
            counting,
        })
    }

    fn stop(mut self, requests: f64) -> String {
        // SAFETY: kill only sends a signal to the child this struct started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        if !self.counting {
            return format!("recorded in {}", self.out.display());
        }
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(',').collect();
                let count: f64 = fields.first()?.parse().ok()?;
                let event = fields.get(2)?.rsplit(':').next()?;
                Some(format!("{event} {:.2}", count / requests.max(1.0)))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Context switches of the threads of `pids`, voluntary and not, summed by
/// thread name (`comm`: the tokio workers, the blocking pool, ...): where
/// a proxy's hand-offs happen.
fn context_switches_by_thread(pids: &[u32]) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .map_or_else(|| "?".to_owned(), |n| n.trim().to_owned());
            let switches: u64 = status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:")
                        || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            *by_name.entry(name).or_insert(0) += switches;
        }
    }
    by_name
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
