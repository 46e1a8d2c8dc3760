//! What every connection handler shares: the snapshot in force, the ways
//! out (dialer, pool), authorization, and what is counted and recorded.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use super::{
    admission,
    authz::Authorizer,
    connections::{ConnectionLog, Peers},
    dial::Dialer,
    http_pool::HttpPool,
    pod::PodHandle,
    snapshot::{Snapshot, SnapshotCell},
    telemetry,
};
use crate::{
    config::HttpSettings, ebpf::OrigDstTable, identity::SpiffeId, l7::L7Options, mtls::Mtls,
};

/// Idle HTTP/1.1 connections kept per (client pod, endpoint).
const HTTP_POOL_MAX_IDLE: usize = 64;

pub struct ProxyContext {
    pub orig_dst: OrigDstTable,
    pub mtls: Arc<Mtls>,
    /// Pods, remote workloads, services and policies in force, swapped whole.
    snapshots: SnapshotCell,
    pub dial: Dialer,
    pub authorizer: Arc<Authorizer>,
    pub connections: ConnectionLog,
    /// Upstream connections of per-request balancing (HTTP service ports).
    pub http_pool: HttpPool,
    /// The kernel fast path, when loaded: splices authorized local flows.
    pub fast_path: Option<Arc<crate::ebpf::FastPath>>,
    /// The per-pod DNS proxy's state (where queries it does not answer go).
    pub dns: Arc<crate::dns::Dns>,
    /// Istio's TCP metrics.
    pub telemetry: telemetry::TcpTelemetry,
    /// Istio's HTTP metrics (requests decided by this node's L7 policies).
    pub http_telemetry: telemetry::HttpTelemetry,
    /// Spans of the requests decided or balanced here (node.yaml
    /// `tracing`); none when tracing is off.
    pub tracer: Option<Arc<crate::spans::RequestTracer>>,
    /// `mesh_trace_spans_total`.
    pub span_counters: crate::spans::SpanCounters,
    /// `mesh_route_mirrored_requests_total`, and the copies in flight.
    pub mirror_counters: super::mirror::MirrorCounters,
    /// Turns true when the agent drains: tunnel connections get a GOAWAY.
    pub(super) draining: tokio::sync::watch::Sender<bool>,
    /// Tunnel connections served (from other nodes), open now.
    pub tunnel_connections: Arc<AtomicUsize>,
    /// What may be open at once.
    pub admission: admission::Admission,
    /// Tunnel TLS handshakes in progress now.
    pub(super) pending_handshakes: Arc<AtomicUsize>,
    /// Timeouts of HTTP connections (node.yaml `http`).
    http: HttpSettings,
}

impl ProxyContext {
    pub fn new(orig_dst: OrigDstTable, mtls: Arc<Mtls>) -> Self {
        Self {
            orig_dst,
            dial: Dialer {
                mtls: mtls.clone(),
                connect_timeout: Duration::from_secs(10),
            },
            mtls,
            snapshots: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
            authorizer: Arc::default(),
            connections: ConnectionLog::new(1024),
            http_pool: HttpPool::new(
                HTTP_POOL_MAX_IDLE,
                HttpSettings::default().upstream_idle_timeout,
            ),
            fast_path: None,
            dns: Arc::default(),
            telemetry: telemetry::TcpTelemetry::default(),
            http_telemetry: telemetry::HttpTelemetry::default(),
            tracer: None,
            span_counters: crate::spans::SpanCounters::default(),
            mirror_counters: Default::default(),
            draining: tokio::sync::watch::Sender::new(false),
            tunnel_connections: Arc::default(),
            admission: admission::Admission::default(),
            pending_handshakes: Arc::default(),
            http: HttpSettings::default(),
        }
    }

    /// The HTTP timeouts of node.yaml (at start).
    pub fn set_http(&mut self, http: HttpSettings) {
        self.http = http;
        self.http_pool = HttpPool::new(HTTP_POOL_MAX_IDLE, http.upstream_idle_timeout);
    }

    /// Options of the L7 relay: the node's HTTP timeouts, `request_metrics`.
    pub fn l7_options(&self, request_metrics: crate::l7::RequestMetricsHandle) -> L7Options {
        L7Options {
            header_read_timeout: self.http.request_headers_timeout,
            idle_timeout: self.http.idle_timeout,
            upstream_idle_timeout: self.http.upstream_idle_timeout,
            request_metrics: Some(request_metrics),
            ..L7Options::default()
        }
    }

    /// The request metrics (and spans) of one HTTP connection: `labels`
    /// as [`telemetry::ConnectionRequests`] orders them, reported from
    /// `side`.
    pub fn request_telemetry(
        &self,
        labels: [String; 8],
        security: &'static str,
        side: crate::spans::SpanSide,
    ) -> crate::l7::RequestMetricsHandle {
        crate::l7::RequestMetricsHandle(Arc::new(telemetry::ConnectionRequests {
            telemetry: self.http_telemetry.clone(),
            access_log: self.connections.access_log_enabled(),
            labels,
            security,
            spans: self.tracer.clone().map(|tracer| (tracer, side)),
            series: Default::default(),
        }))
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }

    /// Where per-request decisions look up the snapshot in force.
    pub(super) fn snapshots(&self) -> SnapshotCell {
        self.snapshots.clone()
    }

    /// Puts `snapshot` in force in one step. Pools to endpoints that left
    /// every service are dropped: they get no new requests, and their
    /// connections close when the requests in flight on them end.
    pub fn publish(&self, snapshot: Snapshot) {
        let endpoints: std::collections::HashSet<SocketAddr> = snapshot
            .services
            .entries()
            .iter()
            .flat_map(|entry| entry.endpoint_addrs())
            .collect();
        self.snapshots.store(Arc::new(snapshot));
        self.http_pool
            .retain(|key| endpoints.contains(&key.endpoint));
    }

    /// The identities of the pods of this node the agent serves.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        self.snapshot().local_identities()
    }

    /// Starts draining: every served tunnel connection gets a GOAWAY (its
    /// open streams carry on; new streams go to a new connection).
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Tunnel connections from other nodes still open.
    pub fn tunnel_connections(&self) -> usize {
        self.tunnel_connections.load(Ordering::SeqCst)
    }

    /// Tunnel connections from other nodes still in their TLS handshake.
    pub fn pending_handshakes(&self) -> usize {
        self.pending_handshakes.load(Ordering::SeqCst)
    }
}

impl Peers {
    /// The destination is `pod`, a pod of this node.
    pub(super) fn set_local_destination(&mut self, pod: &PodHandle) {
        self.destination_workload = pod.workload_name();
        self.destination_namespace = pod.workload.namespace.clone();
        self.destination_principal = Some(pod.identity.to_string());
    }
}
