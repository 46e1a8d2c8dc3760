//! The Kubernetes API as a source of desired state (`discovery: kubernetes`
//! in node.yaml; docs/kubernetes.md): pods of this node found and enrolled
//! with no pods.yaml, workloads on other nodes and services from the API,
//! policies still node-local files.
//!
//! - `watch.rs`: the watches (namespaces, pods, Services, EndpointSlices, route resources) and their health.
//! - `cluster.rs`: the facts kept of the cluster, and the desired state's parts made from them.
//! - `pods.rs`, `services.rs`: API objects to facts; enrolment; Services to services.
//! - `routes.rs`: route resources from the API joined to the route files', each object loaded alone.
//! - `netns.rs`, `cgroup.rs`: where a pod lives on the node.
//! - `cni.rs`: the CNI plugin's requests: pods enrolled before their containers start.
//! - `source.rs`: the source itself: files + watches → `Desired`; the saved state.

pub mod cgroup;
pub mod cluster;
pub mod cni;
pub mod netns;
pub mod pods;
pub mod routes;
pub mod services;
pub mod source;
pub mod watch;

pub use source::{KubeSource, KubernetesStatus};

/// A client of the API: from a kubeconfig (an agent or signer outside the
/// cluster), else the pod's service account.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => {
            kube::Config::incluster().context("in-cluster configuration (service account token)")?
        }
    };
    kube::Client::try_from(config).context("making the Kubernetes client")
}
