//! Services: a captured connection to a service's virtual IP and port is served
//! by one of its endpoints, chosen per connection by the balancer (power of two
//! choices over open connections, locality first). Per-request balancing of
//! HTTP ports comes with the HTTP connection pools.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Result, anyhow};

use crate::{
    balance::{
        self, ClientLocality, ConnectionToken, Endpoint, Locality, MonotonicClock, Outcome,
        SplitMix64, Subset,
    },
    config::{LocalityConfig, ServiceConfig},
};

/// One port of one service, with its balancer.
pub struct ServicePortEntry {
    /// `namespace/name:port`.
    pub key: String,
    /// What the balancer was built from (locality, subsets): a change of it
    /// needs a new balancer; a change of endpoints only an update.
    shape: balance::ServiceConfig,
    balancer: Mutex<balance::Service>,
}

/// An endpoint chosen for one connection; report its end with [`ServicePortEntry::done`].
pub struct Chosen {
    pub addr: SocketAddr,
    token: ConnectionToken,
}

impl ServicePortEntry {
    /// Picks an endpoint for a new connection; Err when the service has none.
    pub fn choose(&self) -> Result<Chosen> {
        let mut balancer = self.balancer.lock().expect("balancer lock");
        let pick = balancer.pick().map_err(|e| anyhow!("{}: {e}", self.key))?;
        let token = balancer.on_open(&pick.id);
        Ok(Chosen {
            addr: pick.addr,
            token,
        })
    }

    /// The connection ended; a failed connect counts towards ejection.
    pub fn done(&self, chosen: Chosen, connect_failed: bool) {
        let outcome = if connect_failed {
            Outcome::ConnectFailed
        } else {
            Outcome::Success
        };
        self.balancer
            .lock()
            .expect("balancer lock")
            .on_close(chosen.token, outcome);
    }
}

/// Every service port by (VIP, port).
#[derive(Default)]
pub struct ServiceTable {
    by_address: HashMap<SocketAddr, Arc<ServicePortEntry>>,
}

impl ServiceTable {
    /// Builds balancers for `services` as seen from node `node`, keeping the
    /// state (load, latency estimates, ejections) of service ports that are in
    /// `previous` with the same shape: a reload changes endpoints in place.
    pub fn build(
        services: &[ServiceConfig],
        node: &str,
        previous: Option<&ServiceTable>,
    ) -> Result<Self> {
        let kept: HashMap<String, Arc<ServicePortEntry>> = previous
            .map(|t| {
                t.by_address
                    .values()
                    .map(|e| (e.key.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut by_address = HashMap::new();
        for svc in services {
            for port in &svc.ports {
                let target = port.target_port.unwrap_or(port.port);
                let config = balance::ServiceConfig {
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
                    ..Default::default()
                };
                let key = format!("{}:{}", svc.key(), port.port);
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
                if let Some(entry) = kept.get(&key).filter(|e| e.shape == config) {
                    entry
                        .balancer
                        .lock()
                        .expect("balancer lock")
                        .update_endpoints(endpoints);
                    for vip in &svc.vips {
                        by_address.insert(SocketAddr::new(*vip, port.port), entry.clone());
                    }
                    continue;
                }
                let mut balancer = balance::Service::new(
                    config.clone(),
                    ClientLocality::new(node, None),
                    Arc::new(MonotonicClock::new()),
                    Box::new(SplitMix64::from_entropy()),
                )
                .map_err(|e| anyhow!("service {}: {e}", svc.key()))?;
                balancer.update_endpoints(endpoints);
                let entry = Arc::new(ServicePortEntry {
                    key,
                    shape: config,
                    balancer: Mutex::new(balancer),
                });
                for vip in &svc.vips {
                    by_address.insert(SocketAddr::new(*vip, port.port), entry.clone());
                }
            }
        }
        Ok(Self { by_address })
    }

    pub fn lookup(&self, dst: SocketAddr) -> Option<Arc<ServicePortEntry>> {
        self.by_address.get(&dst).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointConfig, ServicePort, SubsetConfig};

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
                })
                .collect(),
            subsets,
        }
    }

    fn vip() -> SocketAddr {
        "10.96.0.1:80".parse().unwrap()
    }

    #[test]
    fn a_reload_keeps_the_balancer_of_an_unchanged_service_port() {
        let one = [("e1", "10.2.0.2", "v1")];
        let two = [("e1", "10.2.0.2", "v1"), ("e2", "10.2.0.3", "v1")];
        let first = ServiceTable::build(&[service(LocalityConfig::None, &one, vec![])], "n1", None)
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
            "n1",
            Some(&first),
        )
        .unwrap();
        assert!(Arc::ptr_eq(
            &first.lookup(vip()).unwrap(),
            &second.lookup(vip()).unwrap()
        ));
        second.lookup(vip()).unwrap().done(endpoint, false);
        // Locality changed: a new balancer.
        let third = ServiceTable::build(
            &[service(LocalityConfig::PreferNode, &two, vec![])],
            "n1",
            Some(&second),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(
            &second.lookup(vip()).unwrap(),
            &third.lookup(vip()).unwrap()
        ));
        // Unknown addresses are not services.
        assert!(third.lookup("10.96.0.1:81".parse().unwrap()).is_none());
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
            "n1",
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
    fn a_service_without_endpoints_gives_none() {
        let table =
            ServiceTable::build(&[service(LocalityConfig::None, &[], vec![])], "n1", None).unwrap();
        assert!(table.lookup(vip()).unwrap().choose().is_err());
    }
}
