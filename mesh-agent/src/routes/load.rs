//! Route files → [`HttpRoute`]s. A document that cannot be served exactly
//! as written (a misspelled field, a bad value, a field this agent does not
//! implement yet) is an error of the whole load, naming file, line and
//! field: the routes in force keep serving until it is fixed.

// A load error is built at most once per load, and carries everything an
// operator needs: its size is no cost.
#![allow(clippy::result_large_err)]

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;
use serde_yaml::Value;

use super::{
    Backend, HeaderMatch, HttpRoute, PathMatch, QueryMatch, RequestMatch, RouteId, RouteKind, Rule,
    ServiceRef, Timeouts, ValueMatch, WeightedBackend,
    destination_rule::{self, DestinationRule},
    filters::{self, FilterPlace},
    grpc_route,
    model::{RawBackendRef, RawHttpRoute, RawMatch, RawNameMatch, RawRule},
    virtual_service,
};
use crate::policy::{DocCtx, LoadError, Seg, key, label_of};

const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];
const KIND: &str = "HTTPRoute";
/// Kinds of the same API this agent does not serve yet: named as such.
const NOT_YET: [&str; 2] = ["TCPRoute", "TLSRoute"];
/// The most a weight may be (the specification's bound).
const MAX_WEIGHT: u32 = 1_000_000;

/// What the route files hold.
#[derive(Debug, Default)]
pub struct Loaded {
    pub routes: Vec<Arc<HttpRoute>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
}

/// The kinds of document of a route file.
enum DocKind {
    Route(RouteKind),
    DestinationRule,
}

/// Loads every route of every `(path, text)` file.
pub fn load<'a, I, P>(files: I) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = (P, &'a str)>,
    P: AsRef<Path>,
{
    let mut loaded = Loaded::default();
    let mut seen: HashMap<(&'static str, RouteId), (std::path::PathBuf, usize)> = HashMap::new();
    for (path, text) in files {
        let path = path.as_ref();
        for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(de)
                .map_err(|e| DocCtx::new(path, text, index, "?/?".into()).serde(&e))?;
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            let ctx = DocCtx::new(path, text, index, label_of(&value));
            let kind = check_header(&ctx, &value)?;
            let de = serde_yaml::Deserializer::from_str(text)
                .nth(index)
                .expect("the document read above");
            let (kind_name, id) = match kind {
                DocKind::Route(RouteKind::HttpRoute) => {
                    let raw = RawHttpRoute::deserialize(de).map_err(|e| ctx.serde(&e))?;
                    let route = convert(&ctx, path, raw)?;
                    let id = route.id.clone();
                    loaded.routes.push(Arc::new(route));
                    (KIND, id)
                }
                DocKind::Route(RouteKind::GrpcRoute) => {
                    let raw =
                        grpc_route::RawGrpcRoute::deserialize(de).map_err(|e| ctx.serde(&e))?;
                    let route = grpc_route::convert(&ctx, path, raw)?;
                    let id = route.id.clone();
                    loaded.routes.push(Arc::new(route));
                    (grpc_route::KIND, id)
                }
                DocKind::Route(RouteKind::VirtualService) => {
                    let raw = virtual_service::RawVirtualService::deserialize(de)
                        .map_err(|e| ctx.serde(&e))?;
                    let route = virtual_service::convert(&ctx, path, raw)?;
                    let id = route.id.clone();
                    loaded.routes.push(Arc::new(route));
                    (virtual_service::KIND, id)
                }
                DocKind::DestinationRule => {
                    let raw = destination_rule::RawDestinationRule::deserialize(de)
                        .map_err(|e| ctx.serde(&e))?;
                    let rule = destination_rule::convert(&ctx, path, raw)?;
                    let id = rule.id.clone();
                    loaded.destination_rules.push(Arc::new(rule));
                    (destination_rule::KIND, id)
                }
            };
            if let Some((file, doc)) = seen.get(&(kind_name, id.clone())) {
                return Err(ctx.semantic(
                    &[key("metadata"), key("name")],
                    format!(
                        "duplicate {kind_name} {id}: already defined in {} document {}",
                        file.display(),
                        doc + 1
                    ),
                ));
            }
            seen.insert((kind_name, id), (path.to_path_buf(), index));
        }
    }
    Ok(loaded)
}

