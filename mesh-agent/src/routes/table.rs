//! The routes of every Service port, in the Gateway API's precedence, and
//! the rule one request takes.
//!
//! Precedence (the specification's, across every route attached to the
//! Service): an `Exact` path, then the longest `PathPrefix`, then a method,
//! then the most header matches, then the most query parameter matches;
//! `RegularExpression` paths (whose rank the specification leaves to the
//! implementation) come after every exact and prefix path of the same
//! Service. Ties go to the oldest route (`creationTimestamp`), then by
//! `namespace/name`, then to the first rule and match as written.
//!
//! GAMMA: a route in the Service's namespace (a producer route) applies to
//! every client; one in another namespace (a consumer route) applies only
//! to clients in its own namespace, and for them the producer routes do not.

use std::{cmp::Reverse, collections::HashMap, path::PathBuf, sync::Arc};

use http::{HeaderMap, Method, Uri};
use serde::Serialize;

use super::{Backend, HttpRoute, PathMatch, RequestMatch, RouteId, RouteKind, Rule, ValueMatch};
use crate::config::ServiceConfig;

/// Every route attached to every HTTP port of a known Service.
#[derive(Default)]
pub struct RouteTable {
    /// By service port key (`namespace/name:port`), in precedence order.
    by_port: HashMap<String, Vec<Entry>>,
    statuses: Vec<RouteStatus>,
}

/// One match of one rule of one route, attached to one Service port.
struct Entry {
    route: Arc<HttpRoute>,
    rule: usize,
    matched: usize,
    /// `Some(namespace)` for a consumer route: only its namespace's clients.
    consumer: Option<String>,
}

impl Entry {
    fn request_match(&self) -> &RequestMatch {
        &self.route.rules[self.rule].matches[self.matched]
    }
}

/// What became of a route, as Gateway API status conditions would say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub route: String,
    pub file: PathBuf,
    /// One per parent: `Accepted`, or why not.
    pub parents: Vec<ParentStatus>,
    /// `ResolvedRefs`: every backend known, or the ones that are not (the
    /// requests they would get are answered 500).
    pub unresolved_backends: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    pub parent: String,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a request to a Service port with routes takes.
#[derive(Debug)]
pub enum Routed {
    Rule(RuleRef),
    /// Routes are attached, none matches: answered 404.
    NoMatch,
}

/// The rule a request matched, and by which of its matches: held for the
/// request's life (it holds its route, nothing else of the snapshot).
#[derive(Debug, Clone)]
pub struct RuleRef {
    route: Arc<HttpRoute>,
    rule: usize,
    matched: usize,
}

impl RuleRef {
    pub fn route(&self) -> &RouteId {
        &self.route.id
    }

    pub fn rule(&self) -> &Rule {
        &self.route.rules[self.rule]
    }

    /// The prefix the request matched, if its match was one: a
    /// `PathPrefix` (without a trailing `/`), what `ReplacePrefixMatch`
    /// replaces; or an Istio string prefix, what `rewrite.uri` replaces.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.rule().matches[self.matched].path {
            PathMatch::Prefix(prefix) | PathMatch::StringPrefix(prefix) => Some(prefix),
            _ => None,
        }
    }
}

/// The ports of `service` that speak HTTP.
fn http_ports(service: &ServiceConfig) -> impl Iterator<Item = u16> + '_ {
    service
        .ports
        .iter()
        .filter(|p| matches!(p.protocol.as_str(), "http" | "http2" | "grpc"))
        .map(|p| p.port)
}

