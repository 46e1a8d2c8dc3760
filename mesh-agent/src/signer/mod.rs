//! The mesh's own signer for clusters without istiod (`mesh-agent ca`): it
//! serves the Istio CA API (identity::ca_api) over TLS and signs an identity
//! only for a node agent that runs pods of it. It keeps no state of its own
//! (the issuer is in its files, the facts in the API), so restarts lose
//! nothing and several replicas can serve side by side.
//!
//! - `config.rs`: its configuration file;
//! - `authorize.rs`: who may have which identity (istiod's node authorizer);
//! - `service.rs`: the answer to a request: TokenReview, pods, signing;
//! - `metrics.rs`: requests by result, signing time.

pub mod authorize;
pub mod config;
pub mod metrics;
pub mod service;

use std::{convert::Infallible, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tonic::transport::{Identity, ServerTlsConfig, server::TcpIncoming};

use crate::identity::ca_api::CertificateService;

/// Runs the signer until SIGTERM or SIGINT.
pub async fn run(config_path: &std::path::Path) -> Result<()> {
    let config = config::SignerConfig::load(config_path)?;
    let kube = crate::kubernetes::client(config.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(metrics::SignerMetrics::default());
    let signer = service::Signer::new(config.clone(), kube, metrics.clone())?;
    let (chain, key) = signer.serving_certificate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the CA API on {}", config.listen))?;
    let admin = TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("binding the signer's admin address {}", config.admin))?;
    tokio::spawn(serve_admin(admin, metrics));
    tracing::info!(listen = %config.listen, admin = %config.admin, "signer serving");
    tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
        .context("the signer's TLS")?
        .add_service(CertificateService::new(Arc::new(signer)))
        // Answers are small and go out at once (no Nagle wait on an ACK).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(),
        )
        .await
        .context("serving the CA API")?;
    tracing::info!("signer stopped");
    Ok(())
}

async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `/metrics` and `/readyz` (ready once serving: the signer holds no state
/// to warm up).
async fn serve_admin(listener: TcpListener, metrics: Arc<metrics::SignerMetrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (code, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/readyz" | "/healthz" => (StatusCode::OK, "ready\n".to_string()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = code;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
