//! HTTP-aware relay that authorizes every request (L7 enforcement of Istio
//! `AuthorizationPolicy` HTTP rules).
//!
//! [`serve`] sits between a downstream connection (a captured client
//! connection, or a stream out of an mTLS tunnel) and the destination
//! application. It detects the protocol, serves the downstream side with hyper,
//! and for every request:
//!
//! 1. checks the authority (`:authority` / absolute-form authority / `Host`):
//!    several `Host` fields, a non-ASCII one, or one that disagrees with the
//!    URI authority → `400`;
//! 2. normalises the path with the agent's [`PathNormalizer`]; failure → `400`
//!    (`Bad Request`), not forwarded;
//! 3. asks the [`Authorizer`] about the normalised path (query stripped);
//!    [`Verdict::Deny`] → `403` with body `RBAC: access denied`
//!    (`text/plain`, what Envoy/Istio send); the connection stays usable;
//! 4. relays upgrades (WebSocket) where it can, else `501` (see below);
//! 5. forwards the request upstream with the path replaced by the normalised
//!    one plus the original query string (what Envoy does with
//!    `normalize_path`), so the application routes on exactly the path that
//!    was authorized: no normalisation differential between the policy and the
//!    application. Method, headers, body and trailers are forwarded as
//!    received (hop-by-hop headers as hyper does: it does not strip them for
//!    HTTP/1.1; it drops connection-specific headers for HTTP/2).
//!
//! Bodies stream both ways (nothing is buffered whole); HTTP/2 trailers are
//! relayed both ways, so gRPC works.
//!
//! The upstream is made lazily by `connect`, once per downstream connection,
//! on the first request that is forwarded (a connection whose requests are all
//! denied never connects). It speaks the downstream's protocol: HTTP/1.1 →
//! HTTP/1.1 (requests are relayed one at a time over one keep-alive upstream
//! connection), h2 prior knowledge → h2 (streams multiplexed on one upstream
//! connection). Since `connect` can run only once, a failed connect or a lost
//! HTTP/1.1 upstream answers `502` (with `Connection: close` on HTTP/1.1, so
//! the client reconnects and gets a new upstream).
//!
//! ## Protocol detection and the not-HTTP fallback
//!
//! The first bytes are read (within [`L7Options::detect_timeout`]): the h2
//! preface means HTTP/2, a method token followed by a space means HTTP/1.x.
//! Anything else ends [`serve`] with [`L7Error::NotHttp`] *before anything was
//! written or connected*. The error gives back both the bytes read so far and
//! the downstream stream itself ([`NotHttp::into_parts`], or
//! [`NotHttp::into_prefixed`] for a stream that replays those bytes), so the
//! caller can fall back to L4 handling without losing data. The same happens
//! when the detection times out (server-first protocols) or the peer closes
//! mid-way ([`NotHttpReason`]). A peer that closes without sending anything
//! gives `Ok` with zero stats.
//!
//! ## Upgrades
//!
//! An HTTP/1.1 `Upgrade` request (WebSocket) is authorized like any other
//! (a denied one gets `403` and the connection stays usable) and forwarded
//! with its `Upgrade`; when the application answers `101 Switching
//! Protocols`, the client's connection and the upstream one are relayed as
//! bytes both ways until either ends ([`L7Stats::upgrades`]; the request is
//! logged and counted with its 101). Only where the upstream connection is
//! the client's own ([`Forward::relays_upgrades`]: into a pod); a service's
//! HTTP port, whose upstream connections are pooled, answers `501`.
//! HTTP/2 extended CONNECT (RFC 8441: `:protocol`, WebSocket over HTTP/2)
//! is the same: authorized by its `:path` as a `GET` (what it stands for,
//! and what Envoy's codec shows Istio's RBAC), forwarded as an extended CONNECT
//! (the application must have enabled it), and once it answers 2xx the
//! stream is relayed as bytes. A plain `CONNECT` (HTTP/1.1 and HTTP/2) is
//! answered `501 Not Implemented` before anything else (it has no path to
//! authorize); on HTTP/1.1 the connection is then closed. An `Upgrade: h2c`
//! offer alone is not relayed: the offer (`Upgrade`, `HTTP2-Settings` and
//! their `Connection` options) is removed, as a server may ignore it, and
//! the request is relayed as HTTP/1.1.
//!
//! ## Answers made here
//!
//! A `HEAD` answered here (403, 400, 502) has no body, its `Content-Length`
//! says what a GET would get. A refused HTTP/2 request's body is read and
//! discarded (bounded) so its stream ends cleanly rather than with a reset
//! that clients report as an error instead of the answer.
//!
//! ## HTTP/1.1 hardening (hyper's parser)
//!
//! Differing duplicate `Content-Length`, a `Transfer-Encoding` whose final
//! coding is not `chunked`, and `Transfer-Encoding` on HTTP/1.0 are answered
//! `400` by hyper and never reach the service. `Content-Length` together with
//! `Transfer-Encoding: chunked` is handled as RFC 9112 §6.3 requires of an
//! intermediary: the body is framed by the chunked coding, `Content-Length` is
//! removed before forwarding, and the connection is closed after the response,
//! so bytes smuggled after the chunked body never become a request. Those
//! parser-level rejections are not counted in [`L7Stats`].
//!
//! ## Timeouts
//!
//! [`L7Options::idle_timeout`]: a downstream connection with no request in
//! progress for that long is closed gracefully (HTTP/1 closes, HTTP/2 sends
//! GOAWAY). [`L7Options::header_read_timeout`]: an HTTP/1 request head must
//! arrive whole within that time of its first byte. Upstream connections
//! made here close after [`L7Options::upstream_idle_timeout`] without a byte
//! either way. See [`idle`].

