//! The route's filters: request header modifiers and URL rewrite on the
//! way in (the rule's, then the backend's), response header modifiers on
//! the way out (the backend's, then the rule's) on the endpoints' answers.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use tower::{Layer, Service, ServiceExt};

use super::{Answer, Exchange, FromEndpoint, Pending};

#[derive(Debug, Clone, Copy)]
pub struct FiltersLayer;

impl<S> Layer<S> for FiltersLayer {
    type Service = Filters<S>;
    fn layer(&self, inner: S) -> Filters<S> {
        Filters { inner }
    }
}

#[derive(Clone)]
pub struct Filters<S> {
    inner: S,
}

impl<S> Service<Exchange> for Filters<S>
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

    fn call(&mut self, mut exchange: Exchange) -> Pending {
        exchange.routing.on_request(&mut exchange.parts);
        let routing = exchange.routing.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut answer = inner.oneshot(exchange).await?;
            if answer.extensions().get::<FromEndpoint>().is_some() {
                routing.on_response(answer.headers_mut());
            }
            Ok(answer)
        })
    }
}
