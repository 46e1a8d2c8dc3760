//! Delivering a connection into a pod of this node, the last step of all
//! three entry paths (outbound to a local pod, plaintext inbound, tunnel
//! inbound): the pod's policies decide per request when they have HTTP
//! rules (the connection is served as HTTP), else once for the connection.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{authz::ConnectionAuthorizer, context::ProxyContext, outcome::Outcome, pod::PodHandle};
use crate::{
    identity::SpiffeId,
    l7::{self, L7Error},
    policy,
};

/// Who is on the other end of a connection being delivered.
pub struct Client {
    /// The identity the client proved (tunnel) or the capture knows (a pod
    /// of this node); none for plaintext from outside the mesh.
    pub identity: Option<SpiffeId>,
    /// Istio's `source.ip`: the address the connection came from.
    pub source_ip: IpAddr,
    /// Istio's `remote.ip`: the original client (X-Forwarded-For of a
    /// tunnel stream).
    pub remote_ip: IpAddr,
}

/// Serves `downstream` as HTTP into `target`, deciding each request (403
/// `RBAC: access denied` for a denied one, the connection stays usable).
/// Traffic that turns out not to be HTTP gets the L4 decision instead.
pub async fn serve_http<D>(
    ctx: &Arc<ProxyContext>,
    downstream: D,
    target: Arc<PodHandle>,
    client: Client,
    dst: SocketAddr,
) -> Outcome
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Who the client is, from the snapshot in force now; not held for the
    // connection's life (requests look up the policies in force each).
    let snapshot = ctx.snapshot();
    let (source_workload, source_namespace) = snapshot.workload_of(client.remote_ip);
    // An identified client that is not a pod of this node came through the
    // tunnel.
    let through_tunnel =
        client.identity.is_some() && snapshot.local_pod(client.remote_ip).is_none();
    let destination_service = snapshot
        .service_of_endpoint(dst)
        .unwrap_or("unknown")
        .to_string();
    drop(snapshot);
    let authorizer = Arc::new(ConnectionAuthorizer {
        authorizer: ctx.authorizer.clone(),
        snapshots: ctx.snapshots(),
        pod: target.key.clone(),
        workload: target.workload.clone(),
        source: client.identity.clone(),
        source_ip: client.source_ip,
        remote_ip: client.remote_ip,
        destination: dst,
    });
    // Each request is reported by this node as the destination's.
    let request_metrics = ctx.request_telemetry(
        [
            "destination".to_string(),
            source_workload,
            source_namespace,
            client
                .identity
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |id| id.to_string()),
            target.workload_name(),
            target.workload.namespace.clone(),
            target.identity.to_string(),
            destination_service,
        ],
        if through_tunnel { "mutual_tls" } else { "none" },
        crate::spans::SpanSide::Server,
    );
    let options = ctx.l7_options(request_metrics);
    let (dialing, inside, remote_ip) = (ctx.clone(), target.clone(), client.remote_ip);
    let connect = move || async move {
        dialing
            .dial
            .into_pod(&inside, dst, remote_ip)
            .await
            .map_err(std::io::Error::other)
    };
    match l7::serve(downstream, connect, authorizer, normalize_path, options).await {
        Ok(stats) => http_outcome(&stats),
        Err(L7Error::NotHttp(not_http)) => {
            if let Err(by) = ctx.authorizer.connection(
                &ctx.snapshot().policies,
                &target,
                client.identity.as_ref(),
                client.source_ip,
                client.remote_ip,
                dst,
            ) {
                return Outcome::Denied { by, not_http: true };
            }
            let Ok((peeked, mut downstream)) = not_http.into_parts::<D>() else {
                return Outcome::UpstreamFailed("internal error: the stream's type".into());
            };
            match ctx.dial.into_pod(&target, dst, client.remote_ip).await {
                Ok(mut upstream) => {
                    if let Err(err) = upstream.write_all(&peeked).await {
                        return Outcome::UpstreamFailed(format!("writing the first bytes: {err}"));
                    }
                    let relayed =
                        tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    Outcome::RelayedNotHttp {
                        reset: relayed.is_err(),
                    }
                }
                Err(err) => Outcome::UpstreamFailed(format!("{err:#}")),
            }
        }
        Err(err) => Outcome::HttpEnded(err.to_string()),
    }
}

/// The connection record's outcome of an HTTP connection.
pub fn http_outcome(stats: &l7::L7Stats) -> Outcome {
    Outcome::Http {
        requests: stats.requests,
        denied: stats.denied,
        bad: stats.bad_requests,
    }
}

/// The L7 relay's path normaliser: the policy engine's (one definition, so
/// what is matched is what is forwarded).
pub fn normalize_path(raw: &str) -> Result<String, String> {
    policy::normalize_path(raw).map_err(|e| e.to_string())
}
