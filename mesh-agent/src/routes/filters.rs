//! A route rule's filters (Gateway API `HTTPRouteFilter`): what they are as
//! written, validated, and what each does to a request or its response.
//! The request path (`proxy/service_http.rs`) runs them as stages: before
//! a backend is chosen (redirect), on the request (header changes, URL
//! rewrite), and on the response (header changes).

#![allow(clippy::result_large_err)]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header::HOST, request::Parts};
use serde::Deserialize;
use serde_yaml::Value;

use super::Backend;
use crate::policy::{DocCtx, LoadError, Seg, key};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<RawHeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<RawHeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<RawRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<RawUrlRewrite>,
    #[serde(default)]
    pub request_mirror: Option<RawMirror>,
    // Not supported yet: kept so that the loader names the type, rather
    // than an unknown field.
    #[serde(default)]
    #[allow(dead_code)]
    pub extension_ref: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    pub cors: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    pub external_auth: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawHeaderModifier {
    // (Istio's header operations are read into this shape too.)
    #[serde(default)]
    pub set: Vec<RawHeader>,
    #[serde(default)]
    pub add: Vec<RawHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawMirror {
    pub backend_ref: RawMirrorBackend,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<RawFraction>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawMirrorBackend {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawFraction {
    pub numerator: u32,
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<RawPathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawUrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<RawPathModifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// Header changes: `set` replaces, `add` appends, `remove` deletes, in
/// that order.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// A path change of a redirect or a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the `PathPrefix` the request matched (kept, like the
    /// match, without a trailing `/`).
    ReplacePrefixMatch(String),
    /// Istio's `rewrite.uri`: replaces the prefix the request matched when
    /// its match was a prefix, else the whole path.
    ReplacePrefixOrPath(String),
}

impl PathModifier {
    /// `path` changed, given the prefix the request matched (`None` when
    /// the match was not a `PathPrefix`, which the loader refuses for
    /// `ReplacePrefixMatch`).
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathModifier::ReplaceFullPath(p) => p.clone(),
            PathModifier::ReplacePrefixOrPath(replacement) => match matched_prefix {
                Some(prefix) => {
                    let rest = path.strip_prefix(prefix).unwrap_or(path);
                    let joined = format!("{replacement}{rest}");
                    if joined.is_empty() {
                        "/".to_string()
                    } else {
                        joined
                    }
                }
                None => replacement.clone(),
            },
            PathModifier::ReplacePrefixMatch(replacement) => {
                let rest = matched_prefix
                    .and_then(|prefix| path.strip_prefix(prefix))
                    .unwrap_or(path);
                let joined = format!("{replacement}{rest}");
                if joined.is_empty() {
                    "/".to_string()
                } else {
                    joined
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub(super) scheme: Option<String>,
    pub(super) hostname: Option<String>,
    pub(super) path: Option<PathModifier>,
    pub(super) port: Option<u16>,
    pub(super) status: StatusCode,
}

#[derive(Debug, Clone)]
pub struct UrlRewrite {
    pub(super) hostname: Option<HeaderValue>,
    pub(super) path: Option<PathModifier>,
}

/// A copy of each request (a share of them) sent to another Service, its
/// answer ignored.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub backend: Backend,
    /// This many of every `denominator` requests are copied.
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether the request with this uniform `draw` is copied.
    pub fn samples(&self, draw: u64) -> bool {
        draw % u64::from(self.denominator) < u64::from(self.numerator)
    }
}

/// Istio's fault injection: a delay and an abort, each for a percentage
/// of the requests (the delay first, as Envoy does).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(std::time::Duration, f64)>,
    pub abort: Option<(StatusCode, f64)>,
}

impl Fault {
    /// Whether a request with the uniform `draw` is among `percent` of them.
    fn among(percent: f64, draw: u64) -> bool {
        (draw as f64 / u64::MAX as f64) * 100.0 < percent
    }

    /// The delay for the request with this `draw`, if it gets one.
    pub fn delay_for(&self, draw: u64) -> Option<std::time::Duration> {
        self.delay
            .filter(|(_, percent)| Self::among(*percent, draw))
            .map(|(delay, _)| delay)
    }

    /// The status the request with this `draw` is aborted with, if it is.
    pub fn abort_for(&self, draw: u64) -> Option<StatusCode> {
        self.abort
            .filter(|(_, percent)| Self::among(*percent, draw))
            .map(|(status, _)| status)
    }
}

/// A rule's filters, by when they run.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Istio's `fault` (a VirtualService's).
    pub fault: Option<Fault>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none()
            && self.response_headers.is_none()
            && self.redirect.is_none()
            && self.rewrite.is_none()
            && self.mirrors.is_empty()
            && self.fault.is_none()
    }

    /// The request as the backend should get it: rewritten, then its
    /// headers changed.
    pub fn on_request(&self, parts: &mut Parts, matched_prefix: Option<&str>) {
        if let Some(rewrite) = &self.rewrite {
            rewrite.apply(parts, matched_prefix);
        }
        if let Some(modifier) = &self.request_headers {
            modifier.apply(&mut parts.headers);
        }
    }

    pub fn on_response(&self, headers: &mut HeaderMap) {
        if let Some(modifier) = &self.response_headers {
            modifier.apply(headers);
        }
    }
}

impl UrlRewrite {
    fn apply(&self, parts: &mut Parts, matched_prefix: Option<&str>) {
        let path = self
            .path
            .as_ref()
            .map(|p| p.apply(parts.uri.path(), matched_prefix));
        let host = self.hostname.as_ref();
        if path.is_none() && host.is_none() {
            return;
        }
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        if let Some(path) = path {
            let query = uri
                .path_and_query
                .as_ref()
                .and_then(|pq| pq.query())
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            uri.path_and_query = format!("{path}{query}").parse().ok();
        }
        if let Some(host) = host {
            if uri.authority.is_some() {
                uri.authority = host.to_str().ok().and_then(|h| h.parse().ok());
            }
            if parts.headers.contains_key(HOST) || parts.version < http::Version::HTTP_2 {
                parts.headers.insert(HOST, host.clone());
            }
        }
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
}

impl Redirect {
    /// The `Location` for a request with `uri` and `host` (its authority,
    /// possibly with a port), and the status to answer.
    pub fn location(
        &self,
        uri: &Uri,
        host: &str,
        matched_prefix: Option<&str>,
    ) -> (StatusCode, String) {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let (request_host, request_port) = split_host_port(host);
        let hostname = self.hostname.as_deref().unwrap_or(request_host);
        // The specification: with a port given, that port; with only the
        // scheme changed, the scheme's own (left out); otherwise the
        // request's. A scheme's default port is never written.
        let port = match (self.port, self.scheme.is_some()) {
            (Some(port), _) => Some(port),
            (None, true) => None,
            (None, false) => request_port,
        };
        let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = match &self.path {
            Some(modifier) => modifier.apply(uri.path(), matched_prefix),
            None => uri.path().to_string(),
        };
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let authority = match port {
            Some(port) => format!("{hostname}:{port}"),
            None => hostname.to_string(),
        };
        (self.status, format!("{scheme}://{authority}{path}{query}"))
    }
}

fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => (host, port.parse().ok()),
        _ => (authority, None),
    }
}