impl RouteTable {
    /// Attaches `routes` to the HTTP ports of `services` (with the
    /// DestinationRules' subsets, which routes may name as backends).
    pub fn build(routes: &[Arc<HttpRoute>], services: &[ServiceConfig]) -> Self {
        let by_name: HashMap<(&str, &str, Option<&str>), &ServiceConfig> = services
            .iter()
            .map(|s| {
                (
                    (s.namespace.as_str(), s.name.as_str(), s.subset.as_deref()),
                    s,
                )
            })
            .collect();
        let mut by_port: HashMap<String, Vec<Entry>> = HashMap::new();
        let mut statuses = Vec::new();
        for route in routes {
            let mut parents = Vec::new();
            for (parent, port) in &route.parents {
                let label = match port {
                    Some(p) => format!("{}/{}:{p}", parent.namespace, parent.name),
                    None => format!("{}/{}", parent.namespace, parent.name),
                };
                let service = by_name.get(&(parent.namespace.as_str(), parent.name.as_str(), None));
                let ports: Vec<u16> = service
                    .map(|s| {
                        http_ports(s)
                            .filter(|p| port.is_none_or(|want| want == *p))
                            .collect()
                    })
                    .unwrap_or_default();
                let reason = match (service, ports.is_empty()) {
                    (None, _) => Some("NoMatchingParent: no such Service".to_string()),
                    (Some(_), true) => Some(
                        "NoMatchingParent: no HTTP port (protocol http, http2 or grpc) of the Service matches".to_string(),
                    ),
                    (Some(_), false) => None,
                };
                let consumer =
                    (route.id.namespace != parent.namespace).then(|| route.id.namespace.clone());
                for p in ports {
                    let entries = by_port
                        .entry(format!("{}/{}:{p}", parent.namespace, parent.name))
                        .or_default();
                    for (rule, r) in route.rules.iter().enumerate() {
                        for matched in 0..r.matches.len() {
                            entries.push(Entry {
                                route: route.clone(),
                                rule,
                                matched,
                                consumer: consumer.clone(),
                            });
                        }
                    }
                }
                parents.push(ParentStatus {
                    parent: label,
                    accepted: reason.is_none(),
                    reason,
                });
            }
            let unresolved_backends = route
                .rules
                .iter()
                .flat_map(|r| {
                    let backends = r.backends.iter().map(|b| &b.backend);
                    backends.chain(r.filters.mirrors.iter().map(|m| &m.backend))
                })
                .filter_map(|b| unresolved(b, &by_name))
                .collect();
            statuses.push(RouteStatus {
                route: route.id.to_string(),
                file: route.source.clone(),
                parents,
                unresolved_backends,
            });
        }
        for entries in by_port.values_mut() {
            entries.sort_by_cached_key(precedence);
        }
        Self { by_port, statuses }
    }

    /// Whether any route is attached to the service port `key`.
    pub fn has_routes(&self, key: &str) -> bool {
        self.by_port.contains_key(key)
    }

