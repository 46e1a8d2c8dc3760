//! Istio's fault injection (a VirtualService's `fault`): the delay, then
//! the abort, before the request is mirrored or sent, as Envoy's fault
//! filter does. An abort is answered here (flag `FI`); an endpoint's answer
//! to a delayed request is flagged `DI`.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use tower::{Layer, Service, ServiceExt};

use super::{Answer, Exchange, FromEndpoint, Pending, flagged};
use crate::{
    balance::rng::{Rng, ThreadRng},
    l7::{ResponseFlags, local_response},
};

#[derive(Debug, Clone, Copy)]
pub struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = FaultInjection<S>;
    fn layer(&self, inner: S) -> FaultInjection<S> {
        FaultInjection { inner }
    }
}

#[derive(Clone)]
pub struct FaultInjection<S> {
    inner: S,
}

impl<S> Service<Exchange> for FaultInjection<S>
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
            let Some(fault) = exchange.routing.fault() else {
                return inner.oneshot(exchange).await;
            };
            let delay = fault.delay_for(ThreadRng.next_u64());
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = fault.abort_for(ThreadRng.next_u64()) {
                return Ok(flagged(
                    local_response(status, "fault filter abort", exchange.h1),
                    "FI",
                ));
            }
            let mut answer = inner.oneshot(exchange).await?;
            if delay.is_some() && answer.extensions().get::<FromEndpoint>().is_some() {
                answer.extensions_mut().insert(ResponseFlags("DI"));
            }
            Ok(answer)
        })
    }
}
