//! `services.yaml`: services with virtual IPs; a captured connection to a
//! service address is served by one of its endpoints, chosen by the agent.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicesFile {
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    /// Virtual IPs (IPv4 and/or IPv6) applications dial.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The labels of the pods it selects (Kubernetes `spec.selector`): the
    /// workloads an AuthorizationPolicy's `targetRefs` to it applies to.
    /// Empty: it cannot be targeted that way.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Prefer endpoints on this node, then in this zone (default), or not.
    #[serde(default)]
    pub locality: LocalityConfig,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Weighted subsets for canaries, e.g. v1 95 / v2 5: a subset is picked by
    /// weight, then an endpoint among its members (by labels).
    #[serde(default)]
    pub subsets: Vec<SubsetConfig>,
    /// Time to connect to an endpoint (default 5 s); a timeout counts as a
    /// connect failure (retried, and towards ejection).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// HTTP ports: time from a request to its response head, retries
    /// included (default 15 s, `0s` for none); answered `504` when it passes.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP ports: per-route request timeouts; the first route whose
    /// `pathPrefix` starts the request's path wins, else `requestTimeout`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// HTTP ports: retries of idempotent requests on connect failure or 503.
    #[serde(default)]
    pub retries: RetriesConfig,
    /// Ejection of endpoints that keep failing.
    #[serde(default)]
    pub outlier_detection: OutlierDetectionConfig,
    /// HTTP ports: the most requests in flight at once from this node, by
    /// a DestinationRule's `connectionPool` (not a services.yaml field):
    /// beyond it, `503` with flag `UO` at once.
    #[serde(skip)]
    pub max_requests_in_flight: Option<u32>,
    /// HTTP ports: a DestinationRule's `consistentHash` (not a
    /// services.yaml field): requests with the same key go to the same
    /// endpoint.
    #[serde(skip)]
    pub hash_by: Option<HashKey>,
    /// HTTP ports: an upstream connection carries at most this many
    /// requests, by a DestinationRule's `maxRequestsPerConnection` (not a
    /// services.yaml field).
    #[serde(skip)]
    pub max_requests_per_connection: Option<std::num::NonZeroU32>,
    /// HTTP ports: at most this many retries in flight from this node, by
    /// a DestinationRule's `maxRetries` (not a services.yaml field); a
    /// retry beyond it is not made (the attempt's answer stands).
    #[serde(skip)]
    pub max_retries_in_flight: Option<u32>,
    /// How an endpoint is chosen, by a DestinationRule's
    /// `loadBalancer.simple` (not a services.yaml field).
    #[serde(skip)]
    pub choice: crate::balance::Choice,
    /// A DestinationRule subset of the Service of this name: its endpoints
    /// are the ones with the subset's labels, it has no address of its own
    /// and is reached by the routes that name it (not a services.yaml
    /// field).
    #[serde(skip)]
    pub subset: Option<String>,
}

/// What a consistent hash is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// This request header's value (lower-case name).
    Header(String),
    /// This cookie's value. Without it, with a `ttl`, the agent makes one
    /// up, hashes the request by it and sets it on the response (`Max-Age`
    /// the ttl; a session cookie for 0), so the client's next requests
    /// stay; without a ttl such a request is balanced as usual.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    /// This query parameter's value.
    QueryParameter(String),
    /// The client's address.
    SourceIp,
}

impl ServiceConfig {
    /// A service with no name, address, port or endpoint yet and every
    /// setting at its default (what a source fills in).
    pub fn with_defaults() -> Self {
        Self {
            name: String::new(),
            namespace: String::new(),
            vips: Vec::new(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
            locality: LocalityConfig::default(),
            endpoints: Vec::new(),
            subsets: Vec::new(),
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            routes: Vec::new(),
            retries: RetriesConfig::default(),
            outlier_detection: OutlierDetectionConfig::default(),
            max_requests_in_flight: None,
            hash_by: None,
            max_requests_per_connection: None,
            max_retries_in_flight: None,
            choice: crate::balance::Choice::default(),
            subset: None,
        }
    }

    /// The key of one of its ports, as balancers and routes know it.
    pub fn port_key(&self, port: u16) -> String {
        port_key(&self.namespace, &self.name, self.subset.as_deref(), port)
    }
}

/// The key of a service port: `namespace/name:port`, or
/// `namespace/name~subset:port` for a DestinationRule subset (`~` is in no
/// Kubernetes name).
pub fn port_key(namespace: &str, name: &str, subset: Option<&str>, port: u16) -> String {
    match subset {
        None => format!("{namespace}/{name}:{port}"),
        Some(subset) => format!("{namespace}/{name}~{subset}:{port}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfig {
    /// Matches paths that start with it (after normalisation); must start with `/`.
    pub path_prefix: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetriesConfig {
    /// Retries of one request beyond the first attempt (default 2; 0 = off).
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Retries may add this percentage of the requests of the last 10 s
    /// (default 20) ...
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// ... plus this many per second (default 10), so a quiet service can
    /// still retry but retries never multiply an outage.
    #[serde(default = "default_min_retries_per_second")]
    pub min_per_second: u32,
}

impl Default for RetriesConfig {
    fn default() -> Self {
        Self {
            attempts: default_retry_attempts(),
            budget_percent: default_budget_percent(),
            min_per_second: default_min_retries_per_second(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionConfig {
    /// Failures in a row (connect failures, resets, 5xx) that eject an
    /// endpoint (default 5).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// The n-th ejection lasts n times this (default 30 s), at most 300 s;
    /// then the endpoint is re-admitted on probation.
    #[serde(default = "default_base_ejection_time", with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// At most this percentage of the endpoints are ejected at once (default 50).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubsetConfig {
    pub name: String,
    pub weight: u32,
    /// Endpoints whose labels include all of these belong to the subset.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// `tcp`: balanced per connection. `http` (HTTP/1.1 to the endpoints) and
    /// `http2`/`grpc` (HTTP/2 to the endpoints): balanced per request; the
    /// client may speak HTTP/1.1 or HTTP/2 either way.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LocalityConfig {
    PreferNode,
    #[default]
    PreferZone,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointConfig {
    pub name: String,
    pub address: IpAddr,
    pub node: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The endpoint's service account: it is a mesh workload, reached from
    /// other nodes only through the mTLS tunnel, whose peer must prove
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`. Without
    /// it, an endpoint listed in workloads.yaml is handled as that workload,
    /// and any other is dialled directly (outside the mesh).
    #[serde(default)]
    pub service_account: Option<String>,
    /// The endpoint's namespace (default: the service's).
    #[serde(default)]
    pub namespace: Option<String>,
}

fn default_protocol() -> String {
    "tcp".to_string()
}

fn default_weight() -> u32 {
    1
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_retry_attempts() -> u32 {
    2
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries_per_second() -> u32 {
    10
}

fn default_consecutive_failures() -> u32 {
    5
}

fn default_base_ejection_time() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ejection_percent() -> u8 {
    50
}

impl ServiceConfig {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The request timeout for `path` (`None`: no timeout).
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        let timeout = self
            .routes
            .iter()
            .find(|route| path.starts_with(&route.path_prefix))
            .map_or(self.request_timeout, |route| route.timeout);
        (!timeout.is_zero()).then_some(timeout)
    }
}