fn check_header(ctx: &DocCtx<'_>, v: &Value) -> Result<DocKind, LoadError> {
    if !v.is_mapping() {
        return Err(ctx.semantic(&[], "document is not a mapping".into()));
    }
    let api = v.get("apiVersion").and_then(Value::as_str);
    let kind = v.get("kind").and_then(Value::as_str);
    if kind == Some(virtual_service::KIND) || kind == Some(destination_rule::KIND) {
        let doc = if kind == Some(virtual_service::KIND) {
            DocKind::Route(RouteKind::VirtualService)
        } else {
            DocKind::DestinationRule
        };
        return match api {
            Some(a) if virtual_service::API_VERSIONS.contains(&a) => Ok(doc),
            Some(a) => Err(ctx.semantic(
                &[key("apiVersion")],
                format!(
                    "{a:?} is not supported (expected one of {})",
                    virtual_service::API_VERSIONS.join(", ")
                ),
            )),
            None => Err(ctx.semantic(&[], "missing field `apiVersion`".into())),
        };
    }
    let route_kind = match kind {
        Some(KIND) => RouteKind::HttpRoute,
        Some(grpc_route::KIND) => RouteKind::GrpcRoute,
        Some(k) if NOT_YET.contains(&k) => {
            return Err(ctx.semantic(
                &[key("kind")],
                format!("{k} is not supported yet (HTTPRoute and GRPCRoute are; docs/traffic.md)"),
            ));
        }
        Some(k) => {
            return Err(ctx.semantic(
                &[key("kind")],
                format!(
                    "{k:?} is not supported here (expected {KIND}, GRPCRoute, VirtualService or DestinationRule)"
                ),
            ));
        }
        None => return Err(ctx.semantic(&[], "missing field `kind`".into())),
    };
    match api {
        Some(a) if API_VERSIONS.contains(&a) => Ok(DocKind::Route(route_kind)),
        Some(a) => Err(ctx.semantic(
            &[key("apiVersion")],
            format!(
                "{a:?} is not supported (expected {} or {})",
                API_VERSIONS[0], API_VERSIONS[1]
            ),
        )),
        None => Err(ctx.semantic(&[], "missing field `apiVersion`".into())),
    }
}

/// Whether a value that this agent does not implement is absent in effect.
pub(super) fn empty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Sequence(s)) => s.is_empty(),
        Some(Value::Mapping(m)) => m.is_empty(),
        Some(_) => false,
    }
}

fn convert(ctx: &DocCtx<'_>, path: &Path, raw: RawHttpRoute) -> Result<HttpRoute, LoadError> {
    let namespace = route_namespace(ctx, raw.metadata.namespace)?;
    let id = RouteId {
        namespace: namespace.clone(),
        name: raw.metadata.name,
    };
    let spec = raw.spec;
    let parents = convert_parents(ctx, &namespace, spec.parent_refs, &spec.hostnames)?;
    let rules = match spec.rules {
        // The specification's default: every request, no backend.
        None => vec![Rule {
            name: None,
            matches: vec![match_all()],
            backends: Vec::new(),
            filters: Default::default(),
            timeouts: Timeouts::default(),
            retry: None,
        }],
        Some(rules) => rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| convert_rule(ctx, &namespace, i, rule))
            .collect::<Result<_, _>>()?,
    };
    Ok(HttpRoute {
        id,
        kind: RouteKind::HttpRoute,
        created: raw.metadata.creation_timestamp,
        parents,
        rules,
        source: path.to_path_buf(),
    })
}

