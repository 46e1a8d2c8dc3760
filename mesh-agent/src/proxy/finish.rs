//! The end of a connection's life in the proxy: relayed to its upstream (or
//! reset when there is none), then counted and recorded once.

use std::time::Instant;

use anyhow::Result;
use tokio::net::TcpStream;

use super::{
    connections::ConnectionRecord,
    context::ProxyContext,
    relay::{self, RelayOutcome, RelayStats, relay},
    splice,
};
use crate::tunnel::TunnelStream;

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
    mut record: ConnectionRecord,
    started: Instant,
    downstream: TcpStream,
    upstream: Result<Upstream>,
) -> bool {
    let failed = match upstream {
        Ok(upstream) => {
            ctx.telemetry.opened(&record);
            // Each relay boxed: a connection's future holds the one it runs.
            let stats = match upstream {
                Upstream::Tcp(tcp) => Box::pin(relay(downstream, tcp)).await,
                Upstream::Tunnel(stream) => Box::pin(relay_to_tunnel(downstream, stream)).await,
            };
            record.bytes_sent = stats.downstream_to_upstream;
            record.bytes_received = stats.upstream_to_downstream;
            record.outcome = relay_outcome(stats.outcome).to_string();
            ctx.telemetry.closed(&record);
            false
        }
        Err(err) => {
            tracing::info!(pod = %record.pod, dst = %record.original_dst, error = format!("{err:#}"), "upstream connect failed; client reset");
            ctx.admission.count_if_out_of_descriptors(&err);
            // The client sees what it would have seen directly: a reset.
            reset(downstream);
            record.outcome = format!("upstream-failed: {err:#}");
            true
        }
    };
    record.duration_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(?record, "connection done");
    ctx.connections.record(record, failed);
    failed
}

/// Relays a flow between two pods of this node, spliced in the kernel when
/// the fast path allows it (see `splice`).
pub async fn finish_local(
    ctx: &ProxyContext,
    mut record: ConnectionRecord,
    started: Instant,
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
        return finish(
            ctx,
            record,
            started,
            downstream,
            Ok(Upstream::Tcp(upstream)),
        )
        .await;
    };
    ctx.telemetry.opened(&record);
    let stats = relay::relay_observed(downstream, upstream, &splice).await;
    let bytes = splice.finish(stats.downstream_to_upstream, stats.upstream_to_downstream);
    record.bytes_sent = bytes.client_sent;
    record.bytes_received = bytes.server_sent;
    record.spliced_bytes = bytes.spliced;
    record.outcome = relay_outcome(stats.outcome).to_string();
    record.duration_ms = started.elapsed().as_millis() as u64;
    ctx.telemetry.closed(&record);
    tracing::debug!(?record, "spliced connection done");
    ctx.connections.record(record, false);
    false
}

/// A connection refused before it reached an upstream (denied, no
/// destination, no endpoint): closed at once with a reset, and recorded.
pub fn refuse(
    ctx: &ProxyContext,
    mut record: ConnectionRecord,
    started: Instant,
    downstream: TcpStream,
    outcome: String,
) {
    reset(downstream);
    record.outcome = outcome;
    record.duration_ms = started.elapsed().as_millis() as u64;
    ctx.connections.record(record, true);
}

/// Records a connection served by another path (HTTP) that set its outcome.
pub fn record_served(
    ctx: &ProxyContext,
    mut record: ConnectionRecord,
    started: Instant,
    (outcome, failed): (String, bool),
) {
    record.outcome = outcome;
    record.duration_ms = started.elapsed().as_millis() as u64;
    ctx.connections.record(record, failed);
}

pub fn relay_outcome(outcome: RelayOutcome) -> &'static str {
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

/// Closes with a reset (SO_LINGER 0), as a refused or failed connection would.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
