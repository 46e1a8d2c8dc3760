//! Spans of the HTTP requests the agent handles (docs/operations.md,
//! "Tracing"), as Envoy makes them: a request continues the trace its
//! client started (W3C or B3 context) or starts one, gets one span of the
//! agent's, and goes on carrying that span as its parent. A CLIENT span on
//! the client's node when the agent balances a service's HTTP port, a
//! SERVER span where the destination's policies decide each request.
//!
//! New traces are sampled at node.yaml's `tracing.randomSamplingPercentage`;
//! a request whose context says sampled or not sampled is followed. Sampled
//! spans go to the OTLP collector through a bounded queue ([`export`]),
//! never holding a request up.

pub mod export;
pub mod propagation;

use anyhow::Context as _;
use hyper::{Request, header};
use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanContext, SpanKind, Status, Tracer as _, TracerProvider},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _},
};

pub use export::{SpanCounters, SpanFate};

use crate::{
    config::{OtlpProtocol, TracingSettings},
    proxy::telemetry::PeerLabels,
};

/// The agent's tracer: sampler, span queue and exporter.
pub struct RequestTracer {
    tracer: SdkTracer,
    /// Kept so the export queue lives as long as the tracer.
    _provider: SdkTracerProvider,
}

/// Which end of a request the agent's span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanSide {
    /// The client's node sending a request to an endpoint it chose.
    Client,
    /// The destination's node deciding a request before delivering it.
    Server,
}

/// The agent's span of one request, ended with its answer.
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    side: SpanSide,
}

/// What a request's span ends with: its answer, and who was on each end.
pub struct SpanEnd<'a> {
    pub status: u16,
    pub response_flags: &'a str,
    /// The policy (rule) that refused it, if one did.
    pub denied_by: Option<&'a str>,
    /// Who was on each end (Istio's labels).
    pub peers: PeerLabels<'a>,
    pub security: &'a str,
}

impl RequestTracer {
    /// Starts the export (on the current Tokio runtime) to the collector of
    /// `settings`; spans are counted in `counters`.
    pub fn start(
        settings: &TracingSettings,
        node_name: &str,
        counters: SpanCounters,
    ) -> anyhow::Result<Self> {
        let resource = Resource::builder_empty()
            .with_service_name("mesh-agent")
            .with_attribute(KeyValue::new("k8s.node.name", node_name.to_string()))
            .build();
        let exporter_resource = resource.clone();
        let settings_for_export = settings.clone();
        let build = move || -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
            let settings = settings_for_export;
            let mut exporter = match settings.protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone())
                    .with_timeout(settings.export_timeout)
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(settings.traces_url())
                    .with_timeout(settings.export_timeout)
                    .build(),
            }
            .with_context(|| format!("the OTLP exporter to {}", settings.endpoint))?;
            exporter.set_resource(&exporter_resource);
            Ok(exporter)
        };
        let queue = export::ExportQueue::start(build, settings.max_queued_spans, counters)?;
        Ok(Self::with_processor(
            queue,
            settings.random_sampling_percentage,
            resource,
        ))
    }

    /// A tracer sampling new traces at `percentage` whose ended spans go
    /// to `processor` (its tests and micro-benchmark give their own).
    pub fn with_processor(
        processor: impl opentelemetry_sdk::trace::SpanProcessor + 'static,
        percentage: f64,
        resource: Resource,
    ) -> Self {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                percentage / 100.0,
            ))))
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        Self {
            tracer: provider.tracer("mesh-agent"),
            _provider: provider,
        }
    }

    /// Starts the agent's span of `request` (before any check, so the
    /// decision is inside it) and makes it the parent the request carries
    /// on. `request` is edited: its trace context headers.
    pub fn begin<B>(&self, side: SpanSide, request: &mut Request<B>) -> RequestSpan {
        let parent = propagation::extract(request.headers());
        let kind = match side {
            SpanSide::Client => SpanKind::Client,
            SpanSide::Server => SpanKind::Server,
        };
        let mut span = self
            .tracer
            .span_builder(method_name(request.method()))
            .with_kind(kind)
            .start_with_context(&self.tracer, &parent);
        // OpenTelemetry's HTTP semantic conventions; a span not sampled is
        // given none (the sampler decides by trace id alone).
        if span.is_recording() {
            span.set_attributes(request_attributes(request));
        }
        propagation::inject(request.headers_mut(), span.span_context());
        RequestSpan { span, side }
    }
}

/// The span's name: the method, as the conventions ask when there is no
/// route template (no allocation for the standard ones).
fn method_name(method: &hyper::Method) -> std::borrow::Cow<'static, str> {
    use hyper::Method;
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    const NAMES: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match known.iter().position(|m| m == method) {
        Some(i) => NAMES[i].into(),
        None => method.as_str().to_owned().into(),
    }
}

/// The request's own attributes (OpenTelemetry HTTP semantic conventions).
fn request_attributes<B>(request: &Request<B>) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("http.request.method", method_name(request.method())),
        KeyValue::new("url.path", request.uri().path().to_owned()),
        KeyValue::new("url.scheme", "http"),
        KeyValue::new(
            "network.protocol.version",
            match request.version() {
                hyper::Version::HTTP_2 => "2",
                hyper::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
    ];
    let authority = request.uri().authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    if let Some(authority) = authority {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => (host, port.parse::<u16>().ok()),
            _ => (authority, None),
        };
        attributes.push(KeyValue::new("server.address", host.to_owned()));
        if let Some(port) = port {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
    }
    if let Some(agent) = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
    }
    attributes
}

impl RequestSpan {
    /// The trace's id (32 hex digits), for the access log.
    pub fn trace_id(&self) -> String {
        self.span.span_context().trace_id().to_string()
    }

    pub fn span_context(&self) -> &SpanContext {
        self.span.span_context()
    }

    /// Ends the span with the request's answer and both ends' names.
    pub fn end(mut self, end: &SpanEnd<'_>) {
        if self.span.is_recording() {
            let peers = &end.peers;
            self.span.set_attributes([
                KeyValue::new("http.response.status_code", i64::from(end.status)),
                KeyValue::new("mesh.source.workload", peers.source_workload.to_owned()),
                KeyValue::new("mesh.source.namespace", peers.source_namespace.to_owned()),
                KeyValue::new("mesh.source.principal", peers.source_principal.to_owned()),
                KeyValue::new(
                    "mesh.destination.workload",
                    peers.destination_workload.to_owned(),
                ),
                KeyValue::new(
                    "mesh.destination.namespace",
                    peers.destination_namespace.to_owned(),
                ),
                KeyValue::new(
                    "mesh.destination.principal",
                    peers.destination_principal.to_owned(),
                ),
                KeyValue::new(
                    "mesh.destination.service",
                    peers.destination_service.to_owned(),
                ),
                KeyValue::new("mesh.response_flags", end.response_flags.to_owned()),
                KeyValue::new("mesh.connection_security_policy", end.security.to_owned()),
            ]);
            if let Some(policy) = end.denied_by {
                self.span
                    .set_attribute(KeyValue::new("mesh.policy", policy.to_owned()));
            }
            // Semantic conventions: a server's span fails on 5xx, a
            // client's on 4xx too.
            let failed = end.status >= 500 || (self.side == SpanSide::Client && end.status >= 400);
            if failed {
                self.span
                    .set_attribute(KeyValue::new("error.type", end.status.to_string()));
                self.span.set_status(Status::error(""));
            }
        }
        self.span.end();
    }
}

#[cfg(test)]
mod tests;
