//! DNS through the mesh: the per-pod DNS proxy.
//!
//! The kernel programs send every UDP query of an enrolled pod to port 53
//! to the agent's socket on 127.0.0.1:15053 / [::1]:15053 in the pod's own
//! namespace (mesh-ebpf `dns`), and show the answers as coming from the
//! server the pod addressed; TCP to port 53 is captured with all TCP and
//! handed here. Names of the services the agent knows
//! (`<service>.<namespace>.svc.<clusterDomain>`; the pod's search path makes
//! them of the short forms) are answered from the snapshot in force; every
//! other query goes, as it came, to the server the pod addressed, from the
//! pod's own namespace, and its answer back as it came (truncated answers
//! included: the client then asks again over TCP, which comes here too).

pub mod answer;
pub mod names;
pub mod proxy;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::ebpf::DnsResolvers;

/// The DNS proxy's shared state: where pods' queries go when the agent
/// does not answer them, and what it did with them.
#[derive(Default)]
pub struct Dns {
    /// None in tests without kernel programs: every query is answered here
    /// or fails.
    resolvers: Option<DnsResolvers>,
    counts: [AtomicU64; 3],
}

/// What became of a query, as counted (`mesh_dns_queries_total{answer}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A mesh service's name, answered by the agent.
    Local,
    /// Answered by the pod's resolver, through the agent.
    Forwarded,
    /// No answer could be had from the resolver (the client's own timeout
    /// and retries then apply, as for a lost datagram).
    Failed,
}

impl Handled {
    pub const ALL: [Handled; 3] = [Self::Local, Self::Forwarded, Self::Failed];

    pub fn as_label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Forwarded => "forwarded",
            Self::Failed => "failed",
        }
    }
}

impl Dns {
    pub fn new(resolvers: DnsResolvers) -> Self {
        Self {
            resolvers: Some(resolvers),
            counts: Default::default(),
        }
    }

    /// The DNS server the pod with `netns_cookie` last addressed.
    pub fn resolver(&self, netns_cookie: u64) -> Option<SocketAddr> {
        self.resolvers.as_ref()?.get(netns_cookie)
    }

    pub fn count(&self, handled: Handled) {
        let index = Handled::ALL.iter().position(|h| *h == handled).unwrap_or(0);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Queries so far, by what became of them.
    pub fn counts(&self) -> Vec<(Handled, u64)> {
        Handled::ALL
            .iter()
            .zip(&self.counts)
            .map(|(h, n)| (*h, n.load(Ordering::Relaxed)))
            .collect()
    }
}
