//! Authorization: every connection (L4) and every HTTP request (L7) into a
//! pod of this node is decided by that pod's policies in the snapshot in
//! force; denies and dry-run would-denies are logged with the deciding
//! policy and rule, and every decision is counted.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hyper::HeaderMap;
use parking_lot::Mutex;

use super::{pod::PodHandle, snapshot::SnapshotCell};
use crate::{
    identity::SpiffeId,
    l7::{self, RequestInfo, Verdict},
    policy::{self, CompiledPolicies, Decision, HeaderLookup, HttpAttributes, PolicyRef},
};

/// Decides, logs and counts.
#[derive(Default)]
pub struct Authorizer {
    /// Decisions by policy rule (none: allowed with no ALLOW policy in
    /// play): allow, deny, dry-run deny. Keyed by the rule itself, so
    /// counting a decision costs a lookup, not a string.
    decisions: Mutex<HashMap<Option<PolicyRef>, [u64; 6]>>,
    /// The token buckets of rate-limited pods.
    limiter: policy::RateLimiter,
}

/// The kinds of decision counted, in the order of the counters.
const DECISIONS: [&str; 6] = [
    "allow",
    "deny",
    "dry_run_deny",
    "kubelet_probe",
    "unauthenticated",
    "rate_limited",
];
const ALLOW: usize = 0;
const DENY: usize = 1;
const DRY_RUN_DENY: usize = 2;
const KUBELET_PROBE: usize = 3;
const UNAUTHENTICATED: usize = 4;
const RATE_LIMITED: usize = 5;

impl Authorizer {
    /// Decisions so far: (policy rule or `-`, decision) -> count.
    pub fn decisions(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for (by, counts) in self.decisions.lock().iter() {
            let by = by
                .as_ref()
                .map_or_else(|| "-".to_string(), |by| by.to_string());
            for (kind, &count) in DECISIONS.iter().zip(counts) {
                if count > 0 {
                    out.insert((by.clone(), kind.to_string()), count);
                }
            }
        }
        out
    }

    /// Counts a request answered 401 (its JWT failed), under policy `-`.
    pub fn count_unauthenticated(&self) {
        self.count(None, UNAUTHENTICATED);
    }

    /// Counts one decision of kind `kind` (an index into [`DECISIONS`]).
    fn count(&self, by: Option<&PolicyRef>, kind: usize) {
        self.decisions.lock().entry(by.cloned()).or_default()[kind] += 1;
    }

    /// Whether a plaintext connection from `client` to `port` of `target`
    /// is the kubelet probing it: from the node's own address to a probe
    /// port. Such a connection is let in whatever the pod's policies say
    /// (as Istio does), and counted as a `kubelet_probe` decision; nothing
    /// else from the node gets that pass.
    pub fn kubelet_probe(&self, target: &PodHandle, client: IpAddr, port: u16) -> bool {
        let probes = &target.kubelet_probes;
        let is_probe = probes.ports.contains(&port) && probes.from.contains(&client);
        if is_probe {
            self.count(None, KUBELET_PROBE);
        }
        is_probe
    }

    /// Whether a plaintext connection from outside the mesh (`client`) may
    /// come into `target` on `port`: not when a PeerAuthentication in
    /// STRICT mode says so for that port. Err names the PeerAuthentication;
    /// the refusal is logged and counted as a deny by it.
    pub fn plaintext(
        &self,
        policies: &CompiledPolicies,
        target: &PodHandle,
        client: IpAddr,
        port: u16,
    ) -> Result<(), String> {
        let Some(by) = policies
            .for_workload(&target.workload)
            .refusing_plaintext(port)
        else {
            return Ok(());
        };
        tracing::warn!(pod = %target.key, src = %client, dst_port = port, policy = %by, "plaintext connection refused");
        self.count(Some(&by), DENY);
        Err(by.to_string())
    }

    /// Authorizes a plain TCP connection into `target` (L4: HTTP-only rules
    /// are judged as Istio does for TCP traffic). Err names the deciding
    /// policy and rule.
    pub fn connection(
        &self,
        policies: &CompiledPolicies,
        target: &PodHandle,
        source: Option<&SpiffeId>,
        source_ip: IpAddr,
        remote_ip: IpAddr,
        dst: SocketAddr,
    ) -> Result<(), String> {
        let principal = source.map(|id| id.to_string());
        let request = policy::Request {
            source_principal: principal.as_deref(),
            source_namespace: source.map(|id| id.namespace()),
            source_ip,
            remote_ip,
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            sni: None,
            http: None,
        };
        self.decide(policies, &target.key, &target.workload, &request)
    }

