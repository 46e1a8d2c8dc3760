//! The per-request service: authority and path checks, authorization,
//! answers made here, and upgrades; allowed requests go to a [`Forward`]
//! (`upstream.rs` for traffic into a pod).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::http::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::{PathAndQuery, Uri};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::{Authorizer, L7Stats, PathNormalizer, Protocol, RequestInfo, Verdict};

/// Body of the responses sent downstream: the upstream's, or a local one.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// Body of the 403 answer (what Envoy/Istio send).
pub const DENIED_BODY: &str = "RBAC: access denied";
/// The body of a 401 for a JWT that fails (Envoy's words).
pub const UNAUTHENTICATED_BODY: &str = "Jwt verification fails";
/// RFC 6750 §3: the token was presented and is not valid.
pub const WWW_AUTHENTICATE_INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";

/// A response extension a [`Forward`] sets on a 403 it decided itself (e.g.
/// by the policies of the endpoint it picked): the deciding policy, for the
/// access log.
#[derive(Debug, Clone)]
pub struct DeniedBy(pub String);

/// Where allowed requests go: one lazily connected upstream ([`SingleUpstream`],
/// for traffic into a pod) or, for a service port, a balancer that picks an
/// endpoint per request (the agent's `proxy::service_http`).
pub trait Forward: Send + Sync + 'static {
    /// Sends `request` (already checked and authorized, path normalised) and
    /// returns the answer for the downstream client; `downstream` says what
    /// the client speaks (a local answer on HTTP/1 may ask it to close).
    fn forward(
        &self,
        request: Request<Incoming>,
        downstream: Protocol,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>>;

    /// Whether an HTTP/1.1 upgrade (WebSocket) can be relayed: the upstream
    /// connection is this client's own, and can be handed over whole.
    fn relays_upgrades(&self) -> bool {
        false
    }
}

/// State shared by all requests of one downstream connection.
pub(super) struct Relay {
    protocol: Protocol,
    metrics: Option<Arc<dyn super::RequestMetrics>>,
    forwarder: Arc<dyn Forward>,
    authorizer: Arc<dyn Authorizer>,
    normalize: PathNormalizer,
    requests: AtomicU64,
    denied: AtomicU64,
    bad_requests: AtomicU64,
    upgrades: AtomicU64,
    /// Upgraded connections (WebSocket) being relayed: the downstream
    /// connection is not over until they are.
    upgraded: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl Relay {
    pub(super) fn new(
        protocol: Protocol,
        forwarder: Arc<dyn Forward>,
        authorizer: Arc<dyn Authorizer>,
        normalize: PathNormalizer,
        metrics: Option<Arc<dyn super::RequestMetrics>>,
    ) -> Self {
        Self {
            protocol,
            metrics,
            forwarder,
            authorizer,
            normalize,
            requests: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            upgraded: parking_lot::Mutex::default(),
        }
    }

    /// The relays of upgraded connections, to be waited for.
    pub(super) fn take_upgraded(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.upgraded.lock())
    }

    pub(super) fn stats(&self) -> L7Stats {
        L7Stats {
            requests: self.requests.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            bad_requests: self.bad_requests.load(Ordering::Relaxed),
            upgrades: self.upgrades.load(Ordering::Relaxed),
        }
    }

