//! Helpers for the end-to-end tests: start the real agent in a test-bed node, ask
//! it what it saw, and look at the kernel's own view of what is attached.

pub mod agent;
pub mod backend;
pub mod echo;
pub mod kernel;
pub mod kube;
pub mod load;
pub mod mesh;
pub mod signer;

pub use agent::{NodeAgent, agent_binary, pod_yaml, pods_yaml};

use mesh_testbed::{Pod, Topology, traffic::TrafficServer};

/// The usual test topology: node n1 with pods `a` and `b`, node n2 with pod `c`.
pub fn two_nodes(test_name: &str) -> Topology {
    Topology::builder(test_name)
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap_or_else(|e| panic!("building the test bed: {e:#}"))
}

/// Traffic servers listening on `port` in each of `pods`.
pub fn traffic_servers(pods: &[&Pod], port: u16) -> Vec<TrafficServer> {
    pods.iter()
        .map(|pod| TrafficServer::start(pod, port).unwrap_or_else(|e| panic!("{e:#}")))
        .collect()
}
