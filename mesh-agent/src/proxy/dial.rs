//! Upstream connections, each made from the right network namespace: from a
//! pod's own address (passthrough), into a pod of this node over its
//! loopback (delivery), or through the mTLS tunnel to another node's agent.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use mesh_common::{AGENT_SOURCE_IPV4, DELIVERY_MARK, TUNNEL_PORT};
use tokio::net::{TcpSocket, TcpStream};

use super::{pod::PodHandle, source_address::NO_ANSWER_HOLD};
use crate::balance::rng::{ThreadRng, below};
use crate::{
    mtls::{Mtls, RemotePeer},
    tunnel::{self, PoolKey, TunnelStream, TunnelTarget},
};

pub struct Dialer {
    pub mtls: Arc<Mtls>,
    pub connect_timeout: Duration,
}

impl Dialer {
    /// Connects to `dst` from `pod`'s namespace (the pod's own address).
    pub async fn from_pod(&self, pod: &PodHandle, dst: SocketAddr) -> Result<TcpStream> {
        let socket = pod.netns.tcp_socket(dst.is_ipv6())?;
        self.connect(socket, dst).await
    }

    /// Connects to `dst` inside `target`'s namespace for `client`: from the
    /// client's own address when the pod is set up for it (the application
    /// sees the client), else from the agent's reserved loopback address.
    /// Either way the socket is bound to the pod's loopback device, which is
    /// how inbound capture knows the agent's deliveries and leaves them alone.
    pub async fn into_pod(
        &self,
        target: &PodHandle,
        dst: SocketAddr,
        client: IpAddr,
    ) -> Result<TcpStream> {
        if let Ok(source) = target.source_address.source_for(client, dst) {
            let wait = self.connect_timeout.min(CLIENT_ADDRESS_ANSWER);
            let mut tries = 0;
            loop {
                tries += 1;
                let socket = transparent_delivery_socket(target, dst, source)?;
                match tokio::time::timeout(wait, socket.connect(dst)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    // Another delivery of this client to this destination
                    // drew the same port: draw again.
                    Ok(Err(err))
                        if err.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                            && tries < PORT_TRIES =>
                    {
                        continue;
                    }
                    Ok(Err(err)) => {
                        return Err(err)
                            .with_context(|| format!("connecting to {dst} from {source}"));
                    }
                    Err(_) => {
                        target.source_address.no_answer(dst.port());
                        tracing::warn!(pod = %target.key, %dst, %source, hold = ?NO_ANSWER_HOLD, "the application did not answer a delivery from the client's address (does it mark its sockets?): deliveries to this port come from the agent's address for a while");
                        break;
                    }
                }
            }
        }
        let agent: IpAddr = if dst.is_ipv6() {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::from(AGENT_SOURCE_IPV4))
        };
        let socket = target.netns.tcp_socket(dst.is_ipv6())?;
        // The port is chosen at connect, not at bind: every connection into
        // the pod leaves from this one address, and a port picked at bind
        // must be free of every other socket on it (TIME_WAIT included), so
        // a few tens of thousands of connections a minute would run out.
        // Chosen at connect it only has to make the 4-tuple unique.
        bind_address_no_port(&socket);
        socket
            .bind(SocketAddr::new(agent, 0))
            .with_context(|| format!("binding {agent} in {}", target.key))?;
        self.connect(socket, dst).await
    }

    /// Opens a tunnel stream to `dst` through its node's agent, as `pod`'s
    /// identity; the TCP connection leaves from `pod`'s namespace.
    pub async fn tunnel(
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
            let reason = tunnel_failure_reason(&err);
            self.mtls.count_rejection(&reason);
            tracing::warn!(pod = %pod.key, peer = %peer.identity, %gateway, reason, error = format!("{err:#}"), "tunnel to the peer failed");
            anyhow!("tunnel to {} ({}): {err:#}", peer.key, peer.identity)
        })
    }

    async fn connect(&self, socket: TcpSocket, dst: SocketAddr) -> Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, socket.connect(dst))
            .await
            .with_context(|| format!("connecting to {dst} timed out"))?
            .with_context(|| format!("connecting to {dst}"))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// How long a delivery from a client's address waits for the application