    /// Handles one request (the hyper service).
    pub(super) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let request_bytes = content_length(request.headers());
        // For the access log only (never a metric label).
        let method = request.method().clone();
        let path = self
            .metrics
            .as_ref()
            .map(|_| request.uri().path().to_owned())
            .unwrap_or_default();
        let mut request = request;
        let span = self.metrics.as_ref().and_then(|m| m.begin(&mut request));
        let (mut response, denied_by) = match self.check(&mut request) {
            Ok(()) => {
                // The client's side of an upgrade, taken before the request
                // leaves (it goes with the request otherwise).
                let tunnel = is_extended_connect(&request);
                let client_upgrade = (is_upgrade(request.headers()) || tunnel)
                    .then(|| hyper::upgrade::on(&mut request));
                let mut response = self.forwarder.forward(request, self.protocol).await;
                let switched = if tunnel {
                    response.status().is_success()
                } else {
                    response.status() == StatusCode::SWITCHING_PROTOCOLS
                };
                if let Some(client_upgrade) = client_upgrade
                    && switched
                {
                    self.relay_upgraded(client_upgrade, hyper::upgrade::on(&mut response));
                }
                let denied_by = response.extensions_mut().remove::<DeniedBy>().map(|d| d.0);
                (response, denied_by)
            }
            Err(refusal) => {
                if self.protocol == Protocol::Http2 {
                    drain_refused_body(request.into_body()).await;
                }
                let denied_by = refusal.denied_by.clone();
                (refusal.into_response(), denied_by)
            }
        };
        if method == Method::HEAD {
            without_body(&mut response);
        }
        if let Some(metrics) = &self.metrics {
            let status = response.status().as_u16();
            let flags = match response.extensions_mut().remove::<super::ResponseFlags>() {
                Some(flags) => flags.0,
                None if status == 403 && denied_by.is_some() => "DENY",
                None => "-",
            };
            let destination = response
                .extensions_mut()
                .remove::<Arc<super::Destination>>();
            metrics.record(
                &super::RequestOutcome {
                    method: &method,
                    path: &path,
                    status,
                    duration: started.elapsed(),
                    request_bytes,
                    response_bytes: body_length(&response),
                    denied_by: denied_by.as_deref(),
                    response_flags: flags,
                    destination: destination.as_ref(),
                },
                span,
            );
        }
        Ok(response)
    }

    /// Once both sides have switched protocols (the 101 is on its way to the
    /// client), their bytes are relayed both ways until either ends.
    fn relay_upgraded(&self, client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
        self.upgrades.fetch_add(1, Ordering::Relaxed);
        let relay = tokio::spawn(async move {
            let (client, server) = match tokio::try_join!(client, server) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "upgrade not completed");
                    return;
                }
            };
            let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
            match tokio::io::copy_bidirectional(&mut client, &mut server).await {
                Ok((up, down)) => tracing::debug!(up, down, "upgraded connection ended"),
                Err(error) => tracing::debug!(%error, "upgraded connection failed"),
            }
        });
        self.upgraded.lock().push(relay);
    }

    /// Everything decided locally: `Ok` with the request to forward (path
    /// rewritten), or `Err` with the answer.
    fn check(&self, request: &mut Request<Incoming>) -> Result<(), Refusal> {
        let h1 = self.protocol == Protocol::Http1;
        // Extended CONNECT (RFC 8441, WebSocket over HTTP/2) names a path
        // and is decided like a request; a plain CONNECT has none.
        if request.method() == Method::CONNECT
            && !(is_extended_connect(request) && self.forwarder.relays_upgrades())
        {
            tracing::debug!("CONNECT refused");
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "Not Implemented",
                h1,
            ));
        }
        let host = match request_host(request.uri(), request.headers()) {
            Ok(host) => host,
            Err(reason) => {
                tracing::debug!(reason, "bad request authority");
                self.bad_requests.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::new(StatusCode::BAD_REQUEST, "Bad Request", h1));
            }
        };
        let path = match (self.normalize)(request.uri().path()) {
            Ok(path) => path,
            Err(reason) => {
                tracing::debug!(reason, raw = request.uri().path(), "path rejected");
                self.bad_requests.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::new(StatusCode::BAD_REQUEST, "Bad Request", h1));
            }
        };
        let query = request.uri().query().map(str::to_owned);
        let auth = match self
            .authorizer
            .authenticate(request.headers_mut(), query.as_deref())
        {
            Ok(auth) => auth,
            Err(unauthenticated) => {
                tracing::debug!(
                    method = %request.method(),
                    host,
                    path,
                    reason = %unauthenticated,
                    "request unauthenticated"
                );
                self.denied.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::unauthenticated(unauthenticated));
            }
        };
        // An extended CONNECT is decided as the HTTP/1.1 upgrade it stands
        // for, a GET (as Envoy's codec presents it to Istio's RBAC): one
        // policy allows WebSocket over either version.
        let method = if is_extended_connect(request) {
            "GET"
        } else {
            request.method().as_str()
        };
        let verdict = self.authorizer.authorize(&RequestInfo {
            method,
            host: &host,
            path: &path,
            query: request.uri().query(),
            headers: request.headers(),
            auth: auth.as_deref(),
        });
        match verdict {
            Verdict::Allow => {}
            Verdict::Deny { reason } => {
                tracing::debug!(
                    method = %request.method(),
                    host,
                    path,
                    reason,
                    "request denied"
                );
                self.denied.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::denied(reason));
            }
            Verdict::Limited {
                by,
                limit,
                retry_after,
            } => {
                tracing::debug!(method = %request.method(), host, path, by, "request over its rate limit: 429");
                self.denied.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::limited(by, limit, retry_after));
            }
        }
        if h1 && !strip_h2c_upgrade(request.headers_mut()) && !self.forwarder.relays_upgrades() {
            tracing::debug!("upgrade refused: not relayed on this path");
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "Not Implemented",
                false,
            ));
        }
        match rewrite_path(request.uri(), &path) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(reason) => {
                tracing::debug!(reason, path, "normalised path unusable");
                self.bad_requests.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::new(StatusCode::BAD_REQUEST, "Bad Request", h1));
            }
        }
        Ok(())
    }
}

