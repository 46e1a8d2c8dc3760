//! The userspace data path: captured connections in, upstream connections out.
//!
//! Outbound (from a pod's app, via the agent's listener on 127.0.0.1:15001 in
//! that pod): the kernel's record says where it was going.
//! - a pod on this node: delivered inside that pod's namespace over its
//!   loopback (so it is not captured again); no TLS, it never leaves the node;
//! - a mesh workload on another node (workloads.yaml): through the mTLS tunnel
//!   (HBONE) to its node's agent, which must prove the workload's identity;
//! - anything else: dialled from the source pod's namespace, so it leaves with
//!   the pod's own address.
//!
//! Inbound plaintext (from outside the mesh, steered by sk_lookup to the agent's
//! listener on 127.0.0.1:15006 in the pod): the accepted socket's local address
//! is where the client was going; delivered inside the pod.
//!
//! Inbound tunnel (port 15008 on the pod's addresses): TLS terminated with the
//! pod's identity, the peer's identity recorded, each CONNECT delivered to the
//! pod of this node it names.

pub mod admission;
mod authz;
pub mod connections;
mod descriptors;
pub mod http_pool;
pub mod relay;
mod service_http;
mod splice;
pub mod telemetry;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use mesh_common::{AGENT_SOURCE_IPV4, TUNNEL_PORT};
use tokio::net::TcpStream;

use crate::{
    capture::netns_worker::NetnsWorker,
    ebpf::OrigDstTable,
    identity::{SpiffeId, spiffe_id_of},
    l7::{self, L7Error, L7Options},
    mtls::{Mtls, RemotePeer},
    policy::{self, CompiledPolicies, Decision, WorkloadPolicy},
    services::{PortProtocol, ServicePortEntry, ServiceTable},
    tunnel::{self, ConnectRequest, PoolKey, Rejection, ServeError, TunnelStream, TunnelTarget},
};
use connections::{ConnectionLog, ConnectionRecord, Direction};
use relay::{RelayOutcome, RelayStats, relay};

/// An enrolled pod as the data path needs it.
pub struct PodHandle {
    /// `namespace/name`.
    pub key: String,
    pub netns_cookie: u64,
    pub netns: NetnsWorker,
    /// The pod's workload identity.
    pub identity: SpiffeId,
    pub addrs: Vec<IpAddr>,
    /// Namespace and labels, for selecting its authorization policies.
    pub workload: policy::Workload,
    /// Its connections being proxied now (for `limits.connectionsPerPod`).
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl PodHandle {
    /// The workload name Istio's metrics use: the `app` label, else the pod name.
    pub fn workload_name(&self) -> String {
        self.workload
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| self.key.rsplit('/').next().unwrap_or(&self.key).to_string())
    }

    /// The pod's address of the same family as `other`.
    fn addr_like(&self, other: IpAddr) -> IpAddr {
        self.addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == other.is_ipv4())
            .unwrap_or(other)
    }
}

pub struct ProxyContext {
    pub orig_dst: OrigDstTable,
    pub mtls: Arc<Mtls>,
    /// Pods on this node by address, for local delivery.
    local_pods: RwLock<HashMap<IpAddr, Arc<PodHandle>>>,
    pub connections: ConnectionLog,
    pub connect_timeout: Duration,
    /// The policies in force; replaced whole on reload, so a connection is
    /// decided by the set in force when it arrived.
    policies: RwLock<Arc<CompiledPolicies>>,
    /// Decisions by (policy or rule, decision), for metrics and status.
    decisions: Mutex<BTreeMap<(String, String), u64>>,
    /// Services by VIP and port; replaced whole on reload.
    services: RwLock<Arc<ServiceTable>>,
    /// Upstream connections of per-request balancing (HTTP service ports).
    pub http_pool: http_pool::HttpPool,
    /// The kernel fast path, when loaded: splices authorized local flows.
    pub fast_path: Option<Arc<crate::ebpf::FastPath>>,
    /// Istio's TCP metrics.
    pub telemetry: telemetry::TcpTelemetry,
    /// Istio's HTTP metrics (requests decided by this node's L7 policies).
    pub http_telemetry: telemetry::HttpTelemetry,
    /// Turns true when the agent drains: tunnel connections get a GOAWAY.
    draining: tokio::sync::watch::Sender<bool>,
    /// Tunnel connections served (from other nodes), open now.
    pub tunnel_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// What may be open at once.
    pub admission: admission::Admission,
    /// Tunnel TLS handshakes in progress now.
    pending_handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Idle HTTP/1.1 connections kept per (client pod, endpoint).
const HTTP_POOL_MAX_IDLE: usize = 64;

enum Upstream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

impl ProxyContext {
    pub fn new(orig_dst: OrigDstTable, mtls: Arc<Mtls>) -> Self {
        Self {
            orig_dst,
            mtls,
            local_pods: RwLock::new(HashMap::new()),
            connections: ConnectionLog::new(1024),
            connect_timeout: Duration::from_secs(10),
            policies: RwLock::new(Arc::new(
                policy::PolicySet::default().compile(policy::DEFAULT_ROOT_NAMESPACE),
            )),
            decisions: Mutex::default(),
            services: RwLock::default(),
            http_pool: http_pool::HttpPool::new(HTTP_POOL_MAX_IDLE),
            fast_path: None,
            telemetry: telemetry::TcpTelemetry::default(),
            http_telemetry: telemetry::HttpTelemetry::default(),
            draining: tokio::sync::watch::Sender::new(false),
            tunnel_connections: Arc::default(),
            admission: admission::Admission::default(),
            pending_handshakes: Arc::default(),
        }
    }

