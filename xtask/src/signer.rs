//! The mesh's signer (`mesh-agent ca`) on the test bed's control plane, as
//! the Kubernetes demo and the bench run it: its issuer files, its
//! configuration, the node agents' pods and tokens in the API MODEL
//! (mesh_testbed::kube_api), and the `identity:` block an agent asks it with.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_testbed::{CONTROL_PLANE_IPV4, Node, Process, Topology, kube_api::StandInApi, wait_until};

use crate::pki::BenchCa;

pub const CA_PORT: u16 = 15012;
pub const ADMIN_PORT: u16 = 15014;
pub const SERVING_NAME: &str = "mesh-ca.mesh-system.svc";

/// The agent pod of `node` (mesh-system/mesh-agent) in the API, and the
/// token TokenReview accepts for it (audience istio-ca); the token.
pub fn register_agent(api: &StandInApi, node: &Node) -> Result<String> {
    let pod = format!("mesh-agent-{}", node.name());
    let uid = api.put_running_pod("mesh-system", &pod, "mesh-agent", node.name());
    let token = format!("token-of-the-agent-on-{}", node.name());
    api.accept_token(
        &token,
        ("mesh-system", "mesh-agent"),
        (&pod, &uid),
        &["istio-ca"],
    );
    Ok(token)
}

/// Writes the signer's files into `dir` (issuer from `ca`, a kubeconfig for
/// `api`), starts it on the control plane and waits until it answers.
pub fn start(
    agent: &Path,
    topo: &Topology,
    api: &StandInApi,
    dir: &Path,
    ca: &BenchCa,
    log: &str,
) -> Result<Process> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(dir.join("ca.key"), &ca.key_pem)?;
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig())?;
    std::fs::write(
        dir.join("signer.yaml"),
        format!(
            "trustDomain: cluster.local\nlisten: {CONTROL_PLANE_IPV4}:{CA_PORT}\nadmin: {CONTROL_PLANE_IPV4}:{ADMIN_PORT}\nissuerCert: {d}/ca.crt\nissuerKey: {d}/ca.key\nservingNames: [{SERVING_NAME}]\nkubeconfig: {d}/kubeconfig\n",
            d = dir.display()
        ),
    )?;
    let mut cmd = Command::new(agent);
    cmd.args(["ca", "--config"])
        .arg(dir.join("signer.yaml"))
        .env("MESH_LOG", log);
    let mut signer = topo.spawn_on_control_plane("the signer", cmd)?;
    let n1 = &topo.nodes()[0];
    wait_until("the signer to answer", Duration::from_secs(20), || {
        if let Some(status) = signer.try_status()? {
            bail!("the signer exited with {status}");
        }
        Ok(n1
            .http_get(admin_address(), "/readyz")
            .is_ok_and(|(code, _)| code == 200))
    })
    .with_context(|| signer.output_report())?;
    Ok(signer)
}

pub fn admin_address() -> SocketAddr {
    SocketAddr::from((CONTROL_PLANE_IPV4, ADMIN_PORT))
}

/// Writes `token` and the signer's root into `dir` (what the DaemonSet
/// projects into the agent's pod); the `identity:` block asking the signer.
pub fn agent_identity(dir: &Path, token: &str, ca: &BenchCa) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("token"), token)?;
    std::fs::write(dir.join("ca-root.crt"), &ca.cert_pem)?;
    Ok(format!(
        "identity:\n  signingRequest:\n    address: https://{CONTROL_PLANE_IPV4}:{CA_PORT}\n    caRoots: {d}/ca-root.crt\n    serverName: {SERVING_NAME}\n    tokenFile: {d}/token\n",
        d = dir.display()
    ))
}
