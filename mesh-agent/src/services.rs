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
        SplitMix64,
    },
    config::{LocalityConfig, ServiceConfig},
};

/// One port of one service, with its balancer.
pub struct ServicePortEntry {
    /// `namespace/name:port`.
    pub key: String,
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
    /// Builds balancers for `services` as seen from node `node`.
    pub fn build(services: &[ServiceConfig], node: &str) -> Result<Self> {
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
                    ..Default::default()
                };
                let mut balancer = balance::Service::new(
                    config,
                    ClientLocality::new(node, None),
                    Arc::new(MonotonicClock::new()),
                    Box::new(SplitMix64::from_entropy()),
                )
                .map_err(|e| anyhow!("service {}: {e}", svc.key()))?;
                balancer.update_endpoints(
                    svc.endpoints
                        .iter()
                        .map(|e| {
                            let mut endpoint =
                                Endpoint::new(&e.name, SocketAddr::new(e.address, target), &e.node)
                                    .with_weight(e.weight);
                            if let Some(zone) = &e.zone {
                                endpoint = endpoint.with_zone(zone);
                            }
                            endpoint
                        })
                        .collect(),
                );
                let entry = Arc::new(ServicePortEntry {
                    key: format!("{}:{}", svc.key(), port.port),
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
