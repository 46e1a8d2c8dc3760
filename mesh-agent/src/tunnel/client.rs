//! The sending end: opens HTTP/2 CONNECT streams over pooled mTLS
//! connections.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::header::FORWARDED;
use http::{Method, Request, StatusCode, Version};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::headers::{format_authority, format_forwarded};
use super::pool::{Pool, PooledConn, Sender, StreamLease};
use super::stream::TunnelStream;
use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};

/// How long a failed connect waits for the connection's own error, which
/// says more than the request's ("connection closed").
const END_REASON_WAIT: Duration = Duration::from_millis(500);

/// Which connections may carry a stream: same source identity, same
/// destination identity, same gateway (what ztunnel keys its pool on).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_identity: String,
    pub destination_identity: String,
    pub gateway: SocketAddr,
}

impl PoolKey {
    pub fn new(
        source_identity: impl Into<String>,
        destination_identity: impl Into<String>,
        gateway: SocketAddr,
    ) -> Self {
        Self {
            source_identity: source_identity.into(),
            destination_identity: destination_identity.into(),
            gateway,
        }
    }
}

/// Where and how to reach a remote workload through its node's agent.
#[derive(Debug, Clone)]
pub struct TunnelTarget {
    /// Destination pod `ip:15008`.
    pub gateway: SocketAddr,
    /// Original destination `ip:port`; sent as `:authority`.
    pub authority: SocketAddr,
    /// Original client, sent as `Forwarded: for=...`.
    pub forwarded_for: Option<IpAddr>,
    pub pool_key: PoolKey,
    /// When the certificate we present expires: a pooled connection takes
    /// no new stream past its own or the peer's certificate's expiry.
    pub local_cert_expiry: Option<SystemTime>,
}

/// Tunables of [`TunnelClient`].
#[derive(Debug, Clone)]
pub struct TunnelClientConfig {
    /// A pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Streams per connection before another connection is opened (ztunnel's
    /// default is 100); the peer's SETTINGS may lower it.
    pub max_streams_per_connection: usize,
    /// Bounds dial + TLS + HTTP/2 handshake of a new connection.
    pub connect_timeout: Duration,
}

impl Default for TunnelClientConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            max_streams_per_connection: 100,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Opens tunnelled streams; cheap to clone (shares the pool).
#[derive(Clone)]
pub struct TunnelClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    pool: Pool,
    connect_timeout: Duration,
}

/// The peer's agent answered a CONNECT with something other than 200: `403`
/// when the destination's policies deny the stream, `502`/`503` when it
/// cannot reach the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("was answered with status {0}")]
pub struct PeerRefused(pub StatusCode);

enum ConnectFailure {
    /// The peer answered; retrying elsewhere would not help.
    Refused(anyhow::Error),
    /// The connection failed before an answer (it may have died while
    /// pooled).
    Connection(anyhow::Error),
}

impl TunnelClient {
    pub fn new(idle_timeout: Duration) -> Self {
        Self::with_config(TunnelClientConfig {
            idle_timeout,
            ..TunnelClientConfig::default()
        })
    }

