//! Istio's standard TCP metrics, so existing dashboards and alerts work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, with
//! Istio's labels. Label values come from workload names and identities
//! (bounded by the configuration), never from addresses or ports.

use prometheus::{IntCounterVec, Opts, core::Collector};

use super::connections::{ConnectionRecord, Direction};

const LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",
];

#[derive(Clone)]
pub struct TcpTelemetry {
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
}

impl Default for TcpTelemetry {
    fn default() -> Self {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &LABELS).expect("valid metric")
        };
        Self {
            opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened through the agent",
            ),
            closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed through the agent",
            ),
            sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent by the client of a TCP connection (request direction)",
            ),
            received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received by the client of a TCP connection (response direction)",
            ),
        }
    }
}

impl TcpTelemetry {
    /// For registration in the agent's metrics registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.opened.clone()),
            Box::new(self.closed.clone()),
            Box::new(self.sent.clone()),
            Box::new(self.received.clone()),
        ]
    }

    /// The connection reached its destination and bytes start to flow.
    pub fn opened(&self, record: &ConnectionRecord) {
        self.opened.with_label_values(&labels(record, "-")).inc();
    }

    /// The connection ended; its bytes are in the record.
    pub fn closed(&self, record: &ConnectionRecord) {
        let flags = match record.outcome.as_str() {
            "closed" => "-",
            "client-reset" => "DC",
            "upstream-reset" => "UR",
            "idle-timeout" => "IT",
            _ => "-",
        };
        // Opened and closed share label values (Istio dashboards subtract
        // them); the flags only mark the closing.
        let open_labels = labels(record, "-");
        let close_labels = labels(record, flags);
        self.closed.with_label_values(&close_labels).inc();
        self.sent
            .with_label_values(&open_labels)
            .inc_by(record.bytes_sent);
        self.received
            .with_label_values(&open_labels)
            .inc_by(record.bytes_received);
    }
}

fn labels<'a>(record: &'a ConnectionRecord, flags: &'a str) -> [&'a str; 10] {
    let peers = &record.peers;
    let unknown = "unknown";
    [
        match record.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        },
        &peers.source_workload,
        &peers.source_namespace,
        record.source_identity.as_deref().unwrap_or(unknown),
        &peers.destination_workload,
        &peers.destination_namespace,
        peers.destination_principal.as_deref().unwrap_or(unknown),
        &peers.destination_service,
        if record.security == "mutual_tls" {
            "mutual_tls"
        } else {
            "none"
        },
        flags,
    ]
}
