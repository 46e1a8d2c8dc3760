//! Plaintext inbound: a connection from outside the mesh to a pod of this
//! node, steered by sk_lookup to the agent's listener on 127.0.0.1:15006 in
//! the pod. The accepted socket's local address is where the client was
//! going; it is delivered inside the pod by the pod's policies.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    connections::Direction,
    context::ProxyContext,
    counted,
    deliver::{self, Client},
    finish::{self, Recording, Upstream},
    outcome::{Outcome, Path},
    pod::PodHandle,
};

/// Serves one plaintext connection captured on its way into `pod`.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    downstream: TcpStream,
    client: SocketAddr,
) {
    let mut record = Recording::start(&ctx, Direction::Inbound, &pod, client);
    record.peers.set_local_destination(&pod);
    record.upstream = Path::Pod(pod.key.clone());
    let original_dst = match original_destination(downstream.local_addr()) {
        Ok(addr) => addr,
        Err(outcome) => {
            tracing::warn!(pod = %pod.key, %client, %outcome, "inbound connection without a local address; reset");
            finish::refuse(record, downstream, outcome);
            return;
        }
    };
    record.original_dst = original_dst;
    // The policies in force now decide; the snapshot itself is not held
    // for the connection's life (it holds every pod of its generation).
    let snapshot = ctx.snapshot();
    let policies = snapshot.policies.clone();
    if let Some(service) = snapshot.service_of_endpoint(original_dst) {
        record.peers.destination_service = service.to_string();
    }
    drop(snapshot);
    // The kubelet's probe is let in whatever the policies say (counted).
    let probe = ctx
        .authorizer
        .kubelet_probe(&pod, client.ip(), original_dst.port());
    // A STRICT PeerAuthentication refuses plaintext before anything else
    // is decided (the kubelet's probe excepted, as in Istio).
    if !probe
        && let Err(by) = ctx
            .authorizer
            .plaintext(&policies, &pod, client.ip(), original_dst.port())
    {
        finish::refuse(record, downstream, Outcome::PlaintextRefused(by));
        return;
    }
    // Plaintext from outside the mesh: no principal, no namespace.
    if !probe && pod.decided_per_request(&policies, original_dst.port()) {
        let from = Client {
            identity: None,
            source_ip: client.ip(),
            remote_ip: client.ip(),
        };
        let (downstream, bytes) = counted::counting(downstream);
        let served = Box::pin(deliver::serve_http(
            &ctx,
            downstream,
            pod.clone(),
            from,
            original_dst,
        ))
        .await;
        record.count_bytes(&bytes);
        record.end(served);
        return;
    }
    if let Err(by) = if probe {
        Ok(())
    } else {
        ctx.authorizer.connection(
            &policies,
            &pod,
            None,
            client.ip(),
            client.ip(),
            original_dst,
        )
    } {
        let outcome = Outcome::Denied {
            by,
            not_http: false,
        };
        finish::refuse(record, downstream, outcome);
        return;
    }
    let upstream = ctx
        .dial
        .into_pod(&pod, original_dst, client.ip())
        .await
        .map(Upstream::Tcp);
    finish::finish(&ctx, record, downstream, upstream).await;
}

/// The accepted socket's own address is where the client was going; without
/// it there is nowhere to deliver, and no other address (the client's, the
/// listener's) is ever taken in its place.
fn original_destination(local: std::io::Result<SocketAddr>) -> Result<SocketAddr, Outcome> {
    local.map_err(|err| Outcome::NoOriginalDestination(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_its_local_address_an_inbound_connection_has_no_destination() {
        let to: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        assert_eq!(original_destination(Ok(to)).unwrap(), to);
        let unknown = std::io::Error::from_raw_os_error(nix::libc::ENOTCONN);
        match original_destination(Err(unknown)) {
            Err(Outcome::NoOriginalDestination(reason)) => {
                assert!(reason.contains("not connected"), "{reason}")
            }
            other => panic!("a destination was made up: {other:?}"),
        }
    }
}