    pub fn with_config(config: TunnelClientConfig) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                pool: Pool::new(config.idle_timeout, config.max_streams_per_connection),
                connect_timeout: config.connect_timeout,
            }),
        }
    }

    /// Number of live pooled connections.
    pub fn pooled_connections(&self) -> usize {
        self.inner.pool.len()
    }

    /// Opens one tunnelled stream to `target`.
    ///
    /// Reuses a pooled connection for `target.pool_key` that is alive and
    /// below its stream limit, else dials with `dial` (a connected TCP stream,
    /// created by the caller in the right network namespace), then TLS with
    /// `tls`/`server_name` (ALPN h2 is added if missing), then HTTP/2. If a
    /// pooled connection turns out to be dead, the stream is retried once on
    /// a new connection.
    pub async fn connect<F, Fut>(
        &self,
        target: &TunnelTarget,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        dial: F,
    ) -> anyhow::Result<TunnelStream>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let pool = &self.inner.pool;
        let key = &target.pool_key;
        let mut dial = Some(dial);
        loop {
            let (conn, lease, fresh) = match pool.checkout(key) {
                Some((conn, lease)) => (conn, lease, false),
                None => {
                    let lock = pool.dial_lock(key);
                    let guard = lock.lock().await;
                    // Someone else may have dialled while we waited.
                    if let Some((conn, lease)) = pool.checkout(key) {
                        (conn, lease, false)
                    } else {
                        let Some(dial) = dial.take() else {
                            bail!("no HBONE connection to {} available", target.gateway);
                        };
                        let dialled = self
                            .dial_new(target, tls.clone(), server_name.clone(), dial)
                            .await;
                        drop(guard);
                        drop(lock);
                        match dialled {
                            Ok((conn, lease)) => (conn, lease, true),
                            Err(e) => {
                                pool.gc_dial_lock(key);
                                return Err(e);
                            }
                        }
                    }
                }
            };
            match send_connect(conn.sender(), target).await {
                Ok((recv, send)) => return Ok(TunnelStream::new(recv, send, Some(lease))),
                Err(ConnectFailure::Refused(e)) => return Err(e),
                Err(ConnectFailure::Connection(e)) => {
                    pool.evict(&conn);
                    if fresh || dial.is_none() {
                        return Err(match conn.end_reason(END_REASON_WAIT).await {
                            Some(reason) if !format!("{e:#}").contains(&reason) => {
                                e.context(format!("HBONE connection ended: {reason}"))
                            }
                            _ => e,
                        });
                    }
                    tracing::debug!(
                        conn = conn.id,
                        error = %format!("{e:#}"),
                        "pooled HBONE connection failed; dialling a new one"
                    );
                }
            }
        }
    }

    async fn dial_new<F, Fut>(
        &self,
        target: &TunnelTarget,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        dial: F,
    ) -> anyhow::Result<(Arc<PooledConn>, StreamLease)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let gateway = target.gateway;
        let handshake = async {
            let tcp = dial()
                .await
                .with_context(|| format!("connecting to HBONE gateway {gateway}"))?;
            // Small frames (e.g. the CONNECT) must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(with_h2_alpn(tls))
                .connect(server_name, tcp)
                .await
                .with_context(|| format!("TLS handshake with HBONE gateway {gateway}"))?;
            let peer_cert_expiry = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::identity::not_after_of(leaf));
            let (sender, connection) = h2_client_builder()
                .handshake(tls)
                .await
                .with_context(|| format!("HTTP/2 handshake with HBONE gateway {gateway}"))?;
            anyhow::Ok((sender, connection, peer_cert_expiry))
        };
        let (sender, connection, peer_cert_expiry) =
            tokio::time::timeout(self.inner.connect_timeout, handshake)
                .await
                .map_err(|_| {
                    anyhow!(
                        "connecting to HBONE gateway {gateway} timed out after {:?}",
                        self.inner.connect_timeout
                    )
                })??;
        // A little before the expiry: the peer refuses streams past it
        // (401), and its clock and the way there are not ours.
        let usable_until = match (target.local_cert_expiry, peer_cert_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|expiry| expiry - EXPIRY_MARGIN);
        Ok(self
            .inner
            .pool
            .insert(target.pool_key.clone(), sender, connection, usable_until))
    }
}

/// How long before a certificate's expiry its pooled connection stops
/// taking new streams.
pub(super) const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

fn h2_client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        // We never accept pushed streams.
        .enable_push(false);
    b
}

fn with_h2_alpn(tls: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if tls.alpn_protocols.iter().any(|p| p == b"h2") {
        return tls;
    }
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn connect_request(target: &TunnelTarget) -> anyhow::Result<Request<()>> {
    // An authority-form URI: h2 sends it as `:authority` with no
    // `:scheme`/`:path`, as RFC 9113 §8.5 wants for CONNECT.
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(format_authority(target.authority));
    if let Some(client) = target.forwarded_for {
        builder = builder.header(FORWARDED, format_forwarded(client));
    }
    Ok(builder.body(())?)
}

async fn send_connect(
    sender: Sender,
    target: &TunnelTarget,
) -> Result<(h2::RecvStream, h2::SendStream<Bytes>), ConnectFailure> {
    let request = connect_request(target).map_err(ConnectFailure::Refused)?;
    let what = || format!("HBONE CONNECT {} via {}", target.authority, target.gateway);
    let failed = |e: h2::Error| anyhow::Error::new(e).context(format!("{} failed", what()));
    // A stream reset (e.g. REFUSED_STREAM past a GOAWAY) is worth a retry
    // on another connection, as is the connection failing.
    let retryable = |e: h2::Error| ConnectFailure::Connection(failed(e));
    let mut sender = sender.ready().await.map_err(retryable)?;
    let (response, send) = sender.send_request(request, false).map_err(retryable)?;
    let response = response.await.map_err(retryable)?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(ConnectFailure::Refused(
            anyhow::Error::new(PeerRefused(status)).context(what()),
        ));
    }
    Ok((response.into_body(), send))
}