mod detect;
pub mod idle;
mod service;
mod upstream;

#[cfg(test)]
mod hostile_h2_tests;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::spans::RequestSpan;

use hyper::http::HeaderMap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

pub use detect::{NotHttpReason, PrefixedIo, Protocol};
pub use service::{
    DENIED_BODY, DeniedBy, Forward, ResponseBody, UNAUTHENTICATED_BODY,
    WWW_AUTHENTICATE_INVALID_TOKEN, local_response, request_host, too_many_requests,
};

/// What the authorizer sees of one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The `Host` header (HTTP/1) or `:authority` (HTTP/2); empty if none.
    pub host: &'a str,
    /// The normalised path, query stripped.
    pub path: &'a str,
    /// The query, if any (what a route's query parameter matches read).
    pub query: Option<&'a str>,
    /// The request headers (after the JWT check's edits).
    pub headers: &'a HeaderMap,
    /// The request's valid JWT, if it carried one.
    pub auth: Option<&'a crate::policy::RequestAuth>,
}

/// The decision about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request.
    Allow,
    /// Answer `403 RBAC: access denied`; `reason` is logged, never sent.
    Deny { reason: String },
    /// Answer `429 Too Many Requests`: over `limit` requests a second of the
    /// rate limit `by`; one more may come in after `retry_after`.
    Limited {
        by: String,
        limit: u32,
        retry_after: std::time::Duration,
    },
}

/// The per-request decision (sync, fast). Implemented by the agent with its
/// policy engine.
pub trait Authorizer: Send + Sync + 'static {
    /// Checks the request's JWT, before [`Authorizer::authorize`]: `Err` is
    /// answered 401; on success the headers may have been edited (token
    /// removed, claims written). None to check by default.
    fn authenticate(
        &self,
        _headers: &mut HeaderMap,
        _query: Option<&str>,
    ) -> Result<Option<std::sync::Arc<crate::policy::RequestAuth>>, crate::policy::Unauthenticated>
    {
        Ok(None)
    }

    fn authorize(&self, request: &RequestInfo<'_>) -> Verdict;
}

/// Allows every request: for a client's side of a service port, where the
/// destination's policies are applied per request by whoever delivers it.
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &RequestInfo<'_>) -> Verdict {
        Verdict::Allow
    }
}

