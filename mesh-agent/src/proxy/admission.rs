//! Limits on what is open at once: connections per pod, tunnel connections
//! per node, and the process's file descriptors. Beyond a limit a new
//! connection is reset at once and counted; the ones open are not touched.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus::{IntCounterVec, Opts, core::Collector};

use super::descriptors::{self, DescriptorReserve};
use crate::config::Limits;

pub struct Admission {
    limits: parking_lot::RwLock<Limits>,
    refusals: IntCounterVec,
    descriptors: DescriptorReserve,
}

/// The refusal label of connections reset for want of a file descriptor.
const FILE_DESCRIPTORS: &str = "file_descriptors";

/// Held while one admitted connection lives.
pub struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    ConnectionsPerPod,
    TunnelConnections,
    PendingHandshakes,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::ConnectionsPerPod => "connections_per_pod",
            Limit::TunnelConnections => "tunnel_connections",
            Limit::PendingHandshakes => "pending_handshakes",
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            limits: parking_lot::RwLock::new(Limits::default()),
            refusals: IntCounterVec::new(
                Opts::new(
                    "mesh_limit_refusals_total",
                    "New connections refused because a limit was reached (node.yaml limits)",
                ),
                &["limit"],
            )
            .expect("valid metric"),
            descriptors: DescriptorReserve::default(),
        }
    }
}

impl Admission {
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write() = limits;
    }

    /// Admits one more connection on `open` if it stays within `limit`;
    /// else counts the refusal.
    pub fn admit(&self, limit: Limit, open: &Arc<AtomicUsize>) -> Option<Admitted> {
        let max = {
            let limits = self.limits.read();
            match limit {
                Limit::ConnectionsPerPod => limits.connections_per_pod,
                Limit::TunnelConnections => limits.tunnel_connections,
                Limit::PendingHandshakes => limits.pending_handshakes,
            }
        } as usize;
        let admitted = open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Some(Admitted(open.clone()))
        } else {
            self.refusals.with_label_values(&[limit.label()]).inc();
            None
        }
    }

    /// An accept on `listener` (a listener of `pod`) failed. Out of file
    /// descriptors, the waiting connection is reset with the reserve
    /// descriptor and counted; otherwise the loop backs off a little
    /// instead of spinning.
    pub async fn accept_failed(
        &self,
        listener: &impl std::os::fd::AsFd,
        err: &std::io::Error,
        pod: &str,
    ) {
        if descriptors::is_exhaustion(err) && self.descriptors.reset_waiting(listener) {
            self.refusals.with_label_values(&[FILE_DESCRIPTORS]).inc();
            if self.descriptors.should_warn() {
                tracing::warn!(pod, error = %err, "out of file descriptors: new connections are reset (counted as mesh_limit_refusals_total, limit file_descriptors)");
            }
            return;
        }
        if self.descriptors.should_warn() {
            tracing::warn!(pod, error = %err, "accept failed");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    /// An upstream connection could not be made: if that was for want of a
    /// file descriptor, it is counted as a refusal like the ones above.
    pub fn count_if_out_of_descriptors(&self, err: &anyhow::Error) {
        let exhausted = err
            .chain()
            .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
            .any(descriptors::is_exhaustion);
        if exhausted {
            self.refusals.with_label_values(&[FILE_DESCRIPTORS]).inc();
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        for limit in [
            Limit::ConnectionsPerPod,
            Limit::TunnelConnections,
            Limit::PendingHandshakes,
        ] {
            // Exposed at 0 too, for alerts on any increase.
            self.refusals.with_label_values(&[limit.label()]);
        }
        self.refusals.with_label_values(&[FILE_DESCRIPTORS]);
        vec![Box::new(self.refusals.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_again_once_one_ends() {
        let admission = Admission::default();
        admission.set_limits(Limits {
            connections_per_pod: 2,
            ..Limits::default()
        });
        let open = Arc::new(AtomicUsize::new(0));
        let first = admission
            .admit(Limit::ConnectionsPerPod, &open)
            .expect("1st");
        let _second = admission
            .admit(Limit::ConnectionsPerPod, &open)
            .expect("2nd");
        assert!(admission.admit(Limit::ConnectionsPerPod, &open).is_none());
        assert_eq!(
            admission
                .refusals
                .with_label_values(&["connections_per_pod"])
                .get(),
            1
        );
        drop(first);
        assert!(admission.admit(Limit::ConnectionsPerPod, &open).is_some());
    }
}
