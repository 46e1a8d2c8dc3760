//! Per-request balancing of a service's HTTP port: every request a client
//! sends to the service address is given to an endpoint chosen for it (power
//! of two choices over peak-EWMA latency, locality, subsets, ejection), over
//! pooled connections ([`super::http_pool`]).
//!
//! Per request:
//! 1. the routes attached to the port say where it goes (a rule's backend,
//!    by weight) or answer it here: a redirect, `404` (`NR`), `500` (`NC`);
//! 2. the request pipeline ([`super::pipeline`], tower layers): the route's
//!    filters, fault injection, the connection pool's circuit breaker, the
//!    body made replayable and copied to mirrors;
//! 3. its attempts, bounded by the route's timeout (`timeouts.request`,
//!    `routes[].timeout`, else `requestTimeout`; `504` when it passes, the
//!    attempt in flight counting as a failure of its endpoint): an
//!    endpoint is picked (one the request already failed on is avoided; by
//!    the consistent hash's key if any); none at all: `503 no healthy
//!    upstream` at once, counted;
//! 4. an endpoint on this node: the request is authorized here by that pod's
//!    policies (a remote endpoint's own agent does it): denied → `403`;
//! 5. the request goes out; its outcome (status, connect failure, reset) and
//!    latency to the response head feed the balancer;
//! 6. a request that can be sent again (bodiless, or read whole for a
//!    route's retry) is retried on another endpoint by the route's retry
//!    policy, else on a connect failure or `503` if idempotent, up to the
//!    attempts allowed and only while `maxRetries` and the retry budget
//!    allow; otherwise the client gets what the endpoint said (or `503` for
//!    a connect failure, `502` for a failure after sending).

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Either, Full};
use hyper::{
    Request, Response, StatusCode, Version,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderValue},
    http::{request::Parts, uri::Uri},
};

use tokio::net::TcpStream;
use tower::ServiceExt;

use super::{
    authz,
    context::ProxyContext,
    counted::Counted,
    deliver::{http_outcome, normalize_path},
    finish::reset,
    http_pool::{BoxIo, PoolKey, SendError, Sent, UpstreamBody},
    mirror::{MirrorResult, MirrorTarget},
    outcome::Outcome as ConnectionOutcome,
    pipeline::{self, Exchange, FromEndpoint, Prepared, RequestBody, Routing, flagged},
    pod::PodHandle,
};
use crate::{
    balance::rng::{Rng, ThreadRng},
    balance::{Outcome, hash_key, retryable},
    config::HashKey,
    l7::{
        self, Authorizer, Destination, Forward, L7Error, Protocol, RequestInfo, ResponseBody,
        Verdict, local_response,
    },
    routes::Routed,
    services::{PortProtocol, RequestPick, ServicePortEntry},
    spans::SpanSide,
};

/// Serves a client connection to a service's HTTP port: each request goes
/// to an endpoint of its own. The policies that apply are the endpoints':
/// decided here for endpoints on this node, by their node's agent for the
/// others. A client that does not speak HTTP to an HTTP port is reset.
pub async fn serve(
    ctx: &Arc<ProxyContext>,
    downstream: Counted<TcpStream>,
    source: Arc<PodHandle>,
    service: Arc<ServicePortEntry>,
) -> ConnectionOutcome {
    let forwarder = Arc::new(ServiceForwarder {
        ctx: ctx.clone(),
        source: source.clone(),
        service: service.clone(),
    });
    // Each request is reported by this node as the source's; the
    // destination is the endpoint chosen for it (see `ServiceForwarder`).
    let request_metrics = ctx.request_telemetry(
        [
            "source".to_string(),
            source.workload_name(),
            source.workload.namespace.clone(),
            source.identity.to_string(),
            "unknown".to_string(),
            "unknown".to_string(),
            "unknown".to_string(),
            service_host(&service.config),
        ],
        "unknown",
        SpanSide::Client,
    );
    let options = ctx.l7_options(request_metrics);
    match l7::serve_with(
        downstream,
        forwarder,
        Arc::new(l7::AllowAll),
        normalize_path,
        options,
    )
    .await
    {
        Ok(stats) => http_outcome(&stats),
        Err(L7Error::NotHttp(not_http)) => {
            tracing::warn!(pod = %source.key, service = %service.key, reason = %not_http.reason, "not HTTP on an HTTP service port; reset");
            if let Ok((_, downstream)) = not_http.into_parts::<Counted<TcpStream>>() {
                reset(downstream.into_inner());
            }
            ConnectionOutcome::NotHttpOnHttpPort(service.key.clone())
        }
        Err(err) => ConnectionOutcome::HttpEnded(err.to_string()),
    }
}

