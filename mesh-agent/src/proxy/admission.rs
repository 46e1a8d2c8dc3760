//! Limits on what is open at once: connections per pod, tunnel connections
//! per node. Beyond a limit a new connection is reset at once and counted;
//! the ones open are not touched.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus::{IntCounterVec, Opts, core::Collector};

use crate::config::Limits;

pub struct Admission {
    limits: std::sync::RwLock<Limits>,
    refusals: IntCounterVec,
}

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
            limits: std::sync::RwLock::new(Limits::default()),
            refusals: IntCounterVec::new(
                Opts::new(
                    "mesh_limit_refusals_total",
                    "New connections refused because a limit was reached (node.yaml limits)",
                ),
                &["limit"],
            )
            .expect("valid metric"),
        }
    }
}

impl Admission {
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write().expect("limits lock") = limits;
    }

    /// Admits one more connection on `open` if it stays within `limit`;
    /// else counts the refusal.
    pub fn admit(&self, limit: Limit, open: &Arc<AtomicUsize>) -> Option<Admitted> {
        let max = {
            let limits = self.limits.read().expect("limits lock");
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

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        for limit in [
            Limit::ConnectionsPerPod,
            Limit::TunnelConnections,
            Limit::PendingHandshakes,
        ] {
            // Exposed at 0 too, for alerts on any increase.
            self.refusals.with_label_values(&[limit.label()]);
        }
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
