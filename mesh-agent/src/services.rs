//! Services: a captured connection to a service's virtual IP and port is served
//! by its endpoints. TCP ports: one endpoint per connection (power of two
//! choices over open connections). HTTP ports: one endpoint per request
//! (power of two choices over peak-EWMA latency), with retries within a
//! budget; the HTTP side lives in `proxy::service_http`. Locality, subsets
//! and outlier ejection apply to both.

use parking_lot::Mutex;
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Result, anyhow};

use crate::{
    balance::{
        self, ClientLocality, ConnectionToken, Endpoint, Locality, MonotonicClock, Outcome,
        OutlierConfig, Protocol, RequestToken, RetryBudget, RetryBudgetConfig, RetryStats,
        ServiceStats, SplitMix64, Subset,
    },
    config::{LocalityConfig, NodeConfig, ServiceConfig},
    identity::SpiffeId,
    mtls::RemotePeer,
};

/// What the endpoints of a port speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Tcp,
    /// HTTP/1.1 to the endpoints.
    Http1,
    /// HTTP/2 (prior knowledge) to the endpoints: `http2`, `grpc`.
    Http2,
}

impl PortProtocol {
    fn from_config(name: &str) -> Self {
        match name {
            "http" => Self::Http1,
            "http2" | "grpc" => Self::Http2,
            _ => Self::Tcp,
        }
    }
}

/// One port of one service, with its balancer.
pub struct ServicePortEntry {
    /// `namespace/name:port`.
    pub key: String,
    pub protocol: PortProtocol,
    /// The service as configured (timeouts, routes, retries).
    pub config: ServiceConfig,
    /// What the balancer was built from (locality, subsets, protocol,
    /// ejection, retries): a change of it needs a new balancer; a change of
    /// endpoints or timeouts only an update.
    shape: (balance::ServiceConfig, RetryBudgetConfig),
    /// Endpoints that are mesh workloads (a service account is given), by
    /// address: the identity their tunnel peer must prove.
    peers: HashMap<SocketAddr, Arc<RemotePeer>>,
    /// The endpoints of this table's generation (a kept balancer may already
    /// hold a newer set, see [`ServicePortEntry::serves`]).
    endpoint_addrs: std::collections::HashSet<SocketAddr>,
    /// Kept across reloads that keep the shape; in-flight connections and
    /// requests report to it through the entry they started with.
    state: Arc<PortState>,
}

/// The balancing state of a service port.
struct PortState {
    balancer: Mutex<balance::Service>,
    budget: Mutex<RetryBudget>,
    /// Requests answered 504 because their route's timeout passed.
    timeouts: std::sync::atomic::AtomicU64,
    /// Requests in flight now (for a DestinationRule's connection pool).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests answered 503 `UO` because the pool was full.
    overflows: std::sync::atomic::AtomicU64,
    /// Retries in flight now (for a DestinationRule's `maxRetries`).
    retries_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Retries not made because `maxRetries` were in flight.
    retry_overflows: std::sync::atomic::AtomicU64,
}

/// A place taken under a bound (a request in flight to a service port with
/// a bounded connection pool, a retry under `maxRetries`); freed when
/// dropped.
pub struct InFlight(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A place under `max` of `count`, if there is one (always, without a
/// bound).
fn admit(count: &Arc<std::sync::atomic::AtomicUsize>, max: Option<u32>) -> Option<InFlight> {
    use std::sync::atomic::Ordering;
    let Some(max) = max else {
        return Some(InFlight(None));
    };
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max as usize).then_some(n + 1)
        })
        .ok()
        .map(|_| InFlight(Some(count.clone())))
}

/// An endpoint chosen for one connection; report its end with [`ServicePortEntry::done`].
pub struct Chosen {
    pub addr: SocketAddr,
    /// The identity the endpoint must prove, if the file names one.
    pub peer: Option<Arc<RemotePeer>>,
    token: ConnectionToken,
}

/// An endpoint chosen for one request attempt; report its end with
/// [`ServicePortEntry::finish_request`] or [`ServicePortEntry::cancel_request`].
pub struct RequestPick {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    /// The identity the endpoint must prove, if the file names one.
    pub peer: Option<Arc<RemotePeer>>,
    token: RequestToken,
}

