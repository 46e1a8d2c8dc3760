//! Local rate limits on the destination's side, in the shape of Linkerd's
//! `HTTPLocalRateLimitPolicy` (policy.linkerd.io/v1alpha1): the one
//! published resource for a mesh proxy's own token buckets, with a total
//! limit, a limit per client identity and overrides for named clients.
//! Linkerd targets its `Server` resource; this mesh has none, so the
//! target is the Service (`group: ""`, `kind: Service`) whose pods (its
//! selector) and ports (its target ports) are limited; or, per route, an
//! `HTTPRoute` or `GRPCRoute` (`group: gateway.networking.k8s.io`): the
//! requests that match one of its rules, at the pods and ports of its
//! parent Services (from its namespace's clients only, for a consumer
//! route), counted in buckets of their own. A request beyond a
//! limit is answered `429 Too Many Requests` by the destination's agent,
//! with `Retry-After` and the rate-limit headers.
//!
//! Each pod has its own buckets (as each Linkerd proxy has): `total` for
//! all its requests on the target ports, `identity` for each client
//! identity (the clients without one share a bucket), an override's rate
//! for the identities it names. A bucket holds one second of its rate
//! (at least one request) and refills continuously.

// As in `load`: a load error is built at most once per load.
#![allow(clippy::result_large_err)]

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::compile::PolicyName;
use super::load::{DocCtx, LoadError, Seg, key};
use super::model::RawMetadata;
use crate::identity::SpiffeId;

pub(super) const KIND: &str = "HTTPLocalRateLimitPolicy";
pub(super) const API_VERSION: &str = "policy.linkerd.io/v1alpha1";

/// One loaded rate limit policy.
#[derive(Debug)]
pub struct RateLimit {
    pub(crate) id: Arc<PolicyName>,
    /// What is limited.
    pub(crate) target: LimitTarget,
    /// Requests per second of all clients together, per pod.
    pub(crate) total: Option<u32>,
    /// Requests per second of each client identity, per pod.
    pub(crate) identity: Option<u32>,
    /// Per-identity rates for named clients (`namespace`, service account).
    pub(crate) overrides: Vec<(u32, Vec<(String, String)>)>,
    pub(crate) source: Arc<std::path::Path>,
}

/// What a rate limit is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitTarget {
    /// The pods and ports of this Service (of the policy's namespace).
    Service(String),
    /// The requests matching this route (of the policy's namespace, of
    /// this kind: `HTTPRoute` or `GRPCRoute`) at its parents' pods.
    Route { kind: &'static str, name: String },
}

impl std::fmt::Display for LimitTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitTarget::Service(name) => write!(f, "Service {name}"),
            LimitTarget::Route { kind, name } => write!(f, "{kind} {name}"),
        }
    }
}

impl RateLimit {
    pub fn name(&self) -> &PolicyName {
        &self.id
    }

