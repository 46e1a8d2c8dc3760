//! Node in a box: a test bed that simulates Kubernetes nodes and pods with
//! real kernel objects, for end-to-end tests of the mesh agent.
//!
//! - each node is a network namespace, with a bridge `br0` for its pods and
//!   a veth `fab0` to the fabric (a netns holding a bridge);
//! - each pod is a network namespace (with `eth0` on its node's bridge) plus
//!   a cgroup v2 directory under its node's cgroup;
//! - processes are started straight into a pod (its cgroup and netns) or a
//!   node (its netns and a `system` cgroup), with output captured to files;
//! - the servers and clients they run are this package's own binary,
//!   `pod-tool` ([`tool`]), so the tests need nothing cargo does not build.
//!
//! Every name carries a per-topology id `mtb-<pid>-<starttime>-<n>`, so tests
//! (threads, and several test processes) run in parallel. A [`Topology`]
//! removes everything on drop, also while unwinding from a panic; objects
//! of processes that died without cleaning up are removed by
//! [`sweep_leftovers`], which every [`TopologyBuilder::build`] runs first.
//!
//! Building a topology makes the test process a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`): orphans of killed pod processes are reaped by
//! teardown, so nothing of a topology outlives its drop (not even a zombie
//! waiting for PID 1, which some container inits never reap).
//!
//! Needs root; end-to-end tests start with [`e2e_enabled`].
//!
//! ```no_run
//! use std::time::Duration;
//! use mesh_testbed::{Topology, e2e_enabled};
//!
//! if e2e_enabled("example") {
//!     let topo = Topology::builder("example")
//!         .node("n1", &["a", "b"])
//!         .node("n2", &["c"])
//!         .build()
//!         .unwrap();
//!     let c = topo.pod("c");
//!     let server = c.spawn_tool(&["http-server", "0.0.0.0:8080"]).unwrap();
//!     // Pod a (node n1) reaches pod c (node n2) over the fabric.
//!     let url = format!("http://{}:8080/", c.ipv4());
//!     mesh_testbed::wait_until("pod c serving", Duration::from_secs(10), || {
//!         Ok(topo.pod("a").run("curl", &["-sf", &url], Duration::from_secs(5)).is_ok())
//!     })
//!     .unwrap();
//!     drop(server);
//! }
//! ```

mod bpffs;
mod cgroup;
pub mod cri;
pub mod dnsmasq;
pub mod kube_api;
mod naming;
pub mod netfilter;
mod netns;
pub mod otlp;
mod preflight;
mod process;
mod reap;
mod sweep;
pub mod tool;
mod topology;
pub mod traffic;
mod wait;
pub mod wire;

pub use preflight::{e2e_enabled, e2e_preflight, runs_or_skips};
pub use process::Process;
pub use sweep::sweep_leftovers;
pub use topology::{CONTROL_PLANE_IPV4, Node, Pod, Topology, TopologyBuilder};
pub use wait::wait_until;

#[cfg(test)]
mod tests;
