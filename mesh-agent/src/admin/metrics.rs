//! Prometheus metrics of the agent itself. Label sets are bounded: per pod on
//! this node at most, never per connection.

use parking_lot::Mutex;
use std::{collections::HashMap, sync::atomic::Ordering};

use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};

use crate::{
    proxy::connections::{ConnectionLog, Direction},
    state::PodCountersView,
};

/// Panics since start (set by the panic hook, read at each scrape).
pub static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Metrics {
    registry: Registry,
    /// The names of every registered metric, for checks of dashboards.
    names: Mutex<Vec<String>>,
    pub ready: IntGauge,
    pub pods_enrolled: IntGauge,
    pub pods_failed: IntGauge,
    pub programs_attached: IntGauge,
    pub config_generation: IntGauge,
    pub policies_unenforceable: IntGauge,
    pub config_reloads: IntCounterVec,
    pod_connects: IntCounterVec,
    pod_captured: IntCounterVec,
    pod_agent_source: IntCounterVec,
    dns_queries: IntCounterVec,
    pod_excluded: IntCounterVec,
    pod_refused: IntCounterVec,
    proxy_connections: IntCounterVec,
    proxy_bytes: IntCounterVec,
    proxy_active: IntGaugeVec,
    certificate_expiry: IntGaugeVec,
    tunnel_rejections: IntCounterVec,
    certificate_requests: IntCounterVec,
    tunnel_pooled: IntGauge,
    tunnel_inbound: IntGauge,
    tunnel_handshaking: IntGauge,
    decisions: IntCounterVec,
    service_picks: IntCounterVec,
    service_ejected: IntGaugeVec,
    service_latency: GaugeVec,
    service_ejections: IntCounterVec,
    service_no_endpoint: IntCounterVec,
    service_retries: IntCounterVec,
    service_timeouts: IntCounterVec,
    service_overflows: IntCounterVec,
    http_pooled: IntGauge,
    fastpath: IntCounterVec,
    bpf_map_entries: IntGaugeVec,
    bpf_map_capacity: IntGaugeVec,
    panics: IntCounterVec,
    /// Last total seen per series, to turn totals into increments.
    last_totals: Mutex<HashMap<Vec<String>, u64>>,
}