/// Normalises a raw request path (the request target's path, without the
/// query): `Ok(normalised path)` or `Err(reason)`, answered with `400`.
pub type PathNormalizer = fn(&str) -> Result<String, String>;

/// What happened to one request, for metrics and the access log.
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome<'a> {
    pub method: &'a hyper::Method,
    /// The path as the client sent it.
    pub path: &'a str,
    pub status: u16,
    /// From the request's arrival to the response head.
    pub duration: Duration,
    /// The bodies' `Content-Length`, when given (0 otherwise).
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// For a request denied here: the policy (rule) that decided it.
    pub denied_by: Option<&'a str>,
    /// Envoy's response flags of an answer made here (`UH`, `UF`, `UT`,
    /// `UC`, `DENY`), `-` for the application's.
    pub response_flags: &'static str,
    /// The endpoint the [`Forward`] chose for it, when it chose per request.
    pub destination: Option<&'a Arc<Destination>>,
}

/// Told about every request: when it arrives, and when it is answered
/// (forwarded or refused here).
pub trait RequestMetrics: Send + Sync + 'static {
    /// The request arrived: its span starts (if the agent traces), and
    /// its trace context headers name that span from now on.
    fn begin(&self, _request: &mut hyper::Request<hyper::body::Incoming>) -> Option<RequestSpan> {
        None
    }

    fn record(&self, outcome: &RequestOutcome<'_>, span: Option<RequestSpan>);
}

/// A response extension a [`Forward`] that picks an endpoint per request
/// sets: who answered, for the request's metrics and span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
}

/// A response extension on an answer a [`Forward`] made itself: Envoy's
/// response flag saying why (`UH` no healthy upstream, `UF` connect
/// failure, `UT` timeout, `UC` upstream reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFlags(pub &'static str);

/// A [`RequestMetrics`] in [`L7Options`].
#[derive(Clone)]
pub struct RequestMetricsHandle(pub Arc<dyn RequestMetrics>);

impl std::fmt::Debug for RequestMetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestMetricsHandle")
    }
}

/// Limits of [`serve`].
#[derive(Debug, Clone)]
pub struct L7Options {
    /// Time a client has to send a whole HTTP/1 request head, from its first
    /// byte.
    pub header_read_timeout: Duration,
    /// A downstream connection with no request in progress for this long is
    /// closed gracefully.
    pub idle_timeout: Duration,
    /// An upstream connection made by [`serve`] that carried no byte for this
    /// long is closed.
    pub upstream_idle_timeout: Duration,
    /// Largest request head (HTTP/1; answered `431`) or header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Time the first bytes have to say whether the connection is HTTP.
    pub detect_timeout: Duration,
    /// Where to report each request, if anywhere.
    pub request_metrics: Option<RequestMetricsHandle>,
}

/// Envoy's default for both sides (`common_http_protocol_options.idle_timeout`):
/// clients' pools commonly keep connections for minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for L7Options {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            upstream_idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: 64 * 1024,
            detect_timeout: Duration::from_secs(5),
            request_metrics: None,
        }
    }
}

/// What happened on one downstream connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L7Stats {
    /// Requests that reached the relay (allowed, denied, refused, bad).
    pub requests: u64,
    /// Requests answered `403` by the authorizer's verdict.
    pub denied: u64,
    /// Requests answered `400` by the relay (path normalisation, authority).
    pub bad_requests: u64,
    /// Requests that switched protocols (WebSocket), then relayed as bytes.
    pub upgrades: u64,
}

/// Why [`serve`] ended without serving HTTP to completion.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    /// The connection is not HTTP; the bytes and the stream are given back.
    #[error("{0}")]
    NotHttp(NotHttp),
    /// Reading the first bytes failed.
    #[error("reading the first bytes: {0}")]
    Detect(#[source] std::io::Error),
    /// A request head took longer than the header read timeout, after
    /// `stats`.
    #[error("request head not received within {0:?} of its first byte")]
    HeadTimeout(Duration, L7Stats),
    /// The HTTP connection failed (I/O error, protocol error, ...) after
    /// `stats`.
    #[error("{protocol:?} connection: {source}")]
    Connection {
        protocol: Protocol,
        #[source]
        source: hyper::Error,
        stats: L7Stats,
    },
}

