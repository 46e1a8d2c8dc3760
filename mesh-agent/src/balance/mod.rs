//! Endpoint selection and resilience for a service: locality, weighted
//! subsets, power-of-two-choices over connections (TCP) or peak-EWMA latency
//! (HTTP), outlier ejection, retry budgets. Pure logic, no I/O: time comes
//! from an injected [`Clock`], randomness from an injected [`Rng`]; the proxy
//! wraps a [`Service`] in a mutex and reports what happened to each pick.
//!
//! # How [`Service::pick`] chooses
//!
//! 1. **No endpoints at all** → `Err(PickError::NoHealthyEndpoint)` (the proxy
//!    answers 503 / resets). This is the only error.
//! 2. **Subsets** (if configured): a subset is drawn by weight among the
//!    subsets that have at least one healthy (non-ejected) endpoint; if none
//!    has, among the subsets that have any endpoint; if no subset matches any
//!    endpoint, the whole service is used. So a canary subset whose endpoints
//!    are all ejected (or gone) sends its share to the other subsets.
//! 3. **Health**: the ejected endpoints are removed. If that leaves nothing
//!    (possible when ejections were decided before endpoints were removed, or
//!    inside one subset), ejection is ignored for this pick ("panic mode",
//!    counted in `fallback_picks`): a possibly-failing endpoint beats a
//!    certain 503. Ejection itself never takes more than
//!    `max_ejection_percent` (rounded down) of the service's endpoints out of
//!    rotation at once: a failing endpoint that would exceed it stays in.
//! 4. **Weight 0** endpoints are removed unless every candidate has weight 0
//!    (then all count as 1).
//! 5. **Locality**: the nearest non-empty tier (same node, same zone, any) as
//!    configured by [`Locality`]; only that tier is used.
//! 6. **Power of two choices**: two distinct candidates are drawn with
//!    probability proportional to weight; the one with the lower
//!    `load / weight` wins, an exact tie is broken randomly in proportion to
//!    the weights (so idle endpoints get traffic in proportion to weight).
//!    Load is the number of open connections ([`Protocol::Tcp`]) or the
//!    peak-EWMA latency × (pending requests + 1) ([`Protocol::Http`]).
//!    Or, as configured by [`Choice`] (an Istio DestinationRule's
//!    `loadBalancer.simple`): a weighted **round robin** (smooth, as
//!    nginx's: each candidate in turn, in proportion to weight, spread
//!    out) or a weighted **random** draw, neither looking at load. A
//!    request's consistent-hash key, when there is one, decides instead.
//!
//! Failures reported through [`Service::on_close`] / [`Service::finish`]
//! drive outlier ejection (see [`OutlierConfig`]); a re-admitted endpoint is
//! on probation: one success ends it, one failure ejects it again for
//! `base_ejection_time × times ejected` (capped).

mod choose;
mod clock;
mod endpoint;
mod ewma;
mod outlier;
mod retry;
pub(crate) mod rng;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use endpoint::{ClientLocality, Endpoint, Locality, Outcome, Subset};
pub use ewma::EwmaConfig;
pub use outlier::OutlierConfig;
pub use retry::{RetryBudget, RetryBudgetConfig, RetryStats, retryable};
pub use rng::{Rng, SplitMix64};

use ewma::PeakEwma;
use outlier::OutlierState;

/// Why [`Service::pick`] could not choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The service has no endpoints.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
}

/// An invalid balancer configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Subsets are configured but their weights sum to 0.
    #[error("subset weights sum to zero")]
    SubsetWeights,
    /// `max_ejection_percent` above 100.
    #[error("max_ejection_percent {0} is above 100")]
    EjectionPercent(u8),
    /// `consecutive_failures` of 0.
    #[error("consecutive_failures must be at least 1")]
    ConsecutiveFailures,
    /// An EWMA decay of 0.
    #[error("EWMA decay must be positive")]
    EwmaDecay,
    /// A negative or non-finite retry ratio.
    #[error("retry ratio {0} must be finite and non-negative")]
    RetryRatio(f64),
    /// A retry window of 0 buckets or shorter than one nanosecond per bucket.
    #[error("retry window must be positive and split into at least one bucket")]
    RetryWindow,
}

