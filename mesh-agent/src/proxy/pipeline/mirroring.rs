//! The request's body made ready for its attempts, and its copies for the
//! route's mirrors started: a bodiless request can be sent again; so can
//! one whose route retries it, if its body is known to fit the replay
//! buffer (read whole first: a body that breaks off is answered `400`,
//! flag `DPE`); any other is streamed once, copied to the mirrors as it
//! goes (`super::super::mirror`).

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::{
    StatusCode,
    body::{Body, Bytes},
};
use tower::ServiceExt;

use super::{Exchange, Next, Pending, Prepared, RequestBody, Stage, flagged};
use crate::{
    l7::local_response,
    proxy::{context::ProxyContext, mirror, pod::PodHandle},
};

#[derive(Clone)]
pub struct Mirroring {
    pub ctx: Arc<ProxyContext>,
    /// The client's pod: the copies leave as its requests.
    pub source: Arc<PodHandle>,
}

impl Stage<Exchange> for Mirroring {
    type Passes = Prepared;

    fn run<S: Next<Prepared>>(self, exchange: Exchange, next: S) -> Pending {
        let Mirroring { ctx, source } = self;
        Box::pin(async move {
            let Exchange {
                parts,
                body,
                routing,
                h1,
                deadline,
            } = exchange;
            let mirrors = &routing.mirrors;
            let fits = body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= mirror::BODY_LIMIT as u64);
            let body = if body.is_end_stream() {
                // Nothing to copy but the head; and nothing to replay.
                let _ = mirror::start(&ctx, &source, mirrors, &parts, body);
                RequestBody::Replayable(Bytes::new())
            } else if routing.retry().is_some() && fits {
                match http_body_util::Limited::new(body, mirror::BODY_LIMIT)
                    .collect()
                    .await
                {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        mirror::start_buffered(&ctx, &source, mirrors, &parts, &bytes);
                        RequestBody::Replayable(bytes)
                    }
                    // The client's body broke off or was longer than it said.
                    Err(_) => {
                        return Ok(flagged(
                            local_response(StatusCode::BAD_REQUEST, "Bad Request", h1),
                            "DPE",
                        ));
                    }
                }
            } else {
                RequestBody::Streamed(mirror::start(&ctx, &source, mirrors, &parts, body))
            };
            next.oneshot(Prepared {
                parts,
                body,
                routing,
                h1,
                deadline,
            })
            .await
        })
    }
}