/// Where a list of filters is: a rule's, or one backend's of a rule.
#[derive(Clone, Copy)]
pub enum FilterPlace {
    Rule,
    Backend,
    /// A GRPCRoute's rule: no redirect or rewrite (not GRPCRoute filters).
    GrpcRule,
}

/// Validates `raw` (at `at`, the list's field path). `prefix_match`: every
/// match of the rule is a `PathPrefix` (needed by `ReplacePrefixMatch`).
pub fn convert(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    raw: Vec<RawFilter>,
    place: FilterPlace,
    prefix_match: bool,
    namespace: &str,
) -> Result<Filters, LoadError> {
    let mut filters = Filters::default();
    for (i, f) in raw.into_iter().enumerate() {
        let here = |field: &'static str| {
            let mut path = at.to_vec();
            path.push(Seg::Index(i));
            if !field.is_empty() {
                path.push(key(field));
            }
            path
        };
        let twice = |what: &str| {
            ctx.semantic(
                &here("type"),
                format!("{what} may appear once in a filter list"),
            )
        };
        let missing = |field: &'static str| {
            ctx.semantic(&here(""), format!("type {} needs `{field}`", f.kind))
        };
        match (f.kind.as_str(), place) {
            ("RequestHeaderModifier", _) => {
                let m = f
                    .request_header_modifier
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                if filters.request_headers.is_some() {
                    return Err(twice("RequestHeaderModifier"));
                }
                filters.request_headers =
                    Some(header_modifier(ctx, &here("requestHeaderModifier"), m)?);
            }
            ("ResponseHeaderModifier", _) => {
                let m = f
                    .response_header_modifier
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                if filters.response_headers.is_some() {
                    return Err(twice("ResponseHeaderModifier"));
                }
                filters.response_headers =
                    Some(header_modifier(ctx, &here("responseHeaderModifier"), m)?);
            }
            ("RequestRedirect" | "URLRewrite", FilterPlace::GrpcRule) => {
                return Err(ctx.semantic(
                    &here("type"),
                    format!("{} is not a GRPCRoute filter", f.kind),
                ));
            }
            ("RequestRedirect", FilterPlace::Rule) => {
                let r = f
                    .request_redirect
                    .ok_or_else(|| missing("requestRedirect"))?;
                if filters.redirect.is_some() {
                    return Err(twice("RequestRedirect"));
                }
                let at = here("requestRedirect");
                let status = redirect_status(ctx, &at, "statusCode", r.status_code.unwrap_or(302))?;
                if let Some(scheme) = &r.scheme
                    && !matches!(scheme.as_str(), "http" | "https")
                {
                    let mut at = at.clone();
                    at.push(key("scheme"));
                    return Err(ctx.semantic(&at, format!("{scheme:?} is not http or https")));
                }
                let path = r
                    .path
                    .map(|p| path_modifier(ctx, &at, p, prefix_match))
                    .transpose()?;
                filters.redirect = Some(Redirect {
                    scheme: r.scheme,
                    hostname: r.hostname,
                    path,
                    port: r.port,
                    status,
                });
            }
            ("URLRewrite", FilterPlace::Rule) => {
                let r = f.url_rewrite.ok_or_else(|| missing("urlRewrite"))?;
                if filters.rewrite.is_some() {
                    return Err(twice("URLRewrite"));
                }
                let at = here("urlRewrite");
                let hostname = r
                    .hostname
                    .map(|h| {
                        HeaderValue::from_str(&h).map_err(|_| {
                            let mut at = at.clone();
                            at.push(key("hostname"));
                            ctx.semantic(&at, format!("{h:?} is not a host name"))
                        })
                    })
                    .transpose()?;
                let path = r
                    .path
                    .map(|p| path_modifier(ctx, &at, p, prefix_match))
                    .transpose()?;
                filters.rewrite = Some(UrlRewrite { hostname, path });
            }
            ("RequestMirror", FilterPlace::Rule | FilterPlace::GrpcRule) => {
                let m = f.request_mirror.ok_or_else(|| missing("requestMirror"))?;
                filters
                    .mirrors
                    .push(mirror(ctx, &here("requestMirror"), namespace, m)?);
            }
            ("ExtensionRef" | "CORS" | "ExternalAuth", _) => {
                return Err(ctx.semantic(
                    &here("type"),
                    format!(
                        "{} is not supported yet (docs/traffic.md lists what is)",
                        f.kind
                    ),
                ));
            }
            ("RequestRedirect" | "URLRewrite" | "RequestMirror", FilterPlace::Backend) => {
                return Err(ctx.semantic(
                    &here("type"),
                    format!(
                        "{} is not supported on a backend (put it on the rule)",
                        f.kind
                    ),
                ));
            }
            (other, _) => {
                return Err(ctx.semantic(&here("type"), format!("{other:?} is not a filter type")));
            }
        }
    }
    if filters.redirect.is_some() && filters.rewrite.is_some() {
        return Err(ctx.semantic(
            at,
            "RequestRedirect and URLRewrite cannot be on the same rule (the specification's rule)"
                .into(),
        ));
    }
    Ok(filters)
}

