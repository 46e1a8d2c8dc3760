//! The admin API: health, readiness, metrics and status, over plain HTTP/1.1 on
//! a node-local address (loopback by default).

mod config_dump;
pub mod metrics;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::AgentState;

pub const PATH_HEALTHZ: &str = "/healthz";
pub const PATH_READYZ: &str = "/readyz";
pub const PATH_METRICS: &str = "/metrics";
pub const PATH_STATUS: &str = "/status";
pub const PATH_DEBUG_PODS: &str = "/debug/pods";
pub const PATH_DEBUG_CONNECTIONS: &str = "/debug/connections";
pub const PATH_CONFIG_DUMP: &str = "/config_dump";

/// Binds the admin address; fails at once if it is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin API on {addr}"))
}

/// Serves the admin API until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "admin API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "admin API connection ended with an error");
            }
        });
    }
}

fn route(state: &AgentState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        PATH_HEALTHZ => text(StatusCode::OK, "ok\n"),
        PATH_READYZ => match state.unready_reason() {
            // Ready, and saying how long it stays so if the CA is away.
            None => match state.certificate_authority().and_then(|ca| ca.warning()) {
                Some(warning) => text(StatusCode::OK, format!("ready; warning: {warning}\n")),
                None => text(StatusCode::OK, "ready\n"),
            },
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        PATH_METRICS => {
            state.refresh_metrics();
            let mut resp = text(StatusCode::OK, state.metrics.render());
            resp.headers_mut()
                .insert(CONTENT_TYPE, "text/plain; version=0.0.4".parse().unwrap());
            resp
        }
        PATH_STATUS => json(&state.status()),
        PATH_DEBUG_PODS => json(&state.pods_with_counters()),
        PATH_DEBUG_CONNECTIONS => json(&state.proxy.connections.recent()),
        PATH_CONFIG_DUMP => json(&config_dump::dump(state)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("serializable");
    let mut resp = text(StatusCode::OK, body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().unwrap());
    resp
}