/// A service's name as Istio's `destination_service` label gives it.
pub fn service_host(service: &crate::config::ServiceConfig) -> String {
    format!("{}.{}.svc.cluster.local", service.name, service.namespace)
}

/// Sends each request of one client connection to an endpoint of `service`.
#[derive(Clone)]
pub struct ServiceForwarder {
    pub ctx: Arc<ProxyContext>,
    /// The client's pod: its identity and namespace are used upstream.
    pub source: Arc<PodHandle>,
    pub service: Arc<ServicePortEntry>,
}

impl Forward for ServiceForwarder {
    fn forward(
        &self,
        request: Request<Incoming>,
        downstream: Protocol,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        Box::pin(self.serve(request, downstream == Protocol::Http1))
    }
}

/// One attempt's claim on its endpoint; if the request is dropped (the
/// client went away) the claim is released without an outcome.
struct Attempt<'a> {
    service: &'a ServicePortEntry,
    pick: Option<RequestPick>,
    started: Instant,
}

impl Attempt<'_> {
    /// A failure's latency runs from the attempt's start.
    fn finish(mut self, outcome: Outcome) {
        if let Some(pick) = self.pick.take() {
            self.service
                .finish_request(pick, self.started.elapsed(), outcome);
        }
    }

    /// A response's latency runs from `since`, when the request left on a
    /// ready connection; the first response on a new connection is no
    /// sample (the far side may have been setting up for it).
    fn finish_sent(mut self, since: Instant, fresh_connection: bool, outcome: Outcome) {
        if let Some(pick) = self.pick.take() {
            if fresh_connection {
                self.service.finish_request_unsampled(pick, outcome);
            } else {
                self.service.finish_request(pick, since.elapsed(), outcome);
            }
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(pick) = self.pick.take() {
            self.service.cancel_request(pick);
        }
    }
}

impl ServiceForwarder {
    /// One request: routed, then through the pipeline (`super::pipeline`)
    /// to its attempts. The answer is marked with the endpoint that gave it
    /// (the last one tried) for the request's metrics and span.
    async fn serve(&self, request: Request<Incoming>, h1: bool) -> Response<ResponseBody> {
        let routing = match self.route(&request) {
            Ok(routing) => Arc::new(routing),
            Err(refusal) => return refusal.into_response(h1),
        };
        // The route's request timeout (`0s`: none), else the service's;
        // from now, so that it bounds every stage below.
        let deadline = match routing.timeouts().request {
            Some(timeout) if timeout.is_zero() => None,
            Some(timeout) => Some(timeout),
            None => routing.service.config.timeout_for(request.uri().path()),
        }
        .map(|timeout| tokio::time::Instant::now() + timeout);
        let (parts, body) = request.into_parts();
        let exchange = Exchange {
            parts,
            body,
            routing,
            h1,
            deadline,
        };
        let pipeline = pipeline::stack(&self.ctx, &self.source, Attempts(self.clone()));
        match pipeline.oneshot(exchange).await {
            Ok(answer) => answer,
            Err(never) => match never {},
        }
    }

