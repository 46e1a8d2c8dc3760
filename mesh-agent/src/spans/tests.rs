use std::sync::{Arc, Mutex};

use hyper::Request;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{SimpleSpanProcessor, SpanData, SpanExporter},
};

use super::*;

#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn tracer(percentage: f64) -> (RequestTracer, Collected) {
    let collected = Collected::default();
    let tracer = RequestTracer::with_processor(
        SimpleSpanProcessor::new(collected.clone()),
        percentage,
        Resource::builder_empty().build(),
    );
    (tracer, collected)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn request(traceparent: Option<String>) -> Request<()> {
    let mut builder = Request::get("http://web.shop.svc.cluster.local:8080/items?x=1")
        .header("user-agent", "curl/8");
    if let Some(traceparent) = traceparent {
        builder = builder.header("traceparent", traceparent);
    }
    builder.body(()).unwrap()
}

fn end(span: RequestSpan, status: u16) {
    span.end(&SpanEnd {
        status,
        response_flags: "-",
        denied_by: None,
        peers: PeerLabels {
            reporter: "source",
            source_workload: "sleep",
            source_namespace: "client-ns",
            source_principal: "spiffe://cluster.local/ns/client-ns/sa/sleep",
            destination_workload: "web",
            destination_namespace: "shop",
            destination_principal: "spiffe://cluster.local/ns/shop/sa/web",
            destination_service: "web.shop.svc.cluster.local",
        },
        security: "mutual_tls",
    });
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn forwarded_parent(request: &Request<()>) -> (String, String, String) {
    let value = request.headers()["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = value.split('-').collect();
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[test]
fn a_request_without_context_starts_a_trace_and_carries_the_agents_span_on() {
    let (tracer, collected) = tracer(100.0);
    let mut request = request(None);
    let span = tracer.begin(SpanSide::Client, &mut request);
    let (trace, parent, flags) = forwarded_parent(&request);
    assert_eq!(trace, span.trace_id());
    assert_eq!(parent, span.span_context().span_id().to_string());
    assert_eq!(flags, "01");
    end(span, 503);
    let spans = collected.0.lock().unwrap();
    let [span] = spans.as_slice() else {
        panic!("one span: {spans:?}")
    };
    assert_eq!(span.parent_span_id, SpanId::INVALID);
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(span.name, "GET");
    assert_eq!(
        attribute(span, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(attribute(span, "url.path").as_deref(), Some("/items"));
    assert_eq!(
        attribute(span, "server.address").as_deref(),
        Some("web.shop.svc.cluster.local")
    );
    assert_eq!(attribute(span, "server.port").as_deref(), Some("8080"));
    assert_eq!(
        attribute(span, "user_agent.original").as_deref(),
        Some("curl/8")
    );
    assert_eq!(
        attribute(span, "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(attribute(span, "error.type").as_deref(), Some("503"));
    assert_eq!(
        attribute(span, "mesh.destination.workload").as_deref(),
        Some("web")
    );
    assert_eq!(
        attribute(span, "mesh.source.principal").as_deref(),
        Some("spiffe://cluster.local/ns/client-ns/sa/sleep")
    );
}

#[test]
fn a_sampled_context_is_followed_even_at_zero_percent() {
    let (tracer, collected) = tracer(0.0);
    let mut request = request(Some(format!("00-{TRACE}-{PARENT}-01")));
    let span = tracer.begin(SpanSide::Server, &mut request);
    let (trace, parent, flags) = forwarded_parent(&request);
    assert_eq!(trace, TRACE);
    assert_ne!(parent, PARENT, "the agent's span is the new parent");
    assert_eq!(flags, "01");
    end(span, 404);
    let spans = collected.0.lock().unwrap();
    assert_eq!(spans.len(), 1);
    assert_eq!(
        spans[0].span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(spans[0].parent_span_id, SpanId::from_hex(PARENT).unwrap());
    assert_eq!(spans[0].span_kind, SpanKind::Server);
    // A server's span fails on 5xx only.
    assert_eq!(attribute(&spans[0], "error.type"), None);
}

#[test]
fn a_context_not_sampled_is_followed_even_at_one_hundred_percent() {
    let (tracer, collected) = tracer(100.0);
    let mut request = request(Some(format!("00-{TRACE}-{PARENT}-00")));
    let span = tracer.begin(SpanSide::Client, &mut request);
    let (trace, parent, flags) = forwarded_parent(&request);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "00"));
    assert_ne!(parent, PARENT);
    end(span, 200);
    assert!(collected.0.lock().unwrap().is_empty());
}

#[test]
fn new_traces_are_sampled_at_the_configured_rate() {
    let (tracer, collected) = tracer(10.0);
    let mut sampled = 0;
    for _ in 0..2000 {
        let mut request = request(None);
        let span = tracer.begin(SpanSide::Client, &mut request);
        if forwarded_parent(&request).2 == "01" {
            sampled += 1;
        }
        end(span, 200);
    }
    assert_eq!(collected.0.lock().unwrap().len(), sampled);
    // 10% of 2000 by trace id: far outside 100..300 only if the rate is wrong.
    assert!(
        (100..300).contains(&sampled),
        "{sampled} of 2000 sampled at 10%"
    );
}