/// Which load estimate power-of-two-choices compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Open connections ([`Service::on_open`] / [`Service::on_close`]).
    #[default]
    Tcp,
    /// Peak-EWMA latency × (pending requests + 1)
    /// ([`Service::start_request`] / [`Service::finish`]).
    Http,
}

/// How an endpoint is chosen among the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// Power of two choices by load (what Envoy's LEAST_REQUEST does).
    #[default]
    LeastLoaded,
    /// Weighted round robin.
    RoundRobin,
    /// A weighted random draw.
    Random,
}

/// Per-service configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceConfig {
    /// Load estimate used by power-of-two-choices.
    pub protocol: Protocol,
    /// How the endpoint is chosen among the candidates.
    pub choice: Choice,
    /// Locality preference.
    pub locality: Locality,
    /// Weighted subsets; empty = none (endpoint weights apply directly).
    pub subsets: Vec<Subset>,
    /// Latency estimate parameters (HTTP).
    pub ewma: EwmaConfig,
    /// Outlier ejection parameters.
    pub outlier: OutlierConfig,
}

impl ServiceConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.subsets.is_empty() && self.subsets.iter().all(|s| s.weight == 0) {
            return Err(ConfigError::SubsetWeights);
        }
        if self.outlier.max_ejection_percent > 100 {
            return Err(ConfigError::EjectionPercent(
                self.outlier.max_ejection_percent,
            ));
        }
        if self.outlier.consecutive_failures == 0 {
            return Err(ConfigError::ConsecutiveFailures);
        }
        if self.ewma.decay.is_zero() {
            return Err(ConfigError::EwmaDecay);
        }
        Ok(())
    }
}

/// The endpoint chosen by [`Service::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The endpoint's id, to pass to [`Service::on_open`] /
    /// [`Service::start_request`].
    pub id: Arc<str>,
    /// Where to connect.
    pub addr: SocketAddr,
}

/// An in-flight HTTP request, from [`Service::start_request`] to
/// [`Service::finish`]. Tied to one incarnation of the endpoint: if the
/// endpoint is removed (even if later re-added under the same id), finishing
/// the token is a no-op.
#[derive(Debug)]
#[must_use = "pass the token to Service::finish"]
pub struct RequestToken {
    id: Arc<str>,
    incarnation: u64,
}

/// An open TCP connection, from [`Service::on_open`] to [`Service::on_close`];
/// same removal rules as [`RequestToken`].
#[derive(Debug)]
#[must_use = "pass the token to Service::on_close"]
pub struct ConnectionToken {
    id: Arc<str>,
    incarnation: u64,
}

/// Metrics of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    /// The endpoint's id.
    pub id: String,
    /// Times it was picked.
    pub picks: u64,
    /// Open connections.
    pub open_connections: u64,
    /// Pending requests.
    pub pending_requests: u64,
    /// Current peak-EWMA latency estimate.
    pub ewma: Duration,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// Its ejection multiplier.
    pub times_ejected: u32,
    /// Its current run of failures.
    pub consecutive_failures: u32,
}

/// Metrics of a service (counters are monotonic over its lifetime, except
/// per-endpoint ones, which go away with their endpoint).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceStats {
    /// One entry per current endpoint, in update order.
    pub endpoints: Vec<EndpointStats>,
    /// Successful picks.
    pub picks: u64,
    /// Picks that failed with [`PickError::NoHealthyEndpoint`].
    pub no_healthy_endpoint: u64,
    /// Picks that had to ignore ejection (every candidate was ejected).
    pub fallback_picks: u64,
    /// Ejections.
    pub ejections: u64,
    /// Ejections refused by `max_ejection_percent`.
    pub ejections_suppressed: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    picks: u64,
    no_healthy_endpoint: u64,
    fallback_picks: u64,
    ejections: u64,
    ejections_suppressed: u64,
}

