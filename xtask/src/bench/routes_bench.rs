//! The cost of a route: service web balanced by n1's agent to c on n2
//! over the mTLS tunnel, at a fixed rate, every request carrying the same
//! two headers, with an HTTPRoute on web (two header matches and a
//! request header modifier) and without one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mesh_testbed::{Node, Pod, Topology};

use super::{
    REQUEST_PATH, Tools,
    settings_cost::{self, Sample, SettingsCost},
};

/// The setting the others are compared with.
pub const BASELINE: &str = "no route";

/// The route under test: both headers must match; one header is set.
const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches:
    - headers:
      - {name: x-env, value: prod}
      - {name: x-team, type: RegularExpression, value: "bench|perf"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-routed, value: "1"}]
    backendRefs: [{name: web, port: 80}]
"#;

/// Rounds of this part: at least four (the difference is small beside a
/// busy machine's noise).
pub fn rounds(plan_rounds: usize) -> usize {
    plan_rounds.max(4)
}

/// The settings in the order measured in `round`: (name, with the route).
pub fn settings(round: usize) -> Vec<(&'static str, bool)> {
    settings_cost::turned(
        vec![
            (BASELINE, false),
            ("route: 2 header matches + header modifier", true),
        ],
        round,
    )
}

/// The service web (the tracing part's).
pub fn write_services(topo: &Topology, dir: impl Fn(&Node) -> PathBuf) -> Result<()> {
    super::tracing_bench::write_services(topo, dir)
}

/// Puts the route in every node's `routes/`, or takes it out.
pub fn write_route(topo: &Topology, dir: impl Fn(&Node) -> PathBuf, route: bool) -> Result<()> {
    for node in topo.nodes() {
        let routes = dir(node).join("routes");
        let file = routes.join("web.yaml");
        if route {
            std::fs::create_dir_all(&routes)?;
            std::fs::write(&file, ROUTE).with_context(|| format!("writing {}", file.display()))?;
        } else if file.exists() {
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
    }
    Ok(())
}

/// 1,000 requests/s over 16 connections for `secs`, with both headers.
pub fn measure(tools: &Tools, client: &Pod, agent_pids: &[u32], secs: u32) -> Result<Sample> {
    let url = format!("http://{}{REQUEST_PATH}", super::tracing_bench::VIP);
    let mut args = super::fixed_rate_args(&url, secs);
    for header in ["x-env:prod", "x-team:bench"] {
        args.extend(["--header".to_string(), header.to_string()]);
    }
    settings_cost::measure(tools, client, agent_pids, &args)
}

/// The table of this part.
pub fn cost(seconds: u32) -> SettingsCost {
    SettingsCost::new(
        format!(
            "HTTPRoute cost (a -> service web on n1's agent, balanced, -> c on n2 over the mTLS tunnel; every request with the same two headers; the route matches both (one exact, one regular expression) and sets a request header; 1,000 req/s, 16 connections, {seconds} s; both agents' CPU)"
        ),
        "route",
    )
}

/// The route is in force on `node` (its agent accepted it): the figures
/// of the "route" setting are of requests that went through it.
pub fn check_accepted(node: &Node) -> Result<()> {
    let (_, dump) = node.http_get(super::ADMIN.parse()?, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&dump).context("/config_dump")?;
    let accepted = dump["routes"][0]["parents"][0]["accepted"] == true
        && dump["routes"][0]["unresolvedBackends"] == serde_json::json!([]);
    anyhow::ensure!(
        accepted,
        "the bench route is not in force: {}",
        dump["routes"]
    );
    Ok(())
}