    /// The identities of the pods of this node the agent serves.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        self.local_pods
            .read()
            .expect("local pods lock")
            .values()
            .map(|pod| pod.identity.clone())
            .collect()
    }

    /// Starts draining: every served tunnel connection gets a GOAWAY (its
    /// open streams carry on; new streams go to a new connection).
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Tunnel connections from other nodes still open.
    pub fn tunnel_connections(&self) -> usize {
        self.tunnel_connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn services(&self) -> Arc<ServiceTable> {
        self.services.read().expect("services lock").clone()
    }

    /// Applies a new service table. Pools to endpoints that left every
    /// service are dropped: they get no new requests, and their connections
    /// close when the requests in flight on them end.
    pub fn set_services(&self, services: ServiceTable) {
        let endpoints: std::collections::HashSet<SocketAddr> = services
            .entries()
            .iter()
            .flat_map(|entry| entry.endpoint_addrs())
            .collect();
        self.http_pool
            .retain(|key| endpoints.contains(&key.endpoint));
        *self.services.write().expect("services lock") = Arc::new(services);
    }

    pub fn set_policies(&self, policies: CompiledPolicies) {
        *self.policies.write().expect("policies lock") = Arc::new(policies);
    }

    /// Decisions so far: (policy rule or `-`, decision) -> count.
    pub fn decisions(&self) -> BTreeMap<(String, String), u64> {
        self.decisions.lock().expect("decisions lock").clone()
    }

    pub(crate) fn count_decision(&self, by: &str, decision: &str) {
        *self
            .decisions
            .lock()
            .expect("decisions lock")
            .entry((by.to_string(), decision.to_string()))
            .or_default() += 1;
    }

    /// The policies in force for `workload` right now (cached per workload in
    /// the compiled set; a reload swaps the whole set).
    pub(crate) fn workload_policy(&self, workload: &policy::Workload) -> WorkloadPolicy {
        let policies = self.policies.read().expect("policies lock").clone();
        policies.for_workload(workload)
    }

    /// Whether the destination's policies have HTTP rules: then every request
    /// is decided on its own (L7) instead of the connection (L4).
    fn needs_http(&self, target: &PodHandle) -> bool {
        self.workload_policy(&target.workload).has_http_rules()
    }

    /// Serves `downstream` as HTTP into `target`, deciding each request (403
    /// `RBAC: access denied` for a denied one, the connection stays usable).
    /// Traffic that turns out not to be HTTP gets the L4 decision instead.
    /// Returns the record's outcome and whether it failed.
    #[allow(clippy::too_many_arguments)]
    async fn serve_http<D>(
        self: &Arc<Self>,
        downstream: D,
        target: Arc<PodHandle>,
        source: Option<SpiffeId>,
        source_ip: IpAddr,
        remote_ip: IpAddr,
        dst: SocketAddr,
    ) -> (String, bool)
    where
        D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let authorizer = Arc::new(authz::ConnectionAuthorizer {
            proxy: self.clone(),
            pod: target.key.clone(),
            workload: target.workload.clone(),
            source: source.clone(),
            source_ip,
            remote_ip,
            destination: dst,
        });
        // Each request is reported by this node as the destination's.
        let (source_workload, source_namespace) = self.workload_of(remote_ip);
        let request_metrics = telemetry::ConnectionRequests {
            telemetry: self.http_telemetry.clone(),
            access_log: self.connections.access_log_enabled(),
            labels: [
                "destination".to_string(),
                source_workload,
                source_namespace,
                source
                    .as_ref()
                    .map_or_else(|| "unknown".to_string(), |id| id.to_string()),
                target.workload_name(),
                target.workload.namespace.clone(),
                target.identity.to_string(),
                "unknown".to_string(),
            ],
            // An identified client that is not a pod of this node came
            // through the tunnel.
            security: if source.is_some() && self.local_pod(remote_ip).is_none() {
                "mutual_tls"
            } else {
                "none"
            },
            series: Default::default(),
        };
        let options = L7Options {
            request_metrics: Some(l7::RequestMetricsHandle(Arc::new(request_metrics))),
            ..L7Options::default()
        };
        let (proxy, inside) = (self.clone(), target.clone());
        let connect = move || async move {
            proxy
                .connect_inside(&inside, dst)
                .await
                .map_err(std::io::Error::other)
        };
        match l7::serve(downstream, connect, authorizer, normalize_path, options).await {
            Ok(stats) => (http_outcome(&stats), false),
            Err(L7Error::NotHttp(not_http)) => {
                if let Err(by) =
                    self.authorize_tcp(&target, source.as_ref(), source_ip, remote_ip, dst)
                {
                    return (format!("denied by {by} (not HTTP)"), true);
                }
                let Ok((peeked, mut downstream)) = not_http.into_parts::<D>() else {
                    return ("internal error: stream type".to_string(), true);
                };
                match self.connect_inside(&target, dst).await {
                    Ok(mut upstream) => {
                        use tokio::io::AsyncWriteExt;
                        if upstream.write_all(&peeked).await.is_err() {
                            return ("upstream-reset".to_string(), true);
                        }
                        match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                            Ok(_) => ("closed (not HTTP)".to_string(), false),
                            Err(_) => ("reset (not HTTP)".to_string(), false),
                        }
                    }
                    Err(err) => (format!("upstream-failed: {err:#}"), true),
                }
            }
            Err(err) => (format!("http connection ended: {err}"), false),
        }
    }

    /// Serves a client connection to a service's HTTP port: each request
    /// goes to an endpoint of its own (see `service_http`). The policies that
    /// apply are the endpoints': decided here for endpoints on this node, by
    /// their node's agent for the others. A client that does not speak HTTP
    /// to an HTTP port is reset.
    async fn serve_service_http(
        self: &Arc<Self>,
        downstream: TcpStream,
        source: Arc<PodHandle>,
        service: Arc<ServicePortEntry>,
    ) -> (String, bool) {
        let forwarder = Arc::new(service_http::ServiceForwarder {
            proxy: self.clone(),
            source: source.clone(),
            service: service.clone(),
        });
        // Each request is reported by this node as the source's: the
        // endpoint (and so the destination workload) is chosen per request.
        let request_metrics = telemetry::ConnectionRequests {
            telemetry: self.http_telemetry.clone(),
            access_log: self.connections.access_log_enabled(),
            labels: [
                "source".to_string(),
                source.workload_name(),
                source.workload.namespace.clone(),
                source.identity.to_string(),
                "unknown".to_string(),
                service.config.namespace.clone(),
                "unknown".to_string(),
                service_host(&service.config),
            ],
            security: "unknown",
            series: Default::default(),
        };
        let options = L7Options {
            request_metrics: Some(l7::RequestMetricsHandle(Arc::new(request_metrics))),
            ..L7Options::default()
        };
        match l7::serve_with(
            downstream,
            forwarder,
            Arc::new(l7::AllowAll),
            normalize_path,
            options,
        )
        .await
        {
            Ok(stats) => (http_outcome(&stats), false),
            Err(L7Error::NotHttp(not_http)) => {
                tracing::warn!(pod = %source.key, service = %service.key, reason = %not_http.reason, "not HTTP on an HTTP service port; reset");
                if let Ok((_, downstream)) = not_http.into_parts::<TcpStream>() {
                    reset(downstream);
                }
                (format!("not HTTP on HTTP port {}", service.key), true)
            }
            Err(err) => (format!("http connection ended: {err}"), false),
        }
    }

    /// Authorizes a plain TCP connection into `target` (L4: HTTP-only rules are
    /// judged as Istio does for TCP traffic).
    fn authorize_tcp(
        &self,
        target: &PodHandle,
        source: Option<&SpiffeId>,
        source_ip: IpAddr,
        remote_ip: IpAddr,
        dst: SocketAddr,
    ) -> Result<(), String> {
        let principal = source.map(|id| id.to_string());
        let request = policy::Request {
            source_principal: principal.as_deref(),
            source_namespace: source.map(|id| id.namespace()),
            source_ip,
            remote_ip,
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            sni: None,
            http: None,
        };
        self.authorize(&target.key, &target.workload, &request)
    }

    /// Authorizes a connection (L4) or an HTTP request (`request.http` set) into
    /// the pod `pod_key`, by the policies in force for `workload` now. Denies and
    /// dry-run would-denies are logged with the deciding policy and rule; every
    /// decision is counted. Err carries the deciding policy and rule.
    pub(crate) fn authorize(
        &self,
        pod_key: &str,
        workload: &policy::Workload,
        request: &policy::Request<'_>,
    ) -> Result<(), String> {
        let decision = self.workload_policy(workload).decide(request);
        let (dry_run_denies, allowed_by, denied_by) = match decision {
            Decision::Allow {
                by, dry_run_denies, ..
            } => (dry_run_denies, by, None),
            Decision::Deny {
                by, dry_run_denies, ..
            } => (dry_run_denies, None, Some(by)),
        };
        let source = request.source_principal.unwrap_or("-");
        let (method, path) = request
            .http
            .as_ref()
            .map_or(("-", "-"), |h| (h.method, h.path));
        let what = if request.http.is_some() {
            "request"
        } else {
            "connection"
        };
        for would in &dry_run_denies {
            tracing::info!(pod = %pod_key, source, src = %request.source_ip, dst_port = request.destination_port, method, path, policy = %would, "dry-run: this {what} would be denied");
            self.count_decision(&would.to_string(), "dry_run_deny");
        }
        match denied_by {
            None => {
                self.count_decision(
                    &allowed_by.map_or_else(|| "-".to_string(), |by| by.to_string()),
                    "allow",
                );
                Ok(())
            }
            Some(by) => {
                tracing::warn!(pod = %pod_key, source, src = %request.source_ip, dst_port = request.destination_port, method, path, policy = %by, "{what} denied");
                self.count_decision(&by.to_string(), "deny");
                Err(by.to_string())
            }
        }
    }

    pub fn add_local_pod(&self, pod: Arc<PodHandle>) {
        let mut pods = self.local_pods.write().expect("local pods lock");
        for addr in &pod.addrs {
            pods.insert(*addr, pod.clone());
        }
    }

    pub fn remove_local_pod(&self, key: &str) {
        self.local_pods
            .write()
            .expect("local pods lock")
            .retain(|_, p| p.key != key);
    }

    /// The workload name and namespace of a mesh address (a pod of this node
    /// or a workload of another), `unknown` otherwise.
    fn workload_of(&self, ip: IpAddr) -> (String, String) {
        if let Some(pod) = self.local_pod(ip) {
            return (pod.workload_name(), pod.workload.namespace.clone());
        }
        if let Some(peer) = self.mtls.remote_peer(ip)
            && let Some((namespace, name)) = peer.key.split_once('/')
        {
            return (name.to_string(), namespace.to_string());
        }
        ("unknown".to_string(), "unknown".to_string())
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodHandle>> {
        self.local_pods
            .read()
            .expect("local pods lock")
            .get(&ip)
            .cloned()
    }

    fn record(
        &self,
        direction: Direction,
        pod: &PodHandle,
        client: SocketAddr,
    ) -> ConnectionRecord {
        ConnectionRecord {
            id: self.connections.open(direction),
            direction,
            pod: pod.key.clone(),
            client,
            original_dst: client,
            upstream: String::new(),
            bytes_sent: 0,
            bytes_received: 0,
            outcome: String::new(),
            duration_ms: 0,
            source_identity: None,
            peer_identity: None,
            security: "none".to_string(),
            spliced_bytes: 0,
            peers: connections::Peers::default(),
        }
    }

    /// Serves one connection captured on its way out of `pod`.
    pub async fn handle_outbound(
        self: Arc<Self>,
        pod: Arc<PodHandle>,
        downstream: TcpStream,
        client: SocketAddr,
    ) {
        let started = Instant::now();
        let mut record = self.record(Direction::Outbound, &pod, client);
        record.source_identity = Some(pod.identity.to_string());
        record.peers.source_workload = pod.workload_name();
        record.peers.source_namespace = pod.workload.namespace.clone();
        let captured = match self.orig_dst.take(pod.netns_cookie, client) {
            Ok(captured) => captured,
            Err(err) => {
                // Never guess a destination: close, and say why.
                tracing::warn!(pod = %pod.key, %client, error = %err, "captured connection without a record; reset");
                reset(downstream);
                record.outcome = format!("no-original-destination: {err}");
                record.duration_ms = started.elapsed().as_millis() as u64;
                self.connections.record(record, true);
                return;
            }
        };
        let mut dst = captured.original_dst;
        record.original_dst = dst;
        // A service address: one of its endpoints serves this connection.
        let service = self.services.read().expect("services lock").lookup(dst);
        if let Some(service) = &service {
            record.peers.destination_service = service_host(&service.config);
        }
        if let Some(service) = service.as_ref().filter(|s| s.protocol != PortProtocol::Tcp) {
            // An HTTP port: an endpoint per request, not per connection.
            record.upstream = format!("service:{}", service.key);
            // Boxed, here and below: the state of the HTTP paths is large, and
            // would otherwise be reserved in every connection's future,
            // idle TCP relays included.
            let (outcome, failed) =
                Box::pin(self.serve_service_http(downstream, pod, service.clone())).await;
            record.outcome = outcome;
            record.duration_ms = started.elapsed().as_millis() as u64;
            self.connections.record(record, failed);
            self.orig_dst.forget(captured.socket_cookie);
            return;
        }
        let mut chosen = None;
        let mut endpoint_peer = None;
        if let Some(service) = &service {
            match service.choose() {
                Ok(endpoint) => {
                    dst = endpoint.addr;
                    endpoint_peer = endpoint.peer.clone();
                    chosen = Some(endpoint);
                }
                Err(err) => {
                    // Fail fast and say so: the client gets a reset at once.
                    tracing::warn!(pod = %pod.key, service = %service.key, error = format!("{err:#}"), "no endpoint for the service; reset");
                    reset(downstream);
                    record.outcome = format!("no-healthy-endpoint: {}", service.key);
                    record.duration_ms = started.elapsed().as_millis() as u64;
                    self.connections.record(record, true);
                    self.orig_dst.forget(captured.socket_cookie);
                    return;
                }
            }
        }
        // An authorized L4 flow between two pods of this node may be spliced.
        let mut splice_into = None;
        let upstream = if let Some(target) = self.local_pod(dst.ip()) {
            record.upstream = format!("pod:{}", target.key);
            record.peers.set_local_destination(&target);
            // Same node: the destination's policy applies here, with the source
            // identity known from the capture.
            let source_ip = pod.addr_like(dst.ip());
            if self.needs_http(&target) {
                let source = Some(pod.identity.clone());
                let (outcome, failed) = Box::pin(
                    self.serve_http(downstream, target, source, source_ip, source_ip, dst),
                )
                .await;
                record.outcome = outcome;
                record.duration_ms = started.elapsed().as_millis() as u64;
                self.connections.record(record, failed);
                self.orig_dst.forget(captured.socket_cookie);
                return;
            }
            if let Err(by) =
                self.authorize_tcp(&target, Some(&pod.identity), source_ip, source_ip, dst)
            {
                self.deny(record, started, downstream, &by);
                self.orig_dst.forget(captured.socket_cookie);
                return;
            }
            splice_into = Some(target.netns_cookie);
            Box::pin(self.connect_inside(&target, dst))
                .await
                .map(Upstream::Tcp)
        } else if let Some(peer) = endpoint_peer.or_else(|| self.mtls.remote_peer(dst.ip())) {
            record.upstream = format!("tunnel:{}", peer.key);
            record.peer_identity = Some(peer.identity.to_string());
            record.peers.destination_principal = Some(peer.identity.to_string());
            if let Some((namespace, name)) = peer.key.split_once('/') {
                record.peers.destination_workload = name.to_string();
                record.peers.destination_namespace = namespace.to_string();
            }
            record.security = "mutual_tls".to_string();
            Box::pin(self.connect_tunnel(&pod, &peer, dst))
                .await
                .map(Upstream::Tunnel)
        } else {
            record.upstream = "direct".to_string();
            Box::pin(self.connect_from(&pod, dst))
                .await
                .map(Upstream::Tcp)
        };
        let failed = match (splice_into, upstream) {
            (Some(server_netns), Ok(Upstream::Tcp(tcp))) => {
                Box::pin(self.finish_local(
                    record,
                    started,
                    downstream,
                    pod.netns_cookie,
                    tcp,
                    server_netns,
                ))
                .await
            }
            (_, upstream) => self.finish(record, started, downstream, upstream).await,
        };
        if let (Some(service), Some(endpoint)) = (service, chosen) {
            service.done(endpoint, failed);
        }
        self.orig_dst.forget(captured.socket_cookie);
    }

    /// Serves one plaintext connection captured on its way into `pod`.
    pub async fn handle_inbound(
        self: Arc<Self>,
        pod: Arc<PodHandle>,
        downstream: TcpStream,
        client: SocketAddr,
    ) {
        let started = Instant::now();
        let mut record = self.record(Direction::Inbound, &pod, client);
        record.peers.set_local_destination(&pod);
        let original_dst = downstream.local_addr().unwrap_or(client);
        record.original_dst = original_dst;
        record.upstream = format!("pod:{}", pod.key);
        // Plaintext from outside the mesh: no principal, no namespace.
        if self.needs_http(&pod) {
            let (outcome, failed) = Box::pin(self.serve_http(
                downstream,
                pod.clone(),
                None,
                client.ip(),
                client.ip(),
                original_dst,
            ))
            .await;
            record.outcome = outcome;
            record.duration_ms = started.elapsed().as_millis() as u64;
            self.connections.record(record, failed);
            return;
        }
        if let Err(by) = self.authorize_tcp(&pod, None, client.ip(), client.ip(), original_dst) {
            self.deny(record, started, downstream, &by);
            return;
        }
        let upstream = self
            .connect_inside(&pod, original_dst)
            .await
            .map(Upstream::Tcp);
        self.finish(record, started, downstream, upstream).await;
    }

    /// A denied TCP connection is closed at once (reset), and recorded.
    fn deny(
        &self,
        mut record: ConnectionRecord,
        started: Instant,
        downstream: TcpStream,
        by: &str,
    ) {
        reset(downstream);
        record.outcome = format!("denied by {by}");
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.connections.record(record, true);
    }

    /// Serves one connection to `pod`'s tunnel port: mutual TLS with the pod's
    /// identity, then one delivery per CONNECT stream.
    pub async fn handle_tunnel(
        self: Arc<Self>,
        pod: Arc<PodHandle>,
        tcp: TcpStream,
        peer: SocketAddr,
    ) {
        let config = match self.mtls.server_config(&pod.identity) {
            Ok(config) => config,
            Err(err) => {
                self.mtls.count_rejection("no_identity");
                tracing::warn!(pod = %pod.key, %peer, error = format!("{err:#}"), "tunnel connection refused");
                return;
            }
        };
        let proxy = self.clone();
        let open = move |request: ConnectRequest| {
            let proxy = proxy.clone();
            async move { proxy.open_tunnel_stream(request).await }
        };
        let mut draining = self.draining.subscribe();
        let shutdown = async move {
            let _ = draining.wait_for(|draining| *draining).await;
        };
        let Some(pending) = self.admission.admit(
            admission::Limit::PendingHandshakes,
            &self.pending_handshakes,
        ) else {
            tracing::debug!(pod = %pod.key, %peer, "too many tunnel handshakes in progress: reset");
            reset(tcp);
            return;
        };
        let served = async {
            let (tls, peer_addr) = {
                let _pending = pending;
                tunnel::accept_tls(tcp, config, self.mtls.handshake_timeout).await?
            };
            tunnel::serve_tls(tls, peer_addr, open, shutdown).await
        };
        match served.await {
            Ok(()) => {}
            Err(ServeError::Handshake(err)) => {
                let reason = tunnel_rejection_reason(&err);
                self.mtls.count_rejection(&reason);
                tracing::warn!(pod = %pod.key, %peer, reason, error = %err, "tunnel handshake refused");
            }
            Err(ServeError::HandshakeTimeout) => {
                self.mtls.count_rejection("handshake_timeout");
                tracing::warn!(pod = %pod.key, %peer, "tunnel handshake timed out");
            }
            Err(err) => {
                tracing::debug!(pod = %pod.key, %peer, error = %err, "tunnel connection ended")
            }
        }
    }

    /// The record of a tunnel stream into `target`: the source is known by
    /// the identity it proved, and by name when workloads.yaml has a
    /// workload with that identity at the client's address.
    fn tunnel_record(
        &self,
        target: &PodHandle,
        client: SocketAddr,
        peer_identity: &SpiffeId,
    ) -> ConnectionRecord {
        let mut record = self.record(Direction::Inbound, target, client);
        record.peers.set_local_destination(target);
        if let Some(source) = self.mtls.remote_peer(client.ip())
            && source.identity == *peer_identity
            && let Some((namespace, name)) = source.key.split_once('/')
        {
            record.peers.source_workload = name.to_string();
            record.peers.source_namespace = namespace.to_string();
        }
        record
    }

    async fn open_tunnel_stream(
        self: &Arc<Self>,
        request: ConnectRequest,
    ) -> Result<tunnel::Upstream, Rejection> {
        let peer_identity = request
            .peer_certificates
            .first()
            .ok_or_else(|| "no client certificate".to_string())
            .and_then(|der| spiffe_id_of(der.as_ref()))
            .map_err(|e| Rejection::Forbidden(format!("client identity: {e}")))?;
        // A connection can outlive the certificate it was made with: no new
        // stream past its expiry, the client must handshake again.
        if request
            .peer_certificate_expiry
            .is_some_and(|until| std::time::SystemTime::now() > until)
        {
            self.mtls.count_rejection("expired");
            tracing::warn!(peer = %peer_identity, peer_addr = %request.peer_addr, "CONNECT on a connection whose client certificate has expired refused");
            return Err(Rejection::Unauthorized(format!(
                "the certificate of {peer_identity} on this connection has expired"
            )));
        }
        let Some(target) = self.local_pod(request.authority.ip()) else {
            self.mtls.count_rejection("connect_not_a_local_pod");
            tracing::warn!(authority = %request.authority, peer = %peer_identity, "CONNECT to an address that is not a pod of this node refused");
            return Err(Rejection::Forbidden(format!(
                "{} is not a pod of this node",
                request.authority
            )));
        };
        let client = request
            .forwarded_for
            .map(|ip| SocketAddr::new(ip, 0))
            .unwrap_or(request.peer_addr);
        if self.needs_http(&target) {
            // The stream's bytes go to the HTTP authorizer through a pipe.
            let (stream_end, http_end) = tokio::io::duplex(256 * 1024);
            let proxy = self.clone();
            let (peer_ip, authority) = (request.peer_addr.ip(), request.authority);
            tokio::spawn(async move {
                let mut record = proxy.tunnel_record(&target, client, &peer_identity);
                record.original_dst = authority;
                record.upstream = format!("pod:{}", target.key);
                record.source_identity = Some(peer_identity.to_string());
                record.security = "mutual_tls".to_string();
                let started = Instant::now();
                let (outcome, failed) = proxy
                    .serve_http(
                        http_end,
                        target,
                        Some(peer_identity),
                        peer_ip,
                        client.ip(),
                        authority,
                    )
                    .await;
                record.outcome = outcome;
                record.duration_ms = started.elapsed().as_millis() as u64;
                proxy.connections.record(record, failed);
            });
            return Ok(tunnel::Upstream::Local(stream_end));
        }
        if let Err(by) = self.authorize_tcp(
            &target,
            Some(&peer_identity),
            request.peer_addr.ip(),
            client.ip(),
            request.authority,
        ) {
            let mut record = self.tunnel_record(&target, client, &peer_identity);
            record.original_dst = request.authority;
            record.source_identity = Some(peer_identity.to_string());
            record.security = "mutual_tls".to_string();
            record.outcome = format!("denied by {by}");
            self.connections.record(record, true);
            return Err(Rejection::Forbidden(format!("RBAC: access denied ({by})")));
        }
        let mut record = self.tunnel_record(&target, client, &peer_identity);
        record.original_dst = request.authority;
        record.upstream = format!("pod:{}", target.key);
        record.source_identity = Some(peer_identity.to_string());
        record.peer_identity = Some(target.identity.to_string());
        record.security = "mutual_tls".to_string();
        let started = Instant::now();
        match self.connect_inside(&target, request.authority).await {
            Ok(tcp) => {
                // Recorded (log, metrics, the drain's count) when the stream
                // ends, with the bytes it carried.
                self.telemetry.opened(&record);
                let proxy = self.clone();
                let done = move |relayed: tunnel::Relayed| {
                    record.bytes_sent = relayed.to_upstream;
                    record.bytes_received = relayed.from_upstream;
                    record.outcome = if relayed.aborted { "reset" } else { "closed" }.to_string();
                    record.duration_ms = started.elapsed().as_millis() as u64;
                    proxy.telemetry.closed(&record);
                    proxy.connections.record(record, false);
                };
                Ok(tunnel::Upstream::Observed(tcp, Box::new(done)))
            }
            Err(err) => {
                record.outcome = format!("upstream-failed: {err:#}");
                self.connections.record(record, true);
                Err(Rejection::UpstreamUnavailable(format!("{err:#}")))
            }
        }
    }

    async fn finish(
        &self,
        mut record: ConnectionRecord,
        started: Instant,
        downstream: TcpStream,
        upstream: Result<Upstream>,
    ) -> bool {
        let failed = match upstream {
            Ok(upstream) => {
                self.telemetry.opened(&record);
                // Each relay boxed: a connection's future holds the one it runs.
                let stats = match upstream {
                    Upstream::Tcp(tcp) => Box::pin(relay(downstream, tcp)).await,
                    Upstream::Tunnel(stream) => Box::pin(relay_to_tunnel(downstream, stream)).await,
                };
                record.bytes_sent = stats.downstream_to_upstream;
                record.bytes_received = stats.upstream_to_downstream;
                record.outcome = relay_outcome(stats.outcome).to_string();
                self.telemetry.closed(&record);
                false
            }
            Err(err) => {
                tracing::info!(pod = %record.pod, dst = %record.original_dst, error = format!("{err:#}"), "upstream connect failed; client reset");
                self.admission.count_if_out_of_descriptors(&err);
                // The client sees what it would have seen directly: a reset.
                reset(downstream);
                record.outcome = format!("upstream-failed: {err:#}");
                true
            }
        };
        record.duration_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(?record, "connection done");
        self.connections.record(record, failed);
        failed
    }

    /// Relays a flow between two pods of this node, spliced in the kernel when
    /// the fast path allows it (see `splice`).
    async fn finish_local(
        &self,
        mut record: ConnectionRecord,
        started: Instant,
        downstream: TcpStream,
        client_netns: u64,
        upstream: TcpStream,
        server_netns: u64,
    ) -> bool {
        let splice = self
            .fast_path
            .as_deref()
            .filter(|fp| fp.splicing())
            .and_then(|fp| {
                splice::Splice::arm(fp, client_netns, &downstream, server_netns, &upstream)
            });
        let Some(splice) = splice else {
            return self
                .finish(record, started, downstream, Ok(Upstream::Tcp(upstream)))
                .await;
        };
        self.telemetry.opened(&record);
        let stats = relay::relay_observed(downstream, upstream, &splice).await;
        let bytes = splice.finish(stats.downstream_to_upstream, stats.upstream_to_downstream);
        record.bytes_sent = bytes.client_sent;
        record.bytes_received = bytes.server_sent;
        record.spliced_bytes = bytes.spliced;
        record.outcome = relay_outcome(stats.outcome).to_string();
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.telemetry.closed(&record);
        tracing::debug!(?record, "spliced connection done");
        self.connections.record(record, false);
        false
    }

    /// Connects to `dst` from `pod`'s namespace (the pod's own address).
    async fn connect_from(&self, pod: &PodHandle, dst: SocketAddr) -> Result<TcpStream> {
        let socket = pod.netns.tcp_socket(dst.is_ipv6()).await?;
        self.connect(socket, dst).await
    }

    /// Connects to `dst` inside `target`'s namespace over its loopback, from the
    /// agent's reserved source address, so inbound capture leaves it alone.
    async fn connect_inside(&self, target: &PodHandle, dst: SocketAddr) -> Result<TcpStream> {
        let socket = target.netns.tcp_socket(dst.is_ipv6()).await?;
        let source: IpAddr = if dst.is_ipv6() {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::from(AGENT_SOURCE_IPV4))
        };
        // The port is chosen at connect, not at bind: every connection into
        // the pod leaves from this one address, and a port picked at bind
        // must be free of every other socket on it (TIME_WAIT included), so
        // a few tens of thousands of connections a minute would run out.
        // Chosen at connect it only has to make the 4-tuple unique.
        bind_address_no_port(&socket);
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding {source} in {}", target.key))?;
        self.connect(socket, dst).await
    }

    /// Opens a tunnel stream to `dst` through its node's agent, as `pod`'s
    /// identity; the TCP connection leaves from `pod`'s namespace.
    async fn connect_tunnel(
        &self,
        pod: &Arc<PodHandle>,
        peer: &RemotePeer,
        dst: SocketAddr,
    ) -> Result<TunnelStream> {
        let tls = self.mtls.client_config(&pod.identity, &peer.identity)?;
        let gateway = SocketAddr::new(dst.ip(), TUNNEL_PORT);
        let source_ip = pod
            .addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == dst.is_ipv4());
        let target = TunnelTarget {
            gateway,
            authority: dst,
            forwarded_for: source_ip,
            pool_key: PoolKey::new(pod.identity.to_string(), peer.identity.to_string(), gateway),
            local_cert_expiry: self.mtls.certificate_expiry(&pod.identity),
        };
        let server_name = rustls_pki_types::ServerName::IpAddress(dst.ip().into());
        let dial_pod = pod.clone();
        let timeout = self.connect_timeout;
        let stream = self
            .mtls
            .tunnel
            .connect(&target, tls, server_name, move || async move {
                let socket = dial_pod
                    .netns
                    .tcp_socket(gateway.is_ipv6())
                    .await
                    .map_err(std::io::Error::other)?;
                let stream = tokio::time::timeout(timeout, socket.connect(gateway))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "tunnel connect timed out",
                        )
                    })??;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            })
            .await;
        stream.map_err(|err| {
            let reason = tunnel_rejection_reason_anyhow(&err);
            self.mtls.count_rejection(&reason);
            tracing::warn!(pod = %pod.key, peer = %peer.identity, %gateway, reason, error = format!("{err:#}"), "tunnel to the peer failed");
            anyhow!("tunnel to {} ({}): {err:#}", peer.key, peer.identity)
        })
    }

    async fn connect(&self, socket: tokio::net::TcpSocket, dst: SocketAddr) -> Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, socket.connect(dst))
            .await
            .with_context(|| format!("connecting to {dst} timed out"))?
            .with_context(|| format!("connecting to {dst}"))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// IP_BIND_ADDRESS_NO_PORT (Linux 4.2): bind(addr, 0) leaves the port to
