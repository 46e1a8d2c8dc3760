//! How the balancer chooses: the pool of candidates (subsets, ejection,
//! locality tiers), a weighted draw, and power of two choices by load.

use std::time::Duration;

use super::{Endpoint, Locality, Outcome, Protocol, Service, rng};

impl Service {
    pub(super) fn lookup(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub(super) fn lookup_incarnation(&self, id: &str, incarnation: u64) -> Option<usize> {
        self.lookup(id)
            .filter(|&i| self.endpoints[i].incarnation == incarnation)
    }

    pub(super) fn readmit_due(&mut self, now: Duration) {
        for state in &mut self.endpoints {
            if state.outlier.readmit_if_due(now) {
                tracing::debug!(id = %state.id, "endpoint re-admitted on probation");
            }
        }
    }

    pub(super) fn record_outcome(&mut self, i: usize, outcome: Outcome) {
        let now = self.clock.now();
        self.readmit_due(now);
        let config = self.config.outlier;
        if !outcome.is_failure() {
            self.endpoints[i].outlier.on_success();
            return;
        }
        if !self.endpoints[i].outlier.on_failure(&config) {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|s| s.outlier.is_ejected())
            .count();
        let limit = config.max_ejected(self.endpoints.len());
        let state = &mut self.endpoints[i];
        if ejected < limit {
            let duration = state.outlier.eject(now, &config);
            self.counters.ejections += 1;
            tracing::info!(
                id = %state.id,
                addr = %state.endpoint.addr,
                ejection_secs = duration.as_secs_f64(),
                times = state.outlier.times_ejected,
                "endpoint ejected"
            );
        } else {
            self.counters.ejections_suppressed += 1;
            tracing::debug!(
                id = %state.id,
                "endpoint failing but max_ejection_percent reached; kept in rotation"
            );
        }
    }

    /// The endpoints of the chosen subset (or all of them).
    pub(super) fn pool(&mut self) -> Vec<usize> {
        if self.subset_members.is_empty() {
            return (0..self.endpoints.len()).collect();
        }
        let endpoints = &self.endpoints;
        let with_healthy =
            |members: &Vec<usize>| members.iter().any(|&i| !endpoints[i].outlier.is_ejected());
        let mut eligible: Vec<usize> = (0..self.subset_members.len())
            .filter(|&s| self.config.subsets[s].weight > 0 && with_healthy(&self.subset_members[s]))
            .collect();
        if eligible.is_empty() {
            eligible = (0..self.subset_members.len())
                .filter(|&s| {
                    self.config.subsets[s].weight > 0 && !self.subset_members[s].is_empty()
                })
                .collect();
        }
        if eligible.is_empty() {
            return (0..self.endpoints.len()).collect();
        }
        let total: u64 = eligible
            .iter()
            .map(|&s| u64::from(self.config.subsets[s].weight))
            .sum();
        let mut r = rng::below(&mut self.rng, total);
        for &s in &eligible {
            let w = u64::from(self.config.subsets[s].weight);
            if r < w {
                return self.subset_members[s].clone();
            }
            r -= w;
        }
        unreachable!("r < total")
    }

    pub(super) fn nearest_tier(&self, candidates: Vec<usize>) -> Vec<usize> {
        let tier = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<usize> {
            candidates
                .iter()
                .copied()
                .filter(|&i| keep(&self.endpoints[i].endpoint))
                .collect()
        };
        let same_node = |e: &Endpoint| e.node == self.client.node;
        let same_zone = |e: &Endpoint| self.client.zone.is_some() && e.zone == self.client.zone;
        if self.config.locality == Locality::PreferNode {
            let nearest = tier(&same_node);
            if !nearest.is_empty() {
                return nearest;
            }
        }
        if matches!(
            self.config.locality,
            Locality::PreferNode | Locality::PreferZone
        ) {
            let nearest = tier(&same_zone);
            if !nearest.is_empty() {
                return nearest;
            }
        }
        candidates
    }

    /// Draws an index of `candidates` by weight, skipping `skip`.
    pub(super) fn draw(&mut self, candidates: &[usize], total: u64, skip: Option<usize>) -> usize {
        let mut r = rng::below(&mut self.rng, total);
        for &i in candidates {
            if Some(i) == skip {
                continue;
            }
            let w = self.endpoints[i].weight();
            if r < w {
                return i;
            }
            r -= w;
        }
        unreachable!("r < total")
    }

    pub(super) fn load(&mut self, i: usize, now: Duration) -> f64 {
        let state = &mut self.endpoints[i];
        let load = match self.config.protocol {
            Protocol::Tcp => state.open as f64,
            Protocol::Http => state.ewma.decay(now) * (state.pending + 1) as f64,
        };
        load / state.weight() as f64
    }

    /// Smooth weighted round robin (nginx's): every candidate gains its
    /// weight, the one ahead is chosen and falls back by the total. Equal
    /// weights take turns; 5:1 gives a a a b a a, not a a a a a b.
    pub(super) fn round_robin(&mut self, candidates: &[usize]) -> usize {
        let mut total = 0i64;
        let mut chosen = candidates[0];
        for &i in candidates {
            let weight = i64::try_from(self.endpoints[i].weight()).unwrap_or(i64::MAX);
            total = total.saturating_add(weight);
            let state = &mut self.endpoints[i];
            state.turn = state.turn.saturating_add(weight);
            if state.turn > self.endpoints[chosen].turn {
                chosen = i;
            }
        }
        let state = &mut self.endpoints[chosen];
        state.turn = state.turn.saturating_sub(total);
        chosen
    }

    pub(super) fn power_of_two(&mut self, candidates: &[usize], now: Duration) -> usize {
        if let [only] = candidates {
            return *only;
        }
        let total: u64 = candidates.iter().map(|&i| self.endpoints[i].weight()).sum();
        let a = self.draw(candidates, total, None);
        let wa = self.endpoints[a].weight();
        let b = self.draw(candidates, total - wa, Some(a));
        let wb = self.endpoints[b].weight();
        let (la, lb) = (self.load(a, now), self.load(b, now));
        if la < lb {
            a
        } else if lb < la {
            b
        } else if rng::below(&mut self.rng, wa + wb) < wa {
            a
        } else {
            b
        }
    }
}
