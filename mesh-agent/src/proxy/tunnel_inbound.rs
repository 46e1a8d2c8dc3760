//! Tunnel inbound: a connection to a pod's tunnel port (15008) from another
//! node's agent. TLS is terminated with the pod's identity and the peer's
//! identity is read once per connection; each CONNECT stream is delivered
//! to the pod of this node it names, by that pod's policies.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    admission,
    connections::Direction,
    context::ProxyContext,
    counted,
    deliver::{self, Client},
    finish::{self, Recording},
    outcome::{Outcome, Path, Security},
    pod::PodHandle,
    snapshot::Snapshot,
};
use crate::{
    identity::{SpiffeId, spiffe_id_of},
    tunnel::{self, ConnectRequest, Rejection, ServeError},
};

/// Serves one connection to `pod`'s tunnel port: mutual TLS with the pod's
/// identity, then one delivery per CONNECT stream.
pub async fn handle(ctx: Arc<ProxyContext>, pod: Arc<PodHandle>, tcp: TcpStream, peer: SocketAddr) {
    let config = match ctx.mtls.server_config(&pod.identity) {
        Ok(config) => config,
        Err(err) => {
            ctx.mtls.count_rejection("no_identity");
            tracing::warn!(pod = %pod.key, %peer, error = format!("{err:#}"), "tunnel connection refused");
            return;
        }
    };
    let mut draining = ctx.draining.subscribe();
    let shutdown = async move {
        let _ = draining.wait_for(|draining| *draining).await;
    };
    let Some(pending) = ctx
        .admission
        .admit(admission::Limit::PendingHandshakes, &ctx.pending_handshakes)
    else {
        tracing::debug!(pod = %pod.key, %peer, "too many tunnel handshakes in progress: reset");
        finish::reset(tcp);
        return;
    };
    let served = async {
        let (tls, peer_addr) = {
            let _pending = pending;
            tunnel::accept_tls(tcp, config, ctx.mtls.handshake_timeout).await?
        };
        // The peer's identity, read once for the connection's streams.
        let peer_identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| "no client certificate".to_string())
            .and_then(|der| spiffe_id_of(der.as_ref()));
        let ctx = ctx.clone();
        let open = move |request: ConnectRequest| {
            let (ctx, peer_identity) = (ctx.clone(), peer_identity.clone());
            async move {
                let peer_identity = peer_identity
                    .map_err(|e| Rejection::Forbidden(format!("client identity: {e}")))?;
                open_stream(&ctx, request, peer_identity).await
            }
        };
        tunnel::serve_tls(tls, peer_addr, open, shutdown).await
    };
    match served.await {
        Ok(()) => {}
        Err(ServeError::Handshake(err)) => {
            let reason = crate::identity::classify_io_error(&err)
                .as_label()
                .to_string();
            ctx.mtls.count_rejection(&reason);
            tracing::warn!(pod = %pod.key, %peer, reason, error = %err, "tunnel handshake refused");
        }
        Err(ServeError::HandshakeTimeout) => {
            ctx.mtls.count_rejection("handshake_timeout");
            tracing::warn!(pod = %pod.key, %peer, "tunnel handshake timed out");
        }
        Err(err) => {
            tracing::debug!(pod = %pod.key, %peer, error = %err, "tunnel connection ended")
        }
    }
}

/// The record of a tunnel stream into `target`: the source is known by
/// the identity it proved, and by name when a workload with that identity
/// is known at the client's address.
fn stream_record(
    ctx: &Arc<ProxyContext>,
    snapshot: &Snapshot,
    target: &PodHandle,
    client: SocketAddr,
    request: &ConnectRequest,
    peer_identity: &SpiffeId,
) -> Recording {
    let mut record = Recording::start(ctx, Direction::Inbound, target, client);
    record.peers.set_local_destination(target);
    record.upstream = Path::Pod(target.key.clone());
    record.original_dst = request.authority;
    if let Some(service) = snapshot.service_of_endpoint(request.authority) {
        record.peers.destination_service = service.to_string();
    }
    record.source_identity = Some(peer_identity.to_string());
    record.security = Security::MutualTls;
    if let Some(source) = snapshot.remote_peer(client.ip())
        && source.identity == *peer_identity
        && let Some((namespace, name)) = source.key.split_once('/')
    {
        record.peers.source_workload = name.to_string();
        record.peers.source_namespace = namespace.to_string();
    }
    record
}

async fn open_stream(
    ctx: &Arc<ProxyContext>,
    request: ConnectRequest,
    peer_identity: SpiffeId,
) -> Result<tunnel::Upstream, Rejection> {
    // A connection can outlive the certificate it was made with: no new
    // stream past its expiry, the client must handshake again.
    if request
        .peer_certificate_expiry
        .is_some_and(|until| std::time::SystemTime::now() > until)
    {
        ctx.mtls.count_rejection("expired");
        tracing::warn!(peer = %peer_identity, peer_addr = %request.peer_addr, "CONNECT on a connection whose client certificate has expired refused");
        return Err(Rejection::Unauthorized(format!(
            "the certificate of {peer_identity} on this connection has expired"
        )));
    }
    let snapshot = ctx.snapshot();
    let Some(target) = snapshot.local_pod(request.authority.ip()).cloned() else {
        ctx.mtls.count_rejection("connect_not_a_local_pod");
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
    let mut record = stream_record(ctx, &snapshot, &target, client, &request, &peer_identity);
    if snapshot.needs_http(&target, request.authority.port()) {
        // The HTTP authorizer serves the stream itself, on its task.
        let ctx = ctx.clone();
        let from = Client {
            identity: Some(peer_identity),
            source_ip: request.peer_addr.ip(),
            remote_ip: client.ip(),
        };
        return Ok(tunnel::Upstream::Handler(Box::new(move |stream| {
            Box::pin(async move {
                let (stream, bytes) = counted::counting(stream);
                let served =
                    deliver::serve_http(&ctx, stream, target, from, request.authority).await;
                record.count_bytes(&bytes);
                record.end(served);
            })
        })));
    }
    if let Err(by) = ctx.authorizer.connection(
        &snapshot.policies,
        &target,
        Some(&peer_identity),
        request.peer_addr.ip(),
        client.ip(),
        request.authority,
    ) {
        let refusal = Rejection::Forbidden(format!("RBAC: access denied ({by})"));
        record.end(Outcome::Denied {
            by,
            not_http: false,
        });
        return Err(refusal);
    }
    record.peer_identity = Some(target.identity.to_string());
    match ctx
        .dial
        .into_pod(&target, request.authority, client.ip())
        .await
    {
        Ok(tcp) => {
            // Recorded (log, metrics, the drain's count) when the stream
            // ends, with the bytes it carried.
            ctx.telemetry.opened(&record);
            let ctx = ctx.clone();
            let done = move |relayed: tunnel::Relayed| {
                let outcome = if relayed.aborted {
                    Outcome::Reset
                } else {
                    Outcome::Closed
                };
                record.bytes_sent = relayed.to_upstream;
                record.bytes_received = relayed.from_upstream;
                record.outcome = outcome.clone();
                ctx.telemetry.closed(&record);
                record.end(outcome);
            };
            Ok(tunnel::Upstream::Observed(tcp, Box::new(done)))
        }
        Err(err) => {
            let why = format!("{err:#}");
            record.end(Outcome::UpstreamFailed(why.clone()));
            Err(Rejection::UpstreamUnavailable(why))
        }
    }
}