/// The tunnel's connections now: pooled to other nodes, and from them.
#[derive(Debug, Clone, Copy)]
pub struct TunnelCounts {
    pub pooled: usize,
    pub inbound: usize,
    pub pending_handshakes: usize,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let m = Self {
            ready: gauge(
                "mesh_agent_ready",
                "1 when programs are attached and config is loaded",
            ),
            pods_enrolled: gauge(
                "mesh_pods_enrolled",
                "Pods whose traffic the kernel programs capture",
            ),
            pods_failed: gauge(
                "mesh_pods_enrolment_failed",
                "Configured pods that could not be enrolled",
            ),
            programs_attached: gauge(
                "mesh_bpf_program_attachments",
                "Kernel program attachments to pods",
            ),
            config_generation: gauge(
                "mesh_config_generation",
                "Configurations loaded since start",
            ),
            policies_unenforceable: gauge(
                "mesh_policies_unenforceable",
                "Authorization policies that cannot be enforced as written, each denying all traffic to the workloads it selects",
            ),
            config_reloads: counter(
                "mesh_config_reloads_total",
                "Configuration reloads",
                &["result"],
            ),
            pod_connects: counter(
                "mesh_pod_tcp_connects_total",
                "TCP connect() calls seen by the kernel programs, per pod",
                &["namespace", "pod", "family"],
            ),
            pod_captured: counter(
                "mesh_pod_captured_connections_total",
                "Connections of a pod handed to the agent by the kernel programs",
                &["namespace", "pod", "direction"],
            ),
            dns_queries: counter(
                "mesh_dns_queries_total",
                "DNS queries of enrolled pods through the agent's DNS proxy, by who answered (local: a mesh service's name; forwarded: the pod's resolver; failed: no answer)",
                &["answer"],
            ),
            pod_agent_source: counter(
                "mesh_pod_deliveries_from_agent_address_total",
                "Connections delivered into a pod from the agent's address instead of the client's, by reason",
                &["namespace", "pod", "reason"],
            ),
            pod_excluded: counter(
                "mesh_pod_excluded_connections_total",
                "Connections left uncaptured by a configured exclusion",
                &["namespace", "pod"],
            ),
            pod_refused: counter(
                "mesh_pod_refused_connections_total",
                "Connections refused in the kernel (fail-closed), by reason",
                &["namespace", "pod", "reason"],
            ),
            proxy_connections: counter(
                "mesh_proxy_connections_total",
                "Connections the agent proxied, by direction and result",
                &["direction", "result"],
            ),
            proxy_bytes: counter(
                "mesh_proxy_bytes_total",
                "Bytes the agent relayed",
                &["direction", "flow"],
            ),
            panics: counter(
                "mesh_agent_panics_total",
                "Panics in the agent (a task ended by a bug; the agent keeps serving)",
                &[],
            ),
            bpf_map_entries: IntGaugeVec::new(
                Opts::new(
                    "mesh_bpf_map_entries",
                    "Entries in a kernel hash map (mesh_bpf_map_capacity is its size)",
                ),
                &["map"],
            )
            .expect("valid metric"),
            bpf_map_capacity: IntGaugeVec::new(
                Opts::new(
                    "mesh_bpf_map_capacity",
                    "Most entries a kernel hash map holds",
                ),
                &["map"],
            )
            .expect("valid metric"),
            proxy_active: IntGaugeVec::new(
                Opts::new("mesh_proxy_active_connections", "Connections being proxied"),
                &["direction"],
            )
            .expect("valid metric"),
            certificate_expiry: IntGaugeVec::new(
                Opts::new(
                    "mesh_certificate_expiry_timestamp_seconds",
                    "When each workload certificate expires (Unix time)",
                ),
                &["identity"],
            )
            .expect("valid metric"),
            certificate_requests: counter(
                "mesh_certificate_requests_total",
                "Certificate signing requests sent to the CA, by result (ok, failed)",
                &["result"],
            ),
            tunnel_rejections: counter(
                "mesh_tunnel_rejections_total",
                "Refused tunnel handshakes and requests, by reason",
                &["reason"],
            ),
            tunnel_pooled: gauge(
                "mesh_tunnel_pooled_connections",
                "Pooled mTLS tunnel connections to other nodes",
            ),
            tunnel_inbound: gauge(
                "mesh_tunnel_inbound_connections",
                "Tunnel connections from other nodes open now, in handshake or not (limit: limits.tunnelConnections)",
            ),
            tunnel_handshaking: gauge(
                "mesh_tunnel_pending_handshakes",
                "Tunnel connections from other nodes whose TLS handshake is under way (limit: limits.pendingHandshakes)",
            ),
            decisions: counter(
                "mesh_authorization_decisions_total",
                "Authorization decisions, by deciding policy rule (`-` when allowed)",
                &["policy", "decision"],
            ),
            service_picks: counter(
                "mesh_service_endpoint_picks_total",
                "Connections (TCP ports) or request attempts (HTTP ports) given to each endpoint",
                &["service", "endpoint"],
            ),
            service_ejected: IntGaugeVec::new(
                Opts::new(
                    "mesh_service_endpoint_ejected",
                    "1 while an endpoint is ejected for failing",
                ),
                &["service", "endpoint"],
            )
            .expect("valid metric"),
            service_latency: GaugeVec::new(
                Opts::new(
                    "mesh_service_endpoint_latency_estimate_seconds",
                    "Peak-EWMA latency estimate the balancer uses (HTTP ports)",
                ),
                &["service", "endpoint"],
            )
            .expect("valid metric"),
            service_ejections: counter(
                "mesh_service_ejections_total",
                "Endpoints ejected for consecutive failures",
                &["service"],
            ),
            service_no_endpoint: counter(
                "mesh_service_no_endpoint_total",
                "Connections reset or requests answered 503 because the service had no endpoint",
                &["service"],
            ),
            service_retries: counter(
                "mesh_service_retries_total",
                "Retries of HTTP requests: granted, or refused by the retry budget",
                &["service", "result"],
            ),
            service_timeouts: counter(
                "mesh_service_request_timeouts_total",
                "HTTP requests answered 504 because their route's timeout passed",
                &["service"],
            ),
            service_overflows: counter(
                "mesh_service_overflows_total",
                "HTTP requests answered 503 (flag UO) because a DestinationRule's connection pool was full",
                &["service"],
            ),
            http_pooled: gauge(
                "mesh_http_pool_connections",
                "Pooled upstream connections of HTTP service ports",
            ),
            fastpath: counter(
                "mesh_fastpath_total",
                "Same-node fast path (experimental): sockets added, insert failures (normal path), sends and bytes redirected, passed to the normal path, spliced",
                &["event"],
            ),
            last_totals: Mutex::default(),
            names: Mutex::default(),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new("mesh_agent_build_info", "Agent version"),
            &["version"],
        )
        .expect("valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.ready.clone()),
            Box::new(m.pods_enrolled.clone()),
            Box::new(m.pods_failed.clone()),
            Box::new(m.programs_attached.clone()),
            Box::new(m.config_generation.clone()),
            Box::new(m.policies_unenforceable.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.pod_connects.clone()),
            Box::new(m.pod_captured.clone()),
            Box::new(m.pod_agent_source.clone()),
            Box::new(m.dns_queries.clone()),
            Box::new(m.pod_excluded.clone()),
            Box::new(m.pod_refused.clone()),
            Box::new(m.proxy_connections.clone()),
            Box::new(m.proxy_bytes.clone()),
            Box::new(m.proxy_active.clone()),
            Box::new(m.certificate_expiry.clone()),
            Box::new(m.certificate_requests.clone()),
            Box::new(m.tunnel_rejections.clone()),
            Box::new(m.tunnel_pooled.clone()),
            Box::new(m.tunnel_inbound.clone()),
            Box::new(m.tunnel_handshaking.clone()),
            Box::new(m.decisions.clone()),
            Box::new(m.service_picks.clone()),
            Box::new(m.service_ejected.clone()),
            Box::new(m.service_latency.clone()),
            Box::new(m.service_ejections.clone()),
            Box::new(m.service_no_endpoint.clone()),
            Box::new(m.service_retries.clone()),
            Box::new(m.service_timeouts.clone()),
            Box::new(m.service_overflows.clone()),
            Box::new(m.http_pooled.clone()),
            Box::new(m.fastpath.clone()),
            Box::new(m.panics.clone()),
            Box::new(m.bpf_map_entries.clone()),
            Box::new(m.bpf_map_capacity.clone()),
            Box::new(build_info),
        ];
        m.register(collectors);
        m
    }

    /// The names of every metric the agent exposes (histograms also expose
    /// `_bucket`, `_sum` and `_count` series).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().clone()
    }

    /// Adds collectors kept elsewhere (the data path's Istio metrics).
    pub fn register(&self, collectors: Vec<Box<dyn Collector>>) {
        for collector in collectors {
            self.names
                .lock()
                .extend(collector.desc().iter().map(|d| d.fq_name.clone()));
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    /// Feeds a total kept elsewhere (kernel maps, proxy totals) into a
    /// Prometheus counter. Kernel totals restart from zero when a pod is enrolled
    /// again; a total lower than the last one seen is such a restart, so all of it
    /// is new.
    fn sync(&self, vec: &IntCounterVec, labels: &[&str], total: u64) {
        let mut key: Vec<String> = vec![vec.desc()[0].fq_name.clone()];
        key.extend(labels.iter().map(|l| l.to_string()));
        let mut last = self.last_totals.lock();
        let previous = last.insert(key, total).unwrap_or(0);
        let increment = if total >= previous {
            total - previous
        } else {
            total
        };
        if increment > 0 {
            vec.with_label_values(labels).inc_by(increment);
        }
    }

    pub fn sync_pod_counters(&self, namespace: &str, pod: &str, c: &PodCountersView) {
        self.sync(&self.pod_connects, &[namespace, pod, "ipv4"], c.connect4);
        self.sync(&self.pod_connects, &[namespace, pod, "ipv6"], c.connect6);
        self.sync(
            &self.pod_captured,
            &[namespace, pod, "outbound"],
            c.captured_outbound,
        );
        self.sync(
            &self.pod_captured,
            &[namespace, pod, "inbound"],
            c.captured_inbound,
        );
        self.sync(&self.pod_excluded, &[namespace, pod], c.excluded);
        self.sync(
            &self.pod_refused,
            &[namespace, pod, "agent_absent"],
            c.refused_agent_absent,
        );
        self.sync(
            &self.pod_refused,
            &[namespace, pod, "map_full"],
            c.refused_map_full,
        );
    }

    pub fn sync_pod_source_address(
        &self,
        namespace: &str,
        pod: &str,
        view: &crate::proxy::source_address::SourceAddressView,
    ) {
        for (reason, total) in &view.fallbacks {
            self.sync(&self.pod_agent_source, &[namespace, pod, reason], *total);
        }
    }

    pub fn sync_dns(&self, dns: &crate::dns::Dns) {
        for (handled, total) in dns.counts() {
            self.sync(&self.dns_queries, &[handled.as_label()], total);
        }
    }

    pub fn sync_proxy(&self, log: &ConnectionLog) {
        for (direction, name) in [
            (Direction::Outbound, "outbound"),
            (Direction::Inbound, "inbound"),
        ] {
            let t = log.totals(direction);
            let closed = t.closed.load(Ordering::Relaxed);
            let failed = t.failed.load(Ordering::Relaxed);
            self.sync(
                &self.proxy_connections,
                &[name, "ok"],
                closed.saturating_sub(failed),
            );
            self.sync(&self.proxy_connections, &[name, "failed"], failed);
            self.sync(
                &self.proxy_bytes,
                &[name, "sent"],
                t.bytes_sent.load(Ordering::Relaxed),
            );
            self.sync(
                &self.proxy_bytes,
                &[name, "received"],
                t.bytes_received.load(Ordering::Relaxed),
            );
            self.proxy_active
                .with_label_values(&[name])
                .set(log.active(direction) as i64);
        }
    }

    pub fn sync_mtls(
        &self,
        certificates: &[crate::state::CertificateView],
        rejections: &std::collections::BTreeMap<String, u64>,
        tunnel: TunnelCounts,
        ca: Option<&crate::state::CaView>,
    ) {
        self.certificate_expiry.reset();
        for cert in certificates {
            self.certificate_expiry
                .with_label_values(&[&cert.identity])
                .set(cert.not_after as i64);
        }
        for (reason, total) in rejections {
            self.sync(&self.tunnel_rejections, &[reason], *total);
        }
        if let Some(ca) = ca {
            self.sync(&self.certificate_requests, &["ok"], ca.requests_succeeded);
            self.sync(&self.certificate_requests, &["failed"], ca.requests_failed);
        }
        self.tunnel_pooled.set(tunnel.pooled as i64);
        self.tunnel_inbound.set(tunnel.inbound as i64);
        self.tunnel_handshaking
            .set(tunnel.pending_handshakes as i64);
    }

    pub fn sync_decisions(&self, decisions: &std::collections::BTreeMap<(String, String), u64>) {
        for ((policy, decision), total) in decisions {
            self.sync(&self.decisions, &[policy, decision], *total);
        }
    }

    /// Balancer state of every service port; per-endpoint series follow the
    /// endpoints in the file (bounded by it).
    pub fn sync_services(
        &self,
        services: &[(String, crate::services::ServicePortStats)],
        pooled: usize,
    ) {
        self.service_ejected.reset();
        self.service_latency.reset();
        for (service, stats) in services {
            for endpoint in &stats.balancer.endpoints {
                let labels = [service.as_str(), endpoint.id.as_str()];
                self.sync(&self.service_picks, &labels, endpoint.picks);
                self.service_ejected
                    .with_label_values(&labels)
                    .set(i64::from(endpoint.ejected));
                self.service_latency
                    .with_label_values(&labels)
                    .set(endpoint.ewma.as_secs_f64());
            }
            self.sync(
                &self.service_ejections,
                &[service],
                stats.balancer.ejections,
            );
            self.sync(
                &self.service_no_endpoint,
                &[service],
                stats.balancer.no_healthy_endpoint,
            );
            self.sync(
                &self.service_retries,
                &[service, "allowed"],
                stats.retries.allowed,
            );
            self.sync(
                &self.service_retries,
                &[service, "budget_exhausted"],
                stats.retries.denied,
            );
            self.sync(
                &self.service_retries,
                &[service, "overflow"],
                stats.retry_overflows,
            );
            self.sync(&self.service_timeouts, &[service], stats.timeouts);
            self.sync(&self.service_overflows, &[service], stats.overflows);
        }
        self.http_pooled.set(pooled as i64);
    }

    pub fn sync_panics(&self) {
        // Exposed at 0 too: an alert on `> 0` needs the series.
        self.panics.with_label_values::<&str>(&[]);
        self.sync(
            &self.panics,
            &[],
            PANICS.load(std::sync::atomic::Ordering::Relaxed),
        );
    }

    pub fn sync_maps(&self, gauges: &[crate::ebpf::occupancy::MapGauge]) {
        for gauge in gauges {
            self.bpf_map_entries
                .with_label_values(&[gauge.name])
                .set(i64::from(gauge.entries()));
            self.bpf_map_capacity
                .with_label_values(&[gauge.name])
                .set(i64::from(gauge.capacity));
        }
    }

    pub fn sync_fast_path(&self, s: &crate::ebpf::FastPathStats) {
        for (event, total) in [
            ("sockets_added", s.sockets_added),
            ("insert_failed", s.insert_failed),
            ("redirected_msgs", s.redirected_msgs),
            ("redirected_bytes", s.redirected_bytes),
            ("passed_msgs", s.passed_msgs),
            ("passed_bytes", s.passed_bytes),
            ("spliced_msgs", s.spliced_msgs),
            ("spliced_bytes", s.spliced_bytes),
            ("splices_active", s.splices_active),
        ] {
            self.sync(&self.fastpath, &[event], total);
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_totals_become_monotonic_counters_across_resets() {
        let metrics = Metrics::new();
        let view = |connect4| PodCountersView {
            connect4,
            ..Default::default()
        };
        let counter = metrics
            .pod_connects
            .with_label_values(&["ns", "web", "ipv4"]);
        metrics.sync_pod_counters("ns", "web", &view(5));
        metrics.sync_pod_counters("ns", "web", &view(5));
        metrics.sync_pod_counters("ns", "web", &view(7));
        assert_eq!(counter.get(), 7);
        // The pod was enrolled again: the kernel total restarted at 0 and is now
        // 2. The Prometheus counter never goes backwards and loses nothing.
        metrics.sync_pod_counters("ns", "web", &view(2));
        assert_eq!(counter.get(), 9);
        metrics.sync_pod_counters("ns", "web", &view(3));
        assert_eq!(counter.get(), 10);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"mesh_pod_tcp_connects_total{family="ipv4",namespace="ns",pod="web"} 10"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_agent_build_info{version=""#),
            "{text}"
        );
    }

    #[test]
    fn refusals_are_labelled_by_reason() {
        let metrics = Metrics::new();
        let c = PodCountersView {
            refused_agent_absent: 2,
            refused_map_full: 1,
            ..Default::default()
        };
        metrics.sync_pod_counters("ns", "web", &c);
        let text = metrics.render();
        for line in [
            r#"mesh_pod_refused_connections_total{namespace="ns",pod="web",reason="agent_absent"} 2"#,
            r#"mesh_pod_refused_connections_total{namespace="ns",pod="web",reason="map_full"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// Every metric the Grafana dashboard in deploy/ queries is one the agent
    /// exposes: renaming a metric without the dashboard fails here.
    #[test]
    fn the_dashboard_queries_only_metrics_the_agent_exposes() {
        let metrics = Metrics::new();
        let proxy_tcp = crate::proxy::telemetry::TcpTelemetry::default();
        let proxy_http = crate::proxy::telemetry::HttpTelemetry::default();
        metrics.register(proxy_tcp.collectors());
        metrics.register(proxy_http.collectors());
        let mut exposed: Vec<String> = Vec::new();
        for name in metrics.names() {
            for suffix in ["", "_bucket", "_sum", "_count"] {
                exposed.push(format!("{name}{suffix}"));
            }
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("istio_") || word.starts_with("mesh_") {
                        queried += 1;
                        assert!(
                            exposed.iter().any(|n| n == word),
                            "the dashboard queries {word}, which the agent does not expose (panel {})",
                            panel["title"]
                        );
                    }
                }
            }
        }
        assert!(queried >= 15, "only {queried} metric references found");
    }

    /// Every metric the agent exposes has a row in docs/metrics.md.
    #[test]
    fn every_exposed_metric_is_documented() {
        let metrics = Metrics::new();
        metrics.register(crate::proxy::telemetry::TcpTelemetry::default().collectors());
        metrics.register(crate::proxy::telemetry::HttpTelemetry::default().collectors());
        metrics.register(crate::spans::SpanCounters::default().collectors());
        metrics.register(crate::proxy::mirror::MirrorCounters::default().collectors());
        let doc = include_str!("../../../docs/metrics.md");
        let names = metrics.names();
        assert!(names.len() >= 30, "{names:?}");
        for name in names {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is exposed but not in docs/metrics.md"
            );
        }
    }
}
