//! The desired state of this node: what a source (today the configuration
//! files, `config`; next the Kubernetes API) says the agent should serve.
//!
//! A source produces a whole [`Desired`], already validated; the daemon turns
//! it into one [`crate::proxy::Snapshot`] and swaps it in, or rejects it whole
//! (see `apply`). Nothing reads a `Desired` on the data path.

use std::{path::PathBuf, sync::Arc};

use crate::{
    config::{NodeConfig, PodConfig, RemoteWorkload, ServiceConfig},
    policy::PolicySet,
};

/// Everything the agent serves, from one source, validated as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Where it came from (the configuration directory for the files source).
    pub dir: PathBuf,
    pub node: NodeConfig,
    /// Pods of this node to enrol.
    pub pods: Vec<PodConfig>,
    /// Mesh workloads on other nodes.
    pub workloads: Vec<RemoteWorkload>,
    /// Services with virtual IPs.
    pub services: Vec<ServiceConfig>,
    /// Authorization policies, parsed once (each knows its file).
    pub policies: Policies,
    /// Gateway API routes of Services, parsed once (each knows its file).
    pub routes: crate::routes::Routes,
}

/// Parsed policies with the texts they came from. Two are equal when their
/// texts are: the parse of a text is always the same.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// (path, text) of every policy file, in load order.
    pub files: Vec<(PathBuf, String)>,
    pub set: Arc<PolicySet>,
}

impl PartialEq for Policies {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

/// What a source says: a new desired state, or why its last change was
/// refused (the previous desired state keeps serving).
#[derive(Debug)]
pub enum Update {
    Desired(Box<Desired>),
    Rejected(String),
    /// A new desired state from a source with two parts, one of which (the
    /// files) is still refused for this reason: the other part's change
    /// applies with the last good files, and the refusal stays shown.
    DesiredFilesRefused(Box<Desired>, String),
}
