//! The agent in a test-bed node, as the demo and the benchmark run it.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Node, Process, Topology, wait_until};

/// Where every agent of the test bed serves its admin API (in its node's netns).
pub const ADMIN: &str = "127.0.0.1:15000";

/// What goes into an agent's config directory besides node.yaml.
pub struct AgentConfig<'a> {
    pub dir: &'a Path,
    pub pods_yaml: &'a str,
    /// Other files (name, content), e.g. workloads.yaml.
    pub extra_files: &'a [(&'a str, String)],
    /// The agent's log filter.
    pub log: &'a str,
    /// Extra node.yaml lines (e.g. `fastPath: ...`).
    pub node_extra: &'a str,
    /// Extra lines of the `identity.issuer` block, indented (e.g.
    /// `    lifetime: 2m`).
    pub issuer_extra: &'a str,
    /// A whole `identity:` block instead of the issuer one (e.g. asking a
    /// signer: `identity:\n  signingRequest: ...`).
    pub identity: Option<&'a str>,
}

/// Writes the config directory: node.yaml (pins under the test bed's bpffs
/// dir, which teardown removes; detach on stop; certificates minted from the
/// CA in `pki`), pods.yaml and the extra files; starts the agent in `node` and
/// waits until it is ready.
pub fn start(
    bin: &Path,
    topo: &Topology,
    node: &Node,
    pki: &Path,
    config: &AgentConfig<'_>,
) -> Result<Process> {
    let AgentConfig {
        dir: config_dir,
        pods_yaml,
        extra_files,
        log,
        node_extra,
        issuer_extra,
        identity,
    } = *config;
    std::fs::create_dir_all(config_dir)?;
    let pin_dir = topo.bpffs_dir().join(node.name());
    let identity = match identity {
        Some(block) => block.to_string(),
        None => format!(
            "identity:\n  issuer:\n    cert: {}\n    key: {}\n{issuer_extra}",
            pki.join("ca.crt").display(),
            pki.join("ca.key").display()
        ),
    };
    std::fs::write(
        config_dir.join("node.yaml"),
        format!(
            "name: {}\nadminAddress: {ADMIN}\npinDir: {}\nonStop: release\n{identity}{node_extra}",
            node.name(),
            pin_dir.display(),
        ),
    )?;
    std::fs::write(config_dir.join("pods.yaml"), pods_yaml)?;
    for (name, content) in extra_files {
        std::fs::write(config_dir.join(name), content)?;
    }
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(config_dir)
        .env("MESH_LOG", log);
    let mut agent = node.spawn_with(cmd)?;
    let admin: SocketAddr = ADMIN.parse()?;
    wait_until(
        &format!("the agent on {} to be ready", node.name()),
        Duration::from_secs(20),
        || {
            if let Some(status) = agent.try_status()? {
                bail!("the agent exited with {status}");
            }
            Ok(node
                .http_get(admin, "/readyz")
                .map(|(code, _)| code == 200)
                .unwrap_or(false))
        },
    )
    .with_context(|| format!("agent log:\n{}", agent.stderr_so_far()))?;
    Ok(agent)
}