/// before it is taken for one that cannot answer it (an application that
/// marks its own sockets routes its replies by its own rules) and made again
/// from the agent's address. An answer over loopback takes microseconds.
const CLIENT_ADDRESS_ANSWER: Duration = Duration::from_secs(1);

/// Source ports of deliveries from a client's address: below the ranges
/// operating systems pick client ports from by default (Linux 32768–60999,
/// Windows and macOS 49152–65535). A delivery shares the pod's namespace
/// with the connections captured from the same client to the same port, and
/// the kernel hands a packet to the socket whose addresses and ports match:
/// a delivery on one of the client's own ports would take its packets.
const DELIVERY_PORTS: std::ops::RangeInclusive<u16> = 1024..=32767;
/// Ports drawn for one delivery before giving up.
const PORT_TRIES: usize = 16;

/// A socket in `target`'s namespace that may use `source`, a client's
/// address (transparent), bound to it on a port drawn from
/// [`DELIVERY_PORTS`] and to the pod's loopback device (which is how inbound
/// capture knows the agent's deliveries), and marked so that the
/// application's replies come back to it (capture/delivery_routing.rs).
fn transparent_delivery_socket(
    target: &PodHandle,
    dst: SocketAddr,
    source: IpAddr,
) -> Result<TcpSocket> {
    let socket = target.netns.tcp_socket(dst.is_ipv6())?;
    let options = socket2::SockRef::from(&socket);
    options
        .bind_device(Some(b"lo"))
        .context("binding the delivery socket to lo")?;
    if dst.is_ipv6() {
        options.set_ip_transparent_v6(true)
    } else {
        options.set_ip_transparent_v4(true)
    }
    .context("making the delivery socket transparent")?;
    options
        .set_mark(DELIVERY_MARK)
        .context("marking the delivery socket")?;
    // Ports of earlier deliveries in TIME_WAIT may be drawn again: connect
    // then only needs the 4-tuple to be unique.
    options.set_reuse_address(true)?;
    let span = u64::from(DELIVERY_PORTS.end() - DELIVERY_PORTS.start()) + 1;
    for _ in 0..PORT_TRIES {
        let port = DELIVERY_PORTS.start() + below(&mut ThreadRng, span) as u16;
        match socket.bind(SocketAddr::new(source, port)) {
            Ok(()) => return Ok(socket),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(err) => {
                return Err(err).with_context(|| format!("binding {source} in {}", target.key));
            }
        }
    }
    Err(anyhow!(
        "no free port for {source} in {} after {PORT_TRIES} tries",
        target.key
    ))
}

/// IP_BIND_ADDRESS_NO_PORT (Linux 4.2): bind(addr, 0) leaves the port to
/// connect(). Best effort: without it, bind picks the port as before.
fn bind_address_no_port(socket: &TcpSocket) {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    if let Err(err) = setsockopt(socket, IpBindAddressNoPort, &true) {
        tracing::debug!(error = %err, "IP_BIND_ADDRESS_NO_PORT not set");
    }
}

/// Why a tunnel stream could not be opened, as counted: the peer's refusal
/// (a 403 from its agent is its policy; ztunnel answers a denied CONNECT
/// with 401), a TLS failure by kind, or the dial.
fn tunnel_failure_reason(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        if let Some(refused) = cause.downcast_ref::<tunnel::PeerRefused>() {
            return match refused.0.as_u16() {
                401 | 403 => "denied_by_peer".to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    fn refused(status: StatusCode) -> anyhow::Error {
        anyhow::Error::new(tunnel::PeerRefused(status)).context("opening a tunnel stream")
    }

    #[test]
    fn a_peer_that_refuses_by_policy_is_counted_as_denying() {
        // The agent's peers answer 403; ztunnel answers 401.
        assert_eq!(
            tunnel_failure_reason(&refused(StatusCode::FORBIDDEN)),
            "denied_by_peer"
        );
        assert_eq!(
            tunnel_failure_reason(&refused(StatusCode::UNAUTHORIZED)),
            "denied_by_peer"
        );
        assert_eq!(
            tunnel_failure_reason(&refused(StatusCode::SERVICE_UNAVAILABLE)),
            "refused_by_peer"
        );
    }
}
