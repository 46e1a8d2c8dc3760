//! Istio's standard TCP metrics, so existing dashboards and alerts work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, with
//! Istio's labels. Label values come from workload names and identities
//! (bounded by the configuration), never from addresses or ports.

use std::sync::Arc;

use prometheus::{IntCounterVec, Opts, core::Collector};

use super::connections::{ConnectionRecord, Direction};
use crate::{
    l7::Destination,
    spans::{RequestSpan, RequestTracer, SpanEnd, SpanSide},
};

/// The labels naming both ends, shared by Istio's TCP and HTTP metrics (and
/// in this order in [`ConnectionRequests::labels`]).
const PEER_LABELS: [&str; 8] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
];

/// Istio's TCP metrics: the peers, then these.
fn tcp_labels() -> Vec<&'static str> {
    [
        PEER_LABELS.as_slice(),
        &["connection_security_policy", "response_flags"],
    ]
    .concat()
}

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
            IntCounterVec::new(Opts::new(name, help), &tcp_labels()).expect("valid metric")
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
        let flags = record.outcome.response_flags();
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
        record.security.as_label(),
        flags,
    ]
}

/// Istio's HTTP metrics: the peers, then these.
fn request_labels() -> Vec<&'static str> {
    [
        PEER_LABELS.as_slice(),
        &[
            "response_code",
            "response_flags",
            "connection_security_policy",
        ],
    ]
    .concat()
}

/// Istio's standard HTTP metrics: `istio_requests_total`,
/// `istio_request_duration_milliseconds`, `istio_request_bytes`,
/// `istio_response_bytes`.
#[derive(Clone)]
pub struct HttpTelemetry {
    requests: IntCounterVec,
    duration: prometheus::HistogramVec,
    request_bytes: prometheus::HistogramVec,
    response_bytes: prometheus::HistogramVec,
}

impl Default for HttpTelemetry {
    fn default() -> Self {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(name, help).buckets(buckets),
                &request_labels(),
            )
            .expect("valid metric")
        };
        // Istio's default buckets.
        let ms = vec![
            1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
        ];
        let bytes = prometheus::exponential_buckets(1.0, 10.0, 9).expect("valid buckets");
        Self {
            requests: IntCounterVec::new(
                Opts::new("istio_requests_total", "HTTP requests"),
                &request_labels(),
            )
            .expect("valid metric"),
            duration: histogram(
                "istio_request_duration_milliseconds",
                "Time from a request's arrival to its response head",
                ms,
            ),
            request_bytes: histogram(
                "istio_request_bytes",
                "Request body sizes (Content-Length)",
                bytes.clone(),
            ),
            response_bytes: histogram(
                "istio_response_bytes",
                "Response body sizes (Content-Length)",
                bytes,
            ),
        }
    }
}

impl HttpTelemetry {
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.request_bytes.clone()),
            Box::new(self.response_bytes.clone()),
        ]
    }
}

/// Istio's labels naming both ends of one request, in [`PEER_LABELS`]
/// order by [`PeerLabels::values`].
#[derive(Debug, Clone, Copy)]
pub struct PeerLabels<'a> {
    pub reporter: &'a str,
    pub source_workload: &'a str,
    pub source_namespace: &'a str,
    pub source_principal: &'a str,
    pub destination_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_principal: &'a str,
    pub destination_service: &'a str,
}

impl<'a> PeerLabels<'a> {
    fn values(&self) -> [&'a str; 8] {
        [
            self.reporter,
            self.source_workload,
            self.source_namespace,
            self.source_principal,
            self.destination_workload,
            self.destination_namespace,
            self.destination_principal,
            self.destination_service,
        ]
    }
}

/// The labels fixed for one connection's requests (all but the response
/// code and flags, and the destination where the endpoint is chosen per
/// request), and where to count them. The series are looked up once per
/// connection and label set, not per request.
pub struct ConnectionRequests {
    pub telemetry: HttpTelemetry,
    /// One `access` log line per request.
    pub access_log: bool,
    /// reporter, source workload, namespace and principal, destination
    /// workload, namespace and principal, destination service.
    pub labels: [String; 8],
    pub security: &'static str,
    /// The agent's span of each request, and which end it stands for.
    pub spans: Option<(Arc<RequestTracer>, SpanSide)>,
    pub series: parking_lot::Mutex<Vec<(SeriesKey, Series)>>,
}

