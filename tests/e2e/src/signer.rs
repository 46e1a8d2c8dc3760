//! The mesh's signer (`mesh-agent ca`, the real binary) on the test bed's
//! control plane, with node agents asking it for their pods' certificates.
//! The Kubernetes API it asks (TokenReview, pods) is a MODEL
//! ([`mesh_testbed::kube_api`]); the signer, the agents, gRPC over TLS, the
//! kernel and the traffic are real.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_agent::identity::{SigningRequestSource, SpiffeId, ca::Ca, requester};
use mesh_testbed::{CONTROL_PLANE_IPV4, Node, Process, Topology, kube_api::StandInApi};
use nix::sys::signal::Signal;

use crate::{
    NodeAgent, agent_binary,
    mesh::{in_mesh, mesh_pods, workloads_yaml},
    pods_yaml,
};

pub const CA_PORT: u16 = 15012;
pub const ADMIN_PORT: u16 = 15014;
/// The second replica's ports.
pub const REPLICA_CA_PORT: u16 = 15022;
pub const REPLICA_ADMIN_PORT: u16 = 15024;
/// The name on the signer's serving certificate (its Service's).
pub const SERVING_NAME: &str = "mesh-ca.mesh-system.svc";
pub const AGENT_NAMESPACE: &str = "mesh-system";
pub const AGENT_ACCOUNT: &str = "mesh-agent";
pub const AUDIENCE: &str = "istio-ca";

/// The API model, the signer's files and its process.
pub struct SignerBed<'t> {
    topo: &'t Topology,
    /// Holds the model's server tasks.
    pub runtime: tokio::runtime::Runtime,
    pub api: StandInApi,
    /// The signer's own directory: its Secret (issuer key), config.
    pub dir: PathBuf,
    /// The root the signer's serving certificate chains to (the first
    /// issuer's: the serving certificate is made at start).
    serving_root: String,
    process: Option<Process>,
    /// A second replica (same files, its own ports), if started.
    replica: Option<Process>,
}

