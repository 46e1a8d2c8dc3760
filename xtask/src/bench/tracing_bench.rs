//! The cost of request spans: a service's HTTP port balanced by n1's agent
//! (CLIENT spans) to c on n2, whose L7 policies n2's agent decides (SERVER
//! spans), at a fixed rate, with tracing off, at 1% and 100% sampling (to
//! an OTLP receiver in each node's netns), and at 100% with the collector
//! away. The settings alternate each round; the report gives medians over
//! rounds and ratios to "off".

use std::net::SocketAddr;

use super::{
    HTTP_PORT, REQUEST_PATH, Tools,
    settings_cost::{self, Sample, SettingsCost},
};
use anyhow::{Context, Result};
use mesh_testbed::{
    Node, Pod, Topology,
    otlp::{OtlpReceiver, OtlpTransport},
};

/// The service's address.
pub const VIP: &str = "10.96.0.20";
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
    let settings = vec![
        ("off", String::new()),
        ("1%", tracing(COLLECTOR, 1)),
        ("100%", tracing(COLLECTOR, 100)),
        ("100%, collector away", tracing(NO_COLLECTOR, 100)),
    ];
    settings_cost::turned(settings, round)
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

/// 1,000 requests/s over 16 connections for `secs` to the service.
pub fn measure(tools: &Tools, client: &Pod, agent_pids: &[u32], secs: u32) -> Result<Sample> {
    let url = format!("http://{VIP}{REQUEST_PATH}");
    settings_cost::measure(
        tools,
        client,
        agent_pids,
        &super::fixed_rate_args(&url, secs),
    )
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

/// The table of this part.
pub fn cost(seconds: u32) -> SettingsCost {
    SettingsCost::new(
        format!(
            "Request spans (a -> service web on n1's agent, balanced, CLIENT span -> c on n2, L7 policies, SERVER span; 1,000 req/s, 16 connections, {seconds} s; both agents' CPU; OTLP/gRPC to a receiver in each node's netns, in the bench process at nice 10)"
        ),
        "tracing",
    )
}
