//! Per-request authorization for the HTTP (L7) path: the connection's
//! attributes (who, from where, to where) plus each request's method, host,
//! normalised path and headers go to the destination workload's policies.

use std::{net::SocketAddr, sync::Arc};

use hyper::HeaderMap;

use crate::{
    identity::SpiffeId,
    l7::{Authorizer, RequestInfo, Verdict},
    policy::{self, HeaderLookup, HttpAttributes},
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
        let headers = Headers::new(request.headers);
        let principal = self.source.as_ref().map(|id| id.to_string());
        let decision_request = policy::Request {
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
        };
        match self
            .proxy
            .authorize(&self.pod, &self.workload, &decision_request)
        {
            Ok(()) => Verdict::Allow,
            Err(by) => Verdict::Deny { reason: by },
        }
    }
}

/// The request's headers as the policy engine asks for them. A header sent
/// once (nearly all of them) is read in place; only repeated ones are joined
/// with ',' (what Envoy matches against), so a request costs no copies.
struct Headers<'a> {
    map: &'a HeaderMap,
    repeated: Vec<(&'a str, String)>,
}

impl<'a> Headers<'a> {
    fn new(map: &'a HeaderMap) -> Self {
        let repeated = map
            .keys()
            .filter(|name| map.get_all(*name).iter().nth(1).is_some())
            .map(|name| {
                let joined = map
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(",");
                (name.as_str(), joined)
            })
            .collect();
        Self { map, repeated }
    }
}

impl HeaderLookup for Headers<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        if let Some((_, joined)) = self.repeated.iter().find(|(n, _)| *n == name) {
            return Some(joined);
        }
        self.map.get(name).and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_headers_are_read_in_place_and_repeated_ones_joined() {
        let mut map = HeaderMap::new();
        map.insert("x-token", "secret".parse().unwrap());
        map.append("x-env", "a".parse().unwrap());
        map.append("x-env", "b".parse().unwrap());
        let headers = Headers::new(&map);
        assert_eq!(headers.get("x-token"), Some("secret"));
        assert_eq!(headers.get("x-env"), Some("a,b"));
        assert_eq!(headers.get("x-missing"), None);
        assert_eq!(
            headers.repeated.len(),
            1,
            "only the repeated header is copied"
        );
    }
}
