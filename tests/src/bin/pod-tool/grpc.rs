//! `grpc-export <url>`: a real gRPC client (tonic, the OTLP trace service's
//! generated client): `--count` unary `Export` calls of one span each, with
//! `--header name:value` metadata; prints `ok <n>`.

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use tonic::metadata::{MetadataKey, MetadataValue};

use crate::common::current_thread;

pub fn export(url: &str, count: u32, headers: &[String]) -> Result<()> {
    let headers = headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: expected name:value"))?;
            Ok((
                MetadataKey::from_bytes(name.trim().as_bytes())?,
                MetadataValue::try_from(value.trim())?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    current_thread()?.block_on(async move {
        let mut client = TraceServiceClient::connect(url.to_string())
            .await
            .with_context(|| format!("connecting to {url}"))?;
        for i in 0..count {
            let span = Span {
                trace_id: [1; 16].to_vec(),
                span_id: (u64::from(i) + 1).to_be_bytes().to_vec(),
                name: format!("grpc-route-{i}"),
                ..Span::default()
            };
            let mut request = tonic::Request::new(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span],
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                }],
            });
            for (name, value) in &headers {
                request.metadata_mut().insert(name.clone(), value.clone());
            }
            if let Err(status) = client.export(request).await {
                bail!("export {i}: {status}");
            }
        }
        println!("ok {count}");
        Ok(())
    })
}
