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
//! Each layer is a `tower::Layer`; the stack is built per request (a few
//! `Arc` clones) around the forwarder's attempts.

pub mod fault;
pub mod filters;
pub mod mirroring;
pub mod pool;

use std::{convert::Infallible, sync::Arc};

use futures_util::future::BoxFuture;
use hyper::{
    Response,
    body::{Bytes, Incoming},
    header::HeaderMap,
    http::request::Parts,
};
use tower::{Service, ServiceBuilder};

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

/// The pipeline around `attempts`.
pub fn stack<S>(
    ctx: &Arc<ProxyContext>,
    source: &Arc<PodHandle>,
    attempts: S,
) -> impl Service<Exchange, Response = Answer, Error = Infallible, Future = Pending>
where
    S: Service<Prepared, Response = Answer, Error = Infallible, Future = Pending>
        + Clone
        + Send
        + 'static,
{
    ServiceBuilder::new()
        .layer(filters::FiltersLayer)
        .layer(fault::FaultLayer)
        .layer(pool::PoolLayer)
        .layer(mirroring::MirroringLayer {
            ctx: ctx.clone(),
            source: source.clone(),
        })
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