/// How much of a refused HTTP/2 request's body is read, and for how long,
/// so its stream ends cleanly instead of being reset.
const DRAIN_BYTES: u64 = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards the body of a request answered here, before the
/// answer leaves. An answer that reaches an HTTP/2 client still sending
/// makes common clients (curl) end the body short with END_STREAM; the
/// body then no longer matches its `Content-Length`, which RFC 9113 §8.1.1
/// makes a malformed request, and the stream is reset with PROTOCOL_ERROR
/// after the 403 was sent: the client reports an error instead of the 403.
/// Bounded by [`DRAIN_BYTES`] and [`DRAIN_TIME`]: a larger or slower body
/// is answered then, and the rest is drained in the background (see
/// [`drain_in_background`]).
async fn drain_refused_body(body: Incoming) {
    use hyper::body::Body;
    if body.is_end_stream() {
        return;
    }
    let mut body = body;
    let mut read = 0u64;
    let ended = tokio::time::timeout(DRAIN_TIME, drain(&mut body, &mut read)).await;
    if !matches!(ended, Ok(true)) {
        drain_in_background(body);
    }
}

/// Reads `body` until it ends (true) or more than [`DRAIN_BYTES`] were
/// read in all (false).
async fn drain(body: &mut Incoming, read: &mut u64) -> bool {
    use http_body_util::BodyExt;
    while *read <= DRAIN_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => *read += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => return true,
        }
    }
    false
}

/// Keeps reading a refused body once the answer is on its way, so the
/// stream is not cancelled under it; dropped after [`DRAIN_BYTES`] more or
/// [`DRAIN_TIME`], when HTTP/2 ends the stream with RST_STREAM(NO_ERROR)
/// (RFC 9113 §8.1: the client stops sending, without error).
fn drain_in_background(body: Incoming) {
    tokio::spawn(async move {
        let mut body = body;
        let mut read = 0u64;
        let _ = tokio::time::timeout(DRAIN_TIME, drain(&mut body, &mut read)).await;
    });
}

/// The answer to a HEAD carries no body (RFC 9110 §9.3.2); its
/// `Content-Length` says what a GET would get. hyper's HTTP/2 server does
/// not know the request was a HEAD: an answer made here would be sent as
/// DATA, and an application's (whose `Content-Length` promises bytes that
/// never come) would end in a reset. Clients reject both.
fn without_body(response: &mut Response<ResponseBody>) {
    use hyper::body::Body;
    if let Either::Right(full) = response.body() {
        let length = full.size_hint().exact().unwrap_or(0);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    *response.body_mut() = Either::Right(Full::new(Bytes::new()));
}

/// The bytes of a response body: its `Content-Length`, else its exact size
/// when known (an answer made here), else 0 (a streamed body).
fn body_length(response: &Response<ResponseBody>) -> u64 {
    use hyper::body::Body;
    match response.headers().get(header::CONTENT_LENGTH) {
        Some(_) => content_length(response.headers()),
        None => response.body().size_hint().exact().unwrap_or(0),
    }
}

/// A body's declared length (0 when not declared).
fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A local answer to a request that is not forwarded.
struct Refusal {
    status: StatusCode,
    body: &'static str,
    close: bool,
    /// The policy (rule) that denied the request, for a 403 (or 429).
    denied_by: Option<String>,
    /// For a 429: the limit (requests a second) and when to come back.
    limited: Option<(u32, std::time::Duration)>,
}

impl Refusal {
    fn new(status: StatusCode, body: &'static str, close: bool) -> Self {
        Self {
            status,
            body,
            close,
            denied_by: None,
            limited: None,
        }
    }

    /// 429 ([`too_many_requests`]).
    fn limited(by: String, limit: u32, retry_after: std::time::Duration) -> Self {
        Self {
            denied_by: Some(by),
            limited: Some((limit, retry_after)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", false)
        }
    }

    fn denied(by: String) -> Self {
        Self {
            denied_by: Some(by),
            ..Self::new(StatusCode::FORBIDDEN, DENIED_BODY, false)
        }
    }

    /// 401 for a token that fails (Envoy's answer: the reason is logged,
    /// the client gets `WWW-Authenticate`).
    fn unauthenticated(why: crate::policy::Unauthenticated) -> Self {
        Self {
            denied_by: Some(format!("RequestAuthentication: {why}")),
            ..Self::new(StatusCode::UNAUTHORIZED, UNAUTHENTICATED_BODY, false)
        }
    }

    fn into_response(self) -> Response<ResponseBody> {
        if let Some((limit, retry_after)) = self.limited {
            return too_many_requests(limit, retry_after);
        }
        let mut response = local_response(self.status, self.body, self.close);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE_INVALID_TOKEN),
            );
        }
        response
    }
}