/// A connection whose first bytes are not HTTP: the bytes read from it and the
/// downstream stream, for an L4 fallback.
pub struct NotHttp {
    /// Why the bytes are not HTTP.
    pub reason: NotHttpReason,
    peeked: Vec<u8>,
    // `Mutex` only to make the error `Sync` (for `anyhow`); it is only ever
    // taken apart by value.
    downstream: parking_lot::Mutex<Box<dyn Any + Send>>,
}

impl NotHttp {
    /// The bytes read from the downstream stream (possibly empty on timeout).
    pub fn peeked(&self) -> &[u8] {
        &self.peeked
    }

    /// The bytes read and the downstream stream; `D` must be the type given
    /// to [`serve`] (otherwise `self` is returned unchanged).
    pub fn into_parts<D: 'static>(self) -> Result<(Vec<u8>, D), Self> {
        let downstream = self.downstream.into_inner();
        match downstream.downcast::<D>() {
            Ok(stream) => Ok((self.peeked, *stream)),
            Err(downstream) => Err(Self {
                reason: self.reason,
                peeked: self.peeked,
                downstream: parking_lot::Mutex::new(downstream),
            }),
        }
    }

    /// The downstream stream with the bytes read put back in front.
    pub fn into_prefixed<D: 'static>(self) -> Result<PrefixedIo<D>, Self> {
        self.into_parts()
            .map(|(peeked, stream)| PrefixedIo::new(peeked, stream))
    }
}

impl std::fmt::Debug for NotHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotHttp")
            .field("reason", &self.reason)
            .field("peeked", &self.peeked.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for NotHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not HTTP: {} ({} bytes read)",
            self.reason,
            self.peeked.len()
        )
    }
}

/// Relays HTTP between `downstream` and an upstream made by `connect`,
/// authorizing every request with `authorizer` (see the module docs).
///
/// Returns when the downstream connection is finished, with what happened on
/// it; [`L7Error::NotHttp`] gives the stream back for an L4 fallback.
pub async fn serve<D, C, Fut, U>(
    downstream: D,
    connect: C,
    authorizer: Arc<dyn Authorizer>,
    normalize: PathNormalizer,
    options: L7Options,
) -> Result<L7Stats, L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<U>> + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((protocol, io)) = sniff(downstream, &options).await? else {
        return Ok(L7Stats::default());
    };
    // When the upstream connection ends (it cannot be replaced: `connect`
    // runs once), the downstream connection is shut down gracefully: in-flight
    // requests finish, then HTTP/1 closes and HTTP/2 sends GOAWAY, so clients
    // reconnect instead of getting `502` on an idle keep-alive connection.
    let upstream_closed = Arc::new(tokio::sync::Notify::new());
    let upgrading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forwarder = Arc::new(upstream::SingleUpstream::new(
        upstream::connector(
            protocol,
            connect,
            Arc::clone(&upstream_closed),
            options.upstream_idle_timeout,
            Arc::clone(&upgrading),
        ),
        upgrading,
    ));
    serve_sniffed(
        protocol,
        io,
        forwarder,
        authorizer,
        normalize,
        options,
        upstream_closed,
    )
    .await
}

/// Like [`serve`], but every allowed request goes to `forwarder`, which
/// chooses its upstream per request (a service's endpoints).
pub async fn serve_with<D>(
    downstream: D,
    forwarder: Arc<dyn Forward>,
    authorizer: Arc<dyn Authorizer>,
    normalize: PathNormalizer,
    options: L7Options,
) -> Result<L7Stats, L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((protocol, io)) = sniff(downstream, &options).await? else {
        return Ok(L7Stats::default());
    };
    let never = Arc::new(tokio::sync::Notify::new());
    serve_sniffed(
        protocol, io, forwarder, authorizer, normalize, options, never,
    )
    .await
}