impl ServicePortEntry {
    /// Picks an endpoint for a new connection; Err when the service has none.
    pub fn choose(&self) -> Result<Chosen> {
        let mut balancer = self.state.balancer.lock();
        let pick = balancer.pick().map_err(|e| anyhow!("{}: {e}", self.key))?;
        let token = balancer.on_open(&pick.id);
        Ok(Chosen {
            addr: pick.addr,
            peer: self.peers.get(&pick.addr).cloned(),
            token,
        })
    }

    /// Whether `addr` is one of this generation's endpoints. A balancer kept
    /// across a reload learns the new endpoints when the new table is in
    /// force; a connection still routing by the old table may then be
    /// offered one of them, and must route again by the table in force.
    pub fn serves(&self, addr: SocketAddr) -> bool {
        self.endpoint_addrs.contains(&addr)
    }

    /// The connection ended; a failed connect counts towards ejection.
    pub fn done(&self, chosen: Chosen, connect_failed: bool) {
        let outcome = if connect_failed {
            Outcome::ConnectFailed
        } else {
            Outcome::Success
        };
        self.state.balancer.lock().on_close(chosen.token, outcome);
    }

    /// Picks an endpoint for one attempt of a request, avoiding the ones
    /// this request already failed on; Err when the service has none.
    pub fn pick_request(&self, avoid: &[Arc<str>], key: Option<u64>) -> Result<RequestPick> {
        let mut balancer = self.state.balancer.lock();
        let pick = balancer
            .pick_keyed(avoid, key)
            .map_err(|e| anyhow!("{}: {e}", self.key))?;
        let token = balancer.start_request(&pick.id);
        Ok(RequestPick {
            peer: self.peers.get(&pick.addr).cloned(),
            id: pick.id,
            addr: pick.addr,
            token,
        })
    }

    /// The attempt got a response head after `latency`, or failed.
    pub fn finish_request(&self, pick: RequestPick, latency: Duration, outcome: Outcome) {
        self.state
            .balancer
            .lock()
            .finish(pick.token, latency, outcome);
    }

    /// A request's end without a latency sample (see
    /// [`balance::Service::finish_unsampled`]).
    pub fn finish_request_unsampled(&self, pick: RequestPick, outcome: Outcome) {
        self.state
            .balancer
            .lock()
            .finish_unsampled(pick.token, outcome);
    }

    /// The attempt was never sent.
    pub fn cancel_request(&self, pick: RequestPick) {
        self.state.balancer.lock().cancel(pick.token);
    }

    /// Counts an original request for the retry budget.
    pub fn record_request(&self) {
        self.state.budget.lock().record_request();
    }

    /// Whether the budget allows one more retry (counted if so).
    pub fn try_retry(&self) -> bool {
        self.state.budget.lock().try_retry()
    }