#[derive(Debug)]
struct EndpointState {
    endpoint: Endpoint,
    id: Arc<str>,
    incarnation: u64,
    open: u64,
    pending: u64,
    ewma: PeakEwma,
    outlier: OutlierState,
    picks: u64,
    /// Smooth weighted round robin's running weight.
    turn: i64,
}

impl EndpointState {
    fn weight(&self) -> u64 {
        u64::from(self.endpoint.weight.max(1))
    }
}

/// The balancer of one service (one per service port, as seen from this
/// node). Not internally synchronised: wrap it in a mutex.
pub struct Service {
    config: ServiceConfig,
    client: ClientLocality,
    clock: Arc<dyn Clock>,
    rng: Box<dyn Rng>,
    endpoints: Vec<EndpointState>,
    index: HashMap<Arc<str>, usize>,
    /// Per configured subset, the indexes of its endpoints.
    subset_members: Vec<Vec<usize>>,
    next_incarnation: u64,
    counters: Counters,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config)
            .field("client", &self.client)
            .field("endpoints", &self.endpoints)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service with no endpoints yet, balancing for a client at `client`.
    pub fn new(
        config: ServiceConfig,
        client: ClientLocality,
        clock: Arc<dyn Clock>,
        rng: Box<dyn Rng>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let subset_members = vec![Vec::new(); config.subsets.len()];
        Ok(Self {
            config,
            client,
            clock,
            rng,
            endpoints: Vec::new(),
            index: HashMap::new(),
            subset_members,
            next_incarnation: 1,
            counters: Counters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Replaces the endpoint set. Endpoints whose id remains keep their state
    /// (latency estimate, load, ejection, pick count) and take the new
    /// address, weight, labels and locality; removed ones are dropped (their
    /// outstanding tokens become no-ops); new ones start fresh (default RTT,
    /// not ejected). Duplicate ids: the first occurrence wins.
    pub fn update_endpoints(&mut self, endpoints: Vec<Endpoint>) {
        let now = self.clock.now();
        let mut old: HashMap<Arc<str>, EndpointState> = self
            .endpoints
            .drain(..)
            .map(|state| (state.id.clone(), state))
            .collect();
        self.index.clear();
        for endpoint in endpoints {
            if self.index.contains_key(endpoint.id.as_str()) {
                tracing::warn!(id = %endpoint.id, "duplicate endpoint id ignored");
                continue;
            }
            let state = match old.remove(endpoint.id.as_str()) {
                Some(mut state) => {
                    state.endpoint = endpoint;
                    state
                }
                None => {
                    let incarnation = self.next_incarnation;
                    self.next_incarnation += 1;
                    EndpointState {
                        id: Arc::from(endpoint.id.as_str()),
                        endpoint,
                        incarnation,
                        open: 0,
                        pending: 0,
                        ewma: PeakEwma::new(&self.config.ewma, now),
                        outlier: OutlierState::default(),
                        picks: 0,
                        turn: 0,
                    }
                }
            };
            self.index.insert(state.id.clone(), self.endpoints.len());
            self.endpoints.push(state);
        }
        if !old.is_empty() {
            tracing::debug!(removed = old.len(), "endpoints removed");
        }
        self.subset_members = self
            .config
            .subsets
            .iter()
            .map(|subset| {
                (0..self.endpoints.len())
                    .filter(|&i| subset.matches(&self.endpoints[i].endpoint))
                    .collect()
            })
            .collect();
    }

    /// Chooses an endpoint (see the module documentation for the rules).
    pub fn pick(&mut self) -> Result<Pick, PickError> {
        self.pick_avoiding(&[])
    }

    /// Chooses an endpoint other than those in `avoid` (the ones a request
    /// already failed on, for its retry) when the pool has any other; else
    /// as [`pick`](Self::pick).
    pub fn pick_avoiding(&mut self, avoid: &[Arc<str>]) -> Result<Pick, PickError> {
        self.pick_keyed(avoid, None)
    }

    /// As [`pick_avoiding`](Self::pick_avoiding); with a `key` (a hash of
    /// the request's header or client address), the endpoint is the one
    /// rendezvous hashing gives that key among the candidates: the same
    /// while the endpoints are, and when one leaves only its keys move.
    pub fn pick_keyed(&mut self, avoid: &[Arc<str>], key: Option<u64>) -> Result<Pick, PickError> {
        let now = self.clock.now();
        self.readmit_due(now);
        if self.endpoints.is_empty() {
            self.counters.no_healthy_endpoint += 1;
            return Err(PickError::NoHealthyEndpoint);
        }
        let mut pool = self.pool();
        if !avoid.is_empty() {
            let others: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|&i| !avoid.contains(&self.endpoints[i].id))
                .collect();
            if !others.is_empty() {
                pool = others;
            }
        }
        let healthy: Vec<usize> = pool
            .iter()
            .copied()
            .filter(|&i| !self.endpoints[i].outlier.is_ejected())
            .collect();
        let candidates = if healthy.is_empty() {
            self.counters.fallback_picks += 1;
            pool
        } else {
            healthy
        };
        let weighted: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| self.endpoints[i].endpoint.weight > 0)
            .collect();
        let candidates = if weighted.is_empty() {
            candidates
        } else {
            weighted
        };
        let candidates = self.nearest_tier(candidates);
        let chosen = match key {
            Some(key) => candidates
                .iter()
                .copied()
                .max_by_key(|&i| rendezvous(key, &self.endpoints[i].id))
                .expect("a candidate"),
            None => match self.config.choice {
                Choice::LeastLoaded => self.power_of_two(&candidates, now),
                Choice::RoundRobin => self.round_robin(&candidates),
                Choice::Random => {
                    let total = candidates.iter().map(|&i| self.endpoints[i].weight()).sum();
                    self.draw(&candidates, total, None)
                }
            },
        };
        let state = &mut self.endpoints[chosen];
        state.picks += 1;
        self.counters.picks += 1;
        Ok(Pick {
            id: state.id.clone(),
            addr: state.endpoint.addr,
        })
    }

    /// Records that a connection to endpoint `id` is being opened (call it
    /// before connecting, so the attempt counts as load). Unknown ids give a
    /// token that does nothing.
    pub fn on_open(&mut self, id: &str) -> ConnectionToken {
        match self.lookup(id) {
            Some(i) => {
                let state = &mut self.endpoints[i];
                state.open += 1;
                ConnectionToken {
                    id: state.id.clone(),
                    incarnation: state.incarnation,
                }
            }
            None => ConnectionToken {
                id: Arc::from(id),
                incarnation: 0,
            },
        }
    }

    /// Records that a connection ended (or failed to connect:
    /// [`Outcome::ConnectFailed`]); failures count toward ejection.
    pub fn on_close(&mut self, token: ConnectionToken, outcome: Outcome) {
        let Some(i) = self.lookup_incarnation(&token.id, token.incarnation) else {
            return;
        };
        let state = &mut self.endpoints[i];
        state.open = state.open.saturating_sub(1);
        self.record_outcome(i, outcome);
    }

    /// Records that a request to endpoint `id` was sent. Unknown ids give a
    /// token that does nothing.
    pub fn start_request(&mut self, id: &str) -> RequestToken {
        match self.lookup(id) {
            Some(i) => {
                let state = &mut self.endpoints[i];
                state.pending += 1;
                RequestToken {
                    id: state.id.clone(),
                    incarnation: state.incarnation,
                }
            }
            None => RequestToken {
                id: Arc::from(id),
                incarnation: 0,
            },
        }
    }

    /// Forgets a request that was never sent (refused before it left, e.g.
    /// by policy): no latency sample, no outcome.
    pub fn cancel(&mut self, token: RequestToken) {
        if let Some(i) = self.lookup_incarnation(&token.id, token.incarnation) {
            let state = &mut self.endpoints[i];
            state.pending = state.pending.saturating_sub(1);
        }
    }

    /// Records a request's end: `latency` (to the response head) feeds the
    /// peak-EWMA — a failure can raise the estimate but never lower it, so
    /// fast failures never make an endpoint attractive — and a failure counts
    /// toward ejection.
    pub fn finish(&mut self, token: RequestToken, latency: Duration, outcome: Outcome) {
        let Some(i) = self.lookup_incarnation(&token.id, token.incarnation) else {
            return;
        };
        let now = self.clock.now();
        let state = &mut self.endpoints[i];
        state.pending = state.pending.saturating_sub(1);
        if outcome.is_failure() {
            state.ewma.observe_failure(latency, now);
        } else {
            state.ewma.observe(latency, now);
        }
        self.record_outcome(i, outcome);
    }

    /// Records a request's end without a latency sample: its time says
    /// more about setting something up than about the endpoint (the first
    /// request on a new connection, which may wait for the far side to
    /// connect to the pod).
    pub fn finish_unsampled(&mut self, token: RequestToken, outcome: Outcome) {
        let Some(i) = self.lookup_incarnation(&token.id, token.incarnation) else {
            return;
        };
        let state = &mut self.endpoints[i];
        state.pending = state.pending.saturating_sub(1);
        self.record_outcome(i, outcome);
    }

    /// The endpoints' addresses.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|s| s.endpoint.addr).collect()
    }

    /// A snapshot of the metrics.
    pub fn stats(&self) -> ServiceStats {
        let now = self.clock.now();
        ServiceStats {
            endpoints: self
                .endpoints
                .iter()
                .map(|s| EndpointStats {
                    id: s.endpoint.id.clone(),
                    picks: s.picks,
                    open_connections: s.open,
                    pending_requests: s.pending,
                    ewma: Duration::from_nanos(s.ewma.peek(now) as u64),
                    ejected: s.outlier.ejected_until.is_some_and(|until| until > now),
                    times_ejected: s.outlier.times_ejected,
                    consecutive_failures: s.outlier.consecutive_failures,
                })
                .collect(),
            picks: self.counters.picks,
            no_healthy_endpoint: self.counters.no_healthy_endpoint,
            fallback_picks: self.counters.fallback_picks,
            ejections: self.counters.ejections,
            ejections_suppressed: self.counters.ejections_suppressed,
        }
    }
}

