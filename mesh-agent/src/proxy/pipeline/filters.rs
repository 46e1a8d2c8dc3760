//! The route's filters: request header modifiers and URL rewrite on the
//! way in (the rule's, then the backend's), response header modifiers on
//! the way out (the backend's, then the rule's) on the endpoints' answers.

use tower::ServiceExt;

use super::{Exchange, FromEndpoint, Next, Pending, Stage};

#[derive(Debug, Clone, Copy)]
pub struct Filters;

impl Stage<Exchange> for Filters {
    type Passes = Exchange;

    fn run<S: Next<Exchange>>(self, mut exchange: Exchange, next: S) -> Pending {
        exchange.routing.on_request(&mut exchange.parts);
        let routing = exchange.routing.clone();
        Box::pin(async move {
            let mut answer = next.oneshot(exchange).await?;
            if answer.extensions().get::<FromEndpoint>().is_some() {
                routing.on_response(answer.headers_mut());
            }
            Ok(answer)
        })
    }
}
