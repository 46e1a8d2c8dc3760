//! mesh-agent: the node agent of an eBPF-accelerated service mesh.
//!
//! Layout follows the data path: `config` (the node-local files) -> `capture`
//! (enrolling pods: listeners in their namespaces) and `ebpf` (kernel programs
//! attached to them) -> `proxy` (the userspace data path) -> `daemon` (the
//! running agent) -> `admin` (health, readiness, metrics, status).

pub mod admin;
pub mod apply;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod dns;
pub mod ebpf;
pub mod handover;
pub mod identity;
pub mod kubernetes;
pub mod l7;
pub mod logging;
pub mod mtls;
pub mod policy;
pub mod proxy;
pub mod pump;
pub mod routes;
pub mod services;
pub mod signer;
pub mod spans;
pub mod state;
pub mod status;
pub mod tap;
pub mod tunnel;

/// Default port of the admin API (Istio's ztunnel uses 15000 too).
pub const ADMIN_PORT: u16 = 15000;
