//! What the proxy did, per connection: a bounded log of recent connections (for
//! `/debug/connections` and tests) and totals (for metrics).

use parking_lot::Mutex;
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

pub use super::outcome::{Outcome, Path, Security};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One proxied connection, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    pub id: u64,
    pub direction: Direction,
    /// `namespace/name` of the pod whose traffic was captured.
    pub pod: String,
    /// The client as the agent saw it.
    pub client: SocketAddr,
    /// Where the client was going (from the kernel's record, or the local address
    /// of an inbound connection).
    pub original_dst: SocketAddr,
    /// How the agent reached it: `pod:<ns/name>` (a pod on this node, entered
    /// through its namespace), `tunnel:<ns/name>`, `service:<key>` or `direct`.
    pub upstream: Path,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// How it ended (its text: `closed`, `client-reset`, `denied by ...`,
    /// `upstream-failed: ...`, ...).
    pub outcome: Outcome,
    pub duration_ms: u64,
    /// The source workload's SPIFFE ID, when known (from the capture on this
    /// node, or proven by the peer's certificate through the tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// The identity the destination proved (tunnel only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    /// `mutual_tls` when this connection crossed nodes inside the tunnel,
    /// `none` otherwise (as Istio's connection_security_policy label).
    #[serde(default)]
    pub security: Security,
    /// Of the bytes both ways, those the kernel moved straight from one
    /// application to the other (a spliced flow); 0 otherwise.
    #[serde(default)]
    pub spliced_bytes: u64,
    /// Who talked to whom, as workloads (Istio's metric labels): the source
    /// and destination workload names and namespaces (`unknown` when not a
    /// workload of the mesh) and the service addressed, if any.
    #[serde(default)]
    pub peers: Peers,
}

/// The two ends of a connection as workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peers {
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_service: String,
    /// The destination's identity, whether proved (tunnel) or known (a pod
    /// of this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_principal: Option<String>,
}

/// The access-log line of a finished connection: on the `access` log target,
/// at info, in the agent's log format (text or JSON), so it can be routed
/// and filtered like any log (`MESH_LOG=access=info,...`). A denied
/// connection's outcome names the policy and rule that decided it.
fn access_log(record: &ConnectionRecord) {
    let peers = &record.peers;
    tracing::info!(
        target: "access",
        id = record.id,
        direction = ?record.direction,
        pod = %record.pod,
        src = %record.client,
        dst = %record.original_dst,
        upstream = %record.upstream,
        source_workload = %peers.source_workload,
        source_namespace = %peers.source_namespace,
        source_principal = record.source_identity.as_deref().unwrap_or("-"),
        destination_workload = %peers.destination_workload,
        destination_namespace = %peers.destination_namespace,
        destination_principal = peers.destination_principal.as_deref().unwrap_or("-"),
        destination_service = %peers.destination_service,
        security = %record.security,
        bytes_sent = record.bytes_sent,
        bytes_received = record.bytes_received,
        duration_ms = record.duration_ms,
        outcome = %record.outcome,
        "connection"
    );
}

impl Default for Peers {
    fn default() -> Self {
        let unknown = || "unknown".to_string();
        Self {
            source_workload: unknown(),
            source_namespace: unknown(),
            destination_workload: unknown(),
            destination_namespace: unknown(),
            destination_service: unknown(),
            destination_principal: None,
        }
    }
}

/// Totals since start, by direction.
#[derive(Debug, Default)]
pub struct Totals {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

pub struct ConnectionLog {
    access_log: std::sync::atomic::AtomicBool,
    recent: Mutex<VecDeque<ConnectionRecord>>,
    capacity: usize,
    next_id: AtomicU64,
    pub outbound: Totals,
    pub inbound: Totals,
}

impl ConnectionLog {
    /// One access-log line per connection, or none.
    pub fn access_log_enabled(&self) -> bool {
        self.access_log.load(Ordering::Relaxed)
    }

    pub fn set_access_log(&self, enabled: bool) {
        self.access_log.store(enabled, Ordering::Relaxed);
    }

    pub fn new(capacity: usize) -> Self {
        Self {
            access_log: std::sync::atomic::AtomicBool::new(true),
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            next_id: AtomicU64::new(1),
            outbound: Totals::default(),
            inbound: Totals::default(),
        }
    }

    pub fn open(&self, direction: Direction) -> u64 {
        self.totals(direction)
            .opened
            .fetch_add(1, Ordering::Relaxed);
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a connection that ended (once: see `finish::Recording`).
    pub fn record(&self, record: ConnectionRecord) {
        if self.access_log.load(Ordering::Relaxed) {
            access_log(&record);
        }
        let totals = self.totals(record.direction);
        totals.closed.fetch_add(1, Ordering::Relaxed);
        if record.outcome.failed() {
            totals.failed.fetch_add(1, Ordering::Relaxed);
        }
        totals
            .bytes_sent
            .fetch_add(record.bytes_sent, Ordering::Relaxed);
        totals
            .bytes_received
            .fetch_add(record.bytes_received, Ordering::Relaxed);
        let mut recent = self.recent.lock();
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    pub fn recent(&self) -> Vec<ConnectionRecord> {
        self.recent.lock().iter().cloned().collect()
    }

    pub fn totals(&self, direction: Direction) -> &Totals {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    pub fn active(&self, direction: Direction) -> u64 {
        let t = self.totals(direction);
        t.opened
            .load(Ordering::Relaxed)
            .saturating_sub(t.closed.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, direction: Direction) -> ConnectionRecord {
        ConnectionRecord {
            id,
            direction,
            pod: "ns/a".into(),
            client: "127.0.0.1:4000".parse().unwrap(),
            original_dst: "10.1.0.3:80".parse().unwrap(),
            upstream: Path::Direct,
            bytes_sent: 10,
            bytes_received: 20,
            outcome: Outcome::Closed,
            duration_ms: 1,
            source_identity: None,
            peer_identity: None,
            security: Security::None,
            spliced_bytes: 0,
            peers: Peers::default(),
        }
    }

    #[test]
    fn keeps_the_most_recent_and_counts_everything() {
        let log = ConnectionLog::new(2);
        for _ in 0..3 {
            let id = log.open(Direction::Outbound);
            assert_eq!(log.active(Direction::Outbound), 1);
            log.record(record(id, Direction::Outbound));
        }
        let recent = log.recent();
        assert_eq!(recent.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(log.outbound.closed.load(Ordering::Relaxed), 3);
        assert_eq!(log.outbound.bytes_received.load(Ordering::Relaxed), 60);
        assert_eq!(log.active(Direction::Outbound), 0);
        assert_eq!(log.inbound.opened.load(Ordering::Relaxed), 0);
    }
}