/// Reads the first bytes: HTTP (which version), not HTTP, or `None` when the
/// peer closed without sending anything.
async fn sniff<D>(
    downstream: D,
    options: &L7Options,
) -> Result<Option<(Protocol, PrefixedIo<D>)>, L7Error>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match detect::sniff(downstream, options.detect_timeout)
        .await
        .map_err(L7Error::Detect)?
    {
        detect::Sniffed::Http(protocol, io) => {
            tracing::debug!(?protocol, "serving HTTP");
            Ok(Some((protocol, io)))
        }
        detect::Sniffed::Closed => Ok(None),
        detect::Sniffed::NotHttp(reason, peeked, downstream) => {
            tracing::debug!(%reason, bytes = peeked.len(), "downstream is not HTTP");
            Err(L7Error::NotHttp(NotHttp {
                reason,
                peeked,
                downstream: parking_lot::Mutex::new(Box::new(downstream)),
            }))
        }
    }
}

/// Serves the detected HTTP connection until it ends; `upstream_closed`
/// starts a graceful shutdown of the downstream connection.
async fn serve_sniffed<IO>(
    protocol: Protocol,
    io: IO,
    forwarder: Arc<dyn Forward>,
    authorizer: Arc<dyn Authorizer>,
    normalize: PathNormalizer,
    options: L7Options,
    upstream_closed: Arc<tokio::sync::Notify>,
) -> Result<L7Stats, L7Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let relay = Arc::new(service::Relay::new(
        protocol,
        forwarder,
        authorizer,
        normalize,
        options.request_metrics.clone().map(|h| h.0),
    ));
    let activity = idle::Activity::new();
    let svc = {
        let (relay, activity) = (Arc::clone(&relay), Arc::clone(&activity));
        hyper::service::service_fn(move |request| {
            // In progress from its head until its answer's body is sent.
            let in_progress = activity.request_started();
            let relay = Arc::clone(&relay);
            async move {
                let response = relay.handle(request).await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| idle::Tracked::new(body, in_progress)),
                )
            }
        })
    };
    let expired = activity.expired(options.idle_timeout, options.header_read_timeout);
    let mut expired = std::pin::pin!(expired);
    let result = match protocol {
        Protocol::Http1 => {
            // hyper's header timer is not used: it runs while a keep-alive
            // connection waits for its next request, closing idle ones.
            let io = TokioIo::new(idle::HeadWatch::new(io, Arc::clone(&activity)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_header_size(options.max_header_bytes)
                .auto_date_header(false)
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = upstream_closed.notified() => {
                    tracing::debug!("upstream closed: closing downstream HTTP/1 connection");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                expiry = expired.as_mut() => match expiry {
                    idle::Expiry::Idle => {
                        tracing::debug!("downstream HTTP/1 connection idle: closing");
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                    idle::Expiry::HeadTimeout => {
                        tracing::debug!("request head too slow: closing");
                        return Err(L7Error::HeadTimeout(options.header_read_timeout, relay.stats()));
                    }
                },
            }
        }
        Protocol::Http2 => {
            let io = TokioIo::new(io);
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX))
                .auto_date_header(false)
                // Extended CONNECT (WebSocket over HTTP/2), relayed where the
                // upstream is the client's own; refused (501) elsewhere.
                .enable_connect_protocol()
                .serve_connection(io, svc);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = upstream_closed.notified() => {
                    tracing::debug!("upstream closed: shutting down downstream HTTP/2 connection");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                // No head timeout on HTTP/2 (no bytes are watched): idle only.
                _ = expired.as_mut() => {
                    tracing::debug!("downstream HTTP/2 connection idle: GOAWAY");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
    };
    // Upgraded connections (WebSocket) carry on after their HTTP
    // connection: this one is over when they are.
    for upgraded in relay.take_upgraded() {
        let _ = upgraded.await;
    }
    let stats = relay.stats();
    match result {
        Ok(()) => Ok(stats),
        Err(source) => Err(L7Error::Connection {
            protocol,
            source,
            stats,
        }),
    }
}