/// The Services a route attaches to (GAMMA: `kind: Service`, `group: ""`).
pub(super) fn convert_parents(
    ctx: &DocCtx<'_>,
    namespace: &str,
    parent_refs: Vec<super::model::RawParentRef>,
    hostnames: &[String],
) -> Result<Vec<(ServiceRef, Option<u16>)>, LoadError> {
    if !hostnames.is_empty() {
        return Err(ctx.semantic(
            &[key("spec"), key("hostnames")],
            "not supported yet on a route whose parents are Services".into(),
        ));
    }
    if parent_refs.is_empty() {
        return Err(ctx.semantic(
            &[key("spec"), key("parentRefs")],
            "a route needs a parent: the Service whose requests it routes".into(),
        ));
    }
    let mut parents = Vec::new();
    for (i, parent) in parent_refs.into_iter().enumerate() {
        let at =
            |field: &'static str| vec![key("spec"), key("parentRefs"), Seg::Index(i), key(field)];
        let group = parent
            .group
            .as_deref()
            .unwrap_or("gateway.networking.k8s.io");
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        if !matches!(group, "" | "core") || kind != "Service" {
            return Err(ctx.semantic(
                &at("kind"),
                format!(
                    "a {kind} (group {group:?}) parent is not supported: this agent routes the mesh's requests to Services (GAMMA: kind Service, group \"\"); a Gateway's routes are its gateway's"
                ),
            ));
        }
        if parent.section_name.is_some() {
            return Err(ctx.semantic(
                &at("sectionName"),
                "not supported yet: name the Service's port with `port`".into(),
            ));
        }
        parents.push((
            ServiceRef {
                namespace: parent.namespace.unwrap_or_else(|| namespace.to_string()),
                name: parent.name,
            },
            parent.port,
        ));
    }
    Ok(parents)
}

/// A document's namespace: required (a file has none by default).
pub(super) fn route_namespace(
    ctx: &DocCtx<'_>,
    namespace: Option<String>,
) -> Result<String, LoadError> {
    namespace.filter(|n| !n.is_empty()).ok_or_else(|| {
        ctx.semantic(
            &[key("metadata")],
            "metadata.namespace is required (a route file has no default namespace)".into(),
        )
    })
}

/// A match's `headers` (at `base`): names case-insensitive, only the first
/// of equal names counts (the specification's rule).
pub(super) fn convert_headers(
    ctx: &DocCtx<'_>,
    base: &[Seg],
    raw: Vec<RawNameMatch>,
) -> Result<Vec<HeaderMatch>, LoadError> {
    let mut headers: Vec<HeaderMatch> = Vec::new();
    for (k, h) in raw.into_iter().enumerate() {
        let mut at = base.to_vec();
        at.extend([key("headers"), Seg::Index(k)]);
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            let mut at = at.clone();
            at.push(key("name"));
            ctx.semantic(&at, format!("{:?} is not a header name", h.name))
        })?;
        let value = value_match(ctx, &at, &h)?;
        if !headers.iter().any(|seen| seen.name == name) {
            headers.push(HeaderMatch { name, value });
        }
    }
    Ok(headers)
}

pub(super) fn match_all() -> RequestMatch {
    RequestMatch {
        path: PathMatch::Prefix(String::new()),
        headers: Vec::new(),
        query_params: Vec::new(),
        method: None,
    }
}

