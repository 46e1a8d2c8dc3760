//! Istio `DestinationRule` (networking.istio.io): what is served of its
//! `trafficPolicy` on a mesh Service's ports, applied on the client's node
//! to the Service's settings before its balancers are built:
//!
//! - `connectionPool` as circuit breakers with Envoy's overflow answer
//!   (`503`, response flag `UO`, at once): `http.http2MaxRequests` bounds
//!   the requests in flight to the Service; `tcp.maxConnections` with
//!   `http.http1MaxPendingRequests` bounds them too (an HTTP/1 connection
//!   carries one request at a time, and only that many may wait for one);
//!   `tcp.connectTimeout` is the Service's connect timeout;
//! - `outlierDetection`: `consecutive5xxErrors`, `baseEjectionTime`,
//!   `maxEjectionPercent` are the Service's ejection settings (`interval`
//!   is accepted: ejection on consecutive errors is at once, in Envoy too).
//!
//! Every other field is refused, named, until it is served.

#![allow(clippy::result_large_err)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_yaml::Value;

use super::load::{route_namespace, under};
use super::{
    RouteId, ServiceRef,
    table::{ParentStatus, RouteStatus},
};
use crate::config::ServiceConfig;
use crate::policy::{DocCtx, LoadError, Seg, key};

pub(super) const KIND: &str = "DestinationRule";

/// A DestinationRule, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    pub id: RouteId,
    pub service: ServiceRef,
    pub policy: TrafficPolicy,
    /// Named sets of the Service's endpoints, by labels, each a backend
    /// routes may name (a VirtualService destination's `subset`).
    pub subsets: Vec<Subset>,
    pub source: PathBuf,
}

/// A `subsets` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub name: String,
    /// Endpoints with all of these labels belong to it.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The rule's policy with the subset's own components in place of the
    /// rule's (Istio's merge: a component the subset sets replaces the
    /// rule's whole).
    pub policy: TrafficPolicy,
}

/// Which components of a `trafficPolicy` were written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Components {
    pub connection_pool: bool,
    pub outlier_detection: bool,
    pub load_balancer: bool,
}

