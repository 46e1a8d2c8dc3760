//! The userspace data path: captured connections in, upstream connections out.
//!
//! Three ways in, one way into a pod:
//! - `outbound`: from a pod's app, via the agent's listener on
//!   127.0.0.1:15001 in that pod; `route` says where it goes (a service, a
//!   pod of this node, a mesh workload elsewhere through the tunnel, or
//!   passthrough from the pod's own address);
//! - `inbound`: plaintext from outside the mesh, steered by sk_lookup to
//!   the agent's listener on 127.0.0.1:15006 in the pod;
//! - `tunnel_inbound`: HBONE streams from other nodes' agents on 15008;
//! - `deliver`: into a pod of this node, by its policies (`authz`), at L4
//!   or per HTTP request, over the pod's loopback (`dial`).
//!
//! Every handler reads one `snapshot` (pods, workloads, services, policies),
//! swapped whole on reload, and records its connection once (`finish`).

pub mod admission;
pub mod authz;
pub mod connections;
pub mod context;
mod counted;
mod deliver;
mod descriptors;
pub mod dial;
pub mod finish;
pub mod http_pool;
pub mod inbound;
pub mod mirror;
pub mod outbound;
pub mod outcome;
pub mod pipeline;
pub mod pod;
pub mod relay;
pub mod route;
mod service_http;
pub mod snapshot;
pub mod source_address;
mod splice;
pub mod telemetry;
pub mod tunnel_inbound;

pub use context::ProxyContext;
pub use finish::reset;
pub use pod::PodHandle;
pub use snapshot::{Plan, Snapshot};
