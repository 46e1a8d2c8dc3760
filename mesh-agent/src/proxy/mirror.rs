//! Request mirroring (a route rule's `RequestMirror`): a copy of a request
//! is sent to another Service, fire-and-forget. The client only ever sees
//! the primary's answer: the copy goes out on a task of its own once the
//! request's body has ended, its answer is read and dropped, and a slow or
//! absent mirror only costs that task (bounded in number and time).
//!
//! The body is copied as it streams to the primary ([`TeeBody`]), up to
//! [`BODY_LIMIT`] (linkerd2-proxy's replay buffer size); a longer body is
//! not mirrored (counted).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    http::request::Parts,
};
use prometheus::{IntCounterVec, Opts, core::Collector};
use tokio::sync::oneshot;

use super::{context::ProxyContext, pod::PodHandle, service_http::ServiceForwarder};
use crate::services::ServicePortEntry;

/// The most of a request body copied for mirrors.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Mirrored requests in flight at once on this node, at most: beyond, a
/// copy is not sent (counted), so a slow mirror cannot pile up tasks.
const MAX_IN_FLIGHT: usize = 1024;

/// What became of one mirrored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorResult {
    /// The mirror answered (any status).
    Sent,
    /// Connect failure, reset, or no answer within its request timeout.
    Failed,
    /// The mirror Service had no endpoint.
    NoEndpoint,
    /// A mirror endpoint on this node refused it by its policies.
    Denied,
    /// The route names a mirror that cannot be served (no such Service,
    /// not an HTTP port).
    NoBackend,
    /// The body was longer than [`BODY_LIMIT`].
    BodyTooLarge,
    /// The client's body did not end (it went away, or the primary failed).
    RequestIncomplete,
    /// [`MAX_IN_FLIGHT`] copies were already out.
    Overloaded,
}

impl MirrorResult {
    fn as_label(self) -> &'static str {
        match self {
            MirrorResult::Sent => "sent",
            MirrorResult::Failed => "failed",
            MirrorResult::NoEndpoint => "no_endpoint",
            MirrorResult::Denied => "denied",
            MirrorResult::NoBackend => "no_backend",
            MirrorResult::BodyTooLarge => "body_too_large",
            MirrorResult::RequestIncomplete => "request_incomplete",
            MirrorResult::Overloaded => "overloaded",
        }
    }
}

/// `mesh_route_mirrored_requests_total{service, result}` and the copies in
/// flight.
#[derive(Clone)]
pub struct MirrorCounters {
    copies: IntCounterVec,
    in_flight: Arc<AtomicUsize>,
}

impl Default for MirrorCounters {
    fn default() -> Self {
        Self {
            copies: IntCounterVec::new(
                Opts::new(
                    "mesh_route_mirrored_requests_total",
                    "Copies of requests for a route's RequestMirror, by mirror service and what became of them",
                ),
                &["service", "result"],
            )
            .expect("valid metric"),
            in_flight: Arc::default(),
        }
    }
}

impl MirrorCounters {
    pub fn count(&self, service: &str, result: MirrorResult) {
        self.copies
            .with_label_values(&[service, result.as_label()])
            .inc();
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.copies.clone())]
    }
}

/// A mirror a request is copied to: its service port, or the key of one
/// that cannot be served.
pub enum MirrorTarget {
    Service(Arc<ServicePortEntry>),
    Unresolved(String),
}

/// Starts the copies of a request for `mirrors` and returns its body for
/// the primary: as it is when there is no mirror, else copying as it goes.
pub fn start(
    ctx: &Arc<ProxyContext>,
    source: &Arc<PodHandle>,
    mirrors: &[MirrorTarget],
    parts: &Parts,
    body: Incoming,
) -> TeeBody {
    if mirrors.is_empty() {
        return TeeBody {
            inner: body,
            copy: None,
        };
    }
    let mut copy = spawn_copies(ctx, source, mirrors, parts);
    if body.is_end_stream() {
        copy.finish();
        return TeeBody {
            inner: body,
            copy: None,
        };
    }
    TeeBody {
        inner: body,
        copy: Some(copy),
    }
}

/// Starts the copies of a request whose body was read whole.
pub fn start_buffered(
    ctx: &Arc<ProxyContext>,
    source: &Arc<PodHandle>,
    mirrors: &[MirrorTarget],
    parts: &Parts,
    body: &Bytes,
) {
    if mirrors.is_empty() {
        return;
    }
    let mut copy = spawn_copies(ctx, source, mirrors, parts);
    if body.len() > BODY_LIMIT {
        copy.give_up(MirrorResult::BodyTooLarge);
        return;
    }
    copy.buffered.extend_from_slice(body);
    copy.finish();
}