    /// The per-identity rate for `client` (`None`: no identity limit).
    fn identity_rate(&self, client: Option<&SpiffeId>) -> Option<u32> {
        if let Some(client) = client {
            for (rate, refs) in &self.overrides {
                if refs
                    .iter()
                    .any(|(ns, sa)| client.namespace() == ns && client.service_account() == sa)
                {
                    return Some(*rate);
                }
            }
        }
        self.identity
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRateLimit {
    #[allow(dead_code)] // checked on the lenient first pass
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    spec: RawSpec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    target_ref: RawTargetRef,
    #[serde(default)]
    total: Option<RawRate>,
    #[serde(default)]
    identity: Option<RawRate>,
    #[serde(default)]
    overrides: Vec<RawOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTargetRef {
    #[serde(default)]
    group: Option<String>,
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRate {
    requests_per_second: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOverride {
    requests_per_second: u32,
    client_refs: Vec<RawClientRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClientRef {
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

pub(super) fn convert(ctx: &DocCtx<'_>, raw: RawRateLimit) -> Result<RateLimit, LoadError> {
    let meta = &raw.metadata;
    let Some(namespace) = meta.namespace.clone().filter(|n| !n.is_empty()) else {
        return Err(ctx.semantic(&[key("metadata")], "missing field `namespace`".into()));
    };
    let spec = raw.spec;
    let target = &spec.target_ref;
    let group = target.group.as_deref().unwrap_or("");
    let limited = match (group, target.kind.as_str()) {
        ("" | "core", "Service") => LimitTarget::Service(target.name.clone()),
        ("gateway.networking.k8s.io", "HTTPRoute") => LimitTarget::Route {
            kind: "HTTPRoute",
            name: target.name.clone(),
        },
        ("gateway.networking.k8s.io", "GRPCRoute") => LimitTarget::Route {
            kind: "GRPCRoute",
            name: target.name.clone(),
        },
        _ => {
            return Err(ctx.semantic(
                &[key("spec"), key("targetRef"), key("kind")],
                format!(
                    "{} (group {group:?}) is not supported: target the Service whose pods are limited (group \"\", kind Service), or a route (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute); this mesh has no Linkerd Server resources",
                    target.kind
                ),
            ));
        }
    };
    let rate = |r: &Option<RawRate>, field: &'static str| -> Result<Option<u32>, LoadError> {
        match r {
            Some(RawRate {
                requests_per_second: 0,
            }) => Err(ctx.semantic(
                &[key("spec"), key(field), key("requestsPerSecond")],
                "must be at least 1".into(),
            )),
            Some(r) => Ok(Some(r.requests_per_second)),
            None => Ok(None),
        }
    };
    let total = rate(&spec.total, "total")?;
    let identity = rate(&spec.identity, "identity")?;
    let mut overrides = Vec::new();
    for (i, o) in spec.overrides.iter().enumerate() {
        let at =
            |field: &'static str| vec![key("spec"), key("overrides"), Seg::Index(i), key(field)];
        if o.requests_per_second == 0 {
            return Err(ctx.semantic(&at("requestsPerSecond"), "must be at least 1".into()));
        }
        let mut refs = Vec::new();
        for (j, client) in o.client_refs.iter().enumerate() {
            if client.kind != "ServiceAccount" {
                let mut here = at("clientRefs");
                here.extend([Seg::Index(j), key("kind")]);
                return Err(ctx.semantic(
                    &here,
                    format!("{} is not supported (ServiceAccount is)", client.kind),
                ));
            }
            refs.push((
                client
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                client.name.clone(),
            ));
        }
        overrides.push((o.requests_per_second, refs));
    }
    if total.is_none() && identity.is_none() && overrides.is_empty() {
        return Err(ctx.semantic(
            &[key("spec")],
            "limits nothing: give `total`, `identity` or `overrides`".into(),
        ));
    }
    Ok(RateLimit {
        id: Arc::new(PolicyName {
            namespace,
            name: meta.name.clone(),
        }),
        target: limited,
        total,
        identity,
        overrides,
        source: Arc::from(ctx.file),
    })
}

/// A token bucket: `rate` tokens a second, holding one second's worth (at
/// least one).
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate);
        let capacity = rate.max(1.0);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Puts back a token taken for a request another bucket refused.
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }
}

/// A request over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit that refused it, in requests per second.
    pub limit: u32,
    /// When a request would be let in again.
    pub retry_after: Duration,
}

/// The buckets of every limited pod, kept across reloads (a reload does
/// not refill them): by (policy, pod, the rate the policy had), total and
/// per identity.
#[derive(Default)]
pub struct RateLimiter {
    buckets: parking_lot::Mutex<HashMap<BucketKey, TokenBucket>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BucketKey {
    policy: Arc<PolicyName>,
    pod: Arc<str>,
    /// `None`: the total bucket; `Some("")`: clients without an identity.
    client: Option<String>,
    rate: u32,
}

/// Buckets of pods or identities not seen for this long are forgotten
/// (a full one is what a new one would be).
const IDLE_BUCKET: Duration = Duration::from_secs(60);
/// When there are more buckets than this, idle ones are swept.
const SWEEP_ABOVE: usize = 4096;

impl RateLimiter {
    /// Lets one request to `pod` from `client` through `limit`, or not.
    pub fn check(
        &self,
        limit: &RateLimit,
        pod: &str,
        client: Option<&SpiffeId>,
        now: Instant,
    ) -> Result<(), Limited> {
        let mut buckets = self.buckets.lock();
        if buckets.len() > SWEEP_ABOVE {
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < IDLE_BUCKET);
        }
        let pod: Arc<str> = Arc::from(pod);
        let key = |client: Option<String>, rate: u32| BucketKey {
            policy: limit.id.clone(),
            pod: pod.clone(),
            client,
            rate,
        };
        let total = limit.total.map(|rate| (key(None, rate), rate));
        let identity = limit.identity_rate(client).map(|rate| {
            let who = client.map(ToString::to_string).unwrap_or_default();
            (key(Some(who), rate), rate)
        });
        let mut taken: Option<BucketKey> = None;
        for (key, rate) in total.into_iter().chain(identity) {
            let bucket = buckets
                .entry(key.clone())
                .or_insert_with(|| TokenBucket::new(rate, now));
            if let Err(retry_after) = bucket.take(now) {
                // Refused: the token the other bucket gave is not spent.
                if let Some(first) = taken.and_then(|k| buckets.get_mut(&k)) {
                    first.give_back();
                }
                return Err(Limited {
                    limit: rate,
                    retry_after,
                });
            }
            taken = Some(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServiceConfig, ServicePort};
    use crate::policy::{Workload, load};

    fn limit(spec: &str) -> Result<crate::policy::PolicySet, String> {
        let text = format!(
            "apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: rl, namespace: shop}}
spec:
  targetRef: {{group: \"\", kind: Service, name: web}}
{spec}"
        );
        load([("policies/rl.yaml", text.as_str())]).map_err(|e| e.to_string())
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    #[test]
    fn a_bucket_holds_one_second_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, t0);
        for _ in 0..10 {
            bucket.take(t0).unwrap();
        }
        let wait = bucket.take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        let later = t0 + Duration::from_millis(500);
        let admitted = (0..10).filter(|_| bucket.take(later).is_ok()).count();
        assert_eq!(admitted, 5);
        // Under an offered 100/s for 10 s: the burst, then 10 a second.
        let mut bucket = TokenBucket::new(10, t0);
        let admitted = (0..1000)
            .filter(|i| bucket.take(t0 + Duration::from_millis(10 * i)).is_ok())
            .count();
        assert!((109..=111).contains(&admitted), "{admitted}");
    }

    #[test]
    fn total_identity_and_overrides_each_have_their_buckets() {
        let set = limit(
            "  total: {requestsPerSecond: 100}
  identity: {requestsPerSecond: 2}
  overrides:
  - requestsPerSecond: 5
    clientRefs: [{kind: ServiceAccount, name: vip}]
",
        )
        .unwrap();
        let rl = &set.rate_limits[0];
        let limiter = RateLimiter::default();
        let pod: Arc<str> = Arc::from("shop/web-1");
        let now = Instant::now();
        let admitted = |client: Option<&SpiffeId>| {
            (0..20)
                .filter(|_| limiter.check(rl, &pod, client, now).is_ok())
                .count()
        };
        assert_eq!(admitted(Some(&id("a"))), 2);
        assert_eq!(admitted(Some(&id("b"))), 2);
        assert_eq!(admitted(Some(&id("vip"))), 5);
        // The clients without an identity share one bucket.
        assert_eq!(admitted(None), 2);
        let refused = limiter.check(rl, &pod, Some(&id("a")), now).unwrap_err();
        assert_eq!(refused.limit, 2);
        // Another pod has its own buckets.
        let other: Arc<str> = Arc::from("shop/web-2");
        assert!(limiter.check(rl, &other, Some(&id("a")), now).is_ok());
        // The total counted only admitted requests: 2 + 2 + 5 + 2 + 1 of 100.
        let total_left = (0..200)
            .filter(|i| {
                let client = id(&format!("c{i}"));
                limiter.check(rl, &pod, Some(&client), now).is_ok()
            })
            .count();
        assert_eq!(total_left, 100 - 11);
    }

    /// Service shop/web over the pods labelled app=web, HTTP on `ports`
    /// (port, target port).
    fn web_service(ports: &[(u16, u16)]) -> ServiceConfig {
        let mut web = ServiceConfig::with_defaults();
        web.name = "web".into();
        web.namespace = "shop".into();
        web.selector = [("app".to_string(), "web".to_string())].into();
        web.ports = ports
            .iter()
            .map(|&(port, target)| ServicePort {
                port,
                target_port: Some(target),
                protocol: "http".into(),
            })
            .collect();
        web
    }

    #[test]
    fn it_limits_the_pods_and_ports_of_its_service() {
        let set = limit("  total: {requestsPerSecond: 10}\n").unwrap();
        let web = web_service(&[(80, 8080)]);
        let compiled = set.compile_with_services("istio-system", &[web]);
        let workload = |app: &str| Workload {
            namespace: "shop".into(),
            labels: [("app".to_string(), app.to_string())].into(),
        };
        let selected = compiled.for_workload(&workload("web"));
        assert!(selected.has_http_rules_on(8080));
        assert_eq!(selected.rate_limits_on(8080).count(), 1);
        assert_eq!(selected.rate_limits_on(80).count(), 0);
        let other = compiled.for_workload(&workload("db"));
        assert!(!other.has_http_rules_on(8080));
        // Without the Service it limits nothing, and says why.
        let unknown = set.compile_with_services("istio-system", &[]);
        assert_eq!(
            unknown
                .for_workload(&workload("web"))
                .rate_limits_on(8080)
                .count(),
            0
        );
        assert!(unknown.unmapped_targets()[0].contains("limits nothing"));
    }

    #[test]
    fn a_limit_on_a_route_counts_the_routes_requests_at_its_parents_pods() {
        let policy = "apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: api-limit, namespace: shop}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: api}
  total: {requestsPerSecond: 10}
";
        let set = load([("policies/rl.yaml", policy)]).unwrap();
        let routes = crate::routes::load([(
            "routes/api.yaml",
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      queryParams: [{name: v, value: \"2\"}]
    backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: client}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, namespace: shop, port: 80}]
  rules:
  - matches: [{method: POST}]
    backendRefs: [{name: web, namespace: shop, port: 80}]
",
        )])
        .unwrap()
        .routes;
        let web = web_service(&[(80, 8080), (81, 8081)]);
        let compiled = set.compile_with("istio-system", &[web], &routes);
        assert!(
            compiled.unmapped_targets().is_empty(),
            "{:?}",
            compiled.unmapped_targets()
        );
        let selected = compiled.for_workload(&Workload {
            namespace: "shop".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
        });
        // Only the parent's port.
        assert_eq!(selected.rate_limits_on(8081).count(), 0);
        let (_, scope) = selected.rate_limits_on(8080).next().unwrap();
        let scope = scope.expect("a route's limit");
        let headers = http::HeaderMap::new();
        let request = |method: &'static str, path: &'static str, query: Option<&'static str>| {
            crate::l7::RequestInfo {
                method,
                host: "web",
                path,
                query,
                headers: &headers,
                auth: None,
            }
        };
        assert!(scope.applies(&request("GET", "/api/x", Some("v=2")), Some("shop")));
        assert!(!scope.applies(&request("GET", "/api/x", Some("v=1")), Some("shop")));
        assert!(!scope.applies(&request("GET", "/other", Some("v=2")), Some("shop")));

        // The consumer route of the same name in namespace client: only
        // its namespace's clients, by its own matches.
        let consumer = policy.replace("namespace: shop", "namespace: client");
        let set = load([("policies/rl.yaml", consumer.as_str())]).unwrap();
        let web = web_service(&[(80, 8080)]);
        let compiled = set.compile_with("istio-system", std::slice::from_ref(&web), &routes);
        let selected = compiled.for_workload(&Workload {
            namespace: "shop".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
        });
        let (_, scope) = selected.rate_limits_on(8080).next().unwrap();
        let scope = scope.unwrap();
        assert!(scope.applies(&request("POST", "/", None), Some("client")));
        assert!(!scope.applies(&request("POST", "/", None), Some("shop")));
        assert!(!scope.applies(&request("GET", "/", None), Some("client")));

        // A route not known: limits nothing, and says so.
        let compiled = set.compile_with("istio-system", &[web], &[]);
        assert!(
            compiled.unmapped_targets()[0].contains("HTTPRoute client/api is not known"),
            "{:?}",
            compiled.unmapped_targets()
        );
    }

    #[test]
    fn what_cannot_be_enforced_is_named_with_file_line_and_field() {
        for (spec, says) in [
            (
                "  total: {requestsPerSecond: 0}\n",
                "policies/rl.yaml:6: document 1 (shop/rl): field spec.total.requestsPerSecond: must be at least 1",
            ),
            ("", "limits nothing"),
            (
                "  total: {requestsPerSecond: 1}\n  overrides:\n  - requestsPerSecond: 2\n    clientRefs: [{kind: Group, name: g}]\n",
                "spec.overrides[0].clientRefs[0].kind: Group is not supported",
            ),
            ("  total: {requests: 1}\n", "unknown field `requests`"),
        ] {
            let err = limit(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
        let server = "apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: rl, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  total: {requestsPerSecond: 1}
";
        let err = load([("policies/rl.yaml", server)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.targetRef.kind: Server"), "{err}");
        let version = server.replace("v1alpha1", "v9");
        let err = load([("policies/rl.yaml", version.as_str())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected policy.linkerd.io/v1alpha1"), "{err}");
    }
}
