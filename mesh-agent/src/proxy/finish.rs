//! The end of a connection's life in the proxy: relayed to its upstream (or
//! reset when there is none), then counted and recorded exactly once.

use std::{
    net::SocketAddr,
    ops::{Deref, DerefMut},
    sync::Arc,
    time::Instant,
};

use anyhow::Result;
use tokio::net::TcpStream;

use super::{
    connections::{ConnectionRecord, Direction, Peers},
    context::ProxyContext,
    counted::ByteCounts,
    outcome::{Outcome, Path, Security},
    pod::PodHandle,
    relay::{self, RelayOutcome, RelayStats, relay},
    splice,
};
use crate::tunnel::TunnelStream;

/// A connection's record from its start to its end. It is written once:
/// by [`Recording::end`], or, if the handler goes away first (cancelled,
/// panicked), on drop as `abandoned`, so the counts of open connections
/// never drift.
pub struct Recording {
    ctx: Arc<ProxyContext>,
    started: Instant,
    record: Option<ConnectionRecord>,
}

impl Recording {
    /// A connection of `pod` from `client`, opened now.
    pub fn start(
        ctx: &Arc<ProxyContext>,
        direction: Direction,
        pod: &PodHandle,
        client: SocketAddr,
    ) -> Self {
        let record = ConnectionRecord {
            id: ctx.connections.open(direction),
            direction,
            pod: pod.key.clone(),
            client,
            original_dst: client,
            upstream: Path::None,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: Outcome::Open,
            duration_ms: 0,
            source_identity: None,
            peer_identity: None,
            security: Security::None,
            spliced_bytes: 0,
            peers: Peers::default(),
        };
        Self {
            ctx: ctx.clone(),
            started: Instant::now(),
            record: Some(record),
        }
    }

    /// Takes the client's bytes of a connection served at L7.
    pub fn count_bytes(&mut self, counts: &ByteCounts) {
        self.bytes_sent = counts.read_total();
        self.bytes_received = counts.written_total();
    }

    /// Ends the connection with `outcome` and records it; whether it failed.
    pub fn end(mut self, outcome: Outcome) -> bool {
        let failed = outcome.failed();
        if let Some(record) = self.record.take() {
            self.write(record, outcome);
        }
        failed
    }

    fn write(&self, mut record: ConnectionRecord, outcome: Outcome) {
        record.outcome = outcome;
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::debug!(?record, "connection done");
        self.ctx.connections.record(record);
    }
}

impl Deref for Recording {
    type Target = ConnectionRecord;
    fn deref(&self) -> &ConnectionRecord {
        self.record
            .as_ref()
            .expect("a recording is ended only by `end`, which consumes it")
    }
}

impl DerefMut for Recording {
    fn deref_mut(&mut self) -> &mut ConnectionRecord {
        self.record
            .as_mut()
            .expect("a recording is ended only by `end`, which consumes it")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.write(record, Outcome::Abandoned);
        }
    }
}

/// Where an accepted connection's bytes go.
pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

/// Relays `downstream` to `upstream` until both sides are done, or resets the
/// client when there is no upstream; records the connection. Returns
/// whether it failed.
pub async fn finish(
    ctx: &ProxyContext,
    mut record: Recording,
    downstream: TcpStream,
    upstream: Result<Upstream>,
) -> bool {
    match upstream {
        Ok(upstream) => {
            ctx.telemetry.opened(&record);
            // Each relay boxed: a connection's future holds the one it runs.
            let stats = match upstream {
                Upstream::Tcp(tcp) => Box::pin(relay(downstream, tcp)).await,
                Upstream::Tunnel(stream) => Box::pin(relay_to_tunnel(downstream, stream)).await,
            };
            record.bytes_sent = stats.downstream_to_upstream;
            record.bytes_received = stats.upstream_to_downstream;
            record.outcome = relay_outcome(stats.outcome);
            ctx.telemetry.closed(&record);
            record.end(relay_outcome(stats.outcome))
        }
        Err(err) => {
            tracing::info!(pod = %record.pod, dst = %record.original_dst, error = format!("{err:#}"), "upstream connect failed; client reset");
            ctx.admission.count_if_out_of_descriptors(&err);
            // The client sees what it would have seen directly: a reset.
            reset(downstream);
            record.end(Outcome::UpstreamFailed(format!("{err:#}")))
        }
    }
}

/// Relays a flow between two pods of this node, spliced in the kernel when
/// the fast path allows it (see `splice`).
pub async fn finish_local(
    ctx: &ProxyContext,
    mut record: Recording,
    downstream: TcpStream,
    client_netns: u64,
    upstream: TcpStream,
    server_netns: u64,
) -> bool {
    let splice = ctx
        .fast_path
        .as_deref()
        .filter(|fp| fp.splicing())
        .and_then(|fp| splice::Splice::arm(fp, client_netns, &downstream, server_netns, &upstream));
    let Some(splice) = splice else {
        return finish(ctx, record, downstream, Ok(Upstream::Tcp(upstream))).await;
    };
    ctx.telemetry.opened(&record);
    let stats = relay::relay_observed(downstream, upstream, &splice).await;
    let bytes = splice.finish(stats.downstream_to_upstream, stats.upstream_to_downstream);
    record.bytes_sent = bytes.client_sent;
    record.bytes_received = bytes.server_sent;
    record.spliced_bytes = bytes.spliced;
    record.outcome = relay_outcome(stats.outcome);
    ctx.telemetry.closed(&record);
    record.end(relay_outcome(stats.outcome))
}

/// A connection refused before it reached an upstream (denied, no
/// destination, no endpoint): closed at once with a reset, and recorded.
pub fn refuse(record: Recording, downstream: TcpStream, outcome: Outcome) {
    reset(downstream);
    record.end(outcome);
}

pub fn relay_outcome(outcome: RelayOutcome) -> Outcome {
    match outcome {
        RelayOutcome::Closed => Outcome::Closed,
        RelayOutcome::DownstreamReset => Outcome::ClientReset,
        RelayOutcome::UpstreamReset => Outcome::UpstreamReset,
        RelayOutcome::IdleTimeout => Outcome::IdleTimeout,
    }
}

/// Relays between a captured connection and a tunnel stream. Half-close goes
/// both ways (shutdown on EOF); an error on either side resets both: the
/// client with a TCP reset, the stream with CONNECT_ERROR (which the
/// destination's agent passes on to the server as a TCP reset).
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
            up_rd.unsplit(up_wr).abort();
            reset(downstream);
            RelayStats {
                downstream_to_upstream: sent,
                upstream_to_downstream: received,
                outcome: RelayOutcome::UpstreamReset,
            }
        }
    }
}

/// Closes with a reset (SO_LINGER 0), as a refused or failed connection would.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