    /// Authorizes a connection (L4) or an HTTP request (`request.http` set)
    /// into the pod `pod_key`, by `policies` for `workload`.
    pub fn decide(
        &self,
        policies: &CompiledPolicies,
        pod_key: &str,
        workload: &policy::Workload,
        request: &policy::Request<'_>,
    ) -> Result<(), String> {
        let decision = policies.for_workload(workload).decide(request);
        let (dry_run_denies, allowed_by, denied_by) = match decision {
            Decision::Allow {
                by, dry_run_denies, ..
            } => (dry_run_denies, by, None),
            Decision::Deny {
                by, dry_run_denies, ..
            } => (dry_run_denies, None, Some(by)),
        };
        let source = request.source_principal.unwrap_or("-");
        let (method, path) = request
            .http
            .as_ref()
            .map_or(("-", "-"), |h| (h.method, h.path));
        let what = if request.http.is_some() {
            "request"
        } else {
            "connection"
        };
        for would in &dry_run_denies {
            tracing::info!(pod = %pod_key, source, src = %request.source_ip, dst_port = request.destination_port, method, path, policy = %would, "dry-run: this {what} would be denied");
            self.count(Some(would), DRY_RUN_DENY);
        }
        match denied_by {
            None => {
                self.count(allowed_by.as_ref(), ALLOW);
                Ok(())
            }
            Some(by) => {
                tracing::warn!(pod = %pod_key, source, src = %request.source_ip, dst_port = request.destination_port, method, path, policy = %by, "{what} denied");
                self.count(Some(&by), DENY);
                Err(by.to_string())
            }
        }
    }
}

/// Per-request authorization of one HTTP connection: what is fixed for the
/// connection (who, from where, to where), built once; each request's
/// method, host, normalised path and headers added to it.
pub struct ConnectionAuthorizer {
    pub authorizer: Arc<Authorizer>,
    /// The policies are those in force when each request arrives, so a
    /// request on a long-lived connection follows a reload.
    pub snapshots: SnapshotCell,
    /// `namespace/name` of the destination pod, for logs.
    pub pod: String,
    /// Whose policies apply.
    pub workload: policy::Workload,
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub destination: SocketAddr,
}

impl ConnectionAuthorizer {
    /// Whether the destination's RequestAuthentications check tokens.
    pub fn checks_jwt(&self) -> bool {
        self.snapshots
            .load()
            .policies
            .for_workload(&self.workload)
            .checks_jwt()
    }
}

impl l7::Authorizer for ConnectionAuthorizer {
    fn authenticate(
        &self,
        headers: &mut http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Arc<policy::RequestAuth>>, policy::Unauthenticated> {
        let snapshot = self.snapshots.load();
        let result = snapshot
            .policies
            .for_workload(&self.workload)
            .authenticate(headers, query);
        if let Err(why) = &result {
            tracing::warn!(pod = %self.pod, src = %self.source_ip, reason = %why, "request refused: invalid JWT");
            self.authorizer.count_unauthenticated();
        }
        result
    }

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
                auth: request.auth,
            }),
        };
        let snapshot = self.snapshots.load();
        if let Err(by) = self.authorizer.decide(
            &snapshot.policies,
            &self.pod,
            &self.workload,
            &decision_request,
        ) {
            return Verdict::Deny { reason: by };
        }
        // Allowed: then its rate limits count it.
        let workload_policy = snapshot.policies.for_workload(&self.workload);
        let now = std::time::Instant::now();
        let client_namespace = self.source.as_ref().map(|id| id.namespace());
        for (limit, scope) in workload_policy.rate_limits_on(self.destination.port()) {
            if scope.is_some_and(|scope| !scope.applies(request, client_namespace)) {
                continue;
            }
            if let Err(limited) =
                self.authorizer
                    .limiter
                    .check(limit, &self.pod, self.source.as_ref(), now)
            {
                let by = PolicyRef::RateLimit(Arc::new(limit.name().clone()));
                self.authorizer.count(Some(&by), RATE_LIMITED);
                return Verdict::Limited {
                    by: by.to_string(),
                    limit: limited.limit,
                    retry_after: limited.retry_after,
                };
            }
        }
        Verdict::Allow
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
