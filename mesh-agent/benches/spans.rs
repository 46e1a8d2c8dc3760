//! What a request's span costs the agent on the request path: reading the
//! context, starting the span, writing `traceparent` on, ending it, for a
//! request that is not sampled (a new trace at 1%, or a parent that says
//! not sampled) and one that is (its attributes and the hand-off to the
//! export queue; the export itself is on a thread of its own and not
//! here). Run: `cargo bench -p mesh-agent --bench spans`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::Request;
use mesh_agent::{
    proxy::telemetry::PeerLabels,
    spans::{RequestTracer, SpanEnd, SpanSide},
};
use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanProcessor},
};

/// Takes every ended span and lets it go (what the export queue costs the
/// request path is a `try_send`).
#[derive(Debug)]
struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        black_box(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn request(traceparent: Option<&str>) -> Request<()> {
    let mut builder = Request::get("/api/v1/items")
        .header("host", "web.shop.svc.cluster.local")
        .header("user-agent", "bench/1");
    if let Some(traceparent) = traceparent {
        builder = builder.header("traceparent", traceparent);
    }
    builder.body(()).unwrap()
}

const PEERS: PeerLabels<'static> = PeerLabels {
    reporter: "source",
    source_workload: "sleep",
    source_namespace: "default",
    source_principal: "spiffe://cluster.local/ns/default/sa/sleep",
    destination_workload: "web",
    destination_namespace: "shop",
    destination_principal: "spiffe://cluster.local/ns/shop/sa/web",
    destination_service: "web.shop.svc.cluster.local",
};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_span");
    let sampled_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let unsampled_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    g.bench_function("no_tracing_request_only", |b| {
        b.iter(|| black_box(request(None)))
    });
    for (name, percentage, parent) in [
        ("new_trace_not_sampled", 0.0, None),
        ("parent_not_sampled", 100.0, Some(unsampled_parent)),
        ("new_trace_sampled", 100.0, None),
        ("parent_sampled", 0.0, Some(sampled_parent)),
    ] {
        let tracer =
            RequestTracer::with_processor(Discard, percentage, Resource::builder_empty().build());
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut request = request(parent);
                let span = tracer.begin(SpanSide::Client, &mut request);
                span.end(&SpanEnd {
                    status: 200,
                    response_flags: "-",
                    denied_by: None,
                    peers: PEERS,
                    security: "unknown",
                });
                black_box(request)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