    /// The attempts of a request at the endpoints of its service port: the
    /// first, then retries (the route's policy, else the service's) while
    /// the request can be sent again, `maxRetries` and the retry budget
    /// allow; each ending by the request's deadline or sooner the route's
    /// `backendRequest` timeout.
    async fn attempts(&self, prepared: Prepared) -> Response<ResponseBody> {
        let Prepared {
            parts,
            body,
            routing,
            h1,
            deadline,
        } = prepared;
        let service = &*routing.service;
        let backend_timeout = routing.timeouts().backend_request.filter(|t| !t.is_zero());
        let route_retry = routing.retry().cloned();
        let (mut body, buffered) = match body {
            RequestBody::Streamed(body) => (Some(body), None),
            RequestBody::Replayable(bytes) => (None, Some(bytes)),
        };
        let replayable = buffered.is_some();
        service.record_request();
        let mut tried: Vec<Arc<str>> = Vec::new();
        let (hash, set_cookie) = self.request_hash(service, &parts);
        // The place of the retry in flight, held until this request is answered.
        let mut _retry_slot = None;
        loop {
            let request_body = if let Some(bytes) = &buffered {
                Either::Right(Full::new(bytes.clone()))
            } else {
                match body.take() {
                    Some(body) => Either::Left(body),
                    None => unreachable!("a request with a body is sent once"),
                }
            };
            // This attempt's end: the request's deadline, or sooner the
            // route's `backendRequest` timeout.
            let attempt_deadline = match (deadline, backend_timeout) {
                (deadline, None) => deadline,
                (None, Some(timeout)) => Some(tokio::time::Instant::now() + timeout),
                (Some(deadline), Some(timeout)) => {
                    Some(deadline.min(tokio::time::Instant::now() + timeout))
                }
            };
            let (id, outcome, response, destination) = match self
                .attempt(
                    service,
                    &parts,
                    request_body,
                    (&tried, hash),
                    attempt_deadline,
                )
                .await
            {
                Tried::NoEndpoint => {
                    return flagged(
                        local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", h1),
                        "UH",
                    );
                }
                Tried::Refused(refusal, id, destination) => {
                    return answered_by(refusal.into_response(&service.key, &id), destination);
                }
                Tried::TimedOut(destination) => {
                    return answered_by(
                        flagged(
                            local_response(
                                StatusCode::GATEWAY_TIMEOUT,
                                "upstream request timeout",
                                h1,
                            ),
                            "UT",
                        ),
                        destination,
                    );
                }
                Tried::Sent {
                    id,
                    outcome,
                    response,
                    destination,
                } => (id, outcome, response, destination),
            };
            // The route's retry policy, else the service's: idempotent
            // requests on connect failure or 503.
            let retry = replayable
                && match &route_retry {
                    Some(policy) => {
                        let code =
                            matches!(outcome, Outcome::Status(s) if policy.codes.contains(&s));
                        (code || matches!(outcome, Outcome::ConnectFailed))
                            && tried.len() < policy.attempts as usize
                    }
                    None => {
                        retryable(parts.method.as_str(), &outcome)
                            && tried.len() < service.config.retries.attempts as usize
                    }
                };
            // Under a DestinationRule's `maxRetries` (held until this
            // request is answered), then the retry budget.
            let retry = match retry.then(|| service.admit_retry()).flatten() {
                Some(slot) if service.try_retry() => {
                    _retry_slot = Some(slot);
                    true
                }
                _ => false,
            };
            if retry {
                tracing::debug!(service = %service.key, endpoint = %id, ?outcome, "retrying on another endpoint");
                tried.push(id);
                if let Some(backoff) = route_retry
                    .as_ref()
                    .map(|p| p.backoff)
                    .filter(|b| !b.is_zero())
                {
                    // Never past the request's deadline: the next attempt
                    // then times out at once (504).
                    let until = tokio::time::Instant::now() + backoff;
                    tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
                }
                continue;
            }
            let answer = match (response, outcome) {
                (Some(mut response), _) => {
                    if let Some(cookie) = set_cookie {
                        response
                            .headers_mut()
                            .append(http::header::SET_COOKIE, cookie);
                    }
                    response.extensions_mut().insert(FromEndpoint);
                    response.map(Either::Left)
                }
                (None, Outcome::ConnectFailed) => flagged(
                    local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error",
                        h1,
                    ),
                    "UF",
                ),
                (None, _) => flagged(
                    local_response(StatusCode::BAD_GATEWAY, "upstream reset", h1),
                    "UC",
                ),
            };
            return answered_by(answer, destination);
        }
    }

    /// A DestinationRule's consistent hash: the key of this request, and
    /// the cookie to set when the key is one made up for it.
    fn request_hash(
        &self,
        service: &ServicePortEntry,
        parts: &Parts,
    ) -> (Option<u64>, Option<HeaderValue>) {
        let Some(hash_by) = &service.config.hash_by else {
            return (None, None);
        };
        match hash_by {
            HashKey::Header(name) => (
                parts
                    .headers
                    .get(name.as_str())
                    .map(|v| hash_key(v.as_bytes())),
                None,
            ),
            HashKey::QueryParameter(name) => (
                form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| hash_key(v.as_bytes())),
                None,
            ),
            HashKey::SourceIp => {
                let ip = self
                    .source
                    .addr_like(std::net::Ipv4Addr::UNSPECIFIED.into());
                (Some(hash_key(ip.to_string().as_bytes())), None)
            }
            HashKey::Cookie { name, path, ttl } => {
                let sent = parts
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(cookie::Cookie::split_parse)
                    .filter_map(Result::ok)
                    .find(|c| c.name() == name);
                if let Some(sent) = sent {
                    return (Some(hash_key(sent.value().as_bytes())), None);
                }
                let Some(ttl) = ttl else {
                    return (None, None);
                };
                let value = format!("{:016x}", ThreadRng.next_u64());
                let mut made = cookie::Cookie::build((name.clone(), value.clone()))
                    .path(path.clone().unwrap_or_else(|| "/".into()))
                    .http_only(true);
                if !ttl.is_zero() {
                    let seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
                    made = made.max_age(cookie::time::Duration::seconds(seconds));
                }
                (
                    Some(hash_key(value.as_bytes())),
                    HeaderValue::from_str(&made.build().to_string()).ok(),
                )
            }
        }
    }

    /// One attempt of a request at an endpoint of `service` (one not in
    /// `avoid`, by the consistent hash `key` if any), ending by `deadline`:
    /// its outcome reported to the balancer.
    async fn attempt(
        &self,
        service: &ServicePortEntry,
        parts: &Parts,
        body: UpstreamBody,
        (avoid, key): (&[Arc<str>], Option<u64>),
        deadline: Option<tokio::time::Instant>,
    ) -> Tried {
        let pick = match service.pick_request(avoid, key) {
            Ok(pick) => pick,
            Err(err) => {
                tracing::warn!(pod = %self.source.key, service = %service.key, error = format!("{err:#}"), "no endpoint for the service: 503");
                return Tried::NoEndpoint;
            }
        };
        let (id, addr, peer) = (pick.id.clone(), pick.addr, pick.peer.clone());
        let attempt = Attempt {
            service,
            pick: Some(pick),
            started: Instant::now(),
        };
        // The snapshot in force for this request: where the endpoint
        // is, and whose policies decide it.
        let snapshot = self.ctx.snapshot();
        let target = snapshot.local_pod(addr.ip()).cloned();
        let known_peer = snapshot.remote_peer(addr.ip()).cloned();
        let destination = snapshot.destination(addr.ip()).cloned();
        // Not held while the request is out: it holds every pod of its
        // generation.
        drop(snapshot);
        let edited_headers = match &target {
            Some(target) => match self.authorize_local(target, parts, addr) {
                Ok(edited) => edited,
                Err(refusal) => {
                    drop(attempt);
                    return Tried::Refused(refusal, id, destination);
                }
            },
            None => None,
        };
        let http2 = service.protocol == PortProtocol::Http2;
        let upstream_request = upstream_request(parts, edited_headers, body, http2, addr);
        // The identity the connection will verify, decided now so the
        // pool key says which connections may serve this request.
        let peer = match &target {
            Some(_) => None,
            None => peer.or(known_peer),
        };
        let key = PoolKey {
            source_pod: self.source.key.clone(),
            endpoint: addr,
            peer_identity: peer.as_ref().map(|p| p.identity.to_string()),
            http2,
        };
        let connect_timeout = service.config.connect_timeout;
        let connect = || self.connect(addr, target.clone(), peer.clone(), connect_timeout);
        let sent = self.ctx.http_pool.send(
            &key,
            connect,
            upstream_request,
            super::http_pool::RequestsPerConnection(service.config.max_requests_per_connection),
        );
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
                Ok(result) => result,
                Err(_) => {
                    attempt.finish(Outcome::Failed);
                    service.count_timeout();
                    tracing::info!(service = %service.key, endpoint = %id, path = parts.uri.path(), "request timed out: 504");
                    return Tried::TimedOut(destination);
                }
            },
            None => sent.await,
        };
        let (outcome, response) = match result {
            Ok(Sent {
                response,
                dispatched,
                fresh_connection,
            }) => {
                let outcome = Outcome::Status(response.status().as_u16());
                attempt.finish_sent(dispatched, fresh_connection, outcome);
                (outcome, Some(response))
            }
            Err(SendError::Connect(err)) => {
                tracing::info!(service = %service.key, endpoint = %id, %addr, error = format!("{err:#}"), "endpoint connect failed");
                attempt.finish(Outcome::ConnectFailed);
                (Outcome::ConnectFailed, None)
            }
            Err(err) => {
                tracing::info!(service = %service.key, endpoint = %id, %addr, error = %err, "request to the endpoint failed");
                attempt.finish(Outcome::Failed);
                (Outcome::Failed, None)
            }
        };
        Tried::Sent {
            id,
            outcome,
            response,
            destination,
        }
    }

    /// A copy of a request for a mirror `service` (fire-and-forget: one
    /// attempt, bounded by the service's request timeout, its answer read
    /// and dropped).
    pub(super) async fn send_copy(&self, parts: &Parts, body: Bytes) -> MirrorResult {
        let service = &*self.service;
        let timeout = service.config.request_timeout;
        let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
        let body = Either::Right(Full::new(body));
        let (key, _) = self.request_hash(service, parts);
        match self
            .attempt(service, parts, body, (&[], key), deadline)
            .await
        {
            Tried::NoEndpoint => MirrorResult::NoEndpoint,
            Tried::Refused(..) => MirrorResult::Denied,
            Tried::TimedOut(_) => MirrorResult::Failed,
            Tried::Sent {
                response: Some(response),
                ..
            } => {
                // Read to the end, bounded by the same deadline, so that
                // the pooled connection can serve again.
                let drain = response.into_body().collect();
                match deadline {
                    Some(deadline) => {
                        let _ = tokio::time::timeout_at(deadline, drain).await;
                    }
                    None => {
                        let _ = drain.await;
                    }
                }
                MirrorResult::Sent
            }
            Tried::Sent { response: None, .. } => MirrorResult::Failed,
        }
    }

    /// Where a request goes: the service port it was sent to, or, when
    /// routes are attached to that one, the backend of the rule it matches
    /// (by weight), with the rule's filters and timeouts. Answered here:
    /// a redirect; `404` (flag `NR`) when routes are attached and none
    /// matches; `500` (flag `NC`) when the rule's backend cannot be served
    /// (none with a weight, not a known HTTP port).
    fn route(&self, request: &Request<Incoming>) -> Result<Routing, RouteRefusal> {
        let snapshot = self.ctx.snapshot();
        let routed = snapshot.routes.route(
            &self.service.key,
            &self.source.workload.namespace,
            request.method(),
            request.uri(),
            request.headers(),
        );
        let rule = match routed {
            None => {
                return Ok(Routing {
                    service: self.service.clone(),
                    rule: None,
                    mirrors: Vec::new(),
                });
            }
            Some(Routed::NoMatch) => return Err(RouteRefusal::NoMatch),
            Some(Routed::Rule(rule)) => rule,
        };
        if let Some(redirect) = &rule.rule().filters.redirect {
            let host = l7::request_host(request.uri(), request.headers()).unwrap_or_default();
            let (status, location) = redirect.location(request.uri(), &host, rule.matched_prefix());
            return Err(RouteRefusal::Redirect(status, location));
        }
        let backend = rule.rule().pick(ThreadRng.next_u64());
        let requested_port = self
            .service
            .key
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(0);
        let entry = backend
            .and_then(|b| rule.rule().backends[b].backend.key_for(requested_port))
            .and_then(|key| snapshot.services.by_key(&key))
            .filter(|entry| entry.protocol != PortProtocol::Tcp);
        match (entry, backend) {
            (Some(entry), Some(backend)) => {
                let mirrors = rule
                    .rule()
                    .filters
                    .mirrors
                    .iter()
                    .filter(|m| m.samples(ThreadRng.next_u64()))
                    .map(|m| {
                        // A mirror without a port: the port the request
                        // was sent to (Istio's).
                        let key = m.backend.key_for(requested_port);
                        let entry = key
                            .as_deref()
                            .and_then(|key| snapshot.services.by_key(key))
                            .filter(|entry| entry.protocol != PortProtocol::Tcp);
                        match entry {
                            Some(entry) => MirrorTarget::Service(entry.clone()),
                            None => MirrorTarget::Unresolved(
                                key.map_or_else(|| "-".to_string(), |k| k.into_owned()),
                            ),
                        }
                    })
                    .collect();
                Ok(Routing {
                    service: entry.clone(),
                    rule: Some((rule, backend)),
                    mirrors,
                })
            }
            _ => {
                let chosen = backend.map(|b| &rule.rule().backends[b].backend);
                tracing::warn!(service = %self.service.key, route = %rule.route(), backend = ?chosen, "the route's backend cannot be served: 500");
                Err(RouteRefusal::NoBackend)
            }
        }
    }

    /// A request to an endpoint on this node is decided here, by that pod's
    /// policies (its JWT check, then its authorization), with the client
    /// pod's identity. `Ok(Some(headers))`: the JWT check edited the
    /// headers (a copy: a retry on another endpoint starts from the request
    /// as received).
    fn authorize_local(
        &self,
        target: &PodHandle,
        parts: &Parts,
        addr: SocketAddr,
    ) -> Result<Option<HeaderMap>, LocalRefusal> {
        let source_ip = self.source.addr_like(addr.ip());
        let authorizer = authz::ConnectionAuthorizer {
            authorizer: self.ctx.authorizer.clone(),
            snapshots: self.ctx.snapshots(),
            pod: target.key.clone(),
            workload: target.workload.clone(),
            source: Some(self.source.identity.clone()),
            source_ip,
            remote_ip: source_ip,
            destination: addr,
        };
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let (edited, auth) = if authorizer.checks_jwt() {
            let mut headers = parts.headers.clone();
            let auth =
                crate::l7::Authorizer::authenticate(&authorizer, &mut headers, parts.uri.query())
                    .map_err(LocalRefusal::Unauthenticated)?;
            (Some(headers), auth)
        } else {
            (None, None)
        };
        match authorizer.authorize(&RequestInfo {
            method: parts.method.as_str(),
            host,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: edited.as_ref().unwrap_or(&parts.headers),
            auth: auth.as_deref(),
        }) {
            Verdict::Allow => Ok(edited),
            Verdict::Deny { reason } => Err(LocalRefusal::Denied(reason)),
            Verdict::Limited {
                by,
                limit,
                retry_after,
            } => Err(LocalRefusal::Limited(by, limit, retry_after)),
        }
    }

    /// A new connection to endpoint `addr`: inside its pod if it is on this
    /// node, through the mTLS tunnel to `peer` if it is a mesh workload
    /// elsewhere, else straight from the client's pod.
    async fn connect(
        &self,
        addr: SocketAddr,
        local: Option<Arc<PodHandle>>,
        peer: Option<Arc<crate::mtls::RemotePeer>>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<BoxIo> {
        let connect = async {
            Ok::<BoxIo, anyhow::Error>(if let Some(target) = local {
                let client = self.source.addr_like(addr.ip());
                Box::new(self.ctx.dial.into_pod(&target, addr, client).await?)
            } else if let Some(peer) = peer {
                Box::new(self.ctx.dial.tunnel(&self.source, &peer, addr).await?)
            } else {
                Box::new(self.ctx.dial.from_pod(&self.source, addr).await?)
            })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .with_context(|| format!("connecting to {addr}: no connection after {timeout:?}"))?
    }
}

/// The pipeline's innermost service: the forwarder's attempts.
#[derive(Clone)]
struct Attempts(ServiceForwarder);

impl tower::Service<Prepared> for Attempts {
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = pipeline::Pending;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, prepared: Prepared) -> pipeline::Pending {
        let forwarder = self.0.clone();
        Box::pin(async move { Ok(forwarder.attempts(prepared).await) })
    }
}

