//! The balancer's input types: endpoints, subsets, locality and outcomes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One backend instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable identity (e.g. the pod UID or `namespace/pod:port`); state is
    /// kept per id across [`update_endpoints`](super::Service::update_endpoints).
    pub id: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// The node the endpoint runs on.
    pub node: String,
    /// The node's zone (`topology.kubernetes.io/zone`), if known.
    pub zone: Option<String>,
    /// Relative weight (default 1). 0 = only used if every candidate is 0.
    pub weight: u32,
    /// The endpoint's labels, matched by [`Subset::labels`].
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint with weight 1, no zone and no labels.
    pub fn new(id: impl Into<String>, addr: SocketAddr, node: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            addr,
            node: node.into(),
            zone: None,
            weight: 1,
            labels: BTreeMap::new(),
        }
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// A named, weighted slice of a service's endpoints (canary releases):
/// endpoints whose labels contain every `labels` pair belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// Name, for logs and metrics.
    pub name: String,
    /// `matchLabels`: every pair must be present on the endpoint. Empty =
    /// matches every endpoint.
    pub labels: BTreeMap<String, String>,
    /// Relative weight among the service's subsets (e.g. 95 and 5).
    pub weight: u32,
}

impl Subset {
    /// A subset with the given name, weight and `matchLabels`.
    pub fn new<K, V>(
        name: impl Into<String>,
        weight: u32,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            name: name.into(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            weight,
        }
    }

    /// Whether `endpoint` belongs to this subset.
    pub fn matches(&self, endpoint: &Endpoint) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
    }
}

/// Locality preference of a service. "Prefer" means: use the nearest
/// *non-empty* tier of healthy (non-ejected) endpoints, and only that tier;
/// there is no spill-over by load, so a single healthy same-node endpoint
/// receives all of this node's traffic for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locality {
    /// Same node, else same zone, else any.
    #[default]
    PreferNode,
    /// Same zone (which includes the same node), else any.
    PreferZone,
    /// No preference.
    None,
}

/// Where the client (the proxy's node) is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientLocality {
    /// The node name.
    pub node: String,
    /// The zone, if known; without it the zone tier is always empty.
    pub zone: Option<String>,
}

impl ClientLocality {
    /// A client on `node` in `zone`.
    pub fn new(node: impl Into<String>, zone: Option<&str>) -> Self {
        Self {
            node: node.into(),
            zone: zone.map(str::to_owned),
        }
    }
}

/// What happened to a connection or request, as reported by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected / got a response below 500.
    Success,
    /// The connection could not be established (refused, timed out, reset
    /// during the handshake).
    ConnectFailed,
    /// An HTTP response with this status: 5xx is a failure, anything else
    /// (4xx included: the client's fault) a success.
    Status(u16),
    /// A failure after connecting: reset, response timeout, protocol error.
    Failed,
}

impl Outcome {
    /// Whether this counts as a failure for outlier detection.
    pub fn is_failure(&self) -> bool {
        match *self {
            Outcome::Success => false,
            Outcome::ConnectFailed | Outcome::Failed => true,
            Outcome::Status(s) => s >= 500,
        }
    }
}
