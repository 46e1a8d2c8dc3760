//! Traffic routing by the resources users already write: Gateway API
//! `HTTPRoute`s whose parents are Services (GAMMA, docs/traffic.md), from
//! the configuration directory's `routes/`.
//!
//! - `model.rs`: the resource as written (every field of the specification
//!   known, the unsupported ones kept to be named);
//! - `load.rs`: files → [`HttpRoute`]s, errors naming file, line and field;
//! - `table.rs`: the routes of every Service, in the specification's
//!   precedence, and the choice for one request ([`RouteTable::route`]).
//!
//! The client's node routes: a request to a Service's HTTP port is matched
//! against the routes attached to that Service, and sent to a backend of
//! the matching rule, chosen by weight, then balanced over that backend
//! Service's endpoints (`proxy/service_http.rs`).

mod destination_rule;
pub(crate) mod filters;
mod grpc_route;
mod load;
mod model;
mod table;
#[cfg(test)]
mod tests;
mod virtual_service;

use std::{path::PathBuf, sync::Arc};

pub use destination_rule::{DestinationRule, TrafficPolicy, apply as apply_destination_rules};
pub use filters::{Fault, Filters, HeaderModifier, Mirror, PathModifier};
pub use load::{Loaded, load};
pub use table::{RouteStatus, RouteTable, Routed, RuleRef, route_matches};

/// `namespace/name` of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for RouteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

/// Which resource a route was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Istio's: its rules keep their order, ahead of HTTPRoutes.
    VirtualService,
    /// Gateway API's: ranked by the specification's precedence.
    HttpRoute,
    /// Gateway API's, ranked with the HTTPRoutes.
    GrpcRoute,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::VirtualService => "VirtualService",
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::GrpcRoute => "GRPCRoute",
        }
    }
}

/// An `HTTPRoute` (or an Istio `VirtualService`'s HTTP routes), validated.
#[derive(Debug)]
pub struct HttpRoute {
    pub id: RouteId,
    pub kind: RouteKind,
    /// `metadata.creationTimestamp` (RFC 3339): the older route wins a tie.
    pub created: Option<String>,
    /// The Services it attaches to, and the port when it names one.
    pub parents: Vec<(ServiceRef, Option<u16>)>,
    pub rules: Vec<Rule>,
    pub source: PathBuf,
}

#[derive(Debug)]
pub struct Rule {
    pub name: Option<String>,
    /// A request matches the rule when it matches any of these.
    pub matches: Vec<RequestMatch>,
    pub backends: Vec<WeightedBackend>,
    pub filters: Filters,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
}

/// A rule's `retry` (Gateway API GEP-1731): a request answered with one of
/// `codes`, or whose connection failed, is sent again, up to `attempts`
/// more times, `backoff` apart. Its body must be known and at most 64 KiB
/// (it is read whole before the first attempt, to be sent again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: std::time::Duration,
}

/// A rule's `timeouts`. `Some(ZERO)` is "no timeout" (the specification's
/// `0s`); `None` leaves the backend Service's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request to its response head, retries included (504).
    pub request: Option<std::time::Duration>,
    /// One attempt at a backend (504).
    pub backend_request: Option<std::time::Duration>,
}

#[derive(Debug)]
pub struct RequestMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    pub method: Option<http::Method>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not
    /// `/foobar`. Kept without its trailing `/` (`/` itself is empty).
    Prefix(String),
    /// The whole path must match.
    Regex(regex::Regex),
    /// Istio's `uri.prefix`: a plain string prefix (`/foo` matches `/foobar`).
    StringPrefix(String),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    /// Istio's `prefix`.
    Prefix(String),
    /// The whole value must match.
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone)]
pub struct WeightedBackend {
    pub weight: u32,
    pub backend: Backend,
    /// Run when this backend is the one chosen (after the rule's).
    pub filters: Filters,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A port of a Service (or of one of its DestinationRule subsets): its
    /// requests are balanced over its endpoints.
    Service {
        service: ServiceRef,
        port: u16,
        subset: Option<String>,
        /// The service port's key (`namespace/name:port`,
        /// `namespace/name~subset:port`).
        key: String,
    },
    /// The Service's port the request was sent to (a VirtualService's
    /// destination without a port), of a subset or not.
    ServiceSamePort {
        service: ServiceRef,
        subset: Option<String>,
    },
    /// A reference this agent cannot follow (another kind): the requests
    /// it would get are answered 500, as the specification says.
    Invalid(String),
}

impl Backend {
    /// `port` of `service`.
    pub fn service(service: ServiceRef, port: u16) -> Self {
        Self::subset(service, port, None)
    }

    /// `port` of `service`'s subset (a DestinationRule's), or of the whole
    /// Service.
    pub fn subset(service: ServiceRef, port: u16, subset: Option<String>) -> Self {
        Backend::Service {
            key: crate::config::port_key(
                &service.namespace,
                &service.name,
                subset.as_deref(),
                port,
            ),
            service,
            port,
            subset,
        }
    }

    /// The key of the service port it names.
    pub fn service_port_key(&self) -> Option<&str> {
        match self {
            Backend::Service { key, .. } => Some(key),
            Backend::ServiceSamePort { .. } | Backend::Invalid(_) => None,
        }
    }

    /// The key of the service port it names for a request sent to port
    /// `requested`.
    pub fn key_for(&self, requested: u16) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Backend::Service { key, .. } => Some(std::borrow::Cow::Borrowed(key)),
            Backend::ServiceSamePort { service, subset } => {
                Some(std::borrow::Cow::Owned(crate::config::port_key(
                    &service.namespace,
                    &service.name,
                    subset.as_deref(),
                    requested,
                )))
            }
            Backend::Invalid(_) => None,
        }
    }
}

/// Parsed routes with the texts they came from. Two are equal when their
/// texts are.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// (path, text) of every route file, in load order.
    pub files: Vec<(PathBuf, String)>,
    pub routes: Arc<Vec<Arc<HttpRoute>>>,
    pub destination_rules: Arc<Vec<Arc<DestinationRule>>>,
}

impl PartialEq for Routes {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}
