//! Outbound: a connection captured on its way out of a pod of this node
//! (via the agent's listener on 127.0.0.1:15001 in that pod). The kernel's
//! record says where it was going; the route says how to get there.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{
    connections::Direction,
    context::ProxyContext,
    counted,
    deliver::{self, Client},
    finish::{self, Recording, Upstream},
    outcome::{Outcome, Path, Security},
    pod::PodHandle,
    route::{self, Hop, Route},
    service_http,
};

/// Routes by a newer table tried, at most, when a reload is being put in
/// force (each try commits the table in force, so two suffice).
const STALE_ROUTES: u32 = 4;

/// Serves one connection captured on its way out of `pod`.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    downstream: TcpStream,
    client: std::net::SocketAddr,
) {
    let mut record = Recording::start(&ctx, Direction::Outbound, &pod, client);
    record.source_identity = Some(pod.identity.to_string());
    record.peers.source_workload = pod.workload_name();
    record.peers.source_namespace = pod.workload.namespace.clone();
    let captured = match ctx.orig_dst.take(pod.netns_cookie, client) {
        Ok(captured) => captured,
        Err(err) => {
            // Never guess a destination: close, and say why.
            tracing::warn!(pod = %pod.key, %client, error = %err, "captured connection without a record; reset");
            finish::refuse(
                record,
                downstream,
                Outcome::NoOriginalDestination(err.to_string()),
            );
            return;
        }
    };
    let mut dst = captured.original_dst;
    record.original_dst = dst;
    if dst.port() == mesh_common::DNS_PORT {
        // DNS over TCP: the DNS proxy answers mesh names and sends the rest
        // on to `dst` (docs/capture.md).
        let served = crate::dns::proxy::serve_tcp(&ctx, &pod, downstream, dst).await;
        record.end(match served {
            Ok(()) => Outcome::Closed,
            Err(err) => Outcome::UpstreamFailed(format!("DNS over TCP: {err:#}")),
        });
        ctx.orig_dst.forget(captured.socket_cookie);
        return;
    }
    // One snapshot for the connection's route and decision: both come from
    // the same generation. It is let go before the relay, so a long-lived
    // connection does not keep released pods (their namespaces) alive.
    let mut snapshot = ctx.snapshot();
    let mut chosen = None;
    let mut stale_routes = 0;
    let hop = loop {
        match route::route(&snapshot, dst) {
            Route::ServiceHttp(service) => {
                // An HTTP port: an endpoint per request, not per connection.
                record.peers.destination_service = service_http::service_host(&service.config);
                record.upstream = Path::Service(service.key.clone());
                drop(snapshot);
                // Boxed, here and below: the state of the HTTP paths is large, and
                // would otherwise be reserved in every connection's future,
                // idle TCP relays included.
                let (downstream, bytes) = counted::counting(downstream);
                let served =
                    Box::pin(service_http::serve(&ctx, downstream, pod, service.clone())).await;
                record.count_bytes(&bytes);
                record.end(served);
                ctx.orig_dst.forget(captured.socket_cookie);
                return;
            }
            Route::ServiceTcp(service) => {
                record.peers.destination_service = service_http::service_host(&service.config);
                match service.choose() {
                    // The balancer (kept across a reload) already holds the
                    // endpoints of a newer table than this snapshot's: route
                    // again by the table in force, so that the endpoint and
                    // the policies deciding it are of one generation.
                    Ok(endpoint)
                        if !service.serves(endpoint.addr) && stale_routes < STALE_ROUTES =>
                    {
                        service.done(endpoint, false);
                        stale_routes += 1;
                        snapshot = ctx.snapshot();
                        // If that table is not committed yet, this does it.
                        snapshot.services.commit();
                        continue;
                    }
                    Ok(endpoint) => {
                        dst = endpoint.addr;
                        let hop = route::endpoint_route(&snapshot, dst, endpoint.peer.clone());
                        chosen = Some((service, endpoint));
                        break hop;
                    }
                    Err(err) => {
                        // Fail fast and say so: the client gets a reset at once.
                        tracing::warn!(pod = %pod.key, service = %service.key, error = format!("{err:#}"), "no endpoint for the service; reset");
                        let outcome = Outcome::NoHealthyEndpoint(service.key.clone());
                        finish::refuse(record, downstream, outcome);
                        ctx.orig_dst.forget(captured.socket_cookie);
                        return;
                    }
                }
            }
            Route::Address(hop) => break hop,
        }
    };
    let policies = snapshot.policies.clone();
    // Straight to a service's endpoint (not its VIP): Istio names the
    // service all the same.
    if chosen.is_none()
        && let Some(service) = snapshot.service_of_endpoint(dst)
    {
        record.peers.destination_service = service.to_string();
    }
    drop(snapshot);
    // An authorized L4 flow between two pods of this node may be spliced.
    let mut splice_into = None;
    let upstream = match hop {
        Hop::LocalPod(target) => {
            record.upstream = Path::Pod(target.key.clone());
            record.peers.set_local_destination(&target);
            // Same node: the destination's policy applies here, with the source
            // identity known from the capture.
            let source_ip = pod.addr_like(dst.ip());
            if target.decided_per_request(&policies, dst.port()) {
                let client = Client {
                    identity: Some(pod.identity.clone()),
                    source_ip,
                    remote_ip: source_ip,
                };
                let (downstream, bytes) = counted::counting(downstream);
                let served =
                    Box::pin(deliver::serve_http(&ctx, downstream, target, client, dst)).await;
                record.count_bytes(&bytes);
                record.end(served);
                ctx.orig_dst.forget(captured.socket_cookie);
                return;
            }
            if let Err(by) = ctx.authorizer.connection(
                &policies,
                &target,
                Some(&pod.identity),
                source_ip,
                source_ip,
                dst,
            ) {
                let outcome = Outcome::Denied {
                    by,
                    not_http: false,
                };
                finish::refuse(record, downstream, outcome);
                ctx.orig_dst.forget(captured.socket_cookie);
                return;
            }
            splice_into = Some(target.netns_cookie);
            Box::pin(ctx.dial.into_pod(&target, dst, source_ip))
                .await
                .map(Upstream::Tcp)
        }
        Hop::Tunnel(peer) => {
            record.upstream = Path::Tunnel(peer.key.clone());
            record.peer_identity = Some(peer.identity.to_string());
            record.peers.destination_principal = Some(peer.identity.to_string());
            if let Some((namespace, name)) = peer.key.split_once('/') {
                record.peers.destination_workload = name.to_string();
                record.peers.destination_namespace = namespace.to_string();
            }
            record.security = Security::MutualTls;
            Box::pin(ctx.dial.tunnel(&pod, &peer, dst))
                .await
                .map(Upstream::Tunnel)
        }
        Hop::Passthrough => {
            record.upstream = Path::Direct;
            Box::pin(ctx.dial.from_pod(&pod, dst))
                .await
                .map(Upstream::Tcp)
        }
    };
    let failed = match (splice_into, upstream) {
        (Some(server_netns), Ok(Upstream::Tcp(tcp))) => {
            Box::pin(finish::finish_local(
                &ctx,
                record,
                downstream,
                pod.netns_cookie,
                tcp,
                server_netns,
            ))
            .await
        }
        (_, upstream) => finish::finish(&ctx, record, downstream, upstream).await,
    };
    if let Some((service, endpoint)) = chosen {
        service.done(endpoint, failed);
    }
    ctx.orig_dst.forget(captured.socket_cookie);
}
