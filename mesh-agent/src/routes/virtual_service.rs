//! Istio `VirtualService` (networking.istio.io) for users coming from
//! Istio: its HTTP routes on a mesh Service (`hosts`), read into the same
//! rules as Gateway API routes. What is served: `match` (uri, headers,
//! method, queryParams), `route` (destination host and port, weight),
//! `timeout`, and `fault` (delay and abort by percentage), which the
//! Gateway API has no filter for. A VirtualService's rules keep their
//! order (Istio: the first match wins), ahead of HTTPRoutes on the same
//! Service. Every other field is refused, named, until it is served.

#![allow(clippy::result_large_err)]

use std::{collections::BTreeMap, path::Path, time::Duration};

use http::StatusCode;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_yaml::Value;

use super::load::{route_namespace, under};
use super::{
    Backend, HeaderMatch, HttpRoute, PathMatch, QueryMatch, RequestMatch, RouteId, RouteKind, Rule,
    ServiceRef, Timeouts, ValueMatch, WeightedBackend,
    filters::{Fault, Filters},
};
use crate::policy::{DocCtx, LoadError, Seg, key};

pub(super) const KIND: &str = "VirtualService";
pub(super) const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawVirtualService {
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
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<RawHttp>,
    // Not served yet: named when present.
    #[serde(default)]
    tcp: Option<Value>,
    #[serde(default)]
    tls: Option<Value>,
    #[serde(default)]
    export_to: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<RawMatch>,
    #[serde(default)]
    route: Vec<RawDestinationWeight>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fault: Option<RawFault>,
    #[serde(default)]
    redirect: Option<RawRedirect>,
    #[serde(default)]
    rewrite: Option<RawRewrite>,
    // Not served yet: named when present.
    #[serde(default)]
    direct_response: Option<Value>,
    #[serde(default)]
    delegate: Option<Value>,
    #[serde(default)]
    retries: Option<RawRetries>,
    #[serde(default)]
    mirror: Option<RawDestination>,
    #[serde(default)]
    mirrors: Vec<RawMirrorPolicy>,
    #[serde(default)]
    mirror_percentage: Option<RawPercent>,
    #[serde(default)]
    mirror_percent: Option<u32>,
    #[serde(default)]
    cors_policy: Option<Value>,
    #[serde(default)]
    headers: Option<RawHeaders>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRedirect {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    redirect_code: Option<u16>,
    #[serde(default)]
    derive_port: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRewrite {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    uri_regex_rewrite: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMirrorPolicy {
    destination: RawDestination,
    #[serde(default)]
    percentage: Option<RawPercent>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRetries {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
    #[serde(default)]
    retry_remote_localities: Option<Value>,
    #[serde(default)]
    backoff: Option<Value>,
}

/// Istio's `Headers`: operations on the request and the response.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHeaders {
    #[serde(default)]
    request: Option<RawHeaderOperations>,
    #[serde(default)]
    response: Option<RawHeaderOperations>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHeaderOperations {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

impl RawHeaderOperations {
    fn into_modifier(self) -> super::filters::RawHeaderModifier {
        let pairs = |m: BTreeMap<String, String>| {
            m.into_iter()
                .map(|(name, value)| super::filters::RawHeader { name, value })
                .collect()
        };
        super::filters::RawHeaderModifier {
            set: pairs(self.set),
            add: pairs(self.add),
            remove: self.remove,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<RawStringMatch>,
    #[serde(default)]
    method: Option<RawStringMatch>,
    #[serde(default)]
    headers: BTreeMap<String, RawStringMatch>,
    #[serde(default)]
    query_params: BTreeMap<String, RawStringMatch>,
    // Not served yet: named when present.
    #[serde(default)]
    scheme: Option<Value>,
    #[serde(default)]
    authority: Option<Value>,
    #[serde(default)]
    port: Option<Value>,
    #[serde(default)]
    source_labels: Option<Value>,
    #[serde(default)]
    gateways: Option<Value>,
    #[serde(default)]
    ignore_uri_case: Option<Value>,
    #[serde(default)]
    without_headers: Option<Value>,
    #[serde(default)]
    source_namespace: Option<Value>,
    #[serde(default)]
    stat_prefix: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStringMatch {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDestinationWeight {
    destination: RawDestination,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    headers: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDestination {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<RawPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPort {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFault {
    #[serde(default)]
    delay: Option<RawDelay>,
    #[serde(default)]
    abort: Option<RawAbort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDelay {
    #[serde(default)]
    fixed_delay: Option<String>,
    #[serde(default)]
    percentage: Option<RawPercent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    exponential_delay: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAbort {
    #[serde(default)]
    http_status: Option<u16>,
    #[serde(default)]
    percentage: Option<RawPercent>,
    #[serde(default)]
    grpc_status: Option<Value>,
    #[serde(default)]
    http2_error: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPercent {
    value: f64,
}

fn present(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

/// A mesh Service named by a host of the VirtualService: `name`,
/// `name.namespace`, `name.namespace.svc` or `name.namespace.svc.<domain>`.
pub(super) fn service_of(host: &str, namespace: &str) -> Option<ServiceRef> {
    if host.contains('*') || host.is_empty() {
        return None;
    }
    let mut labels = host.split('.');
    let name = labels.next()?.to_string();
    let ns = labels.next().unwrap_or(namespace).to_string();
    match labels.next() {
        None | Some("svc") => Some(ServiceRef {
            namespace: ns,
            name,
        }),
        Some(_) => None,
    }
}

pub(super) fn convert(
    ctx: &DocCtx<'_>,
    path: &Path,
    raw: RawVirtualService,
) -> Result<HttpRoute, LoadError> {
    let namespace = route_namespace(ctx, raw.metadata.namespace.clone())?;
    let spec = raw.spec;
    for (field, value) in [
        ("tcp", &spec.tcp),
        ("tls", &spec.tls),
        ("exportTo", &spec.export_to),
    ] {
        if present(value) {
            return Err(ctx.semantic(
                &[key("spec"), key(field)],
                "not supported yet (docs/traffic.md lists what is)".into(),
            ));
        }
    }
    if spec.gateways.iter().any(|g| g != "mesh") {
        return Err(ctx.semantic(
            &[key("spec"), key("gateways")],
            "only `mesh` is served: this agent routes the mesh's requests, not a gateway's".into(),
        ));
    }
    let mut parents = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let service = service_of(host, &namespace).ok_or_else(|| {
            ctx.semantic(
                &[key("spec"), key("hosts"), Seg::Index(i)],
                format!("{host:?} is not a mesh Service's name (name, name.namespace or name.namespace.svc.<domain>; no wildcards)"),
            )
        })?;
        parents.push((service, None));
    }
    let rules = spec
        .http
        .into_iter()
        .enumerate()
        .map(|(i, http)| convert_http(ctx, &namespace, i, http))
        .collect::<Result<_, _>>()?;
    Ok(HttpRoute {
        id: RouteId {
            namespace,
            name: raw.metadata.name,
        },
        kind: RouteKind::VirtualService,
        created: raw.metadata.creation_timestamp,
        parents,
        rules,
        source: path.to_path_buf(),
    })
}

fn convert_http(
    ctx: &DocCtx<'_>,
    namespace: &str,
    i: usize,
    http: RawHttp,
) -> Result<Rule, LoadError> {
    let at = |field: &'static str| vec![key("spec"), key("http"), Seg::Index(i), key(field)];
    for (field, value) in [
        ("directResponse", &http.direct_response),
        ("delegate", &http.delegate),
        ("corsPolicy", &http.cors_policy),
    ] {
        if present(value) {
            return Err(ctx.semantic(
                &at(field),
                "not supported yet (docs/traffic.md lists what is)".into(),
            ));
        }
    }
    let matches = if http.matches.is_empty() {
        vec![RequestMatch {
            // Istio's route for no match: prefix `/` (what a rewrite
            // replaces).
            path: PathMatch::StringPrefix("/".into()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }]
    } else {
        http.matches
            .into_iter()
            .enumerate()
            .map(|(j, m)| convert_match(ctx, i, j, m))
            .collect::<Result<_, _>>()?
    };
    let single = http.route.len() == 1;
    let mut backends = Vec::new();
    for (j, r) in http.route.into_iter().enumerate() {
        let here = |field: &'static str| {
            vec![
                key("spec"),
                key("http"),
                Seg::Index(i),
                key("route"),
                Seg::Index(j),
                key(field),
            ]
        };
        if present(&r.headers) {
            return Err(ctx.semantic(&here("headers"), "not supported yet".into()));
        }
        let backend = destination(ctx, here("destination"), namespace, &r.destination)?;
        // Istio: a single destination takes everything; otherwise the
        // weights (of 100) say.
        let weight = r.weight.unwrap_or(if single { 100 } else { 0 });
        backends.push(WeightedBackend {
            weight,
            backend,
            filters: Filters::default(),
        });
    }
    let timeouts = Timeouts {
        request: http
            .timeout
            .map(|t| {
                humantime::parse_duration(&t)
                    .map_err(|e| ctx.semantic(&at("timeout"), format!("{t:?}: {e}")))
            })
            .transpose()?,
        backend_request: None,
    };
    let fault = http.fault.map(|f| convert_fault(ctx, i, f)).transpose()?;
    let mut filters = Filters {
        fault,
        ..Filters::default()
    };
    if let Some(headers) = http.headers {
        let mut at = at("headers");
        if let Some(request) = headers.request {
            at.push(key("request"));
            filters.request_headers = Some(super::filters::header_modifier(
                ctx,
                &at,
                request.into_modifier(),
            )?);
            at.pop();
        }
        if let Some(response) = headers.response {
            at.push(key("response"));
            filters.response_headers = Some(super::filters::header_modifier(
                ctx,
                &at,
                response.into_modifier(),
            )?);
        }
    }
    if let Some(mirror) = http.mirror {
        let backend = destination(ctx, at("mirror"), namespace, &mirror)?;
        // Istio: no percentage mirrors every request.
        let percent = percentage(
            ctx,
            &at("mirrorPercentage"),
            http.mirror_percentage.as_ref(),
            http.mirror_percent,
        )?;
        filters.mirrors.push(super::filters::Mirror {
            backend,
            // In millionths, as a fraction.
            numerator: (percent * 10_000.0).round() as u32,
            denominator: 1_000_000,
        });
    } else if http.mirror_percentage.is_some() || http.mirror_percent.is_some() {
        return Err(ctx.semantic(
            &at("mirrorPercentage"),
            "a mirror percentage needs a `mirror`".into(),
        ));
    }
    for (j, m) in http.mirrors.iter().enumerate() {
        let mut here = at("mirrors");
        here.push(Seg::Index(j));
        let mut to = here.clone();
        to.push(key("destination"));
        let backend = destination(ctx, to, namespace, &m.destination)?;
        here.push(key("percentage"));
        let percent = percentage(ctx, &here, m.percentage.as_ref(), None)?;
        filters.mirrors.push(super::filters::Mirror {
            backend,
            numerator: (percent * 10_000.0).round() as u32,
            denominator: 1_000_000,
        });
    }
    if let Some(rewrite) = http.rewrite {
        filters.rewrite = Some(convert_rewrite(ctx, &at("rewrite"), rewrite)?);
    }
    if let Some(redirect) = http.redirect {
        if !backends.is_empty() || filters.rewrite.is_some() {
            return Err(ctx.semantic(
                &at("redirect"),
                "a redirect is answered by the agent: no `route` or `rewrite` with it".into(),
            ));
        }
        filters.redirect = Some(convert_redirect(ctx, &at("redirect"), redirect)?);
    }
    let mut timeouts = timeouts;
    let retry = match http.retries {
        None => None,
        Some(r) => {
            let here = |field: &'static str| {
                let mut path = at("retries");
                path.push(key(field));
                path
            };
            for (field, value) in [
                ("retryRemoteLocalities", &r.retry_remote_localities),
                ("backoff", &r.backoff),
            ] {
                if present(value) {
                    return Err(ctx.semantic(&here(field), "not supported yet".into()));
                }
            }
            if let Some(per_try) = r.per_try_timeout {
                timeouts.backend_request =
                    Some(humantime::parse_duration(&per_try).map_err(|e| {
                        ctx.semantic(&here("perTryTimeout"), format!("{per_try:?}: {e}"))
                    })?);
            }
            Some(super::RetryPolicy {
                codes: retry_on_codes(r.retry_on.as_deref())
                    .map_err(|e| ctx.semantic(&here("retryOn"), e))?,
                attempts: r.attempts.unwrap_or(2),
                // Envoy's default base interval.
                backoff: Duration::from_millis(25),
            })
        }
    };
    Ok(Rule {
        name: http.name,
        matches,
        backends,
        filters,
        timeouts,
        retry,
    })
}

/// The status codes Istio's `retryOn` retries (connection failures are
/// always retried). Without it, Istio's default: 503.
fn retry_on_codes(retry_on: Option<&str>) -> Result<Vec<u16>, String> {
    let Some(retry_on) = retry_on else {
        return Ok(vec![503]);
    };
    let mut codes = Vec::new();
    for condition in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match condition {
            "5xx" => codes.extend(500..=599),
            "gateway-error" => codes.extend([502, 503, 504]),
            // Connection failures: always retried.
            "connect-failure" | "refused-stream" | "reset" => {}
            // Istio's default list names these; its status list is 503.
            "retriable-status-codes" | "unavailable" | "cancelled" => codes.push(503),
            code => match code.parse::<u16>() {
                Ok(code) if (400..=599).contains(&code) => codes.push(code),
                _ => {
                    return Err(format!(
                        "{condition:?} is not supported yet (5xx, gateway-error, connect-failure, refused-stream, reset, retriable-status-codes, unavailable, cancelled, or a status code)"
                    ));
                }
            },
        }
    }
    codes.sort_unstable();
    codes.dedup();
    Ok(codes)
}

/// A `Destination` (a route's or a mirror's, at `at`): a port of a mesh
/// Service, or the port the request was sent to.
fn destination(
    ctx: &DocCtx<'_>,
    at: Vec<Seg>,
    namespace: &str,
    d: &RawDestination,
) -> Result<Backend, LoadError> {
    let field = |f: &'static str| {
        let mut here = at.clone();
        here.push(key(f));
        here
    };
    if d.subset
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.contains('~'))
    {
        return Err(ctx.semantic(&field("subset"), "not a subset's name".into()));
    }
    let Some(service) = service_of(&d.host, namespace) else {
        return Err(ctx.semantic(
            &field("host"),
            format!("{:?} is not a mesh Service's name", d.host),
        ));
    };
    let subset = d.subset.clone();
    Ok(match &d.port {
        Some(port) => Backend::subset(service, port.number, subset),
        None => Backend::ServiceSamePort { service, subset },
    })
}

/// An Istio path (`uri` of a rewrite or redirect at `at`), which must be
/// absolute.
fn absolute_path(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    uri: Option<String>,
) -> Result<Option<String>, LoadError> {
    match uri {
        Some(uri) if !uri.starts_with('/') => Err(ctx.semantic(
            &under(at, &["uri"]),
            format!("{uri:?} does not start with `/`"),
        )),
        uri => Ok(uri),
    }
}

/// Istio's `rewrite`: `uri` replaces the matched prefix (a prefix match)
/// or the whole path; `authority` the host.
fn convert_rewrite(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    rewrite: RawRewrite,
) -> Result<super::filters::UrlRewrite, LoadError> {
    refuse_unserved(ctx, at, "uriRegexRewrite", &rewrite.uri_regex_rewrite)?;
    let hostname = rewrite
        .authority
        .map(|a| {
            http::HeaderValue::from_str(&a).map_err(|_| {
                ctx.semantic(&under(at, &["authority"]), format!("{a:?} is not a host"))
            })
        })
        .transpose()?;
    let path =
        absolute_path(ctx, at, rewrite.uri)?.map(super::filters::PathModifier::ReplacePrefixOrPath);
    if hostname.is_none() && path.is_none() {
        return Err(ctx.semantic(at, "rewrites nothing: give `uri` or `authority`".into()));
    }
    Ok(super::filters::UrlRewrite { hostname, path })
}

/// Istio's `redirect`: the whole path (`uri`), host, port, scheme and code
/// (301 unless given).
fn convert_redirect(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    redirect: RawRedirect,
) -> Result<super::filters::Redirect, LoadError> {
    refuse_unserved(ctx, at, "derivePort", &redirect.derive_port)?;
    let status = super::filters::redirect_status(
        ctx,
        at,
        "redirectCode",
        redirect.redirect_code.unwrap_or(301),
    )?;
    if let Some(scheme) = &redirect.scheme
        && !matches!(scheme.as_str(), "http" | "https")
    {
        return Err(ctx.semantic(
            &under(at, &["scheme"]),
            format!("{scheme:?} is not http or https"),
        ));
    }
    let path =
        absolute_path(ctx, at, redirect.uri)?.map(super::filters::PathModifier::ReplaceFullPath);
    Ok(super::filters::Redirect {
        scheme: redirect.scheme,
        hostname: redirect.authority,
        path,
        port: redirect.port,
        status,
    })
}

/// `field` of `at`, refused when present (not served yet).
fn refuse_unserved(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    field: &'static str,
    value: &Option<Value>,
) -> Result<(), LoadError> {
    if present(value) {
        return Err(ctx.semantic(
            &under(at, &[field]),
            "not supported yet (docs/traffic.md lists what is)".into(),
        ));
    }
    Ok(())
}

fn percentage(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    p: Option<&RawPercent>,
    legacy: Option<u32>,
) -> Result<f64, LoadError> {
    let value = match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(percent)) => f64::from(percent),
        // Istio: no percentage is every request.
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&value) {
        return Err(ctx.semantic(at, format!("{value} is not a percentage (0 to 100)")));
    }
    Ok(value)
}

fn convert_fault(ctx: &DocCtx<'_>, i: usize, f: RawFault) -> Result<Fault, LoadError> {
    let at = |part: &'static str, field: &'static str| {
        vec![
            key("spec"),
            key("http"),
            Seg::Index(i),
            key("fault"),
            key(part),
            key(field),
        ]
    };
    let delay = match f.delay {
        None => None,
        Some(d) => {
            if present(&d.exponential_delay) {
                return Err(
                    ctx.semantic(&at("delay", "exponentialDelay"), "not supported yet".into())
                );
            }
            let Some(fixed) = d.fixed_delay else {
                return Err(ctx.semantic(
                    &at("delay", "fixedDelay"),
                    "a delay needs `fixedDelay`".into(),
                ));
            };
            let duration: Duration = humantime::parse_duration(&fixed)
                .map_err(|e| ctx.semantic(&at("delay", "fixedDelay"), format!("{fixed:?}: {e}")))?;
            Some((
                duration,
                percentage(
                    ctx,
                    &at("delay", "percentage"),
                    d.percentage.as_ref(),
                    d.percent,
                )?,
            ))
        }
    };
    let abort = match f.abort {
        None => None,
        Some(a) => {
            for (field, value) in [
                ("grpcStatus", &a.grpc_status),
                ("http2Error", &a.http2_error),
            ] {
                if present(value) {
                    return Err(ctx.semantic(
                        &at("abort", field),
                        "not supported yet (httpStatus is)".into(),
                    ));
                }
            }
            let status = a
                .http_status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .filter(|s| s.as_u16() >= 200)
                .ok_or_else(|| {
                    ctx.semantic(
                        &at("abort", "httpStatus"),
                        "an abort needs an `httpStatus` (200 to 599)".into(),
                    )
                })?;
            Some((
                status,
                percentage(ctx, &at("abort", "percentage"), a.percentage.as_ref(), None)?,
            ))
        }
    };
    Ok(Fault { delay, abort })
}

fn convert_match(
    ctx: &DocCtx<'_>,
    i: usize,
    j: usize,
    m: RawMatch,
) -> Result<RequestMatch, LoadError> {
    let at = |field: &'static str| {
        vec![
            key("spec"),
            key("http"),
            Seg::Index(i),
            key("match"),
            Seg::Index(j),
            key(field),
        ]
    };
    let _ = &m.name;
    for (field, value) in [
        ("scheme", &m.scheme),
        ("authority", &m.authority),
        ("port", &m.port),
        ("sourceLabels", &m.source_labels),
        ("gateways", &m.gateways),
        ("ignoreUriCase", &m.ignore_uri_case),
        ("withoutHeaders", &m.without_headers),
        ("sourceNamespace", &m.source_namespace),
        ("statPrefix", &m.stat_prefix),
    ] {
        if present(value) {
            return Err(ctx.semantic(
                &at(field),
                "not supported yet (docs/traffic.md lists what is)".into(),
            ));
        }
    }
    let path = match m.uri {
        None => PathMatch::StringPrefix("/".into()),
        Some(uri) => match string_match(ctx, &at("uri"), uri)? {
            ValueMatch::Exact(v) => PathMatch::Exact(v),
            ValueMatch::Prefix(v) => PathMatch::StringPrefix(v),
            ValueMatch::Regex(r) => PathMatch::Regex(r),
        },
    };
    let method = match m.method {
        None => None,
        Some(method) => match string_match(ctx, &at("method"), method)? {
            ValueMatch::Exact(v) => Some(
                http::Method::from_bytes(v.as_bytes())
                    .map_err(|_| ctx.semantic(&at("method"), format!("{v:?} is not a method")))?,
            ),
            _ => {
                return Err(ctx.semantic(
                    &at("method"),
                    "only `exact` is supported for a method".into(),
                ));
            }
        },
    };
    let mut headers = Vec::new();
    for (name, value) in m.headers {
        let header = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| ctx.semantic(&at("headers"), format!("{name:?} is not a header name")))?;
        headers.push(HeaderMatch {
            name: header,
            value: string_match(ctx, &at("headers"), value)?,
        });
    }
    let mut query_params = Vec::new();
    for (name, value) in m.query_params {
        query_params.push(QueryMatch {
            name,
            value: string_match(ctx, &at("queryParams"), value)?,
        });
    }
    Ok(RequestMatch {
        path,
        headers,
        query_params,
        method,
    })
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex` (RE2, the whole
/// value).
fn string_match(ctx: &DocCtx<'_>, at: &[Seg], m: RawStringMatch) -> Result<ValueMatch, LoadError> {
    match (m.exact, m.prefix, m.regex) {
        (Some(v), None, None) => Ok(ValueMatch::Exact(v)),
        (None, Some(v), None) => Ok(ValueMatch::Prefix(v)),
        (None, None, Some(v)) => regex::Regex::new(&format!("^(?:{v})$"))
            .map(ValueMatch::Regex)
            .map_err(|e| ctx.semantic(at, format!("not a regular expression: {e}"))),
        _ => Err(ctx.semantic(at, "exactly one of `exact`, `prefix`, `regex`".into())),
    }
}
