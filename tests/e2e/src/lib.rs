//! Helpers for the end-to-end tests: start the real agent in a test-bed node, ask
//! it what it saw, and look at the kernel's own view of what is attached.

pub mod agent;
pub mod kernel;

pub use agent::{NodeAgent, agent_binary, pod_yaml, pods_yaml};