/// `429 Too Many Requests` for a request over a rate limit of `limit`
/// requests a second: `Retry-After` (whole seconds, at least 1) and the
/// rate-limit headers of the IETF draft most clients read
/// (`RateLimit-Limit`, `-Remaining`, `-Reset`); response flag `RL`.
pub fn too_many_requests(limit: u32, retry_after: std::time::Duration) -> Response<ResponseBody> {
    let mut response = local_response(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", false);
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
    headers.insert("ratelimit-reset", HeaderValue::from(seconds));
    response.extensions_mut().insert(super::ResponseFlags("RL"));
    response
}

/// A local answer: `text/plain` `body`; `close` asks an HTTP/1 client to
/// close the connection (never set on HTTP/2, where it is illegal).
pub fn local_response(
    status: StatusCode,
    body: &'static str,
    close: bool,
) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The request's authority: the URI's (HTTP/2 `:authority`, HTTP/1
/// absolute-form) or else the `Host` header; empty if neither. Several `Host`
/// fields, a non-visible-ASCII one, or one disagreeing with the URI authority
/// are errors, so the authorizer and the application cannot see different
/// hosts.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<String, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("several Host headers");
    }
    let host = match host {
        Some(value) => Some(value.to_str().map_err(|_| "Host header not ASCII")?),
        None => None,
    };
    match (uri.authority(), host) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host) => {
            Err("Host header disagrees with the request authority")
        }
        (Some(authority), _) => Ok(authority.as_str().to_owned()),
        (None, Some(host)) => Ok(host.to_owned()),
        (None, None) => Ok(String::new()),
    }
}

/// `uri` with its path replaced by `path`, the query kept.
fn rewrite_path(uri: &Uri, path: &str) -> Result<Uri, String> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let path_and_query = PathAndQuery::try_from(path_and_query).map_err(|e| e.to_string())?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Upgrade` other
/// than `h2c`, which is removed before this is asked).
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// Whether an HTTP/2 request is an extended CONNECT (`:protocol`, RFC 8441).
pub(super) fn is_extended_connect<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT
        && request.extensions().get::<hyper::ext::Protocol>().is_some()
}

/// Handles an HTTP/1.1 `Upgrade` offer. No offer, or only `h2c` (which the
/// server may ignore): removes the offer and returns true. Any other
/// protocol (WebSocket, ...): returns false, the request is refused.
fn strip_h2c_upgrade(headers: &mut HeaderMap) -> bool {
    if !headers.contains_key(header::UPGRADE) {
        return true;
    }
    let only_h2c = headers.get_all(header::UPGRADE).iter().all(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .all(|token| token.eq_ignore_ascii_case("h2c"))
        })
    });
    if !only_h2c {
        return false;
    }
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    // Drop the `upgrade` and `http2-settings` connection options.
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty()
                && !token.eq_ignore_ascii_case("upgrade")
                && !token.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::CONNECTION);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::try_from(kept.join(", "))
    {
        headers.insert(header::CONNECTION, value);
    }
    true
}
