//! The cost of request spans: a service's HTTP port balanced by n1's agent
//! (CLIENT spans) to c on n2, whose L7 policies n2's agent decides (SERVER
//! spans), at a fixed rate, with tracing off, at 1% and 100% sampling (to
//! an OTLP receiver in each node's netns), and at 100% with the collector
//! away. The settings alternate each round; the report gives medians over
//! rounds and ratios to "off".

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context, Result};
use mesh_testbed::{
    Node, Pod, Topology,
    otlp::{OtlpReceiver, OtlpTransport},
};
use serde_json::{Value, json};

use super::{HTTP_PORT, REQUEST_PATH, Tools};

/// The service's address.
const VIP: &str = "10.96.0.20";
/// Where each node's receiver listens, in that node's netns.
const COLLECTOR: &str = "127.0.0.1:4317";
/// Nothing listens here: the collector away.
const NO_COLLECTOR: &str = "127.0.0.1:4319";

/// Rounds of this part: at least four (the differences measured are small
/// beside a busy machine's noise).
pub fn rounds(plan_rounds: usize) -> usize {
    plan_rounds.max(4)
}

/// The settings in the order measured in `round`: (name, node.yaml lines).
/// The order turns each round, so no setting is always measured first
/// (right after the agents of the previous part stopped).
pub fn settings(round: usize) -> Vec<(&'static str, String)> {
    let tracing = |endpoint: &str, percentage: u32| {
        format!(
            "tracing:\n  endpoint: http://{endpoint}\n  randomSamplingPercentage: {percentage}\n"
        )
    };
    let mut settings = vec![
        ("off", String::new()),
        ("1%", tracing(COLLECTOR, 1)),
        ("100%", tracing(COLLECTOR, 100)),
        ("100%, collector away", tracing(NO_COLLECTOR, 100)),
    ];
    let turn = round % settings.len();
    settings.rotate_left(turn);
    settings
}

/// `web` in namespace bench: port 80 to c's HTTP port, on every node.
pub fn write_services(topo: &Topology, dir: impl Fn(&Node) -> std::path::PathBuf) -> Result<()> {
    let c = topo.pod("c");
    let yaml = format!(
        "services:\n  - name: web\n    namespace: bench\n    vips: [{VIP}]\n    ports: [{{port: 80, targetPort: {HTTP_PORT}, protocol: http}}]\n    locality: none\n    endpoints:\n      - {{name: c, address: {}, node: {}}}\n",
        c.ipv4(),
        c.node_name()
    );
    for node in topo.nodes() {
        let dir = dir(node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("services.yaml"), &yaml)
            .with_context(|| format!("writing {}", dir.join("services.yaml").display()))?;
    }
    Ok(())
}

/// An OTLP/gRPC receiver in each node's netns.
pub fn start_receivers(topo: &Topology) -> Result<Vec<OtlpReceiver>> {
    topo.nodes()
        .iter()
        .map(|node| {
            OtlpReceiver::start(
                Some(&node.netns_path()),
                COLLECTOR.parse::<SocketAddr>()?,
                OtlpTransport::Grpc,
            )
        })
        .collect()
}

/// One measurement: latency at the fixed rate, both agents' CPU.
#[derive(Clone, Copy, Debug)]
pub struct TracingSample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_s_per_1k: f64,
}

/// 1,000 requests/s over 16 connections for `secs` to the service.
pub fn measure(
    tools: &Tools,
    client: &Pod,
    agent_pids: &[u32],
    secs: u32,
) -> Result<TracingSample> {
    let url = format!("http://{VIP}{REQUEST_PATH}");
    let cpu_before = super::cpu_ticks(agent_pids)?;
    let perf = super::PerfStat::start(agent_pids, &super::bench_dir());
    let args = super::fixed_rate_args(&url, secs);
    let fixed = super::http_load(
        tools,
        client,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let cpu_s =
        (super::cpu_ticks(agent_pids)? - cpu_before) as f64 / super::clock_ticks_per_second();
    let requests = fixed["requests"].as_f64().unwrap_or(0.0).max(1.0);
    if let Some(perf) = perf {
        super::step(format!("  perf per request: {}", perf.stop(requests)));
    }
    let latency = &fixed["latency_us"];
    let us = |name: &str| latency[name].as_f64().unwrap_or(f64::NAN);
    Ok(TracingSample {
        p50_us: us("p50"),
        p99_us: us("p99"),
        cpu_s_per_1k: cpu_s / (requests / 1000.0),
    })
}

/// The spans an agent counted, by result, from its /metrics.
pub fn spans_counted(node: &Node) -> Result<String> {
    let (_, metrics) = node.http_get(super::ADMIN.parse()?, "/metrics")?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("mesh_trace_spans_total{"))
        .map(|l| l.trim_start_matches("mesh_trace_spans_total"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Every round's samples by setting.
#[derive(Default)]
pub struct TracingCost {
    samples: Vec<(&'static str, Vec<TracingSample>)>,
    seconds: u32,
}

impl TracingCost {
    pub fn new(seconds: u32) -> Self {
        Self {
            samples: Vec::new(),
            seconds,
        }
    }

    pub fn push(&mut self, setting: &'static str, sample: TracingSample) {
        match self.samples.iter_mut().find(|(s, _)| *s == setting) {
            Some((_, samples)) => samples.push(sample),
            None => self.samples.push((setting, vec![sample])),
        }
    }

    fn median(samples: &[TracingSample], f: impl Fn(&TracingSample) -> f64) -> f64 {
        super::median(&samples.iter().map(f).collect::<Vec<_>>())
    }

    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let Some((_, off)) = self.samples.iter().find(|(s, _)| *s == "off") else {
            return t;
        };
        let base = |f: &dyn Fn(&TracingSample) -> f64| Self::median(off, f);
        let (p50_off, p99_off, cpu_off) = (
            base(&|s| s.p50_us),
            base(&|s| s.p99_us),
            base(&|s| s.cpu_s_per_1k),
        );
        let _ = writeln!(
            t,
            "\nRequest spans (a -> service web on n1's agent, balanced, CLIENT span -> c on n2, L7 policies, SERVER span; 1,000 req/s, 16 connections, {} s; both agents' CPU; OTLP/gRPC to a receiver in each node's netns, in the bench process at nice 10; medians over {} rounds, the order of the settings turned each round):\n\n| tracing | p50 | p99 | CPU s / 1k req | + p50 | + p99 | + CPU / 1k req |\n|---|---|---|---|---|---|---|",
            self.seconds,
            off.len()
        );
        for (setting, samples) in &self.samples {
            let (p50, p99, cpu) = (
                Self::median(samples, |s| s.p50_us),
                Self::median(samples, |s| s.p99_us),
                Self::median(samples, |s| s.cpu_s_per_1k),
            );
            let _ = writeln!(
                t,
                "| {setting} | {p50:.0} µs | {p99:.0} µs | {cpu:.3} | {:+.0} µs | {:+.0} µs | {:+.3} s ({:+.0}%) |",
                p50 - p50_off,
                p99 - p99_off,
                cpu - cpu_off,
                (cpu / cpu_off - 1.0) * 100.0
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!(
            self.samples
                .iter()
                .map(|(setting, samples)| json!({
                    "setting": setting,
                    "rounds": samples.iter().map(|s| json!({
                        "p50_us": s.p50_us, "p99_us": s.p99_us, "cpu_s_per_1k": s.cpu_s_per_1k,
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()
        )
    }
}
