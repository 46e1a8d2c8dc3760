//! Per-request authorization for the HTTP (L7) path: the connection's
//! attributes (who, from where, to where) plus each request's method, host,
//! normalised path and headers go to the destination workload's policies.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    identity::SpiffeId,
    l7::{Authorizer, RequestInfo, Verdict},
    policy::{self, Decision, HttpAttributes},
};

use super::ProxyContext;

/// What is fixed for a connection; built once, used for every request on it.
pub struct ConnectionAuthorizer {
    pub proxy: Arc<ProxyContext>,
    /// `namespace/name` of the destination pod, for logs.
    pub pod: String,
    /// Whose policies apply; looked up for every request, so a request on a
    /// long-lived connection is decided by the set in force when it arrives.
    pub workload: policy::Workload,
    pub source: Option<SpiffeId>,
    pub source_ip: std::net::IpAddr,
    pub remote_ip: std::net::IpAddr,
    pub destination: SocketAddr,
}

impl Authorizer for ConnectionAuthorizer {
    fn authorize(&self, request: &RequestInfo<'_>) -> Verdict {
        // Repeated headers are matched joined with ',', as Envoy does.
        let mut headers: Vec<(String, String)> = Vec::with_capacity(request.headers.len());
        for name in request.headers.keys() {
            let joined = request
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(",");
            headers.push((name.as_str().to_string(), joined));
        }
        let principal = self.source.as_ref().map(|id| id.to_string());
        let decision = self
            .proxy
            .workload_policy(&self.workload)
            .decide(&policy::Request {
                source_principal: principal.as_deref(),
                source_namespace: self.source.as_ref().map(|id| id.namespace()),
                source_ip: self.source_ip,
                remote_ip: self.remote_ip,
                destination_ip: self.destination.ip(),
                destination_port: self.destination.port(),
                sni: None,
                http: Some(HttpAttributes {
                    method: request.method,
                    host: request.host,
                    path: request.path,
                    headers: &headers,
                }),
            });
        let (dry_run_denies, allowed_by, denied_by) = match decision {
            Decision::Allow {
                by, dry_run_denies, ..
            } => (dry_run_denies, by, None),
            Decision::Deny {
                by, dry_run_denies, ..
            } => (dry_run_denies, None, Some(by)),
        };
        for would in &dry_run_denies {
            tracing::info!(pod = %self.pod, source = principal.as_deref().unwrap_or("-"), method = request.method, path = request.path, policy = %would, "dry-run: this request would be denied");
            self.proxy
                .count_decision(&would.to_string(), "dry_run_deny");
        }
        match denied_by {
            None => {
                self.proxy.count_decision(
                    &allowed_by.map_or_else(|| "-".to_string(), |by| by.to_string()),
                    "allow",
                );
                Verdict::Allow
            }
            Some(by) => {
                tracing::warn!(pod = %self.pod, source = principal.as_deref().unwrap_or("-"), method = request.method, path = request.path, policy = %by, "request denied");
                self.proxy.count_decision(&by.to_string(), "deny");
                Verdict::Deny {
                    reason: by.to_string(),
                }
            }
        }
    }
}
