//! The state the data path reads: built whole from a desired state and
//! swapped in one step, so a connection sees all of one generation (pods,
//! remote workloads, services, policies) and never half of the next.
//!
//! A connection takes the snapshot once when it starts; per-request
//! decisions on a long-lived HTTP connection take the current one.

use crate::dns::names::ServiceNames;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::{Result, anyhow};
use arc_swap::ArcSwap;

use super::pod::PodHandle;
use crate::{
    config::ServiceConfig,
    desired::Desired,
    identity::SpiffeId,
    l7::Destination,
    mtls::RemotePeer,
    policy::{self, CompiledPolicies},
    routes::RouteTable,
    services::ServiceTable,
};

/// Everything a connection is routed and decided by.
pub struct Snapshot {
    /// Which applied desired state this is (1 for the first; 0: empty).
    pub generation: u64,
    local_pods: HashMap<IpAddr, Arc<PodHandle>>,
    remote: HashMap<IpAddr, Arc<RemotePeer>>,
    pub services: Arc<ServiceTable>,
    pub policies: Arc<CompiledPolicies>,
    /// Gateway API routes attached to services' HTTP ports.
    pub routes: Arc<RouteTable>,
    /// The service names the DNS proxy answers.
    pub service_names: Arc<ServiceNames>,
    /// Istio's `destination_service` of an endpoint (address and target
    /// port), for what arrives at it without naming the service.
    services_by_endpoint: Arc<HashMap<SocketAddr, Arc<str>>>,
    /// Every mesh address (pods of this node, workloads of others) as
    /// request metrics and spans name the destination.
    destinations: HashMap<IpAddr, Arc<Destination>>,
}

/// Where the data path finds the snapshot in force.
pub type SnapshotCell = Arc<ArcSwap<Snapshot>>;

/// The parts of a snapshot that a desired state alone decides, built before
/// anything running is touched: if one fails, nothing changes.
pub struct Plan {
    remote: HashMap<IpAddr, Arc<RemotePeer>>,
    services: Arc<ServiceTable>,
    policies: Arc<CompiledPolicies>,
    routes: Arc<RouteTable>,
    service_names: Arc<ServiceNames>,
    services_by_endpoint: Arc<HashMap<SocketAddr, Arc<str>>>,
}

impl Plan {
    /// Builds remote workloads, services (keeping the balancers of
    /// `previous` where their shape is the same) and compiled policies.
    pub fn build(desired: &Desired, previous: &Snapshot) -> Result<Self> {
        let node = &desired.node;
        let remote = remote_peers(desired, &node.trust_domain)?;
        // Istio DestinationRules change the settings of their Services.
        let (with_rules, unresolved_rules) = crate::routes::apply_destination_rules(
            &desired.services,
            &desired.routes.destination_rules,
        );
        let services = ServiceTable::build(&with_rules, node, Some(&previous.services))
            .map_err(|e| anyhow!("services: {e:#}"))?;
        let policies = desired.policies.set.compile_with(
            &node.root_namespace,
            &desired.services,
            &desired.routes.routes,
        );
        for unmapped in policies.unmapped_targets() {
            tracing::error!(error = %unmapped, "authorization policy cannot be enforced as written");
        }
        let mut routes = RouteTable::build(&desired.routes.routes, &with_rules);
        routes.add_statuses(unresolved_rules);
        for status in routes.statuses() {
            for parent in status.parents.iter().filter(|p| !p.accepted) {
                tracing::warn!(route = %status.route, parent = %parent.parent, reason = parent.reason.as_deref().unwrap_or(""), "route not accepted");
            }
            for backend in &status.unresolved_backends {
                tracing::warn!(route = %status.route, backend = %backend, "route backend unresolved: its requests are answered 500");
            }
        }
        Ok(Self {
            remote,
            services: Arc::new(services),
            policies: Arc::new(policies),
            routes: Arc::new(routes),
            service_names: Arc::new(ServiceNames::new(&node.cluster_domain, &desired.services)),
            services_by_endpoint: Arc::new(services_by_endpoint(&desired.services)),
        })
    }