    /// A place for one more request in flight, or `None` when the
    /// DestinationRule's connection pool is full (counted).
    pub fn admit_request(&self) -> Option<InFlight> {
        let admitted = admit(&self.state.in_flight, self.config.max_requests_in_flight);
        if admitted.is_none() {
            self.state
                .overflows
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }

    /// A place for one more retry in flight, or `None` when the
    /// DestinationRule's `maxRetries` are (counted).
    pub fn admit_retry(&self) -> Option<InFlight> {
        let admitted = admit(
            &self.state.retries_in_flight,
            self.config.max_retries_in_flight,
        );
        if admitted.is_none() {
            self.state
                .retry_overflows
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }

    pub fn count_timeout(&self) {
        self.state
            .timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where the endpoints are.
    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.state.balancer.lock().addresses()
    }

    /// Balancer, retry and failure counters, for metrics and status.
    pub fn stats(&self) -> ServicePortStats {
        ServicePortStats {
            balancer: self.state.balancer.lock().stats(),
            retries: self.state.budget.lock().stats(),
            timeouts: self
                .state
                .timeouts
                .load(std::sync::atomic::Ordering::Relaxed),
            overflows: self
                .state
                .overflows
                .load(std::sync::atomic::Ordering::Relaxed),
            retry_overflows: self
                .state
                .retry_overflows
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A snapshot of one service port's counters.
#[derive(Debug, Clone)]
pub struct ServicePortStats {
    pub balancer: ServiceStats,
    pub retries: RetryStats,
    pub timeouts: u64,
    /// Requests answered 503 `UO`: the connection pool was full.
    pub overflows: u64,
    /// Retries not made: `maxRetries` were in flight.
    pub retry_overflows: u64,
}

/// Every service port by (VIP, port).
#[derive(Default)]
pub struct ServiceTable {
    by_address: HashMap<SocketAddr, Arc<ServicePortEntry>>,
    /// Every service port by key (`namespace/name:port`), with or without
    /// an address: the backends routes name.
    by_key: HashMap<String, Arc<ServicePortEntry>>,
    /// Endpoint updates of balancers kept from the previous table, applied
    /// by [`ServiceTable::commit`] once this table is in force: the table
    /// in force until then keeps choosing among its own endpoints.
    pending: parking_lot::Mutex<Vec<(Arc<PortState>, Vec<Endpoint>)>>,
}

impl ServiceTable {
    /// Builds balancers for `services` as seen from `node` (its name and
    /// zone, for locality), keeping the state (load, latency estimates,
    /// ejections, retry budget, counters) of service ports that are in
    /// `previous` with the same shape: a reload changes endpoints in place.
    /// `previous` is left untouched: its kept balancers learn their new
    /// endpoints at [`ServiceTable::commit`], once this table is in force.
    pub fn build(
        services: &[ServiceConfig],
        node: &NodeConfig,
        previous: Option<&ServiceTable>,
    ) -> Result<Self> {
        let trust_domain = node.trust_domain.as_str();
        // Endpoint updates of kept balancers, applied once nothing can fail.
        let mut updates: Vec<(Arc<PortState>, Vec<Endpoint>)> = Vec::new();
        let kept: HashMap<String, Arc<ServicePortEntry>> =
            previous.map(|t| t.by_key.clone()).unwrap_or_default();
        let mut by_address = HashMap::new();
        let mut by_key = HashMap::new();
        for svc in services {
            for port in &svc.ports {
                let target = port.target_port.unwrap_or(port.port);
                let protocol = PortProtocol::from_config(&port.protocol);
                let outlier = &svc.outlier_detection;
                let config = balance::ServiceConfig {
                    choice: svc.choice,
                    protocol: if protocol == PortProtocol::Tcp {
                        Protocol::Tcp
                    } else {
                        Protocol::Http
                    },
                    locality: match svc.locality {
                        LocalityConfig::PreferNode => Locality::PreferNode,
                        LocalityConfig::PreferZone => Locality::PreferZone,
                        LocalityConfig::None => Locality::None,
                    },
                    subsets: svc
                        .subsets
                        .iter()
                        .map(|s| Subset::new(&s.name, s.weight, s.labels.clone()))
                        .collect(),
                    outlier: OutlierConfig {
                        consecutive_failures: outlier.consecutive_failures,
                        base_ejection_time: outlier.base_ejection_time,
                        max_ejection_percent: outlier.max_ejection_percent,
                        ..OutlierConfig::default()
                    },
                    ..Default::default()
                };
                let budget = RetryBudgetConfig {
                    ratio: f64::from(svc.retries.budget_percent) / 100.0,
                    min_retries_per_second: svc.retries.min_per_second,
                    ..RetryBudgetConfig::default()
                };
                let shape = (config, budget);
                let mut peers = HashMap::new();
                for e in &svc.endpoints {
                    let Some(sa) = &e.service_account else {
                        continue;
                    };
                    let namespace = e.namespace.as_deref().unwrap_or(&svc.namespace);
                    let identity = SpiffeId::new(trust_domain, namespace, sa).map_err(|err| {
                        anyhow!("service {} endpoint {}: {err}", svc.key(), e.name)
                    })?;
                    peers.insert(
                        SocketAddr::new(e.address, target),
                        Arc::new(RemotePeer {
                            key: format!("{namespace}/{}", e.name),
                            node: e.node.clone(),
                            identity,
                        }),
                    );
                }
                let key = svc.port_key(port.port);
                let endpoints: Vec<Endpoint> = svc
                    .endpoints
                    .iter()
                    .map(|e| {
                        let mut endpoint =
                            Endpoint::new(&e.name, SocketAddr::new(e.address, target), &e.node)
                                .with_weight(e.weight);
                        if let Some(zone) = &e.zone {
                            endpoint = endpoint.with_zone(zone);
                        }
                        for (k, v) in &e.labels {
                            endpoint = endpoint.with_label(k, v);
                        }
                        endpoint
                    })
                    .collect();
                let endpoint_addrs = endpoints.iter().map(|e| e.addr).collect();
                let entry = match kept
                    .get(&key)
                    .filter(|e| e.shape == shape && e.protocol == protocol)
                {
                    Some(old) => {
                        updates.push((old.state.clone(), endpoints));
                        // Same balancer and budget; the settings that are read
                        // per request (timeouts, routes) take the new values.
                        Arc::new(ServicePortEntry {
                            key: key.clone(),
                            protocol,
                            config: svc.clone(),
                            shape: shape.clone(),
                            peers,
                            endpoint_addrs,
                            state: old.state.clone(),
                        })
                    }
                    None => {
                        let clock = Arc::new(MonotonicClock::new());
                        let mut balancer = balance::Service::new(
                            shape.0.clone(),
                            ClientLocality::new(&node.name, node.zone.as_deref()),
                            clock.clone(),
                            Box::new(SplitMix64::from_entropy()),
                        )
                        .map_err(|e| anyhow!("service {}: {e}", svc.key()))?;
                        balancer.update_endpoints(endpoints);
                        let budget = RetryBudget::new(shape.1, clock)
                            .map_err(|e| anyhow!("service {}: {e}", svc.key()))?;
                        Arc::new(ServicePortEntry {
                            key,
                            protocol,
                            config: svc.clone(),
                            shape,
                            peers,
                            endpoint_addrs,
                            state: Arc::new(PortState {
                                balancer: Mutex::new(balancer),
                                budget: Mutex::new(budget),
                                timeouts: Default::default(),
                                in_flight: Default::default(),
                                overflows: Default::default(),
                                retries_in_flight: Default::default(),
                                retry_overflows: Default::default(),
                            }),
                        })
                    }
                };
                for vip in &svc.vips {
                    by_address.insert(SocketAddr::new(*vip, port.port), entry.clone());
                }
                by_key.insert(entry.key.clone(), entry);
            }
        }
        Ok(Self {
            by_address,
            by_key,
            pending: parking_lot::Mutex::new(updates),
        })
    }

    /// Gives the kept balancers this table's endpoints (once; later calls do
    /// nothing). Called when the table is in force, never before: until
    /// then the previous table's connections choose among its endpoints.
    pub fn commit(&self) {
        for (state, endpoints) in std::mem::take(&mut *self.pending.lock()) {
            state.balancer.lock().update_endpoints(endpoints);
        }
    }

    pub fn lookup(&self, dst: SocketAddr) -> Option<Arc<ServicePortEntry>> {
        self.by_address.get(&dst).cloned()
    }

    /// The service port `namespace/name:port`.
    pub fn by_key(&self, key: &str) -> Option<&Arc<ServicePortEntry>> {
        self.by_key.get(key)
    }

    /// Every service port once, by key.
    pub fn entries(&self) -> Vec<Arc<ServicePortEntry>> {
        let mut entries: Vec<_> = self.by_key.values().cloned().collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointConfig, ServicePort, SubsetConfig};
    use std::time::Duration;

    fn service(
        locality: LocalityConfig,
        endpoints: &[(&str, &str, &str)],
        subsets: Vec<SubsetConfig>,
    ) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: Some(8080),
                protocol: "tcp".into(),
            }],
            selector: Default::default(),
            max_requests_in_flight: None,
            hash_by: None,
            max_requests_per_connection: None,
            max_retries_in_flight: None,
            choice: Default::default(),
            subset: None,
            locality,
            endpoints: endpoints
                .iter()
                .map(|(name, ip, version)| EndpointConfig {
                    name: name.to_string(),
                    address: ip.parse().unwrap(),
                    node: "n2".into(),
                    zone: None,
                    weight: 1,
                    labels: [("version".to_string(), version.to_string())].into(),
                    service_account: None,
                    namespace: None,
                })
                .collect(),
            subsets,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            routes: vec![],
            retries: Default::default(),
            outlier_detection: Default::default(),
        }
    }

    fn node(yaml_name: &str) -> NodeConfig {
        serde_yaml::from_str(&format!("name: {yaml_name}")).unwrap()
    }

    fn vip() -> SocketAddr {
        "10.96.0.1:80".parse().unwrap()
    }

    #[test]
    fn a_reload_keeps_the_balancer_of_an_unchanged_service_port() {
        let one = [("e1", "10.2.0.2", "v1")];
        let two = [("e1", "10.2.0.2", "v1"), ("e2", "10.2.0.3", "v1")];
        let first = ServiceTable::build(
            &[service(LocalityConfig::None, &one, vec![])],
            &node("n1"),
            None,
        )
        .unwrap();
        let endpoint = first.lookup(vip()).unwrap().choose().unwrap();
        assert_eq!(
            endpoint.addr,
            "10.2.0.2:8080".parse().unwrap(),
            "target port applied"
        );
        // Endpoints changed: same balancer, updated in place (its open
        // connection is still accounted for).
        let second = ServiceTable::build(
            &[service(LocalityConfig::None, &two, vec![])],
            &node("n1"),
            Some(&first),
        )
        .unwrap();
        assert!(Arc::ptr_eq(
            &first.lookup(vip()).unwrap().state,
            &second.lookup(vip()).unwrap().state
        ));
        second.lookup(vip()).unwrap().done(endpoint, false);
        // Locality changed: a new balancer.
        let third = ServiceTable::build(
            &[service(LocalityConfig::PreferNode, &two, vec![])],
            &node("n1"),
            Some(&second),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(
            &second.lookup(vip()).unwrap().state,
            &third.lookup(vip()).unwrap().state
        ));
        // Unknown addresses are not services.
        assert!(third.lookup("10.96.0.1:81".parse().unwrap()).is_none());
    }

    #[test]
    fn a_kept_balancer_learns_new_endpoints_only_when_the_new_table_is_committed() {
        let old = [("e1", "10.2.0.2", "v1")];
        let new = [("e2", "10.2.0.3", "v1")];
        let first = ServiceTable::build(
            &[service(LocalityConfig::None, &old, vec![])],
            &node("n1"),
            None,
        )
        .unwrap();
        let second = ServiceTable::build(
            &[service(LocalityConfig::None, &new, vec![])],
            &node("n1"),
            Some(&first),
        )
        .unwrap();
        let (e1, e2) = (
            "10.2.0.2:8080".parse().unwrap(),
            "10.2.0.3:8080".parse().unwrap(),
        );
        // Built, not in force: the table in force still picks its own.
        let picked = first.lookup(vip()).unwrap().choose().unwrap();
        assert_eq!(picked.addr, e1);
        first.lookup(vip()).unwrap().done(picked, false);
        // In force: the kept balancer has the new endpoints, which the old
        // table's entry does not serve (its connections route again).
        second.commit();
        let picked = first.lookup(vip()).unwrap().choose().unwrap();
        assert_eq!(picked.addr, e2);
        assert!(!first.lookup(vip()).unwrap().serves(e2));
        assert!(second.lookup(vip()).unwrap().serves(e2));
        first.lookup(vip()).unwrap().done(picked, false);
        // Committing again changes nothing.
        second.commit();
        assert_eq!(second.lookup(vip()).unwrap().choose().unwrap().addr, e2);
    }

    #[test]
    fn subsets_from_the_file_split_traffic_by_weight() {
        let endpoints = [
            ("v1-a", "10.2.0.2", "v1"),
            ("v1-b", "10.2.0.3", "v1"),
            ("v2-a", "10.2.0.4", "v2"),
        ];
        let subsets = vec![
            SubsetConfig {
                name: "stable".into(),
                weight: 95,
                labels: [("version".into(), "v1".into())].into(),
            },
            SubsetConfig {
                name: "canary".into(),
                weight: 5,
                labels: [("version".into(), "v2".into())].into(),
            },
        ];
        let table = ServiceTable::build(
            &[service(LocalityConfig::None, &endpoints, subsets)],
            &node("n1"),
            None,
        )
        .unwrap();
        let entry = table.lookup(vip()).unwrap();
        let canary: SocketAddr = "10.2.0.4:8080".parse().unwrap();
        let mut to_canary = 0;
        for _ in 0..10_000 {
            let chosen = entry.choose().unwrap();
            if chosen.addr == canary {
                to_canary += 1;
            }
            entry.done(chosen, false);
        }
        // 5% of 10,000 = 500; four standard deviations (~22 each) either way.
        assert!(
            (412..=588).contains(&to_canary),
            "canary got {to_canary} of 10000"
        );
    }

    #[test]
    fn bounded_places_are_refused_past_their_bound_counted_and_freed_when_dropped() {
        let mut svc = service(LocalityConfig::None, &[], vec![]);
        svc.max_requests_in_flight = Some(2);
        svc.max_retries_in_flight = Some(1);
        let table = ServiceTable::build(&[svc], &node("n1"), None).unwrap();
        let entry = table.lookup(vip()).unwrap();
        let (a, b) = (entry.admit_request(), entry.admit_request());
        assert!(a.is_some() && b.is_some());
        assert!(entry.admit_request().is_none());
        let retry = entry.admit_retry();
        assert!(retry.is_some());
        assert!(entry.admit_retry().is_none());
        drop((a, retry));
        assert!(entry.admit_request().is_some());
        assert!(entry.admit_retry().is_some());
        let stats = entry.stats();
        assert_eq!((stats.overflows, stats.retry_overflows), (1, 1));
    }

    #[test]
    fn a_service_without_endpoints_gives_none() {
        let table = ServiceTable::build(
            &[service(LocalityConfig::None, &[], vec![])],
            &node("n1"),
            None,
        )
        .unwrap();
        assert!(table.lookup(vip()).unwrap().choose().is_err());
    }

    #[test]
    fn prefer_zone_prefers_the_zone_node_yaml_gives() {
        // Two endpoints on other nodes: one in this node's zone, one not.
        let mut svc = service(
            LocalityConfig::PreferZone,
            &[("near", "10.2.0.2", "v1"), ("far", "10.3.0.2", "v1")],
            vec![],
        );
        svc.endpoints[0].zone = Some("z1".into());
        svc.endpoints[1].zone = Some("z2".into());
        let node: NodeConfig = serde_yaml::from_str("name: n1\nzone: z1").unwrap();
        let table = ServiceTable::build(&[svc], &node, None).unwrap();
        let entry = table.lookup(vip()).unwrap();
        let near: SocketAddr = "10.2.0.2:8080".parse().unwrap();
        for _ in 0..200 {
            let chosen = entry.choose().unwrap();
            assert_eq!(
                chosen.addr, near,
                "an endpoint outside the node's zone was chosen"
            );
            entry.done(chosen, false);
        }
    }

    #[test]
    fn a_failed_build_leaves_the_previous_balancers_untouched() {
        let one = [("e1", "10.2.0.2", "v1")];
        let first = ServiceTable::build(
            &[service(LocalityConfig::None, &one, vec![])],
            &node("n1"),
            None,
        )
        .unwrap();
        // The same service with a new endpoint, beside a service whose
        // endpoint names an impossible identity: the build fails whole.
        let changed = service(
            LocalityConfig::None,
            &[("e1", "10.2.0.2", "v1"), ("e2", "10.2.0.3", "v1")],
            vec![],
        );
        let mut bad = service(LocalityConfig::None, &one, vec![]);
        bad.name = "broken".into();
        bad.vips = vec!["10.96.0.2".parse().unwrap()];
        bad.endpoints[0].service_account = Some("Not A Valid/Name".into());
        assert!(ServiceTable::build(&[changed, bad], &node("n1"), Some(&first)).is_err());
        assert_eq!(
            first.lookup(vip()).unwrap().endpoint_addrs(),
            vec!["10.2.0.2:8080".parse::<SocketAddr>().unwrap()],
            "the failed build changed the running balancer's endpoints"
        );
    }
}
