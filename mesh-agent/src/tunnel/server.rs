//! The receiving end: serves HBONE on one accepted TCP connection.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::FORWARDED;
use http::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::headers::{parse_authority, parse_forwarded_for};
use super::pool::error_chain;
use super::relay::relay;
use super::stream::TunnelStream;
use super::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE, STREAM_WINDOW};

/// Upper bound of [`lingering_close`].
const LINGER_AFTER_HANDSHAKE_FAILURE: Duration = Duration::from_secs(1);
/// How long a client that finished TLS has to send the HTTP/2 preface.
const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds one CONNECT's headers (they are a few hundred bytes).
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// One CONNECT stream, as handed to the `open` callback.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The original destination from `:authority`.
    pub authority: SocketAddr,
    /// The original client from `Forwarded: for=`, if sent and parseable.
    pub forwarded_for: Option<IpAddr>,
    /// The peer's verified chain, leaf first (shared by the connection's
    /// streams, not copied per stream).
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
    /// The TCP peer (the remote node or pod).
    pub peer_addr: SocketAddr,
    /// When the peer's certificate expires: TLS checked it at the handshake
    /// only, and the connection may outlive it.
    pub peer_certificate_expiry: Option<std::time::SystemTime>,
}

/// Why `open` refused a stream; each maps to the status ztunnel uses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejection {
    /// 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: the client's certificate has expired since the handshake.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403: policy denied it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 503: the upstream could not be connected.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::Forbidden(_) => StatusCode::FORBIDDEN,
            Rejection::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// How serving one connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS handshake failed; [`ServeError::tls_error`] gives the rustls
    /// error when there is one (an I/O error otherwise).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The HTTP/2 connection failed after the handshake.
    #[error("HTTP/2 connection failed: {0}")]
    Http(String),
}

impl ServeError {
    /// The rustls error behind a failed handshake, to classify it (e.g.
    /// `rustls::Error::InvalidCertificate`, `InvalidMessage` for plaintext).
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            ServeError::Handshake(e) => e.get_ref()?.downcast_ref::<rustls::Error>(),
            _ => None,
        }
    }
}

/// Serves one accepted TCP connection on the HBONE port: TLS (client
/// certificates are required by `tls`), then HTTP/2. Each CONNECT stream is
/// passed to `open`; its upstream is relayed until both directions finish.
/// Returns when the connection ends; relays still running continue on their
/// own tasks until the streams end.
/// Where a CONNECT stream's bytes go: a TCP connection (to the pod), or an
/// in-process handler that takes the stream itself.
pub enum Upstream {
    Tcp(TcpStream),
    /// A TCP connection, and what to do with the byte counts at its end.
    Observed(TcpStream, Box<dyn FnOnce(Relayed) + Send>),
    /// Served in the process (e.g. the HTTP authorizer), on the stream's
    /// own task: no pipe, no copy between the stream and the handler.
    Handler(StreamHandler),
}

/// Takes an open CONNECT stream and serves it to its end.
pub type StreamHandler =
    Box<dyn FnOnce(TunnelStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What a stream relayed to its TCP upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub to_upstream: u64,
    pub from_upstream: u64,
    /// Ended by an error (a reset on either side), not by both EOFs.
    pub aborted: bool,
}

impl Upstream {
    /// Gives up on the upstream before relaying: a TCP upstream is reset,
    /// an observer learns of the abort.
    fn abort(self) {
        match self {
            Upstream::Tcp(tcp) => {
                let _ = tcp.set_zero_linger();
            }
            Upstream::Observed(tcp, done) => {
                let _ = tcp.set_zero_linger();
                done(Relayed {
                    to_upstream: 0,
                    from_upstream: 0,
                    aborted: true,
                });
            }
            // Dropped unserved: the handler's own drop says so.
            Upstream::Handler(_) => {}
        }
    }
}

impl From<TcpStream> for Upstream {
    fn from(tcp: TcpStream) -> Self {
        Upstream::Tcp(tcp)
    }
}

