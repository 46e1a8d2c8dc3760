//! Istio's fault injection (a VirtualService's `fault`): the delay, then
//! the abort, before the request is mirrored or sent, as Envoy's fault
//! filter does. An abort is answered here (flag `FI`); an endpoint's answer
//! to a delayed request is flagged `DI`.

use tower::ServiceExt;

use super::{Exchange, FromEndpoint, Next, Pending, Stage, flagged};
use crate::{
    balance::rng::{Rng, ThreadRng},
    l7::{ResponseFlags, local_response},
};

#[derive(Debug, Clone, Copy)]
pub struct FaultInjection;

impl Stage<Exchange> for FaultInjection {
    type Passes = Exchange;

    fn run<S: Next<Exchange>>(self, exchange: Exchange, next: S) -> Pending {
        Box::pin(async move {
            let Some(fault) = exchange.routing.fault() else {
                return next.oneshot(exchange).await;
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
            let mut answer = next.oneshot(exchange).await?;
            if delay.is_some() && answer.extensions().get::<FromEndpoint>().is_some() {
                answer.extensions_mut().insert(ResponseFlags("DI"));
            }
            Ok(answer)
        })
    }
}
