//! Peak-EWMA latency estimate, with the semantics of tower's `PeakEwma`
//! (which linkerd2-proxy uses) and Finagle's.

use std::time::Duration;

/// Parameters of the per-endpoint latency estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EwmaConfig {
    /// Decay time constant τ (default 10 s, linkerd2-proxy's value).
    pub decay: Duration,
    /// Estimate of an endpoint that has never answered (default 30 ms,
    /// linkerd2-proxy's value): cheap enough that a new endpoint is tried
    /// soon, not zero so that it is not stampeded before its first response
    /// (its cost still grows with its pending requests).
    pub default_rtt: Duration,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// The estimate, in nanoseconds, and when it was last touched.
///
/// * Between samples the estimate decays toward zero:
///   `e(t) = e(t0) · exp(-(t - t0) / τ)` — so an endpoint that was slow once
///   and then left alone becomes cheap again and gets re-probed.
/// * A sample above the stored estimate replaces it at once (peak).
/// * A lower sample is blended in: `e = e · w + rtt · (1 - w)`, with
///   `w = exp(-Δ / τ)` and Δ the time since the estimate was last touched
///   (sample or decay on read, exactly as tower does).
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma {
    estimate_ns: f64,
    stamp: Duration,
    tau_ns: f64,
}

impl PeakEwma {
    pub(crate) fn new(config: &EwmaConfig, now: Duration) -> Self {
        Self {
            estimate_ns: nanos(config.default_rtt),
            stamp: now,
            tau_ns: nanos(config.decay).max(1.0),
        }
    }

    fn weight(&self, now: Duration) -> f64 {
        let elapsed = nanos(now.saturating_sub(self.stamp));
        (-elapsed / self.tau_ns).exp()
    }

    /// The estimate at `now`, without touching the state.
    pub(crate) fn peek(&self, now: Duration) -> f64 {
        self.estimate_ns * self.weight(now)
    }

    /// The estimate at `now`, decaying the stored value (a read, as in tower).
    pub(crate) fn decay(&mut self, now: Duration) -> f64 {
        if now > self.stamp {
            self.estimate_ns = self.peek(now);
            self.stamp = now;
        }
        self.estimate_ns
    }

    /// Records a latency sample observed at `now`.
    pub(crate) fn observe(&mut self, rtt: Duration, now: Duration) {
        let rtt = nanos(rtt);
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let w = self.weight(now);
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
        }
        self.stamp = self.stamp.max(now);
    }

    /// Records a failure's latency: it may raise the estimate but never
    /// lowers it, neither directly nor by letting it decay (the stored value
    /// is re-asserted as of `now`). Observing fast failures like successes
    /// would make a broken endpoint look cheap and attract traffic.
    pub(crate) fn observe_failure(&mut self, rtt: Duration, now: Duration) {
        self.estimate_ns = self.estimate_ns.max(nanos(rtt));
        self.stamp = self.stamp.max(now);
    }
}