/// What tells the series of one connection's requests apart.
#[derive(PartialEq, Eq)]
pub struct SeriesKey {
    status: u16,
    flags: &'static str,
    destination: Option<Arc<Destination>>,
}

/// Series kept per connection at most; a connection spreading over more
/// (many endpoints, many codes) looks the rest up per request.
const SERIES_CACHED: usize = 64;

/// The series of one response code.
#[derive(Clone)]
pub struct Series {
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
    request_bytes: prometheus::Histogram,
    response_bytes: prometheus::Histogram,
}

impl ConnectionRequests {
    /// The connection's labels, with the endpoint chosen for a request in
    /// place of the destination the connection alone cannot know.
    fn peers<'a>(&'a self, destination: Option<&'a Arc<Destination>>) -> PeerLabels<'a> {
        let [a, b, c, d, e, f, g, h] = &self.labels;
        let (e, f, g) = match destination {
            Some(chosen) => (&chosen.workload, &chosen.namespace, &chosen.principal),
            None => (e, f, g),
        };
        PeerLabels {
            reporter: a,
            source_workload: b,
            source_namespace: c,
            source_principal: d,
            destination_workload: e,
            destination_namespace: f,
            destination_principal: g,
            destination_service: h,
        }
    }

    fn series(&self, key: SeriesKey) -> Series {
        let mut cache = self.series.lock();
        if let Some((_, series)) = cache.iter().find(|(cached, _)| *cached == key) {
            return series.clone();
        }
        let code = key.status.to_string();
        let [a, b, c, d, e, f, g, h] = self.peers(key.destination.as_ref()).values();
        let labels = [a, b, c, d, e, f, g, h, &code, key.flags, self.security];
        let t = &self.telemetry;
        let series = Series {
            requests: t.requests.with_label_values(&labels),
            duration: t.duration.with_label_values(&labels),
            request_bytes: t.request_bytes.with_label_values(&labels),
            response_bytes: t.response_bytes.with_label_values(&labels),
        };
        if cache.len() < SERIES_CACHED {
            cache.push((key, series.clone()));
        }
        series
    }
}

impl crate::l7::RequestMetrics for ConnectionRequests {
    fn begin(&self, request: &mut hyper::Request<hyper::body::Incoming>) -> Option<RequestSpan> {
        let (tracer, side) = self.spans.as_ref()?;
        Some(tracer.begin(*side, request))
    }

    fn record(&self, outcome: &crate::l7::RequestOutcome, span: Option<RequestSpan>) {
        let flags = outcome.response_flags;
        let series = self.series(SeriesKey {
            status: outcome.status,
            flags,
            destination: outcome.destination.cloned(),
        });
        series.requests.inc();
        series
            .duration
            .observe(outcome.duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(outcome.request_bytes as f64);
        series.response_bytes.observe(outcome.response_bytes as f64);
        let peers = self.peers(outcome.destination);
        // Made only for the log line (it is a string).
        let trace_id = span
            .as_ref()
            .filter(|_| self.access_log)
            .map(RequestSpan::trace_id);
        if let Some(span) = span {
            span.end(&SpanEnd {
                status: outcome.status,
                response_flags: flags,
                denied_by: outcome.denied_by,
                peers,
                security: self.security,
            });
        }
        if self.access_log {
            tracing::info!(
                target: "access",
                reporter = %peers.reporter,
                method = %outcome.method,
                path = outcome.path,
                response_code = outcome.status,
                response_flags = %flags,
                duration_ms = outcome.duration.as_millis() as u64,
                request_bytes = outcome.request_bytes,
                response_bytes = outcome.response_bytes,
                source_workload = %peers.source_workload,
                source_namespace = %peers.source_namespace,
                source_principal = %peers.source_principal,
                destination_workload = %peers.destination_workload,
                destination_namespace = %peers.destination_namespace,
                destination_principal = %peers.destination_principal,
                destination_service = %peers.destination_service,
                security = self.security,
                denied_by = outcome.denied_by.unwrap_or("-"),
                trace_id = %trace_id.as_deref().unwrap_or("-"),
                "request"
            );
        }
    }
}