fn convert_rule(
    ctx: &DocCtx<'_>,
    namespace: &str,
    i: usize,
    rule: RawRule,
) -> Result<Rule, LoadError> {
    let at = |field: &'static str| vec![key("spec"), key("rules"), Seg::Index(i), key(field)];
    for (field, value) in [("sessionPersistence", &rule.session_persistence)] {
        if !empty(value) {
            return Err(ctx.semantic(
                &at(field),
                "not supported yet (docs/traffic.md lists what is)".into(),
            ));
        }
    }
    let matches = match rule.matches {
        None => vec![match_all()],
        Some(m) if m.is_empty() => vec![match_all()],
        Some(matches) => matches
            .into_iter()
            .enumerate()
            .map(|(j, m)| convert_match(ctx, i, j, m))
            .collect::<Result<_, _>>()?,
    };
    let prefix_match = matches
        .iter()
        .all(|m: &RequestMatch| matches!(m.path, PathMatch::Prefix(_)));
    let filters = filters::convert(
        ctx,
        &at("filters"),
        rule.filters,
        FilterPlace::Rule,
        prefix_match,
        namespace,
    )?;
    let backends = rule
        .backend_refs
        .into_iter()
        .enumerate()
        .map(|(j, b)| convert_backend(ctx, namespace, i, j, b))
        .collect::<Result<_, _>>()?;
    let timeouts = match rule.timeouts {
        None => Timeouts::default(),
        Some(t) => {
            let duration = |v: Option<String>, field: &'static str| {
                v.map(|v| {
                    let mut here = at("timeouts");
                    here.push(key(field));
                    gateway_duration(&v).ok_or_else(|| {
                        ctx.semantic(
                            &here,
                            format!("{v:?} is not a duration (like 1h, 10s, 500ms, 1m30s)"),
                        )
                    })
                })
                .transpose()
            };
            let timeouts = Timeouts {
                request: duration(t.request, "request")?,
                backend_request: duration(t.backend_request, "backendRequest")?,
            };
            if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
                && !request.is_zero()
                && (backend.is_zero() || backend > request)
            {
                let mut here = at("timeouts");
                here.push(key("backendRequest"));
                return Err(ctx.semantic(
                    &here,
                    "must not be longer than `request` (the specification's rule)".into(),
                ));
            }
            timeouts
        }
    };
    let retry = match rule.retry {
        None => None,
        Some(r) => {
            let here = |field: &'static str| {
                let mut at = at("retry");
                at.push(key(field));
                at
            };
            if let Some(code) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(ctx.semantic(
                    &here("codes"),
                    format!("{code} is not an error status (400 to 599)"),
                ));
            }
            let backoff = match r.backoff {
                None => std::time::Duration::ZERO,
                Some(b) => gateway_duration(&b).ok_or_else(|| {
                    ctx.semantic(
                        &here("backoff"),
                        format!("{b:?} is not a duration (like 100ms, 1s)"),
                    )
                })?,
            };
            Some(super::RetryPolicy {
                codes: r.codes,
                // The specification leaves the default to the
                // implementation: one retry.
                attempts: r.attempts.unwrap_or(1),
                backoff,
            })
        }
    };
    Ok(Rule {
        name: rule.name,
        matches,
        backends,
        filters,
        timeouts,
        retry,
    })
}

/// A Gateway API duration (GEP-2257): one to four `<number><unit>` with
/// units `h`, `m`, `s`, `ms`, numbers of one to five digits.
fn gateway_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text;
    let mut total = std::time::Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, millis) = if rest.starts_with("ms") {
            ("ms", 1)
        } else if rest.starts_with('h') {
            ("h", 3_600_000)
        } else if rest.starts_with('m') {
            ("m", 60_000)
        } else if rest.starts_with('s') {
            ("s", 1_000)
        } else {
            return None;
        };
        rest = &rest[unit.len()..];
        total += std::time::Duration::from_millis(number * millis);
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

fn convert_match(
    ctx: &DocCtx<'_>,
    i: usize,
    j: usize,
    m: RawMatch,
) -> Result<RequestMatch, LoadError> {
    let base = || {
        vec![
            key("spec"),
            key("rules"),
            Seg::Index(i),
            key("matches"),
            Seg::Index(j),
        ]
    };
    let path = match m.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => {
            let mut at = base();
            at.push(key("path"));
            let value = p.value.unwrap_or_else(|| "/".to_string());
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    at.push(key("value"));
                    return Err(ctx.semantic(&at, format!("{value:?} does not start with `/`")));
                }
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => PathMatch::Prefix(value.trim_end_matches('/').to_string()),
                "RegularExpression" => {
                    at.push(key("value"));
                    PathMatch::Regex(regex(ctx, &at, &value)?)
                }
                other => {
                    at.push(key("type"));
                    return Err(ctx.semantic(
                        &at,
                        format!("{other:?} is not a path match type (Exact, PathPrefix, RegularExpression)"),
                    ));
                }
            }
        }
    };
    let headers = convert_headers(ctx, &base(), m.headers)?;
    let mut query_params: Vec<QueryMatch> = Vec::new();
    for (k, q) in m.query_params.into_iter().enumerate() {
        let mut at = base();
        at.extend([key("queryParams"), Seg::Index(k)]);
        let value = value_match(ctx, &at, &q)?;
        if !query_params.iter().any(|seen| seen.name == q.name) {
            query_params.push(QueryMatch {
                name: q.name,
                value,
            });
        }
    }
    let method = match m.method {
        None => None,
        Some(method) => {
            const METHODS: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if !METHODS.contains(&method.as_str()) {
                let mut at = base();
                at.push(key("method"));
                return Err(ctx.semantic(
                    &at,
                    format!("{method:?} is not one of {}", METHODS.join(", ")),
                ));
            }
            Some(http::Method::from_bytes(method.as_bytes()).expect("a listed method"))
        }
    };
    Ok(RequestMatch {
        path,
        headers,
        query_params,
        method,
    })
}

