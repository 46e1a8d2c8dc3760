//! The signer's metrics: requests by result (`signed` or the reason of the
//! refusal) and how long signing took.

use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

pub struct SignerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    signing_seconds: Histogram,
}

impl Default for SignerMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "mesh_ca_requests_total",
                "Certificate requests by result: signed, or why they were refused",
            ),
            &["result"],
        )
        .expect("valid metric");
        let signing_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_ca_signing_seconds",
                "Time from a request's arrival to its certificate (review, pods, signing)",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(signing_seconds.clone()))
            .expect("registered once");
        Self {
            registry,
            requests,
            signing_seconds,
        }
    }
}

impl SignerMetrics {
    pub fn signed(&self, took: Duration) {
        self.requests.with_label_values(&["signed"]).inc();
        self.signing_seconds.observe(took.as_secs_f64());
    }

    pub fn failed(&self, reason: &str) {
        self.requests.with_label_values(&[reason]).inc();
    }

    /// Requests with this result so far.
    pub fn count(&self, result: &str) -> u64 {
        self.requests.with_label_values(&[result]).get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
