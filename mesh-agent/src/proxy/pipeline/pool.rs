//! A DestinationRule's connection pool as a circuit breaker: when the
//! requests in flight to the service port are at its bound, the request is
//! answered at once with Envoy's overflow (`503`, flag `UO`) and the
//! endpoints never see it; otherwise its place is held until its answer's
//! head.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use hyper::StatusCode;
use tower::{Layer, Service, ServiceExt};

use super::{Answer, Exchange, Pending, flagged};
use crate::l7::local_response;

#[derive(Debug, Clone, Copy)]
pub struct PoolLayer;

impl<S> Layer<S> for PoolLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker { inner }
    }
}

#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
}

impl<S> Service<Exchange> for CircuitBreaker<S>
where
    S: Service<Exchange, Response = Answer, Error = Infallible, Future = Pending>
        + Clone
        + Send
        + 'static,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Pending;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, exchange: Exchange) -> Pending {
        let inner = self.inner.clone();
        Box::pin(async move {
            let service = &exchange.routing.service;
            let Some(in_flight) = service.admit_request() else {
                tracing::debug!(service = %service.key, "connection pool full: 503");
                return Ok(flagged(
                    local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                        exchange.h1,
                    ),
                    "UO",
                ));
            };
            let answer = inner.oneshot(exchange).await;
            drop(in_flight);
            answer
        })
    }
}