/// One task per mirror, each waiting for the body.
fn spawn_copies(
    ctx: &Arc<ProxyContext>,
    source: &Arc<PodHandle>,
    mirrors: &[MirrorTarget],
    parts: &Parts,
) -> BodyCopy {
    let counters = &ctx.mirror_counters;
    let mut waiting = Vec::new();
    for mirror in mirrors {
        let entry = match mirror {
            MirrorTarget::Service(entry) => entry.clone(),
            MirrorTarget::Unresolved(key) => {
                counters.count(key, MirrorResult::NoBackend);
                continue;
            }
        };
        let admitted = counters
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            counters.count(&entry.key, MirrorResult::Overloaded);
            continue;
        }
        let (tx, rx) = oneshot::channel();
        waiting.push((entry.key.clone(), tx));
        let forwarder = ServiceForwarder {
            ctx: ctx.clone(),
            source: source.clone(),
            service: entry,
        };
        let copy = shadow(parts);
        let counters = counters.clone();
        tokio::spawn(async move {
            // The body, once the client has sent all of it; otherwise the
            // copy was given up (and counted) where it was read.
            if let Ok(body) = rx.await {
                let result = forwarder.send_copy(&copy, body).await;
                counters.count(&forwarder.service.key, result);
            }
            counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    BodyCopy {
        buffered: BytesMut::new(),
        waiting,
        counters: counters.clone(),
    }
}

/// The copy's head: the authority gets `-shadow` appended to its host, as
/// Envoy (and so Istio) marks mirrored requests.
fn shadow(parts: &Parts) -> Parts {
    let mut copy = Parts::clone(parts);
    let shadowed = |authority: &str| match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    };
    if let Some(host) = copy.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(value) = HeaderValue::from_str(&shadowed(host))
    {
        copy.headers.insert(header::HOST, value);
    }
    if let Some(authority) = copy.uri.authority().map(|a| a.to_string()) {
        let mut uri = copy.uri.clone().into_parts();
        uri.authority = shadowed(&authority).parse().ok();
        if let Ok(new) = hyper::Uri::from_parts(uri) {
            copy.uri = new;
        }
    }
    copy
}

/// The body as it is copied for the mirrors waiting for it.
struct BodyCopy {
    buffered: BytesMut,
    waiting: Vec<(String, oneshot::Sender<Bytes>)>,
    counters: MirrorCounters,
}

impl BodyCopy {
    /// The body ended: each mirror gets it.
    fn finish(&mut self) {
        let body = std::mem::take(&mut self.buffered).freeze();
        for (_, tx) in self.waiting.drain(..) {
            let _ = tx.send(body.clone());
        }
    }

    /// The copy is given up for `why`: each mirror's copy is counted so.
    fn give_up(&mut self, why: MirrorResult) {
        for (key, _) in self.waiting.drain(..) {
            self.counters.count(&key, why);
        }
    }
}

impl Drop for BodyCopy {
    fn drop(&mut self) {
        // Dropped before the body ended: the client went away, or the
        // primary attempt failed before reading all of it.
        self.give_up(MirrorResult::RequestIncomplete);
    }
}

/// A request body on its way to the primary, copied for mirrors when
/// there are some.
pub struct TeeBody {
    inner: Incoming,
    copy: Option<BodyCopy>,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(copy) = &mut this.copy {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        if copy.buffered.len() + data.len() > BODY_LIMIT {
                            copy.give_up(MirrorResult::BodyTooLarge);
                            this.copy = None;
                        } else {
                            copy.buffered.extend_from_slice(data);
                        }
                    }
                    // The last frame: hyper may not poll again to see the end.
                    if this.inner.is_end_stream()
                        && let Some(mut copy) = this.copy.take()
                    {
                        copy.finish();
                    }
                }
                Poll::Ready(None) => {
                    if let Some(mut copy) = this.copy.take() {
                        copy.finish();
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    // Dropping it counts the copies as incomplete.
                    this.copy = None;
                }
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_says_shadow_in_its_host_and_authority() {
        let parts = |request: hyper::Request<()>| request.into_parts().0;
        let h1 = parts(
            hyper::Request::get("/a")
                .header("host", "web.shop:8080")
                .body(())
                .unwrap(),
        );
        assert_eq!(shadow(&h1).headers["host"], "web.shop-shadow:8080");
        let h2 = parts(hyper::Request::get("http://web/a?x=1").body(()).unwrap());
        let copy = shadow(&h2);
        assert_eq!(copy.uri.to_string(), "http://web-shadow/a?x=1");
        assert!(copy.headers.get("host").is_none());
    }
}
