//! `mesh-agent status`: a human summary from a running agent's admin API.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};

use crate::{admin::PATH_STATUS, state::StatusReport};

pub fn fetch(admin: SocketAddr) -> Result<StatusReport> {
    let url = format!("http://{admin}{PATH_STATUS}");
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let mut resp = agent.get(&url).call().with_context(|| {
        format!("cannot reach the agent's admin API at {url} (is the agent running?)")
    })?;
    let body = resp
        .body_mut()
        .read_to_string()
        .context("reading the status")?;
    serde_json::from_str(&body).with_context(|| format!("unexpected status document from {url}"))
}

pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let enrolled = report.pods.iter().filter(|p| p.enrolled).count();
    let _ = writeln!(out, "node:        {}", report.node);
    let _ = writeln!(
        out,
        "agent:       {} ({})",
        report.version,
        if report.ready { "ready" } else { "NOT READY" }
    );
    let _ = writeln!(out, "config:      {}", report.config_dir.display());
    let _ = writeln!(
        out,
        "programs:    {} ({} attachments)",
        report.programs.join(", "),
        report.attachments
    );
    let _ = writeln!(
        out,
        "pods:        {enrolled} enrolled of {} configured",
        report.pods.len()
    );
    for pod in &report.pods {
        let key = format!("{}/{}", pod.namespace, pod.name);
        match (&pod.error, pod.counters) {
            (Some(err), _) => {
                let _ = writeln!(out, "  ✗ {key}: {err}");
            }
            (None, Some(c)) => {
                let _ = writeln!(
                    out,
                    "  ✓ {key}: connects ipv4={} ipv6={}",
                    c.connect4, c.connect6
                );
            }
            (None, None) => {
                let _ = writeln!(out, "  ✓ {key}");
            }
        }
    }
    out
}
