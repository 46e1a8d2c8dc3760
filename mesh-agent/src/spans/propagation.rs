//! Trace context in and out of a request, in the formats Envoy reads: W3C
//! `traceparent`/`tracestate` first, else B3 (the single `b3` header, else
//! the `X-B3-*` headers). The forwarded request always carries W3C
//! `traceparent`, and B3 headers too (in the encoding they came in) when
//! it came with any, so applications of either kind continue the trace: a
//! request carrying both gets both rewritten, whichever was read.
//!
//! W3C is the OpenTelemetry SDK's propagator. B3 is read and written here:
//! the one crate that has it (`opentelemetry-zipkin`) is deprecated with
//! its exporter, and B3 is a few fixed header formats
//! (<https://github.com/openzipkin/b3-propagation>).

use hyper::header::HeaderMap;
use hyper::header::HeaderValue;
use opentelemetry::{
    Context,
    propagation::TextMapPropagator,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The B3 headers a forwarded request must not keep from its client (the
/// propagator writes the new ones).
const B3_HEADERS: [&str; 6] = [
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// The context a request came with, as the parent of the agent's span
/// (an empty context when it came with none that is valid).
pub fn extract(headers: &HeaderMap) -> Context {
    let w3c = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if w3c.span().span_context().is_valid() {
        return w3c;
    }
    let b3 = match headers.get("b3") {
        Some(value) => value.to_str().ok().and_then(b3_single),
        None => b3_multi(headers),
    };
    b3.map(remote).unwrap_or_default()
}

fn remote(span: SpanContext) -> Context {
    Context::new().with_remote_span_context(span)
}

/// `b3: {trace id}-{span id}[-{sampling}[-{parent span id}]]`. The
/// sampling-only forms (`0`, `1`, `d`) carry no context to continue.
fn b3_single(value: &str) -> Option<SpanContext> {
    let mut fields = value.trim().split('-');
    let trace = b3_trace_id(fields.next()?)?;
    let span = b3_span_id(fields.next()?)?;
    let sampled = match fields.next() {
        None => true,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = fields.next() {
        b3_span_id(parent)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(b3_context(trace, span, sampled))
}

/// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (`1`/`0`, or the old
/// `true`/`false`), `X-B3-Flags: 1` (debug, sampled).
fn b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = b3_trace_id(text("x-b3-traceid")?)?;
    let span = b3_span_id(text("x-b3-spanid")?)?;
    let debug = text("x-b3-flags") == Some("1");
    let sampled = match text("x-b3-sampled") {
        Some("1" | "true") => true,
        Some("0" | "false") => debug,
        // No sampling state: the decision is deferred, and the agent's
        // downstream follows its own sampler in Envoy; here a context
        // without a decision is taken as sampled, B3's usual default.
        None => true,
        Some(_) => return None,
    };
    Some(b3_context(trace, span, sampled))
}

fn b3_context(trace: TraceId, span: SpanId, sampled: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace, span, flags, true, TraceState::default())
}

/// 16 or 32 lower-case hex digits (a 64-bit id is the low half), not zero.
fn b3_trace_id(hex: &str) -> Option<TraceId> {
    if !(hex.len() == 16 || hex.len() == 32) || !is_lower_hex(hex) {
        return None;
    }
    let id = TraceId::from_hex(hex).ok()?;
    (id != TraceId::INVALID).then_some(id)
}

fn b3_span_id(hex: &str) -> Option<SpanId> {
    if hex.len() != 16 || !is_lower_hex(hex) {
        return None;
    }
    let id = SpanId::from_hex(hex).ok()?;
    (id != SpanId::INVALID).then_some(id)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Writes `span` (the agent's) as the forwarded request's parent: W3C
/// always, and each B3 encoding the request came with.
pub fn inject(headers: &mut HeaderMap, span: &SpanContext) {
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    let single = headers.contains_key("b3");
    let multi = headers.contains_key("x-b3-traceid");
    if !single && !multi {
        return;
    }
    for name in B3_HEADERS {
        headers.remove(name);
    }
    let (trace, id) = (span.trace_id(), span.span_id());
    let sampled = if span.is_sampled() { "1" } else { "0" };
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    if single {
        set("b3", format!("{trace}-{id}-{sampled}"));
    }
    if multi {
        set("x-b3-traceid", trace.to_string());
        set("x-b3-spanid", id.to_string());
        set("x-b3-sampled", sampled.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn parent_of(cx: &Context) -> SpanContext {
        cx.span().span_context().clone()
    }

    #[test]
    fn w3c_context_is_read_with_its_sampled_flag_and_state() {
        let cx = extract(&headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "vendor=x"),
            ("b3", &format!("{TRACE}-1111111111111111-1")),
        ]));
        let parent = parent_of(&cx);
        assert_eq!(parent.trace_id().to_string(), TRACE);
        assert_eq!(parent.span_id().to_string(), PARENT);
        assert!(parent.is_sampled());
        assert_eq!(parent.trace_state().get("vendor"), Some("x"));
        let cx = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{PARENT}-00"),
        )]));
        assert!(!parent_of(&cx).is_sampled());
    }

    #[test]
    fn b3_single_and_multi_headers_are_read_when_there_is_no_w3c_context() {
        let cx = extract(&headers(&[("b3", &format!("{TRACE}-{PARENT}-1"))]));
        assert_eq!(parent_of(&cx).trace_id().to_string(), TRACE);
        assert!(parent_of(&cx).is_sampled());
        let cx = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(parent_of(&cx).span_id().to_string(), PARENT);
        assert!(!parent_of(&cx).is_sampled());
        // A 64-bit trace id is the low half of the 128-bit one.
        let cx = extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{PARENT}-0"))]));
        assert_eq!(
            parent_of(&cx).trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!parent_of(&cx).is_sampled());
    }

    #[test]
    fn a_malformed_context_starts_a_new_trace() {
        for bad in [
            headers(&[("traceparent", "00-zzzz-00f067aa0ba902b7-01")]),
            headers(&[("traceparent", &format!("00-{TRACE}-0000000000000000-01"))]),
            headers(&[("b3", "not-a-context")]),
            headers(&[("b3", "1")]),
            headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", "short")]),
            HeaderMap::new(),
        ] {
            assert!(!parent_of(&extract(&bad)).is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn the_agents_span_is_written_as_w3c_and_in_the_b3_encoding_that_came_in() {
        let span = SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex("a1a2a3a4a5a6a7a8").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut w3c = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))]);
        inject(&mut w3c, &span);
        assert_eq!(
            w3c["traceparent"],
            format!("00-{TRACE}-a1a2a3a4a5a6a7a8-01").as_str()
        );
        assert!(!w3c.contains_key("b3"));

        let mut multi = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-parentspanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ]);
        inject(&mut multi, &span);
        assert_eq!(multi["x-b3-spanid"], "a1a2a3a4a5a6a7a8");
        assert_eq!(multi["x-b3-traceid"], TRACE);
        assert!(!multi.contains_key("x-b3-parentspanid"));
        assert!(multi.contains_key("traceparent"));

        let mut single = headers(&[("b3", &format!("{TRACE}-{PARENT}-1"))]);
        inject(&mut single, &span);
        assert_eq!(single["b3"], format!("{TRACE}-a1a2a3a4a5a6a7a8-1").as_str());
        // Both formats, read from W3C: both carry the agent's span on.
        let mut both = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("b3", &format!("{TRACE}-{PARENT}-1")),
        ]);
        inject(&mut both, &span);
        assert_eq!(both["b3"], format!("{TRACE}-a1a2a3a4a5a6a7a8-1").as_str());
    }
}