    /// The rule a request to the service port `key` from a client in
    /// `client_namespace` takes; `None` when no route applies to it (the
    /// Service's own endpoints serve it).
    pub fn route(
        &self,
        key: &str,
        client_namespace: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Option<Routed> {
        let entries = self.by_port.get(key)?;
        let consumer = entries
            .iter()
            .any(|e| e.consumer.as_deref() == Some(client_namespace));
        let mut applicable = entries.iter().filter(|e| match &e.consumer {
            Some(ns) => consumer && ns == client_namespace,
            None => !consumer,
        });
        let first = applicable.next()?;
        std::iter::once(first)
            .chain(applicable)
            .find(|e| matches(e.request_match(), method, uri, headers))
            .map(|e| {
                Routed::Rule(RuleRef {
                    route: e.route.clone(),
                    rule: e.rule,
                    matched: e.matched,
                })
            })
            .or(Some(Routed::NoMatch))
    }

    /// Conditions of other resources shown with the routes' (the
    /// DestinationRules whose Service is not known).
    pub fn add_statuses(&mut self, statuses: Vec<RouteStatus>) {
        self.statuses.extend(statuses);
    }

    /// Every route's conditions, for `/config_dump` and `mesh-agent check`.
    pub fn statuses(&self) -> &[RouteStatus] {
        &self.statuses
    }
}

/// Why a backend cannot be sent to, if it cannot.
fn unresolved(
    backend: &Backend,
    services: &HashMap<(&str, &str, Option<&str>), &ServiceConfig>,
) -> Option<String> {
    let (service, subset, port) = match backend {
        Backend::Invalid(why) => return Some(why.clone()),
        Backend::ServiceSamePort { service, subset } => (service, subset, None),
        Backend::Service {
            service,
            subset,
            port,
            ..
        } => (service, subset, Some(*port)),
    };
    let mut label = format!("{}/{}", service.namespace, service.name);
    if let Some(port) = port {
        label.push_str(&format!(":{port}"));
    }
    let name = (service.namespace.as_str(), service.name.as_str());
    let Some(found) = services.get(&(name.0, name.1, subset.as_deref())) else {
        return Some(match subset {
            Some(subset) if services.contains_key(&(name.0, name.1, None)) => format!(
                "{label}: no subset {subset:?} (no DestinationRule of the Service defines it)"
            ),
            _ => format!("{label}: no such Service"),
        });
    };
    match port {
        None if http_ports(found).next().is_none() => Some(format!("{label}: no HTTP port")),
        Some(port) if !http_ports(found).any(|p| p == port) => {
            Some(format!("{label}: not an HTTP port of the Service"))
        }
        _ => None,
    }
}

type Precedence = (
    u8,
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    (bool, Option<String>),
    RouteId,
    usize,
    usize,
);

fn precedence(e: &Entry) -> Precedence {
    let m = e.request_match();
    let (class, length) = match &m.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => (1, p.len()),
        PathMatch::Regex(_) => (2, 0),
    };
    // A VirtualService's rules keep their order (Istio: the first match),
    // ahead of the Gateway API's routes, which are ranked together.
    let ranked = e.route.kind != RouteKind::VirtualService;
    (
        u8::from(ranked),
        if ranked { class } else { 0 },
        Reverse(if ranked { length } else { 0 }),
        ranked && m.method.is_none(),
        Reverse(if ranked { m.headers.len() } else { 0 }),
        Reverse(if ranked { m.query_params.len() } else { 0 }),
        // The oldest first; a route without a time after those with one.
        (e.route.created.is_none(), e.route.created.clone()),
        e.route.id.clone(),
        e.rule,
        e.matched,
    )
}

/// Whether any rule of `route` matches the request (its rules' matches,
/// whatever other routes say): what a rate limit on the route counts.
pub fn route_matches(route: &HttpRoute, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
    route
        .rules
        .iter()
        .flat_map(|r| &r.matches)
        .any(|m| matches(m, method, uri, headers))
}

fn matches(m: &RequestMatch, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
    let path = uri.path();
    let path_ok = match &m.path {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => {
            p.is_empty()
                || path == p
                || path
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        PathMatch::Regex(r) => r.is_match(path),
        PathMatch::StringPrefix(p) => path.starts_with(p.as_str()),
    };
    if !path_ok || m.method.as_ref().is_some_and(|want| want != method) {
        return false;
    }
    let headers_ok = m.headers.iter().all(|h| {
        headers
            .get(&h.name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| value_matches(&h.value, v))
    });
    if !headers_ok {
        return false;
    }
    if m.query_params.is_empty() {
        return true;
    }
    let query = uri.query().unwrap_or("");
    m.query_params.iter().all(|q| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == q.name)
            .is_some_and(|(_, value)| value_matches(&q.value, &value))
    })
}

fn value_matches(m: &ValueMatch, value: &str) -> bool {
    match m {
        ValueMatch::Exact(want) => want == value,
        ValueMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
        ValueMatch::Regex(r) => r.is_match(value),
    }
}

impl Rule {
    /// The backend for a request (its index), by weight, from a uniform
    /// `draw`; `None` when the rule has no backend with a weight (500).
    pub fn pick(&self, draw: u64) -> Option<usize> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = draw % total;
        for (i, b) in self.backends.iter().enumerate() {
            let weight = u64::from(b.weight);
            if at < weight {
                return Some(i);
            }
            at -= weight;
        }
        unreachable!("draw % total is below the total")
    }
}
