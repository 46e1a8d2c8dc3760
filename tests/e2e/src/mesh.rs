//! A mesh in the test bed: CAs on disk, agents that mint workload certificates
//! from them, and each node told about the workloads on the other nodes.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Result;
use mesh_agent::identity::{SpiffeId, ca::Ca};
use mesh_testbed::{Node, Pod, Topology};

use crate::{NodeAgent, pods_yaml};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE ID the test harness gives a pod (namespace `default`, service
/// account = pod name).
pub fn pod_identity(pod: &Pod) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", pod.name()).expect("valid SPIFFE ID")
}

/// A CA whose issued files live in a directory of the topology.
pub struct TestCa {
    pub ca: Ca,
    pub dir: PathBuf,
}

impl TestCa {
    pub fn new(topo: &Topology, name: &str) -> Result<Self> {
        let dir = topo.tmp_dir().join(format!("ca-{name}"));
        std::fs::create_dir_all(&dir)?;
        let ca = Ca::new_root(&format!("mesh test CA {name}"))?;
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem)?;
        Ok(Self { ca, dir })
    }

    /// Writes cert-chain and key PEM files for `id`, valid in [not_before,
    /// not_after]; returns (chain path, key path).
    pub fn issue_files(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(PathBuf, PathBuf)> {
        let (chain, key) = self.ca.issue(id, not_before, not_after)?;
        static ISSUED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = ISSUED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stem = format!(
            "{}.{}.{}-{n}",
            id.trust_domain(),
            id.namespace(),
            id.service_account()
        );
        let (chain_path, key_path) = (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
        );
        std::fs::write(&chain_path, chain)?;
        std::fs::write(&key_path, key)?;
        Ok((chain_path, key_path))
    }

    /// A valid certificate for `id` (an hour either side of now).
    pub fn issue_valid_files(&self, id: &SpiffeId) -> Result<(PathBuf, PathBuf)> {
        let now = SystemTime::now();
        self.issue_files(
            id,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(3600),
        )
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

/// The issuer files one node's agent uses (its own copy, so a test can rotate
/// nodes one at a time).
pub struct NodeIssuer {
    pub dir: PathBuf,
}

impl NodeIssuer {
    pub fn new(topo: &Topology, node: &Node, ca: &Ca, bundle: &[&Ca]) -> Result<Self> {
        let dir = topo.tmp_dir().join(format!("issuer-{}", node.name()));
        std::fs::create_dir_all(&dir)?;
        let issuer = Self { dir };
        issuer.set_issuer(ca)?;
        issuer.set_bundle(bundle)?;
        Ok(issuer)
    }

    /// Replaces the issuing CA (each file atomically: write, then rename).
    pub fn set_issuer(&self, ca: &Ca) -> Result<()> {
        write_atomically(&self.dir.join("issuer.key"), &ca.key_pem)?;
        write_atomically(&self.dir.join("issuer.crt"), &ca.cert_pem)
    }

    /// Replaces the trust bundle with these roots.
    pub fn set_bundle(&self, roots: &[&Ca]) -> Result<()> {
        let pem = roots
            .iter()
            .map(|r| r.cert_pem.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        write_atomically(&self.dir.join("bundle.crt"), &pem)
    }

    /// The node.yaml lines for this issuer.
    pub fn node_yaml(&self, lifetime: &str) -> String {
        format!(
            "identity:\n  issuer:\n    cert: {}\n    key: {}\n    trustBundle: {}\n    lifetime: {lifetime}\n",
            self.dir.join("issuer.crt").display(),
            self.dir.join("issuer.key").display(),
            self.dir.join("bundle.crt").display()
        )
    }
}

fn write_atomically(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// workloads.yaml listing `pods` (which run on other nodes); `rename_sa`
/// (pod name, service account) lies about one of them, for tests.
pub fn workloads_yaml(pods: &[&Pod], rename_sa: Option<(&str, &str)>) -> String {
    let mut yaml = String::from("workloads:\n");
    for pod in pods {
        let sa = match rename_sa {
            Some((name, sa)) if name == pod.name() => sa.to_string(),
            _ => pod.name().to_string(),
        };
        yaml.push_str(&format!(
            "  - name: {}\n    namespace: default\n    serviceAccount: {sa}\n    node: {}\n    ipv4: {}\n    ipv6: \"{}\"\n",
            pod.name(),
            pod.node_name(),
            pod.ipv4(),
            pod.ipv6()
        ));
    }
    yaml
}

/// One issuer per node, all minting from `ca` and trusting only it.
pub fn node_issuers(topo: &Topology, ca: &TestCa) -> Result<Vec<NodeIssuer>> {
    topo.nodes()
        .iter()
        .map(|n| NodeIssuer::new(topo, n, &ca.ca, &[&ca.ca]))
        .collect()
}

/// Pods named `outsider...` stay out of the mesh: not enrolled, not known as
/// workloads (clients "from outside the mesh" in tests).
pub fn in_mesh(pod: &Pod) -> bool {
    !pod.name().starts_with("outsider")
}

/// The mesh pods of `node`, and those of every other node.
pub fn mesh_pods<'t>(topo: &'t Topology, node: &'t Node) -> (Vec<&'t Pod>, Vec<&'t Pod>) {
    let local = node.pods().iter().filter(|p| in_mesh(p)).collect();
    let remote = topo
        .nodes()
        .iter()
        .filter(|n| n.name() != node.name())
        .flat_map(|n| n.pods().iter())
        .filter(|p| in_mesh(p))
        .collect();
    (local, remote)
}

/// Starts an agent on every node: each enrols its own pods (but outsiders),
/// knows every other node's mesh pods as workloads, and mints from its
/// `NodeIssuer`.
pub fn start_mesh<'t>(
    topo: &'t Topology,
    issuers: &[NodeIssuer],
    lifetime: &str,
) -> Result<Vec<NodeAgent<'t>>> {
    start_mesh_with(topo, issuers, lifetime, "")
}

/// Like [`start_mesh`], with extra node.yaml lines.
pub fn start_mesh_with<'t>(
    topo: &'t Topology,
    issuers: &[NodeIssuer],
    lifetime: &str,
    node_extra: &str,
) -> Result<Vec<NodeAgent<'t>>> {
    start_mesh_each(topo, issuers, lifetime, |_| node_extra.to_string())
}

/// Like [`start_mesh`], with node.yaml lines of each node's own.
pub fn start_mesh_each<'t>(
    topo: &'t Topology,
    issuers: &[NodeIssuer],
    lifetime: &str,
    node_extra: impl Fn(&Node) -> String,
) -> Result<Vec<NodeAgent<'t>>> {
    let mut agents = Vec::new();
    for (node, issuer) in topo.nodes().iter().zip(issuers) {
        let (local, remote) = mesh_pods(topo, node);
        agents.push(NodeAgent::start_with(
            topo,
            node,
            &pods_yaml(&local),
            &format!("{}{}", issuer.node_yaml(lifetime), node_extra(node)),
            &[("workloads.yaml", workloads_yaml(&remote, None))],
        )?);
    }
    Ok(agents)
}