fn mirror(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    namespace: &str,
    raw: RawMirror,
) -> Result<Mirror, LoadError> {
    let field = |f: &'static str| {
        let mut here = at.to_vec();
        here.push(key(f));
        here
    };
    let (numerator, denominator) = match (raw.percent, raw.fraction) {
        (Some(_), Some(_)) => {
            return Err(ctx.semantic(at, "`percent` and `fraction` are exclusive".into()));
        }
        (Some(percent), None) if percent > 100 => {
            return Err(ctx.semantic(&field("percent"), format!("{percent} is more than 100")));
        }
        (Some(percent), None) => (percent, 100),
        (None, Some(f)) if f.denominator == 0 || f.numerator > f.denominator => {
            return Err(ctx.semantic(
                &field("fraction"),
                format!(
                    "{}/{} is not a fraction of at most 1",
                    f.numerator, f.denominator
                ),
            ));
        }
        (None, Some(f)) => (f.numerator, f.denominator),
        (None, None) => (1, 1),
    };
    let b = raw.backend_ref;
    let mut port_at = field("backendRef");
    port_at.push(key("port"));
    let backend = super::load::gateway_backend(
        ctx,
        &port_at,
        namespace,
        super::load::BackendRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: b.name,
            namespace: b.namespace,
            port: b.port,
        },
    )?;
    Ok(Mirror {
        backend,
        numerator,
        denominator,
    })
}