    /// The snapshot serving `pods` (the enrolled ones) with this plan.
    pub fn with_pods(self, pods: &[Arc<PodHandle>], generation: u64) -> Snapshot {
        let mut local_pods = HashMap::new();
        let mut destinations = HashMap::new();
        for (ip, peer) in &self.remote {
            if let Some((namespace, name)) = peer.key.split_once('/') {
                let destination = Destination {
                    workload: name.to_string(),
                    namespace: namespace.to_string(),
                    principal: peer.identity.to_string(),
                };
                destinations.insert(*ip, Arc::new(destination));
            }
        }
        for pod in pods {
            let destination = Arc::new(Destination {
                workload: pod.workload_name(),
                namespace: pod.workload.namespace.clone(),
                principal: pod.identity.to_string(),
            });
            for addr in &pod.addrs {
                local_pods.insert(*addr, pod.clone());
                destinations.insert(*addr, destination.clone());
            }
        }
        Snapshot {
            generation,
            local_pods,
            remote: self.remote,
            services: self.services,
            policies: self.policies,
            routes: self.routes,
            service_names: self.service_names,
            services_by_endpoint: self.services_by_endpoint,
            destinations,
        }
    }
}

impl Snapshot {
    /// Nothing enrolled, nothing known: what the data path reads before the
    /// first desired state is applied.
    pub fn empty() -> Self {
        Self {
            generation: 0,
            local_pods: HashMap::new(),
            remote: HashMap::new(),
            services: Arc::default(),
            policies: Arc::new(
                policy::PolicySet::default().compile(policy::DEFAULT_ROOT_NAMESPACE),
            ),
            routes: Arc::default(),
            service_names: Arc::default(),
            services_by_endpoint: Arc::default(),
            destinations: HashMap::new(),
        }
    }

    /// The destination labels of a mesh address, if it is one.
    pub fn destination(&self, ip: IpAddr) -> Option<&Arc<Destination>> {
        self.destinations.get(&ip)
    }

    /// The service (`<name>.<namespace>.svc.cluster.local`) with `endpoint`
    /// (address and port the pod listens on) among its endpoints; the
    /// first by name when several share it.
    pub fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<&str> {
        self.services_by_endpoint.get(&endpoint).map(|s| &**s)
    }

    pub fn local_pod(&self, ip: IpAddr) -> Option<&Arc<PodHandle>> {
        self.local_pods.get(&ip)
    }

    pub fn remote_peer(&self, ip: IpAddr) -> Option<&Arc<RemotePeer>> {
        self.remote.get(&ip)
    }

    /// The identities of the pods of this node.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        self.local_pods
            .values()
            .map(|pod| pod.identity.clone())
            .collect()
    }

    /// The workload name and namespace of a mesh address (a pod of this node
    /// or a workload of another), `unknown` otherwise.
    pub fn workload_of(&self, ip: IpAddr) -> (String, String) {
        if let Some(pod) = self.local_pod(ip) {
            return (pod.workload_name(), pod.workload.namespace.clone());
        }
        if let Some(peer) = self.remote_peer(ip)
            && let Some((namespace, name)) = peer.key.split_once('/')
        {
            return (name.to_string(), namespace.to_string());
        }
        ("unknown".to_string(), "unknown".to_string())
    }

    /// Whether connections to `port` of `target` are decided per request
    /// (L7) instead of once for the connection (L4).
    pub fn needs_http(&self, target: &PodHandle, port: u16) -> bool {
        target.decided_per_request(&self.policies, port)
    }
}

/// Each service's endpoints, by address and target port, to its host name;
/// where several services share an endpoint the first by namespace and
/// name wins, so the label does not change from one reload to the next.
fn services_by_endpoint(services: &[ServiceConfig]) -> HashMap<SocketAddr, Arc<str>> {
    let mut sorted: Vec<&ServiceConfig> = services.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut map = HashMap::new();
    for service in sorted {
        let host: Arc<str> = super::service_http::service_host(service).into();
        for endpoint in &service.endpoints {
            for port in &service.ports {
                let target = port.target_port.unwrap_or(port.port);
                map.entry(SocketAddr::new(endpoint.address, target))
                    .or_insert_with(|| host.clone());
            }
        }
    }
    map
}

/// Mesh workloads on other nodes by address, with the identity each must prove.
fn remote_peers(desired: &Desired, trust_domain: &str) -> Result<HashMap<IpAddr, Arc<RemotePeer>>> {
    let mut map = HashMap::new();
    for w in &desired.workloads {
        let identity =
            SpiffeId::new(trust_domain, &w.namespace, &w.service_account).map_err(|e| {
                anyhow!(
                    "workloads: no valid SPIFFE ID for {}/{}: {e}",
                    w.namespace,
                    w.service_account
                )
            })?;
        let peer = Arc::new(RemotePeer {
            key: w.key(),
            node: w.node.clone(),
            identity,
        });
        for ip in w
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(w.ipv6.map(IpAddr::V6))
        {
            map.insert(ip, peer.clone());
        }
    }
    Ok(map)
}
