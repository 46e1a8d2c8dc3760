//! Retry budget (linkerd / Finagle style) and the retry-eligibility rule.

use std::sync::Arc;
use std::time::Duration;

use super::ConfigError;
use super::clock::Clock;
use super::endpoint::Outcome;

/// Parameters of a [`RetryBudget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per original request in the window (default 0.2).
    pub ratio: f64,
    /// Retries per second always allowed, even without traffic (default 10).
    pub min_retries_per_second: u32,
    /// Length of the sliding window (default 10 s).
    pub window: Duration,
    /// The window slides in `window / buckets` steps (default 10).
    pub buckets: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
            buckets: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    requests: u64,
    retries: u64,
}

/// Counters of a [`RetryBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryStats {
    /// Retries granted by [`RetryBudget::try_retry`].
    pub allowed: u64,
    /// Retries refused by [`RetryBudget::try_retry`].
    pub denied: u64,
}

/// A sliding-window retry budget: a retry is allowed when, counting it,
/// `retries ≤ ratio × requests + min_retries_per_second × window` over the
/// last `window` (granularity `window / buckets`: a bucket leaves the window
/// all at once). Call [`record_request`](Self::record_request) for each
/// *original* request (retries are not deposits) and
/// [`try_retry`](Self::try_retry) before each retry.
pub struct RetryBudget {
    config: RetryBudgetConfig,
    clock: Arc<dyn Clock>,
    bucket_ns: u128,
    buckets: Vec<Bucket>,
    stats: RetryStats,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// A budget with `config`, reading time from `clock`.
    pub fn new(config: RetryBudgetConfig, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        if !config.ratio.is_finite() || config.ratio < 0.0 {
            return Err(ConfigError::RetryRatio(config.ratio));
        }
        if config.buckets == 0 || config.window.as_nanos() < u128::from(config.buckets) {
            return Err(ConfigError::RetryWindow);
        }
        let bucket_ns = config.window.as_nanos() / u128::from(config.buckets);
        let n = usize::try_from(config.buckets).map_err(|_| ConfigError::RetryWindow)?;
        Ok(Self {
            config,
            clock,
            bucket_ns,
            // Epoch u64::MAX marks "never used".
            buckets: vec![
                Bucket {
                    epoch: u64::MAX,
                    ..Bucket::default()
                };
                n
            ],
            stats: RetryStats::default(),
        })
    }

    fn current(&mut self) -> (u64, &mut Bucket) {
        let epoch =
            u64::try_from(self.clock.now().as_nanos() / self.bucket_ns).unwrap_or(u64::MAX - 1);
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % len) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                requests: 0,
                retries: 0,
            };
        }
        (epoch, bucket)
    }

    fn totals(&self, epoch: u64) -> (u64, u64) {
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.epoch != u64::MAX && b.epoch <= epoch && epoch - b.epoch < len)
            .fold((0, 0), |(q, r), b| (q + b.requests, r + b.retries))
    }

    /// Records an original (non-retry) request.
    pub fn record_request(&mut self) {
        let (_, bucket) = self.current();
        bucket.requests += 1;
    }

    /// Whether one more retry fits the budget; if so it is counted.
    pub fn try_retry(&mut self) -> bool {
        let (epoch, _) = self.current();
        let (requests, retries) = self.totals(epoch);
        let allowance = self.config.ratio * requests as f64
            + f64::from(self.config.min_retries_per_second) * self.config.window.as_secs_f64();
        // The epsilon absorbs float noise such as 0.2 × 100 = 20.000000000000004.
        let allowed = (retries + 1) as f64 <= allowance + 1e-9;
        if allowed {
            self.current().1.retries += 1;
            self.stats.allowed += 1;
        } else {
            self.stats.denied += 1;
        }
        allowed
    }

    /// The counters so far.
    pub fn stats(&self) -> RetryStats {
        self.stats
    }
}

/// Whether a request may be retried: only idempotent methods (GET, HEAD,
/// OPTIONS, PUT, DELETE, TRACE — case-sensitive, as HTTP methods are) and
/// only when the request certainly did no work or the server said so
/// (connect failure, 503). Still subject to the [`RetryBudget`].
pub fn retryable(method: &str, outcome: &Outcome) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    ) && matches!(outcome, Outcome::ConnectFailed | Outcome::Status(503))
}