/// What is served of a `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    pub written: Components,
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection` (0, Istio's "unlimited", is None).
    pub max_requests_per_connection: Option<std::num::NonZeroU32>,
    /// `http.maxRetries`: retries in flight at once.
    pub max_retries: Option<u32>,
    pub consecutive_5xx_errors: Option<u32>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u8>,
    /// `loadBalancer.consistentHash`.
    pub hash_by: Option<crate::config::HashKey>,
    /// `loadBalancer.simple`.
    pub choice: Option<crate::balance::Choice>,
}

impl TrafficPolicy {
    /// This policy with the components `subset` wrote in place of its own.
    pub fn overridden_by(&self, subset: &TrafficPolicy) -> TrafficPolicy {
        let mut merged = self.clone();
        let written = subset.written;
        if written.connection_pool {
            merged.max_connections = subset.max_connections;
            merged.connect_timeout = subset.connect_timeout;
            merged.http1_max_pending_requests = subset.http1_max_pending_requests;
            merged.http2_max_requests = subset.http2_max_requests;
            merged.max_requests_per_connection = subset.max_requests_per_connection;
            merged.max_retries = subset.max_retries;
        }
        if written.outlier_detection {
            merged.consecutive_5xx_errors = subset.consecutive_5xx_errors;
            merged.base_ejection_time = subset.base_ejection_time;
            merged.max_ejection_percent = subset.max_ejection_percent;
        }
        if written.load_balancer {
            merged.hash_by = subset.hash_by.clone();
            merged.choice = subset.choice;
        }
        merged.written = Components {
            connection_pool: self.written.connection_pool || written.connection_pool,
            outlier_detection: self.written.outlier_detection || written.outlier_detection,
            load_balancer: self.written.load_balancer || written.load_balancer,
        };
        merged
    }

    /// The most requests in flight to the Service, if the connection pool
    /// bounds them.
    pub fn max_in_flight(&self) -> Option<u32> {
        let by_connections = self
            .max_connections
            .map(|c| c.saturating_add(self.http1_max_pending_requests.unwrap_or(u32::MAX)));
        match (by_connections, self.http2_max_requests) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawDestinationRule {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: super::model::RawMetadata,
    spec: RawSpec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
    #[serde(default)]
    subsets: Vec<RawSubset>,
    #[serde(default)]
    export_to: Option<Value>,
    #[serde(default)]
    workload_selector: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTrafficPolicy {
    #[serde(default)]
    connection_pool: Option<RawConnectionPool>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    port_level_settings: Option<Value>,
    #[serde(default)]
    tunnel: Option<Value>,
    #[serde(default)]
    proxy_protocol: Option<Value>,
    #[serde(default)]
    retry_budget: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConnectionPool {
    #[serde(default)]
    tcp: Option<RawTcp>,
    #[serde(default)]
    http: Option<RawHttp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTcp {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    tcp_keepalive: Option<Value>,
    #[serde(default)]
    max_connection_duration: Option<Value>,
    #[serde(default)]
    idle_timeout: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    http2_max_requests: Option<u32>,
    #[serde(default)]
    max_requests_per_connection: Option<u32>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    idle_timeout: Option<Value>,
    #[serde(default)]
    h2_upgrade_policy: Option<Value>,
    #[serde(default)]
    use_client_protocol: Option<Value>,
    #[serde(default)]
    max_concurrent_streams: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutlier {
    #[serde(default)]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<Value>,
    #[serde(default)]
    consecutive_errors: Option<Value>,
    #[serde(default)]
    consecutive_local_origin_failures: Option<Value>,
    #[serde(default)]
    split_external_local_origin_errors: Option<Value>,
    #[serde(default)]
    min_health_percent: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLoadBalancer {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<RawConsistentHash>,
    #[serde(default)]
    locality_lb_setting: Option<Value>,
    #[serde(default)]
    warmup: Option<Value>,
    #[serde(default)]
    warmup_duration_secs: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConsistentHash {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_cookie: Option<RawCookie>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
    #[serde(default)]
    ring_hash: Option<Value>,
    #[serde(default)]
    maglev: Option<Value>,
    #[serde(default)]
    minimum_ring_size: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCookie {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    attributes: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTls {
    mode: String,
}

fn present(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

fn refuse_present(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    fields: &[(&'static str, &Option<Value>)],
) -> Result<(), LoadError> {
    for (field, value) in fields {
        if present(value) {
            let mut here = at.to_vec();
            here.push(key(field));
            return Err(ctx.semantic(
                &here,
                "not supported yet (docs/traffic.md lists what is)".into(),
            ));
        }
    }
    Ok(())
}

fn duration(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    text: Option<String>,
) -> Result<Option<Duration>, LoadError> {
    text.map(|t| humantime::parse_duration(&t).map_err(|e| ctx.semantic(at, format!("{t:?}: {e}"))))
        .transpose()
}

pub(super) fn convert(
    ctx: &DocCtx<'_>,
    path: &std::path::Path,
    raw: RawDestinationRule,
) -> Result<DestinationRule, LoadError> {
    let namespace = route_namespace(ctx, raw.metadata.namespace.clone())?;
    let spec = raw.spec;
    refuse_present(
        ctx,
        &[key("spec")],
        &[
            ("exportTo", &spec.export_to),
            ("workloadSelector", &spec.workload_selector),
        ],
    )?;
    let service = super::virtual_service::service_of(&spec.host, &namespace).ok_or_else(|| {
        ctx.semantic(
            &[key("spec"), key("host")],
            format!("{:?} is not a mesh Service's name (name, name.namespace or name.namespace.svc.<domain>; no wildcards)", spec.host),
        )
    })?;
    let at_tp = [key("spec"), key("trafficPolicy")];
    let policy = traffic_policy(ctx, &at_tp, spec.traffic_policy.unwrap_or_default())?;
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, raw) in spec.subsets.into_iter().enumerate() {
        let at = [key("spec"), key("subsets"), Seg::Index(i)];
        if raw.name.is_empty() || raw.name.contains('~') {
            return Err(ctx.semantic(
                &under(&at, &["name"]),
                format!("{:?} is not a subset's name", raw.name),
            ));
        }
        if subsets.iter().any(|s| s.name == raw.name) {
            return Err(ctx.semantic(
                &under(&at, &["name"]),
                format!("subset {:?} is defined twice", raw.name),
            ));
        }
        let own = match raw.traffic_policy {
            Some(tp) => traffic_policy(ctx, &under(&at, &["trafficPolicy"]), tp)?,
            None => TrafficPolicy::default(),
        };
        subsets.push(Subset {
            name: raw.name,
            labels: raw.labels,
            policy: policy.overridden_by(&own),
        });
    }
    Ok(DestinationRule {
        id: RouteId {
            namespace,
            name: raw.metadata.name,
        },
        service,
        policy,
        subsets,
        source: path.to_path_buf(),
    })
}

/// A `trafficPolicy` (the rule's or a subset's) at `at`.
fn traffic_policy(
    ctx: &DocCtx<'_>,
    at_tp: &[Seg],
    tp: RawTrafficPolicy,
) -> Result<TrafficPolicy, LoadError> {
    let mut policy = TrafficPolicy::default();
    refuse_present(
        ctx,
        at_tp,
        &[
            ("portLevelSettings", &tp.port_level_settings),
            ("tunnel", &tp.tunnel),
            ("proxyProtocol", &tp.proxy_protocol),
            ("retryBudget", &tp.retry_budget),
        ],
    )?;
    policy.written = Components {
        connection_pool: tp.connection_pool.is_some(),
        outlier_detection: tp.outlier_detection.is_some(),
        load_balancer: tp.load_balancer.is_some(),
    };
    if let Some(lb) = tp.load_balancer {
        let at = under(at_tp, &["loadBalancer"]);
        refuse_present(
            ctx,
            &at,
            &[
                ("localityLbSetting", &lb.locality_lb_setting),
                ("warmup", &lb.warmup),
                ("warmupDurationSecs", &lb.warmup_duration_secs),
            ],
        )?;
        use crate::balance::Choice;
        policy.choice = match lb.simple.as_deref() {
            None | Some("UNSPECIFIED") => None,
            // The balancer's own: power of two choices over peak-EWMA
            // latency, which picks the less loaded of two (what Envoy's
            // LEAST_REQUEST does); LEAST_CONN is its deprecated name.
            Some("LEAST_REQUEST" | "LEAST_CONN") => Some(Choice::LeastLoaded),
            Some("ROUND_ROBIN") => Some(Choice::RoundRobin),
            Some("RANDOM") => Some(Choice::Random),
            Some(other) => {
                return Err(ctx.semantic(
                    &under(&at, &["simple"]),
                    format!(
                        "{other:?} is not supported (LEAST_REQUEST, ROUND_ROBIN and RANDOM are; PASSTHROUGH needs no Service)"
                    ),
                ));
            }
        };
        if policy.choice.is_some() && lb.consistent_hash.is_some() {
            return Err(ctx.semantic(
                &under(&at, &["simple"]),
                "`simple` and `consistentHash` are exclusive".into(),
            ));
        }
        if let Some(hash) = lb.consistent_hash {
            let mut at = at.to_vec();
            at.push(key("consistentHash"));
            refuse_present(
                ctx,
                &at,
                &[
                    ("ringHash", &hash.ring_hash),
                    ("maglev", &hash.maglev),
                    ("minimumRingSize", &hash.minimum_ring_size),
                ],
            )?;
            use crate::config::HashKey;
            let mut keys = Vec::new();
            if let Some(name) = hash.http_header_name {
                let name = name.to_ascii_lowercase();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(ctx.semantic(
                        &under(&at, &["httpHeaderName"]),
                        format!("{name:?} is not a header name"),
                    ));
                }
                keys.push(HashKey::Header(name));
            }
            if let Some(cookie) = hash.http_cookie {
                let at = under(&at, &["httpCookie"]);
                if cookie.name.is_empty() || cookie.name.contains([';', '=', ' ']) {
                    return Err(ctx.semantic(
                        &under(&at, &["name"]),
                        format!("{:?} is not a cookie name", cookie.name),
                    ));
                }
                if cookie.attributes.as_ref().is_some_and(|a| !a.is_empty()) {
                    return Err(ctx.semantic(
                        &under(&at, &["attributes"]),
                        "not supported yet (docs/traffic.md lists what is)".into(),
                    ));
                }
                let ttl = duration(ctx, &under(&at, &["ttl"]), cookie.ttl)?;
                keys.push(HashKey::Cookie {
                    name: cookie.name,
                    path: cookie.path,
                    ttl,
                });
            }
            if let Some(name) = hash.http_query_parameter_name {
                keys.push(HashKey::QueryParameter(name));
            }
            if hash.use_source_ip == Some(true) {
                keys.push(HashKey::SourceIp);
            }
            if keys.len() != 1 {
                return Err(ctx.semantic(
                    &at,
                    "exactly one of `httpHeaderName`, `httpCookie`, `httpQueryParameterName` and `useSourceIp: true`".into(),
                ));
            }
            policy.hash_by = keys.pop();
        }
    }
    if let Some(tls) = &tp.tls
        && tls.mode != "ISTIO_MUTUAL"
    {
        return Err(ctx.semantic(
            &under(at_tp, &["tls", "mode"]),
            format!(
                "{:?}: only ISTIO_MUTUAL, what the mesh always does between its workloads",
                tls.mode
            ),
        ));
    }
    if let Some(pool) = tp.connection_pool {
        if let Some(tcp) = pool.tcp {
            let at = under(at_tp, &["connectionPool", "tcp"]);
            refuse_present(
                ctx,
                &at,
                &[
                    ("tcpKeepalive", &tcp.tcp_keepalive),
                    ("maxConnectionDuration", &tcp.max_connection_duration),
                    ("idleTimeout", &tcp.idle_timeout),
                ],
            )?;
            policy.max_connections = tcp.max_connections;
            let mut at_timeout = at.to_vec();
            at_timeout.push(key("connectTimeout"));
            policy.connect_timeout = duration(ctx, &at_timeout, tcp.connect_timeout)?;
        }
        if let Some(http) = pool.http {
            let at = under(at_tp, &["connectionPool", "http"]);
            refuse_present(
                ctx,
                &at,
                &[
                    ("idleTimeout", &http.idle_timeout),
                    ("h2UpgradePolicy", &http.h2_upgrade_policy),
                    ("useClientProtocol", &http.use_client_protocol),
                    ("maxConcurrentStreams", &http.max_concurrent_streams),
                ],
            )?;
            policy.http1_max_pending_requests = http.http1_max_pending_requests;
            policy.http2_max_requests = http.http2_max_requests;
            policy.max_requests_per_connection = http
                .max_requests_per_connection
                .and_then(std::num::NonZeroU32::new);
            policy.max_retries = http.max_retries;
        }
        for (value, field) in [
            (policy.max_connections, "maxConnections"),
            (policy.http2_max_requests, "http2MaxRequests"),
        ] {
            if value == Some(0) {
                return Err(ctx.semantic(
                    &under(at_tp, &["connectionPool", field]),
                    "must be at least 1".into(),
                ));
            }
        }
    }
    if let Some(outlier) = tp.outlier_detection {
        let at = under(at_tp, &["outlierDetection"]);
        refuse_present(
            ctx,
            &at,
            &[
                (
                    "consecutiveGatewayErrors",
                    &outlier.consecutive_gateway_errors,
                ),
                ("consecutiveErrors", &outlier.consecutive_errors),
                (
                    "consecutiveLocalOriginFailures",
                    &outlier.consecutive_local_origin_failures,
                ),
                (
                    "splitExternalLocalOriginErrors",
                    &outlier.split_external_local_origin_errors,
                ),
                ("minHealthPercent", &outlier.min_health_percent),
            ],
        )?;
        let mut at_interval = at.to_vec();
        at_interval.push(key("interval"));
        duration(ctx, &at_interval, outlier.interval)?;
        if outlier.consecutive_5xx_errors == Some(0) {
            let mut here = at.to_vec();
            here.push(key("consecutive5xxErrors"));
            return Err(ctx.semantic(
                &here,
                "0 turns ejection off in Istio; leave outlierDetection out instead".into(),
            ));
        }
        policy.consecutive_5xx_errors = outlier.consecutive_5xx_errors;
        let mut at_base = at.to_vec();
        at_base.push(key("baseEjectionTime"));
        policy.base_ejection_time = duration(ctx, &at_base, outlier.base_ejection_time)?;
        policy.max_ejection_percent = match outlier.max_ejection_percent {
            None => None,
            Some(p) if p <= 100 => Some(p as u8),
            Some(p) => {
                let mut here = at.to_vec();
                here.push(key("maxEjectionPercent"));
                return Err(ctx.semantic(&here, format!("{p} is more than 100")));
            }
        };
    }
    Ok(policy)
}

/// `services` with the DestinationRules applied; the conditions of the
/// rules whose Service is not known (they change nothing until it is).
pub fn apply(
    services: &[ServiceConfig],
    rules: &[Arc<DestinationRule>],
) -> (Vec<ServiceConfig>, Vec<RouteStatus>) {
    let mut out = services.to_vec();
    let mut unresolved = Vec::new();
    let mut subsets = Vec::new();
    for rule in rules {
        let Some(service) = out
            .iter_mut()
            .find(|s| s.namespace == rule.service.namespace && s.name == rule.service.name)
        else {
            unresolved.push(RouteStatus {
                route: format!("DestinationRule {}", rule.id),
                file: rule.source.clone(),
                parents: vec![ParentStatus {
                    parent: format!("{}/{}", rule.service.namespace, rule.service.name),
                    accepted: false,
                    reason: Some(
                        "no such Service: the rule changes nothing until it is known".into(),
                    ),
                }],
                unresolved_backends: Vec::new(),
            });
            continue;
        };
        // A subset's policy is whole already (the rule's, with the
        // subset's components in place): applied to the Service as written.
        let written = service.clone();
        apply_policy(service, &rule.policy);
        for subset in &rule.subsets {
            let mut part = written.clone();
            part.subset = Some(subset.name.clone());
            part.vips.clear();
            part.subsets.clear();
            part.endpoints.retain(|e| {
                subset
                    .labels
                    .iter()
                    .all(|(k, v)| e.labels.get(k) == Some(v))
            });
            apply_policy(&mut part, &subset.policy);
            subsets.push(part);
        }
    }
    out.extend(subsets);
    (out, unresolved)
}

/// What a policy changes of a Service's settings.
fn apply_policy(service: &mut ServiceConfig, p: &TrafficPolicy) {
    if let Some(timeout) = p.connect_timeout {
        service.connect_timeout = timeout;
    }
    if let Some(n) = p.consecutive_5xx_errors {
        service.outlier_detection.consecutive_failures = n;
    }
    if let Some(t) = p.base_ejection_time {
        service.outlier_detection.base_ejection_time = t;
    }
    if let Some(m) = p.max_ejection_percent {
        service.outlier_detection.max_ejection_percent = m;
    }
    if let Some(max) = p.max_in_flight() {
        service.max_requests_in_flight = Some(max);
    }
    if let Some(hash) = &p.hash_by {
        service.hash_by = Some(hash.clone());
    }
    if let Some(max) = p.max_requests_per_connection {
        service.max_requests_per_connection = Some(max);
    }
    if let Some(max) = p.max_retries {
        service.max_retries_in_flight = Some(max);
    }
    if let Some(choice) = p.choice {
        service.choice = choice;
    }
}