pub async fn serve_connection<O, Fut>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    open: O,
) -> Result<(), ServeError>
where
    O: Fn(ConnectRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Upstream, Rejection>> + Send + 'static,
{
    serve_connection_until(tcp, tls, handshake_timeout, open, std::future::pending()).await
}

/// [`serve_connection`], shutting down gracefully once `shutdown` resolves:
/// the client gets a GOAWAY (it opens new streams elsewhere: a new
/// connection reaches whichever agent accepts then) and the streams already
/// open carry on to their end.
pub async fn serve_connection_until<O, Fut>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    open: O,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    O: Fn(ConnectRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Upstream, Rejection>> + Send + 'static,
{
    let (tls, peer_addr) = accept_tls(tcp, tls, handshake_timeout).await?;
    serve_tls(tls, peer_addr, open, shutdown).await
}

/// The mutual-TLS handshake of a tunnel connection, within
/// `handshake_timeout`: the first half of [`serve_connection`].
pub async fn accept_tls(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> Result<(TlsStream<TcpStream>, SocketAddr), ServeError> {
    let peer_addr = tcp.peer_addr().map_err(ServeError::Handshake)?;
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(with_h2_alpn(tls));
    let accept = acceptor.accept(tcp).into_fallible();
    match tokio::time::timeout(handshake_timeout, accept).await {
        Err(_elapsed) => Err(ServeError::HandshakeTimeout),
        Ok(Err((e, tcp))) => {
            tokio::spawn(lingering_close(tcp));
            Err(ServeError::Handshake(e))
        }
        Ok(Ok(tls)) => Ok((tls, peer_addr)),
    }
}

/// HTTP/2 over an accepted TLS connection, one CONNECT stream after
/// another, until the client goes or `shutdown` resolves (then GOAWAY):
/// the second half of [`serve_connection`].
pub async fn serve_tls<O, Fut>(
    tls: TlsStream<TcpStream>,
    peer_addr: SocketAddr,
    open: O,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    O: Fn(ConnectRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Upstream, Rejection>> + Send + 'static,
{
    let peer_certificates: Arc<[CertificateDer<'static>]> = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let peer_certificate_expiry = peer_certificates
        .first()
        .and_then(|leaf| crate::identity::not_after_of(leaf));

    let mut connection =
        tokio::time::timeout(H2_HANDSHAKE_TIMEOUT, h2_server_builder().handshake(tls))
            .await
            .map_err(|_| ServeError::Http("no HTTP/2 preface in time".to_string()))?
            .map_err(|e| ServeError::Http(error_chain(&e)))?;
    let keepalive = super::keepalive(connection.ping_pong());
    let mut keepalive = std::pin::pin!(keepalive);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                // Closed: by the peer, or drained after our GOAWAY.
                None => return Ok(()),
                Some(Err(e)) => return Err(ServeError::Http(error_chain(&e))),
                Some(Ok((request, respond))) => {
                    let stream = handle_stream(
                        request,
                        respond,
                        open.clone(),
                        peer_certificates.clone(),
                        peer_certificate_expiry,
                        peer_addr,
                    );
                    tokio::spawn(stream);
                }
            },
            reason = &mut keepalive => return Err(ServeError::Http(reason)),
            () = &mut shutdown, if !draining => {
                // GOAWAY; `accept` goes on driving the open streams and
                // returns `None` once they have all ended.
                connection.graceful_shutdown();
                draining = true;
            }
        }
    }
}

async fn handle_stream<O, Fut>(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    open: O,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    peer_certificate_expiry: Option<std::time::SystemTime>,
    peer_addr: SocketAddr,
) where
    O: Fn(ConnectRequest) -> Fut,
    Fut: Future<Output = Result<Upstream, Rejection>>,
{
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, code: StatusCode| {
        respond.send_response(status(code), true).map(drop)
    };
    if request.method() != Method::CONNECT {
        tracing::debug!(%peer_addr, method = %request.method(), "HBONE: not a CONNECT");
        let _ = answer(&mut respond, StatusCode::BAD_REQUEST);
        return;
    }
    let Some(authority) = request
        .uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
    else {
        tracing::debug!(%peer_addr, uri = %request.uri(), "HBONE: authority is not ip:port");
        let _ = answer(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    let forwarded_for = request
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    let connect = ConnectRequest {
        authority,
        forwarded_for,
        peer_certificates,
        peer_addr,
        peer_certificate_expiry,
    };
    let upstream = match open(connect).await {
        Ok(upstream) => upstream,
        Err(rejection) => {
            tracing::debug!(%peer_addr, %authority, %rejection, "HBONE stream rejected");
            let _ = answer(&mut respond, rejection.status());
            return;
        }
    };
    match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => {
            let stream = TunnelStream::new(request.into_body(), send, None);
            relay(stream, upstream, authority).await;
        }
        Err(e) => {
            tracing::debug!(%peer_addr, %authority, error = %e, "HBONE stream gone before the 200");
            upstream.abort();
        }
    }
}

/// Closes after a failed handshake so that the peer can read our alert.
///
/// With TLS 1.3 a client whose certificate we reject has already finished
/// its handshake and sent HTTP/2 bytes; closing with those unread would send
/// RST, which discards the alert in the client's receive queue and leaves it
/// with "broken pipe" instead of the reason. So: FIN, then drain for a
/// bounded time.
async fn lingering_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_AFTER_HANDSHAKE_FAILURE, drain).await;
}

fn status(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}

fn h2_server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    b
}

fn with_h2_alpn(tls: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if tls.alpn_protocols.iter().any(|p| p == b"h2") {
        return tls;
    }
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
