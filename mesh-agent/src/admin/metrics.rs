//! Prometheus metrics of the agent itself. Label sets are bounded: per pod on
//! this node at most, never per connection.

use std::{collections::HashMap, sync::Mutex};

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub ready: IntGauge,
    pub pods_enrolled: IntGauge,
    pub pods_failed: IntGauge,
    pub programs_attached: IntGauge,
    pub pod_connects: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Last kernel total seen per pod counter series, to turn totals into increments.
    last_kernel_totals: Mutex<HashMap<[String; 3], u64>>,
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
            last_kernel_totals: Mutex::default(),
        }
    }

    /// Feeds a pod's kernel total into its Prometheus counter. The kernel keeps
    /// totals that restart from zero when a pod is enrolled again; a total lower
    /// than the last one seen is such a restart, so all of it is new.
    pub fn sync_pod_connects(&self, namespace: &str, pod: &str, family: &str, total: u64) {
        let key = [namespace.to_string(), pod.to_string(), family.to_string()];
        let mut last = self.last_kernel_totals.lock().expect("metrics lock");
        let previous = last.insert(key, total).unwrap_or(0);
        let increment = if total >= previous {
            total - previous
        } else {
            total
        };
        if increment > 0 {
            self.pod_connects
                .with_label_values(&[namespace, pod, family])
                .inc_by(increment);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_totals_become_monotonic_counters_across_resets() {
        let metrics = Metrics::new();
        let counter = metrics
            .pod_connects
            .with_label_values(&["ns", "web", "ipv4"]);
        metrics.sync_pod_connects("ns", "web", "ipv4", 5);
        metrics.sync_pod_connects("ns", "web", "ipv4", 5);
        metrics.sync_pod_connects("ns", "web", "ipv4", 7);
        assert_eq!(counter.get(), 7);
        // The pod was enrolled again: the kernel total restarted at 0 and is now
        // 2. The Prometheus counter never goes backwards and loses nothing.
        metrics.sync_pod_connects("ns", "web", "ipv4", 2);
        assert_eq!(counter.get(), 9);
        metrics.sync_pod_connects("ns", "web", "ipv4", 3);
        assert_eq!(counter.get(), 10);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"mesh_pod_tcp_connects_total{family="ipv4",namespace="ns",pod="web"} 10"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_agent_build_info{version=""#),
            "{text}"
        );
    }
}