impl<'t> SignerBed<'t> {
    /// The model with a Pod object for every mesh pod of the test bed (in
    /// `default`, service account = pod name, on its node, Running) and a
    /// node-agent pod per node whose token TokenReview accepts; the signer
    /// issuing from `issuer`, sending `bundle`; started and ready.
    pub fn start(topo: &'t Topology, issuer: &Ca, bundle: &[&Ca]) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let api = runtime.block_on(StandInApi::start_with(topo.control_plane_binder()))?;
        for node in topo.nodes() {
            for pod in node.pods().iter().filter(|p| in_mesh(p)) {
                api.put_running_pod("default", pod.name(), pod.name(), node.name());
            }
            let agent_pod = agent_pod_name(node);
            let uid = api.put_running_pod(AGENT_NAMESPACE, &agent_pod, AGENT_ACCOUNT, node.name());
            api.accept_token(
                &node_token(node),
                (AGENT_NAMESPACE, AGENT_ACCOUNT),
                (&agent_pod, &uid),
                &[AUDIENCE],
            );
        }
        let dir = topo.tmp_dir().join("signer");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig())?;
        let mut bed = Self {
            topo,
            runtime,
            api,
            dir,
            serving_root: issuer.cert_pem.clone(),
            process: None,
            replica: None,
        };
        bed.set_issuer(issuer)?;
        bed.set_bundle(bundle)?;
        for (file, port, admin) in [
            ("signer.yaml", CA_PORT, ADMIN_PORT),
            ("signer-replica.yaml", REPLICA_CA_PORT, REPLICA_ADMIN_PORT),
        ] {
            std::fs::write(
                bed.dir.join(file),
                format!(
                    "trustDomain: cluster.local\nlisten: {CONTROL_PLANE_IPV4}:{port}\nadmin: {CONTROL_PLANE_IPV4}:{admin}\nissuerCert: {dir}/issuer.crt\nissuerKey: {dir}/issuer.key\ntrustBundle: {dir}/bundle.crt\nservingNames: [{SERVING_NAME}]\ntrustedNodeAccounts: [{AGENT_NAMESPACE}/{AGENT_ACCOUNT}]\nkubeconfig: {dir}/kubeconfig\n",
                    dir = bed.dir.display()
                ),
            )?;
        }
        bed.start_signer()?;
        Ok(bed)
    }

    /// Starts the signer process and waits until it answers.
    pub fn start_signer(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("the signer is running");
        }
        self.process = Some(self.spawn_signer("signer.yaml", ADMIN_PORT)?);
        Ok(())
    }

    /// Starts a second replica of the signer, with the same issuer and
    /// facts, on [`REPLICA_CA_PORT`].
    pub fn start_replica(&mut self) -> Result<()> {
        if self.replica.is_some() {
            bail!("the replica is running");
        }
        self.replica = Some(self.spawn_signer("signer-replica.yaml", REPLICA_ADMIN_PORT)?);
        Ok(())
    }

    fn spawn_signer(&self, config: &str, admin_port: u16) -> Result<Process> {
        let mut cmd = Command::new(agent_binary());
        cmd.arg("ca")
            .arg("--config")
            .arg(self.dir.join(config))
            .env("MESH_LOG", "info");
        let mut process = self.topo.spawn_on_control_plane("the signer", cmd)?;
        let node = &self.topo.nodes()[0];
        let admin = SocketAddr::new(IpAddr::V4(CONTROL_PLANE_IPV4), admin_port);
        // It binds the CA port before the admin one: answering there means
        // both are served.
        let ready =
            mesh_testbed::wait_until("the signer to answer", Duration::from_secs(20), || {
                if let Some(status) = process.try_status()? {
                    bail!("the signer exited with {status}");
                }
                Ok(node
                    .http_get(admin, "/readyz")
                    .is_ok_and(|(code, _)| code == 200))
            });
        match ready {
            Ok(()) => Ok(process),
            Err(e) => Err(e.context(format!("signer log:\n{}", process.stderr_so_far()))),
        }
    }

    /// Stops the signer (SIGTERM) and waits for it to exit.
    pub fn stop_signer(&mut self) -> Result<String> {
        let mut process = self.process.take().context("the signer is not running")?;
        process.signal(Signal::SIGTERM)?;
        let out = process.wait_with_deadline(Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stderr_so_far())
            .unwrap_or_default()
    }

    /// Replaces the issuing CA (the signer reads it again at its next
    /// request).
    pub fn set_issuer(&self, ca: &Ca) -> Result<()> {
        write_atomically(&self.dir.join("issuer.key"), &ca.key_pem)?;
        write_atomically(&self.dir.join("issuer.crt"), &ca.cert_pem)
    }

    /// Replaces the roots sent with every certificate.
    pub fn set_bundle(&self, roots: &[&Ca]) -> Result<()> {
        let pem: Vec<&str> = roots.iter().map(|r| r.cert_pem.as_str()).collect();
        write_atomically(&self.dir.join("bundle.crt"), &pem.join("\n"))
    }

    /// The issuer key file's text (to prove no node holds it).
    pub fn issuer_key(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("issuer.key"))?)
    }

    /// The signer's `mesh_ca_requests_total{result}`.
    pub fn requests(&self, result: &str) -> u64 {
        self.requests_at(ADMIN_PORT, result)
    }

    /// `mesh_ca_requests_total{result}` of the replica whose admin port is
    /// `admin_port`.
    pub fn requests_at(&self, admin_port: u16, result: &str) -> u64 {
        let node = &self.topo.nodes()[0];
        let admin = SocketAddr::new(IpAddr::V4(CONTROL_PLANE_IPV4), admin_port);
        let (_, text) = node.http_get(admin, "/metrics").unwrap_or_default();
        let series = format!("mesh_ca_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .filter_map(|l| l.strip_prefix(&series))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Starts an agent on every node asking this signer for certificates
    /// of `lifetime`: the node's pods in pods.yaml (files discovery), the
    /// others as workloads, the node's token and the signer's root in its
    /// config directory (nothing else of the CA).
    pub fn start_agents(
        &self,
        roots: &[&Ca],
        lifetime: &str,
        node_extra: &str,
    ) -> Result<Vec<NodeAgent<'t>>> {
        self.start_agents_asking(roots, lifetime, node_extra, |_| CA_PORT)
    }

    /// [`Self::start_agents`], each node asking the replica on `port(node)`.
    pub fn start_agents_asking(
        &self,
        roots: &[&Ca],
        lifetime: &str,
        node_extra: &str,
        port: impl Fn(&Node) -> u16,
    ) -> Result<Vec<NodeAgent<'t>>> {
        let mut agents = Vec::new();
        for node in self.topo.nodes() {
            let (local, remote) = mesh_pods(self.topo, node);
            let config_dir = self
                .topo
                .tmp_dir()
                .join(format!("agent-config-{}", node.name()));
            let node_yaml = format!(
                "{}{node_extra}",
                signing_request_yaml(&config_dir, lifetime, port(node))
            );
            let roots_pem: Vec<&str> = roots.iter().map(|r| r.cert_pem.as_str()).collect();
            agents.push(NodeAgent::start_with(
                self.topo,
                node,
                &pods_yaml(&local),
                &node_yaml,
                &[
                    ("workloads.yaml", workloads_yaml(&remote, None)),
                    ("token", node_token(node)),
                    ("ca-root.crt", roots_pem.join("\n")),
                ],
            )?);
        }
        Ok(agents)
    }

    /// One signing request for `id` sent from inside `node` with `token`,
    /// as an agent would (or an attacker with that token): Ok with the
    /// answer's chain, or the refusal.
    pub fn ask_from(&self, node: &Node, token: &str, id: &SpiffeId) -> Result<Vec<String>> {
        let dir = self.topo.tmp_dir().join("probe");
        std::fs::create_dir_all(&dir)?;
        let token_file = dir.join(format!("token-{}", id.service_account()));
        std::fs::write(&token_file, token)?;
        let roots = self.serving_root.clone().into_bytes();
        let source = SigningRequestSource {
            address: format!("https://{CONTROL_PLANE_IPV4}:{CA_PORT}"),
            // Not read: `requester::channel` is given the roots.
            ca_roots: PathBuf::new(),
            server_name: Some(SERVING_NAME.into()),
            token_file,
            cluster_id: "Kubernetes".into(),
            lifetime: Duration::from_secs(3600),
            renew_at: 0.5,
        };
        let id = id.clone();
        node.in_netns(move || -> Result<Vec<String>> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let channel = requester::channel(&source, &roots)?;
                let (chain, _key) = requester::request(&source, channel, &id).await?;
                Ok(chain)
            })
        })
    }
}

impl Drop for SignerBed<'_> {
    fn drop(&mut self) {
        for mut process in [self.process.take(), self.replica.take()]
            .into_iter()
            .flatten()
        {
            process.kill();
        }
    }
}

pub fn agent_pod_name(node: &Node) -> String {
    format!("mesh-agent-{}", node.name())
}

/// The projected token the model accepts for `node`'s agent pod.
pub fn node_token(node: &Node) -> String {
    format!("token-of-the-agent-on-{}", node.name())
}

/// node.yaml's identity lines for an agent whose config directory is
/// `config_dir` (holding `token` and `ca-root.crt`).
pub fn signing_request_yaml(config_dir: &Path, lifetime: &str, port: u16) -> String {
    format!(
        "identity:\n  signingRequest:\n    address: https://{CONTROL_PLANE_IPV4}:{port}\n    caRoots: {dir}/ca-root.crt\n    serverName: {SERVING_NAME}\n    tokenFile: {dir}/token\n    lifetime: {lifetime}\n",
        dir = config_dir.display()
    )
}

fn write_atomically(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
