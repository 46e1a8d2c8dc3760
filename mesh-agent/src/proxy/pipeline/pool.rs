//! A DestinationRule's connection pool as a circuit breaker: when the
//! requests in flight to the service port are at its bound, the request is
//! answered at once with Envoy's overflow (`503`, flag `UO`) and the
//! endpoints never see it; otherwise its place is held until its answer's
//! head.

use hyper::StatusCode;
use tower::ServiceExt;

use super::{Exchange, Next, Pending, Stage, flagged};
use crate::l7::local_response;

#[derive(Debug, Clone, Copy)]
pub struct CircuitBreaker;

impl Stage<Exchange> for CircuitBreaker {
    type Passes = Exchange;

    fn run<S: Next<Exchange>>(self, exchange: Exchange, next: S) -> Pending {
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
            let answer = next.oneshot(exchange).await;
            drop(in_flight);
            answer
        })
    }
}