/// connect(). Best effort: without it, bind picks the port as before.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The connection record's outcome of an HTTP connection.
fn http_outcome(stats: &l7::L7Stats) -> String {
    format!(
        "http: {} requests, {} denied, {} bad",
        stats.requests, stats.denied, stats.bad_requests
    )
}

fn relay_outcome(outcome: RelayOutcome) -> &'static str {
    match outcome {
        RelayOutcome::Closed => "closed",
        RelayOutcome::DownstreamReset => "client-reset",
        RelayOutcome::UpstreamReset => "upstream-reset",
        RelayOutcome::IdleTimeout => "idle-timeout",
    }
}

/// Relays between a captured connection and a tunnel stream. Half-close goes
/// both ways (shutdown on EOF); an error on either side resets the client and
/// drops the stream (which resets it in the tunnel).
async fn relay_to_tunnel(mut downstream: TcpStream, upstream: TunnelStream) -> RelayStats {
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut down_rd, mut down_wr) = downstream.split();
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let result = tokio::try_join!(
        crate::pump::pump(&mut down_rd, &mut up_wr, |n| sent += n as u64),
        crate::pump::pump(&mut up_rd, &mut down_wr, |n| received += n as u64),
    );
    match result {
        Ok(_) => RelayStats {
            downstream_to_upstream: sent,
            upstream_to_downstream: received,
            outcome: RelayOutcome::Closed,
        },
        Err(err) => {
            tracing::debug!(error = ?err, "tunnel relay ended with an error");
            reset(downstream);
            RelayStats {
                downstream_to_upstream: sent,
                upstream_to_downstream: received,
                outcome: RelayOutcome::UpstreamReset,
            }
        }
    }
}

