//! Consecutive-failure outlier ejection (Envoy's `consecutive_5xx` model).

use std::time::Duration;

/// Outlier-ejection parameters of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint (default 5, at least 1).
    pub consecutive_failures: u32,
    /// Ejection time per ejection: the n-th ejection lasts `n ×` this
    /// (default 30 s).
    pub base_ejection_time: Duration,
    /// Cap on one ejection's duration (default 300 s).
    pub max_ejection_time: Duration,
    /// At most this percentage of the service's endpoints (rounded down) are
    /// ejected at once (default 50, at most 100). A failing endpoint that
    /// would exceed it stays in rotation.
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// How many of `total` endpoints may be ejected at once.
    pub fn max_ejected(&self, total: usize) -> usize {
        total.saturating_mul(usize::from(self.max_ejection_percent.min(100))) / 100
    }
}

/// Per-endpoint ejection state.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutlierState {
    pub(crate) consecutive_failures: u32,
    /// Ejected while `now < until`.
    pub(crate) ejected_until: Option<Duration>,
    /// The ejection multiplier: how many times it was ejected, decremented
    /// by one per `base_ejection_time` spent back in rotation.
    pub(crate) times_ejected: u32,
    /// Re-admitted and not yet succeeded: one failure ejects again.
    pub(crate) probation: bool,
    readmitted_at: Duration,
}

impl OutlierState {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Re-admits the endpoint (on probation) if its ejection is over.
    /// Returns whether it was re-admitted.
    pub(crate) fn readmit_if_due(&mut self, now: Duration) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.probation = true;
                self.consecutive_failures = 0;
                self.readmitted_at = until;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.probation = false;
    }

    /// Counts a failure; returns whether the endpoint should now be ejected.
    /// Failures reported while ejected (in-flight work finishing) are ignored.
    pub(crate) fn on_failure(&mut self, config: &OutlierConfig) -> bool {
        if self.is_ejected() {
            return false;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.probation || self.consecutive_failures >= config.consecutive_failures.max(1)
    }

    /// Ejects the endpoint at `now`; returns the ejection's duration.
    pub(crate) fn eject(&mut self, now: Duration, config: &OutlierConfig) -> Duration {
        let base = config.base_ejection_time;
        if self.times_ejected > 0 && !base.is_zero() {
            let healthy = now.saturating_sub(self.readmitted_at);
            let periods = u32::try_from(healthy.as_nanos() / base.as_nanos()).unwrap_or(u32::MAX);
            self.times_ejected = self.times_ejected.saturating_sub(periods);
        }
        self.times_ejected = self.times_ejected.saturating_add(1);
        let duration = base
            .saturating_mul(self.times_ejected)
            .min(config.max_ejection_time);
        self.ejected_until = Some(now.saturating_add(duration));
        self.consecutive_failures = 0;
        self.probation = false;
        duration
    }
}
