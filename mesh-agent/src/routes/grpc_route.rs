//! Gateway API `GRPCRoute` (gateway.networking.k8s.io/v1) on Services
//! (GAMMA): read into the same rules as an HTTPRoute's, a gRPC method being
//! the request path `/<service>/<method>`: an exact service and method is
//! an `Exact` path, a service alone a path prefix (`/<service>/...`), a
//! method alone or a regular expression a regular expression on the path.
//! Ranked with the HTTPRoutes of the same Service by the same precedence
//! (an exact method first, then the longest service).

#![allow(clippy::result_large_err)]

use std::path::Path;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_yaml::Value;

use super::{
    HttpRoute, PathMatch, RequestMatch, RouteId, RouteKind, Rule, Timeouts,
    filters::{self, FilterPlace, RawFilter},
    load::{
        convert_backend, convert_headers, convert_parents, empty, match_all, regex, route_namespace,
    },
    model::{RawBackendRef, RawMetadata, RawNameMatch, RawParentRef},
};
use crate::policy::{DocCtx, LoadError, Seg, key};

pub(super) const KIND: &str = "GRPCRoute";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawGrpcRoute {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawSpec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    parent_refs: Vec<RawParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<RawMatch>,
    #[serde(default)]
    filters: Vec<RawFilter>,
    #[serde(default)]
    backend_refs: Vec<RawBackendRef>,
    #[serde(default)]
    session_persistence: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    method: Option<RawMethodMatch>,
    #[serde(default)]
    headers: Vec<RawNameMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMethodMatch {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    method: Option<String>,
}

pub(super) fn convert(
    ctx: &DocCtx<'_>,
    path: &Path,
    raw: RawGrpcRoute,
) -> Result<HttpRoute, LoadError> {
    let namespace = route_namespace(ctx, raw.metadata.namespace.clone())?;
    let spec = raw.spec;
    let parents = convert_parents(ctx, &namespace, spec.parent_refs, &spec.hostnames)?;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.into_iter().enumerate() {
        let at = |field: &'static str| vec![key("spec"), key("rules"), Seg::Index(i), key(field)];
        if !empty(&rule.session_persistence) {
            return Err(ctx.semantic(&at("sessionPersistence"), "not supported yet".into()));
        }
        let matches = if rule.matches.is_empty() {
            vec![match_all()]
        } else {
            rule.matches
                .into_iter()
                .enumerate()
                .map(|(j, m)| convert_match(ctx, i, j, m))
                .collect::<Result<_, _>>()?
        };
        let filters = filters::convert(
            ctx,
            &at("filters"),
            rule.filters,
            FilterPlace::GrpcRule,
            false,
            &namespace,
        )?;
        let backends = rule
            .backend_refs
            .into_iter()
            .enumerate()
            .map(|(j, b)| convert_backend(ctx, &namespace, i, j, b))
            .collect::<Result<_, _>>()?;
        rules.push(Rule {
            name: rule.name,
            matches,
            backends,
            filters,
            timeouts: Timeouts::default(),
            retry: None,
        });
    }
    if rules.is_empty() {
        rules.push(Rule {
            name: None,
            matches: vec![match_all()],
            backends: Vec::new(),
            filters: Default::default(),
            timeouts: Timeouts::default(),
            retry: None,
        });
    }
    Ok(HttpRoute {
        id: RouteId {
            namespace,
            name: raw.metadata.name,
        },
        kind: RouteKind::GrpcRoute,
        created: raw.metadata.creation_timestamp,
        parents,
        rules,
        source: path.to_path_buf(),
    })
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
    let path = match m.method {
        None => PathMatch::Prefix(String::new()),
        Some(method) => {
            let mut at = base();
            at.push(key("method"));
            let (service, name) = (method.service.as_deref(), method.method.as_deref());
            match method.kind.as_deref().unwrap_or("Exact") {
                _ if service.is_none() && name.is_none() => {
                    return Err(
                        ctx.semantic(&at, "one of `service` and `method` is required".into())
                    );
                }
                "Exact" => {
                    for (field, value) in [("service", service), ("method", name)] {
                        if value.is_some_and(|v| v.is_empty() || v.contains('/')) {
                            let mut here = at.clone();
                            here.push(key(field));
                            return Err(ctx
                                .semantic(&here, format!("{value:?} is not a gRPC {field} name")));
                        }
                    }
                    match (service, name) {
                        (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
                        (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                        (None, Some(m)) => PathMatch::Regex(regex(
                            ctx,
                            &at,
                            &format!("/[^/]+/{}", regex::escape(m)),
                        )?),
                        (None, None) => unreachable!("refused above"),
                    }
                }
                "RegularExpression" => {
                    let service = service.unwrap_or("[^/]+");
                    let name = name.unwrap_or("[^/]+");
                    PathMatch::Regex(regex(ctx, &at, &format!("/(?:{service})/(?:{name})"))?)
                }
                other => {
                    at.push(key("type"));
                    return Err(ctx.semantic(
                        &at,
                        format!("{other:?} is not a method match type (Exact, RegularExpression)"),
                    ));
                }
            }
        }
    };
    let headers = convert_headers(ctx, &base(), m.headers)?;
    Ok(RequestMatch {
        path,
        headers,
        query_params: Vec::new(),
        method: None,
    })
}
