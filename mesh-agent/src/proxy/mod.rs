//! The userspace data path: captured connections in, upstream connections out.
//!
//! Outbound (from a pod's app, via the agent's listener on 127.0.0.1:15001 in
//! that pod): the kernel's record says where it was going. A destination that is
//! a pod on this node is delivered inside that pod's namespace over its loopback
//! (so it is not captured again); any other destination is dialled from the
//! source pod's namespace, so it leaves with the pod's own address.
//!
//! Inbound (from outside a pod, steered by sk_lookup to the agent's listener on
//! 127.0.0.1:15006 in that pod): the accepted socket's local address is where the
//! client was going; it is delivered inside the pod over its loopback.

pub mod connections;
pub mod relay;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use mesh_common::AGENT_SOURCE_IPV4;
use tokio::net::TcpStream;

use crate::{capture::netns_worker::NetnsWorker, ebpf::OrigDstTable};
use connections::{ConnectionLog, ConnectionRecord, Direction};
use relay::{RelayOutcome, relay};

/// An enrolled pod as the data path needs it.
pub struct PodHandle {
    /// `namespace/name`.
    pub key: String,
    pub netns_cookie: u64,
    pub netns: NetnsWorker,
}

pub struct ProxyContext {
    pub orig_dst: OrigDstTable,
    /// Pods on this node by address, for local delivery.
    local_pods: RwLock<HashMap<IpAddr, Arc<PodHandle>>>,
    pub connections: ConnectionLog,
    pub connect_timeout: Duration,
}

impl ProxyContext {
    pub fn new(orig_dst: OrigDstTable) -> Self {
        Self {
            orig_dst,
            local_pods: RwLock::new(HashMap::new()),
            connections: ConnectionLog::new(1024),
            connect_timeout: Duration::from_secs(10),
        }
    }

    pub fn add_local_pod(&self, addrs: &[IpAddr], pod: Arc<PodHandle>) {
        let mut pods = self.local_pods.write().expect("local pods lock");
        for addr in addrs {
            pods.insert(*addr, pod.clone());
        }
    }

    pub fn remove_local_pod(&self, key: &str) {
        self.local_pods
            .write()
            .expect("local pods lock")
            .retain(|_, p| p.key != key);
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodHandle>> {
        self.local_pods
            .read()
            .expect("local pods lock")
            .get(&ip)
            .cloned()
    }

    /// Serves one connection captured on its way out of `pod`.
    pub async fn handle_outbound(
        self: Arc<Self>,
        pod: Arc<PodHandle>,
        downstream: TcpStream,
        client: SocketAddr,
    ) {
        let started = Instant::now();
        let id = self.connections.open(Direction::Outbound);
        let mut record = ConnectionRecord {
            id,
            direction: Direction::Outbound,
            pod: pod.key.clone(),
            client,
            original_dst: client,
            upstream: String::new(),
            bytes_sent: 0,
            bytes_received: 0,
            outcome: String::new(),
            duration_ms: 0,
        };
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
        record.original_dst = captured.original_dst;
        let upstream = match self.local_pod(captured.original_dst.ip()) {
            Some(target) => {
                record.upstream = format!("pod:{}", target.key);
                self.connect_inside(&target, captured.original_dst).await
            }
            None => {
                record.upstream = "direct".to_string();
                self.connect_from(&pod, captured.original_dst).await
            }
        };
        self.finish(record, started, downstream, upstream).await;
        self.orig_dst.forget(captured.socket_cookie);
    }

    /// Serves one connection captured on its way into `pod`.
    pub async fn handle_inbound(
        self: Arc<Self>,
        pod: Arc<PodHandle>,
        downstream: TcpStream,
        client: SocketAddr,
    ) {
        let started = Instant::now();
        let id = self.connections.open(Direction::Inbound);
        let original_dst = downstream.local_addr().unwrap_or(client);
        let record = ConnectionRecord {
            id,
            direction: Direction::Inbound,
            pod: pod.key.clone(),
            client,
            original_dst,
            upstream: format!("pod:{}", pod.key),
            bytes_sent: 0,
            bytes_received: 0,
            outcome: String::new(),
            duration_ms: 0,
        };
        let upstream = self.connect_inside(&pod, original_dst).await;
        self.finish(record, started, downstream, upstream).await;
    }

    async fn finish(
        &self,
        mut record: ConnectionRecord,
        started: Instant,
        downstream: TcpStream,
        upstream: Result<TcpStream>,
    ) {
        let failed = match upstream {
            Ok(upstream) => {
                let stats = relay(downstream, upstream).await;
                record.bytes_sent = stats.downstream_to_upstream;
                record.bytes_received = stats.upstream_to_downstream;
                record.outcome = match stats.outcome {
                    RelayOutcome::Closed => "closed",
                    RelayOutcome::DownstreamReset => "client-reset",
                    RelayOutcome::UpstreamReset => "upstream-reset",
                    RelayOutcome::IdleTimeout => "idle-timeout",
                }
                .to_string();
                false
            }
            Err(err) => {
                tracing::info!(pod = %record.pod, dst = %record.original_dst, error = format!("{err:#}"), "upstream connect failed; client reset");
                // The client sees what it would have seen directly: a reset.
                reset(downstream);
                record.outcome = format!("upstream-failed: {err:#}");
                true
            }
        };
        record.duration_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(?record, "connection done");
        self.connections.record(record, failed);
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
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding {source} in {}", target.key))?;
        self.connect(socket, dst).await
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

/// Closes with a reset (SO_LINGER 0), as a refused or failed connection would.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
