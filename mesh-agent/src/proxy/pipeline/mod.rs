//! The request pipeline of a service's HTTP port. Once the route has said
//! where a request goes (`service_http::ServiceForwarder::route`: the rule,
//! its backend, its mirrors, or an answer of its own), the request passes
//! these tower layers, outermost first, and each answer passes them back:
//!
//! 1. [`filters`]: the rule's and the backend's request filters (header
//!    modifiers, URL rewrite) on the way in; their response header filters
//!    on the way out, on the endpoints' answers;
//! 2. [`fault`]: Istio's fault injection: the delay, then the abort (`FI`);
//!    an endpoint's answer to a delayed request is flagged `DI`;
//! 3. [`pool`]: a DestinationRule's connection pool as a circuit breaker:
//!    full, `503` with flag `UO` at once; the place is held until the
//!    answer's head;
//! 4. [`mirroring`]: the body made replayable (read whole) when the route
//!    retries and it fits the replay buffer; copies sent to the mirrors;
//! 5. the attempts (`service_http`): balancing, local authorization,
//!    retries and timeouts, the endpoint's answer.
//!
//! Each stage is a [`Stage`]: what it does with a request given the
//! stages after it, made a `tower::Layer` by [`StageLayer`]; the stack is
//! built per request (a few `Arc` clones) around the forwarder's attempts.

pub mod fault;
pub mod filters;
pub mod mirroring;
pub mod pool;

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use hyper::{
    Response,
    body::{Bytes, Incoming},
    header::HeaderMap,
    http::request::Parts,
};
use tower::{Layer, Service, ServiceBuilder};

use super::{
    context::ProxyContext,
    mirror::{MirrorTarget, TeeBody},
    pod::PodHandle,
};
use crate::{
    l7::{ResponseBody, ResponseFlags},
    routes::{Fault, RetryPolicy, RuleRef, Timeouts},
    services::ServicePortEntry,
};

/// An answer, to the client.
pub type Answer = Response<ResponseBody>;

/// What every stage's future is.
pub type Pending = BoxFuture<'static, Result<Answer, Infallible>>;

/// A request entering the pipeline.
pub struct Exchange {
    pub parts: Parts,
    pub body: Incoming,
    pub routing: Arc<Routing>,
    /// The client speaks HTTP/1 (local answers are shaped for it).
    pub h1: bool,
    /// When the request's timeout passes, if it has one.
    pub deadline: Option<tokio::time::Instant>,
}

/// A request ready for its attempts: its body streamed once, or read
/// whole so that it can be sent again.
pub struct Prepared {
    pub parts: Parts,
    pub body: RequestBody,
    pub routing: Arc<Routing>,
    pub h1: bool,
    pub deadline: Option<tokio::time::Instant>,
}

pub enum RequestBody {
    /// Sent once, as it comes (copied to the mirrors on the way).
    Streamed(TeeBody),
    /// Read whole (or none): may be sent again.
    Replayable(Bytes),
}

/// Marks an answer that came from an endpoint (not made here): the
/// response filters and the `DI` flag apply to those only.
#[derive(Debug, Clone, Copy)]
pub struct FromEndpoint;

/// An answer made here, with Envoy's response flag saying why.
pub fn flagged(mut response: Answer, flags: &'static str) -> Answer {
    response.extensions_mut().insert(ResponseFlags(flags));
    response
}

/// The stages after one, taking `R`.
pub trait Next<R>:
    Service<R, Response = Answer, Error = Infallible, Future = Pending> + Clone + Send + 'static
{
}

impl<R, S> Next<R> for S where
    S: Service<R, Response = Answer, Error = Infallible, Future = Pending> + Clone + Send + 'static
{
}

/// One stage of the pipeline: what it does with a request `R`, given the
/// stages after it.
pub trait Stage<R>: Clone + Send + 'static {
    /// What the stages after it take.
    type Passes;
    fn run<S: Next<Self::Passes>>(self, request: R, next: S) -> Pending;
}

/// A [`Stage`] as a tower layer.
#[derive(Clone)]
pub struct StageLayer<T>(pub T);

impl<T: Clone, S> Layer<S> for StageLayer<T> {
    type Service = Staged<T, S>;
    fn layer(&self, inner: S) -> Staged<T, S> {
        Staged {
            stage: self.0.clone(),
            inner,
        }
    }
}

/// A [`Stage`] in front of the stages after it.
#[derive(Clone)]
pub struct Staged<T, S> {
    stage: T,
    inner: S,
}

impl<R, T: Stage<R>, S: Next<T::Passes>> Service<R> for Staged<T, S> {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pending;

    /// Every stage is always ready: what limits requests answers them.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Pending {
        self.stage.clone().run(request, self.inner.clone())
    }
}

/// The pipeline around `attempts`.
pub fn stack<S: Next<Prepared>>(
    ctx: &Arc<ProxyContext>,
    source: &Arc<PodHandle>,
    attempts: S,
) -> impl Service<Exchange, Response = Answer, Error = Infallible, Future = Pending> {
    ServiceBuilder::new()
        .layer(StageLayer(filters::Filters))
        .layer(StageLayer(fault::FaultInjection))
        .layer(StageLayer(pool::CircuitBreaker))
        .layer(StageLayer(mirroring::Mirroring {
            ctx: ctx.clone(),
            source: source.clone(),
        }))
        .service(attempts)
}

/// Where one request goes: a service port, by the rule (and the backend of
/// it) that sent it there, if routes did.
pub struct Routing {
    pub service: Arc<ServicePortEntry>,
    pub rule: Option<(RuleRef, usize)>,
    /// The rule's mirrors this request is copied to (sampled).
    pub mirrors: Vec<MirrorTarget>,
}

impl Routing {
    pub fn fault(&self) -> Option<&Fault> {
        self.rule
            .as_ref()
            .and_then(|(rule, _)| rule.rule().filters.fault.as_ref())
    }

    pub fn retry(&self) -> Option<&RetryPolicy> {
        self.rule
            .as_ref()
            .and_then(|(rule, _)| rule.rule().retry.as_ref())
    }

    pub fn timeouts(&self) -> Timeouts {
        self.rule
            .as_ref()
            .map(|(rule, _)| rule.rule().timeouts)
            .unwrap_or_default()
    }

    /// The rule's request filters, then the chosen backend's.
    pub fn on_request(&self, parts: &mut Parts) {
        if let Some((rule, backend)) = &self.rule {
            rule.rule().filters.on_request(parts, rule.matched_prefix());
            rule.rule().backends[*backend]
                .filters
                .on_request(parts, None);
        }
    }

    /// The chosen backend's response filters, then the rule's.
    pub fn on_response(&self, headers: &mut HeaderMap) {
        if let Some((rule, backend)) = &self.rule {
            rule.rule().backends[*backend].filters.on_response(headers);
            rule.rule().filters.on_response(headers);
        }
    }
}