/// `answer`, marked with the endpoint that gave it, if one did.
fn answered_by(
    mut answer: Response<ResponseBody>,
    destination: Option<Arc<Destination>>,
) -> Response<ResponseBody> {
    if let Some(destination) = destination {
        answer.extensions_mut().insert(destination);
    }
    answer
}

/// How one attempt went.
enum Tried {
    /// No endpoint to try: `503` (flag `UH`).
    NoEndpoint,
    /// A local endpoint's policies refused it.
    Refused(LocalRefusal, Arc<str>, Option<Arc<Destination>>),
    /// The deadline passed: `504` (flag `UT`).
    TimedOut(Option<Arc<Destination>>),
    /// It went out: the endpoint's answer, or none (connect failure, reset).
    Sent {
        id: Arc<str>,
        outcome: Outcome,
        response: Option<Response<Incoming>>,
        destination: Option<Arc<Destination>>,
    },
}

/// Why a request to a service port with routes is answered here.
enum RouteRefusal {
    /// The rule redirects: this status, to this `Location`.
    Redirect(StatusCode, String),
    /// No rule of the routes attached matches: `404`, flag `NR`.
    NoMatch,
    /// The rule's backend cannot be served: `500`, flag `NC`.
    NoBackend,
}

impl RouteRefusal {
    fn into_response(self, h1: bool) -> Response<ResponseBody> {
        match self {
            RouteRefusal::Redirect(status, location) => {
                let mut response = local_response(status, "", h1);
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                response
            }
            RouteRefusal::NoMatch => flagged(
                local_response(StatusCode::NOT_FOUND, "no route matched", h1),
                "NR",
            ),
            RouteRefusal::NoBackend => flagged(
                local_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no backend for the route",
                    h1,
                ),
                "NC",
            ),
        }
    }
}