pub(super) fn value_match(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    m: &RawNameMatch,
) -> Result<ValueMatch, LoadError> {
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(m.value.clone())),
        "RegularExpression" => {
            let mut at = at.to_vec();
            at.push(key("value"));
            Ok(ValueMatch::Regex(regex(ctx, &at, &m.value)?))
        }
        other => {
            let mut at = at.to_vec();
            at.push(key("type"));
            Err(ctx.semantic(
                &at,
                format!("{other:?} is not a match type (Exact, RegularExpression)"),
            ))
        }
    }
}

/// A regular expression that must match the whole value (RE2 syntax, as
/// the `regex` crate reads it).
pub(super) fn regex(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    pattern: &str,
) -> Result<regex::Regex, LoadError> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| ctx.semantic(at, format!("not a regular expression: {e}")))
}

pub(super) fn convert_backend(
    ctx: &DocCtx<'_>,
    namespace: &str,
    i: usize,
    j: usize,
    b: RawBackendRef,
) -> Result<WeightedBackend, LoadError> {
    let at = |field: &'static str| {
        vec![
            key("spec"),
            key("rules"),
            Seg::Index(i),
            key("backendRefs"),
            Seg::Index(j),
            key(field),
        ]
    };
    let filters = filters::convert(
        ctx,
        &at("filters"),
        b.filters,
        FilterPlace::Backend,
        false,
        namespace,
    )?;
    let weight = b.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        return Err(ctx.semantic(&at("weight"), format!("{weight} is more than {MAX_WEIGHT}")));
    }
    let backend = gateway_backend(
        ctx,
        &at("port"),
        namespace,
        BackendRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: b.name,
            namespace: b.namespace,
            port: b.port,
        },
    )?;
    Ok(WeightedBackend {
        weight,
        backend,
        filters,
    })
}

/// A Gateway API `BackendObjectReference`, as read.
pub(super) struct BackendRef<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

/// What a backend reference of a route in `namespace` names: a Service
/// port; or, for another kind or another namespace's Service (which needs
/// a ReferenceGrant, not read yet), a reference its requests get 500 for.
/// A Service without a port is an error at `port_at`.
pub(super) fn gateway_backend(
    ctx: &DocCtx<'_>,
    port_at: &[Seg],
    namespace: &str,
    b: BackendRef<'_>,
) -> Result<Backend, LoadError> {
    let group = b.group.unwrap_or("");
    let kind = b.kind.unwrap_or("Service");
    let backend_namespace = b.namespace.unwrap_or_else(|| namespace.to_string());
    if backend_namespace != namespace {
        return Ok(Backend::Invalid(format!(
            "{backend_namespace}/{} is in another namespace (a ReferenceGrant is not supported yet)",
            b.name
        )));
    }
    if !matches!(group, "" | "core") || kind != "Service" {
        return Ok(Backend::Invalid(format!(
            "{kind} (group {group:?}) {} is not a Service",
            b.name
        )));
    }
    let Some(port) = b.port else {
        return Err(ctx.semantic(port_at, "a Service backend needs its port".into()));
    };
    Ok(Backend::service(
        ServiceRef {
            namespace: backend_namespace,
            name: b.name,
        },
        port,
    ))
}

/// `at` followed by `fields`.
pub(super) fn under(at: &[Seg], fields: &[&'static str]) -> Vec<Seg> {
    let mut here = at.to_vec();
    here.extend(fields.iter().map(|f| key(f)));
    here
}