pub(super) fn header_modifier(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    raw: RawHeaderModifier,
) -> Result<HeaderModifier, LoadError> {
    let pairs = |list: Vec<RawHeader>, field: &'static str| {
        list.into_iter()
            .enumerate()
            .map(|(i, h)| {
                let mut at = at.to_vec();
                at.extend([key(field), Seg::Index(i)]);
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| ctx.semantic(&at, format!("{:?} is not a header name", h.name)))?;
                let value = HeaderValue::from_str(&h.value).map_err(|_| {
                    ctx.semantic(&at, format!("{:?} is not a header value", h.value))
                })?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, LoadError>>()
    };
    let set = pairs(raw.set, "set")?;
    let add = pairs(raw.add, "add")?;
    let remove = raw
        .remove
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let mut at = at.to_vec();
            at.extend([key("remove"), Seg::Index(i)]);
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ctx.semantic(&at, format!("{name:?} is not a header name")))
        })
        .collect::<Result<_, _>>()?;
    Ok(HeaderModifier { set, add, remove })
}

/// A redirect's status: 301, 302, 303, 307 or 308 (`field` of `at` says
/// otherwise).
pub(super) fn redirect_status(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    field: &'static str,
    code: u16,
) -> Result<StatusCode, LoadError> {
    match code {
        301 | 302 | 303 | 307 | 308 => Ok(StatusCode::from_u16(code).expect("a listed code")),
        code => {
            let mut at = at.to_vec();
            at.push(key(field));
            Err(ctx.semantic(
                &at,
                format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
            ))
        }
    }
}

fn path_modifier(
    ctx: &DocCtx<'_>,
    at: &[Seg],
    raw: RawPathModifier,
    prefix_match: bool,
) -> Result<PathModifier, LoadError> {
    let mut at = at.to_vec();
    at.push(key("path"));
    let value = |v: Option<String>, field: &'static str| {
        let mut here = at.clone();
        here.push(key(field));
        match v {
            Some(v) if v.starts_with('/') => Ok(v),
            Some(v) => Err(ctx.semantic(&here, format!("{v:?} does not start with `/`"))),
            None => Err(ctx.semantic(&here, format!("type {} needs `{field}`", raw.kind))),
        }
    };
    match raw.kind.as_str() {
        "ReplaceFullPath" => Ok(PathModifier::ReplaceFullPath(value(
            raw.replace_full_path.clone(),
            "replaceFullPath",
        )?)),
        "ReplacePrefixMatch" if !prefix_match => Err(ctx.semantic(
            &at,
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
        )),
        "ReplacePrefixMatch" => Ok(PathModifier::ReplacePrefixMatch(
            value(raw.replace_prefix_match.clone(), "replacePrefixMatch")?
                .trim_end_matches('/')
                .to_string(),
        )),
        other => {
            at.push(key("type"));
            Err(ctx.semantic(
                &at,
                format!("{other:?} is not a path modifier (ReplaceFullPath, ReplacePrefixMatch)"),
            ))
        }
    }
}