/// Why a request to a local endpoint is answered here.
enum LocalRefusal {
    /// 403, by this policy rule.
    Denied(String),
    /// 401: its JWT failed.
    Unauthenticated(crate::policy::Unauthenticated),
    /// 429: over this rate limit (policy, requests a second, retry after).
    Limited(String, u32, std::time::Duration),
}

impl LocalRefusal {
    fn into_response(
        self,
        service: &impl std::fmt::Display,
        endpoint: &impl std::fmt::Display,
    ) -> Response<ResponseBody> {
        let (mut response, by) = match self {
            LocalRefusal::Denied(by) => {
                tracing::debug!(%service, %endpoint, policy = by, "request denied");
                let response = local_response(StatusCode::FORBIDDEN, crate::l7::DENIED_BODY, false);
                (response, by)
            }
            LocalRefusal::Unauthenticated(why) => {
                tracing::debug!(%service, %endpoint, reason = %why, "request unauthenticated");
                let mut response = local_response(
                    StatusCode::UNAUTHORIZED,
                    crate::l7::UNAUTHENTICATED_BODY,
                    false,
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(crate::l7::WWW_AUTHENTICATE_INVALID_TOKEN),
                );
                (response, format!("RequestAuthentication: {why}"))
            }
            LocalRefusal::Limited(by, limit, retry_after) => {
                tracing::debug!(%service, %endpoint, policy = by, "request over its rate limit: 429");
                (crate::l7::too_many_requests(limit, retry_after), by)
            }
        };
        response.extensions_mut().insert(crate::l7::DeniedBy(by));
        response
    }
}