fn tunnel_rejection_reason(err: &std::io::Error) -> String {
    crate::identity::classify_io_error(err)
        .as_label()
        .to_string()
}

fn tunnel_rejection_reason_anyhow(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        if let Some(refused) = cause.downcast_ref::<tunnel::PeerRefused>() {
            return match refused.0.as_u16() {
                403 => "denied_by_peer".to_string(),
                _ => "refused_by_peer".to_string(),
            };
        }
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return crate::identity::classify_tls_error(tls)
                .as_label()
                .to_string();
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let rejection = crate::identity::classify_io_error(io);
            if !matches!(rejection, crate::identity::HandshakeRejection::Other(_)) {
                return rejection.as_label().to_string();
            }
        }
    }
    "tunnel_failed".to_string()
}

/// The L7 relay's path normaliser: the policy engine's (one definition, so
/// what is matched is what is forwarded).
fn normalize_path(raw: &str) -> Result<String, String> {
    policy::normalize_path(raw).map_err(|e| e.to_string())
}

/// Closes with a reset (SO_LINGER 0), as a refused or failed connection would.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A service's name as Istio's `destination_service` label gives it.
fn service_host(service: &crate::config::ServiceConfig) -> String {
    format!("{}.{}.svc.cluster.local", service.name, service.namespace)
}

impl connections::Peers {
    /// The destination is `pod`, a pod of this node.
    fn set_local_destination(&mut self, pod: &PodHandle) {
        self.destination_workload = pod.workload_name();
        self.destination_namespace = pod.workload.namespace.clone();
        self.destination_principal = Some(pod.identity.to_string());
    }
}
