//! Prometheus metrics of the agent itself. Label sets are bounded: per pod on
//! this node at most, never per connection.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub ready: IntGauge,
    pub pods_enrolled: IntGauge,
    pub pods_failed: IntGauge,
    pub programs_attached: IntGauge,
    pub pod_connects: IntCounterVec,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let ready = IntGauge::new(
            "mesh_agent_ready",
            "1 when programs are attached and config is loaded",
        )
        .unwrap();
        let pods_enrolled = IntGauge::new(
            "mesh_pods_enrolled",
            "Pods whose traffic the kernel programs see",
        )
        .unwrap();
        let pods_failed = IntGauge::new(
            "mesh_pods_enrolment_failed",
            "Configured pods that could not be enrolled",
        )
        .unwrap();
        let programs_attached = IntGauge::new(
            "mesh_bpf_program_attachments",
            "Kernel program attachments to pod cgroups",
        )
        .unwrap();
        let pod_connects = IntCounterVec::new(
            Opts::new(
                "mesh_pod_tcp_connects_total",
                "TCP connect() calls seen by the kernel programs, per pod",
            ),
            &["namespace", "pod", "family"],
        )
        .unwrap();
        let build_info = IntGaugeVec::new(
            Opts::new("mesh_agent_build_info", "Agent version"),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(ready.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pods_enrolled.clone()),
            Box::new(pods_failed.clone()),
            Box::new(programs_attached.clone()),
            Box::new(pod_connects.clone()),
            Box::new(build_info.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            ready,
            pods_enrolled,
            pods_failed,
            programs_attached,
            pod_connects,
            build_info,
        }
    }

    /// Raises a counter to `total` (the kernel keeps totals; Prometheus wants
    /// increments).
    pub fn sync_counter(counter: &prometheus::IntCounter, total: u64) {
        let current = counter.get();
        if total > current {
            counter.inc_by(total - current);
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