/// The rendezvous (highest random weight) score of `endpoint` for `key`:
/// FNV-1a of the endpoint's id, mixed with the key by SplitMix64's
/// finaliser. Fixed (not seeded per process), so every agent sends a key
/// to the same endpoint.
fn rendezvous(key: u64, endpoint: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in endpoint.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key's hash for [`Service::pick_keyed`] (FNV-1a).
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod rendezvous_tests {
    use super::*;

    fn owner<'a>(key: u64, endpoints: &[&'a str]) -> &'a str {
        endpoints
            .iter()
            .copied()
            .max_by_key(|e| rendezvous(key, e))
            .unwrap()
    }

    #[test]
    fn keys_stay_and_only_a_leaving_endpoints_keys_move() {
        let all = ["c", "d", "e"];
        let keys: Vec<u64> = (0..3000)
            .map(|k| hash_key(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<&str> = keys.iter().map(|&k| owner(k, &all)).collect();
        let on_e = before.iter().filter(|o| **o == "e").count();
        // About a third each (± 4σ, σ ≈ 26).
        assert!((1000 - 104..=1000 + 104).contains(&on_e), "{on_e}");
        let after: Vec<&str> = keys.iter().map(|&k| owner(k, &["c", "d"])).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "e" {
                assert_eq!(b, a, "a key not on e moved");
            }
        }
        // And back: with e again, the same owners as before.
        let again: Vec<&str> = keys.iter().map(|&k| owner(k, &all)).collect();
        assert_eq!(before, again);
    }
}
