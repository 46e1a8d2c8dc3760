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
    let readiness = match (&report.not_ready_reason, report.ready) {
        (Some(reason), _) => format!("NOT READY: {reason}"),
        (None, true) => "ready".to_string(),
        (None, false) => "NOT READY".to_string(),
    };
    let _ = writeln!(out, "agent:       {} ({readiness})", report.version);
    let _ = writeln!(out, "config:      {}", report.config_dir.display());
    let _ = writeln!(
        out,
        "programs:    {} ({} attachments)",
        report.programs.join(", "),
        report.attachments
    );
    if let Some(kernel) = &report.kernel {
        let _ = writeln!(
            out,
            "kernel:      {} ({} features checked, {} missing with a fallback)",
            kernel.release,
            kernel.features_checked,
            kernel.fallbacks.len()
        );
        for fallback in &kernel.fallbacks {
            let _ = writeln!(
                out,
                "  missing:   {}: {}",
                fallback.missing, fallback.fallback
            );
        }
    }
    let _ = writeln!(out, "config gen.: {}", report.config_generation);
    let _ = writeln!(
        out,
        "trust domain: {} ({} roots in the bundle)",
        report.trust_domain, report.trust_roots
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for cert in &report.certificates {
        let expiry = match cert.not_after.checked_sub(now) {
            Some(left) => format!("expires in {}", human_duration(left)),
            None => format!("EXPIRED {} ago", human_duration(now - cert.not_after)),
        };
        let _ = writeln!(
            out,
            "certificate: {} ({}, {expiry})",
            cert.identity, cert.source
        );
    }
    if let Some(ca) = &report.certificate_authority {
        let health = ca.warning().unwrap_or_else(|| {
            format!("answering ({} certificates signed)", ca.requests_succeeded)
        });
        let _ = writeln!(out, "CA:          {}: {health}", ca.address);
    }
    let _ = writeln!(
        out,
        "tunnel:      {} pooled connections",
        report.tunnel_pooled_connections
    );
    for d in &report.authorization {
        let _ = writeln!(
            out,
            "authz:       {} x {} ({})",
            d.count, d.decision, d.policy
        );
    }
    for (reason, count) in &report.tunnel_rejections {
        let _ = writeln!(out, "  refused:   {count} x {reason}");
    }
    if let Some(err) = &report.last_reload_error {
        let _ = writeln!(
            out,
            "last reload: REJECTED (previous config still serving): {err}"
        );
    }
    for policy in &report.unenforceable_policies {
        let _ = writeln!(
            out,
            "policy:      CANNOT BE ENFORCED, denies all traffic to what it selects: {policy}"
        );
    }
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
                    "  ✓ {key}: connects ipv4={} ipv6={}, captured out={} in={}, excluded={}, \
                     refused agent-absent={} map-full={}",
                    c.connect4,
                    c.connect6,
                    c.captured_outbound,
                    c.captured_inbound,
                    c.excluded,
                    c.refused_agent_absent,
                    c.refused_map_full
                );
            }
            (None, None) => {
                let _ = writeln!(out, "  ✓ {key}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{PodCountersView, PodStatus};

    fn pod(
        name: &str,
        enrolled: bool,
        error: Option<&str>,
        counters: Option<(u64, u64)>,
    ) -> PodStatus {
        PodStatus {
            namespace: "shop".into(),
            name: name.into(),
            enrolled,
            error: error.map(String::from),
            netns_cookie: enrolled.then_some(42),
            counters: counters.map(|(connect4, connect6)| PodCountersView {
                connect4,
                connect6,
                ..Default::default()
            }),
            source_address: None,
        }
    }

    #[test]
    fn summary_shows_readiness_pods_and_errors() {
        let report = StatusReport {
            node: "node-1".into(),
            version: "0.1.0".into(),
            config_dir: "/etc/mesh".into(),
            ready: false,
            not_ready_reason: Some("no valid certificate for spiffe://td/ns/a/sa/b".into()),
            programs: vec!["mesh_connect4".into(), "mesh_connect6".into()],
            attachments: 2,
            pods: vec![
                pod("web", true, None, Some((5, 3))),
                pod("db", false, Some("no netns"), None),
            ],
            config_generation: 3,
            last_reload_error: Some("pods.yaml:2: bad".into()),
            unenforceable_policies: vec![
                "policies/p.yaml:7: document 1 (foo/p): field spec.provider: `provider` is not supported".into(),
            ],
            trust_domain: "cluster.local".into(),
            certificates: vec![],
            tunnel_rejections: Default::default(),
            tunnel_pooled_connections: 0,
            trust_roots: 2,
            certificate_authority: None,
            authorization: vec![],
            kubernetes: None,
            kernel: None,
        };
        let text = render(&report);
        assert!(
            text.contains("policy:      CANNOT BE ENFORCED, denies all traffic to what it selects: policies/p.yaml:7:"),
            "{text}"
        );
        assert!(text.contains("captured out=0 in=0"), "{text}");
        assert!(text.contains("config gen.: 3"), "{text}");
        assert!(
            text.contains("REJECTED") && text.contains("pods.yaml:2: bad"),
            "{text}"
        );
        assert!(text.contains("node:        node-1"), "{text}");
        assert!(
            text.contains("NOT READY: no valid certificate for spiffe://td/ns/a/sa/b"),
            "{text}"
        );
        assert!(
            text.contains("mesh_connect4, mesh_connect6 (2 attachments)"),
            "{text}"
        );
        assert!(text.contains("1 enrolled of 2 configured"), "{text}");
        assert!(
            text.contains("✓ shop/web: connects ipv4=5 ipv6=3"),
            "{text}"
        );
        assert!(text.contains("✗ shop/db: no netns"), "{text}");
    }

    #[test]
    fn status_document_round_trips_as_json() {
        let report = StatusReport {
            node: "n".into(),
            version: "v".into(),
            config_dir: "/c".into(),
            ready: true,
            not_ready_reason: None,
            programs: vec![],
            attachments: 0,
            pods: vec![pod("web", true, None, Some((1, 2)))],
            config_generation: 1,
            last_reload_error: None,
            unenforceable_policies: Vec::new(),
            trust_domain: "cluster.local".into(),
            certificates: vec![],
            tunnel_rejections: Default::default(),
            tunnel_pooled_connections: 2,
            trust_roots: 1,
            certificate_authority: None,
            authorization: vec![],
            kubernetes: None,
            kernel: None,
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"netnsCookie\":42"), "{json}");
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), report);
    }
}

/// `2d 3h`, `5h 12m`, `7m 3s`, `42s`: the two largest units.
fn human_duration(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let parts: Vec<String> = units
        .iter()
        .scan(secs, |left, (size, name)| {
            let n = *left / size;
            *left %= size;
            Some((n, name))
        })
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, name)| format!("{n}{name}"))
        .collect();
    if parts.is_empty() {
        "0s".to_string()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod duration_tests {
    use super::human_duration;

    #[test]
    fn durations_read_as_their_two_largest_units() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(7 * 60 + 3), "7m 3s");
        assert_eq!(human_duration(5 * 3600 + 12 * 60 + 59), "5h 12m");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3600), "2d 3h");
        assert_eq!(human_duration(86_400 + 30), "1d");
    }
}
