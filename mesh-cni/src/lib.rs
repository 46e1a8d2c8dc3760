//! The mesh's CNI plugin (`mesh-cni`) and what it shares with the agent.
//!
//! The container runtime runs the plugin, chained after the pod network's
//! own plugins, each time it makes a pod sandbox. ADD asks the node's agent
//! (over a Unix socket, [`protocol`]) to enrol the pod and returns only once
//! the agent has attached capture for it, so the pod's first connection is
//! already the mesh's. See docs/kubernetes.md.
//!
//! - [`spec`]: what the CNI specification defines (1.0.0, and the 0.3/0.4
//!   results a runtime may still send): the network configuration, the
//!   environment, results and errors.
//! - [`protocol`]: the plugin's exchange with the agent.
//! - [`plugin`]: the plugin program (ADD, DEL, CHECK, VERSION).
//! - [`install`]: putting the plugin into a node's CNI configuration and
//!   taking it out again, leaving the configuration as it was.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod spec;

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "mesh-cni";
