//! The request's body made ready for its attempts, and its copies for the
//! route's mirrors started: a bodiless request can be sent again; so can
//! one whose route retries it, if its body is known to fit the replay
//! buffer (read whole first: a body that breaks off is answered `400`,
//! flag `DPE`); any other is streamed once, copied to the mirrors as it
//! goes (`super::super::mirror`).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http_body_util::BodyExt;
use hyper::{
    StatusCode,
    body::{Body, Bytes},
};
use tower::{Layer, Service, ServiceExt};

use super::{Answer, Exchange, Pending, Prepared, RequestBody, flagged};
use crate::{
    l7::local_response,
    proxy::{context::ProxyContext, mirror, pod::PodHandle},
};

#[derive(Clone)]
pub struct MirroringLayer {
    pub ctx: Arc<ProxyContext>,
    /// The client's pod: the copies leave as its requests.
    pub source: Arc<PodHandle>,
}

impl<S> Layer<S> for MirroringLayer {
    type Service = Mirroring<S>;
    fn layer(&self, inner: S) -> Mirroring<S> {
        Mirroring {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Mirroring<S> {
    inner: S,
    layer: MirroringLayer,
}

impl<S> Service<Exchange> for Mirroring<S>
where
    S: Service<Prepared, Response = Answer, Error = Infallible, Future = Pending>
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
        let MirroringLayer { ctx, source } = self.layer.clone();
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
            inner
                .oneshot(Prepared {
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