/// The request as sent to an endpoint: the client's method, path, headers
/// and body, in the endpoint's protocol. HTTP/1.1 gets origin-form and a
/// `Host`; HTTP/2 gets the authority in `:authority`. Connection-specific
/// headers stay on the client's connection. `edited` headers in place of
/// the received ones when the JWT check changed them.
fn upstream_request(
    parts: &Parts,
    edited: Option<HeaderMap>,
    body: UpstreamBody,
    http2: bool,
    endpoint: SocketAddr,
) -> Request<UpstreamBody> {
    let mut headers = edited.unwrap_or_else(|| parts.headers.clone());
    strip_connection_headers(&mut headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| endpoint.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let (version, uri) = if http2 {
        headers.remove(header::HOST);
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
            .unwrap_or_else(|_| parts.uri.clone());
        (Version::HTTP_2, uri)
    } else {
        if !headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(&authority)
        {
            headers.insert(header::HOST, host);
        }
        let uri = path.parse().unwrap_or_else(|_| parts.uri.clone());
        (Version::HTTP_11, uri)
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    request
}

/// Removes `Connection`, the headers it names, and the other hop-by-hop
/// headers of the client's connection (RFC 9110 §7.6.1).
fn strip_connection_headers(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in ["connection", "keep-alive", "proxy-connection", "upgrade"] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    fn empty() -> UpstreamBody {
        Either::Right(Full::new(Bytes::new()))
    }

    const ENDPOINT: &str = "10.1.0.7:8080";

    #[test]
    fn an_http2_client_request_to_an_http1_endpoint_gets_origin_form_and_host() {
        let client = parts(
            Request::get("http://web.shop:80/a/b?x=1")
                .version(Version::HTTP_2)
                .header("x-user", "u1")
                .body(())
                .unwrap(),
        );
        let sent = upstream_request(&client, None, empty(), false, ENDPOINT.parse().unwrap());
        assert_eq!(sent.version(), Version::HTTP_11);
        assert_eq!(sent.uri().to_string(), "/a/b?x=1");
        assert_eq!(sent.headers()["host"], "web.shop:80");
        assert_eq!(sent.headers()["x-user"], "u1");
    }

    #[test]
    fn an_http1_client_request_to_an_http2_endpoint_carries_the_host_as_authority() {
        let client = parts(
            Request::post("/submit")
                .header("host", "web.shop")
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("te", "gzip")
                .header("x-end", "2")
                .body(())
                .unwrap(),
        );
        let sent = upstream_request(&client, None, empty(), true, ENDPOINT.parse().unwrap());
        assert_eq!(sent.version(), Version::HTTP_2);
        assert_eq!(sent.uri().to_string(), "http://web.shop/submit");
        assert_eq!(sent.method(), "POST");
        for hop in ["host", "connection", "x-hop", "keep-alive", "te"] {
            assert!(!sent.headers().contains_key(hop), "{hop} forwarded");
        }
        assert_eq!(sent.headers()["x-end"], "2");
    }

    #[test]
    fn a_request_without_any_authority_is_addressed_to_the_endpoint() {
        let client = parts(
            Request::get("/")
                .version(Version::HTTP_10)
                .body(())
                .unwrap(),
        );
        let sent = upstream_request(&client, None, empty(), false, ENDPOINT.parse().unwrap());
        assert_eq!(sent.headers()["host"], ENDPOINT);
        let sent = upstream_request(&client, None, empty(), true, ENDPOINT.parse().unwrap());
        assert_eq!(sent.uri().to_string(), format!("http://{ENDPOINT}/"));
        // `te: trailers` is the one TE value that passes (gRPC needs it).
        let grpc = parts(
            Request::post("/svc/M")
                .header("te", "trailers")
                .body(())
                .unwrap(),
        );
        let sent = upstream_request(&grpc, None, empty(), true, ENDPOINT.parse().unwrap());
        assert_eq!(sent.headers()["te"], "trailers");
    }
}
