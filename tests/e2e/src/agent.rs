//! The agent under test, started in a node of the test bed.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_agent::state::{PodCountersView, StatusReport};
use mesh_testbed::{Node, Pod, Process, wait_until};
use nix::sys::signal::Signal;

/// Where every test agent listens for admin requests, inside its node's netns.
pub const ADMIN: &str = "127.0.0.1:15000";

pub struct RunningAgent<'t> {
    node: &'t Node,
    process: Process,
    config_dir: PathBuf,
}

impl<'t> RunningAgent<'t> {
    /// Writes a config directory enrolling `pods` (plus `extra_pods_yaml`, raw
    /// entries appended to the pods list), starts the agent in `node` and waits
    /// until it is ready.
    pub fn start(
        binary: &str,
        node: &'t Node,
        pods: &[&Pod],
        extra_pods_yaml: &str,
    ) -> Result<Self> {
        let config_dir = write_config(node, pods, extra_pods_yaml)?;
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("run")
            .arg("--config")
            .arg(&config_dir)
            .env("MESH_LOG", "info,mesh_ebpf=debug");
        let process = node.spawn_with(cmd)?;
        let mut agent = Self {
            node,
            process,
            config_dir,
        };
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let admin: SocketAddr = ADMIN.parse()?;
        let Self { node, process, .. } = self;
        let result = wait_until("the agent to report ready on /readyz", deadline, || {
            if let Some(status) = process.try_status()? {
                bail!("the agent exited with {status} before it was ready");
            }
            Ok(node
                .http_get(admin, "/readyz")
                .map(|(code, _)| code == 200)
                .unwrap_or(false))
        });
        result.with_context(|| format!("agent log:\n{}", self.log()))
    }

    /// The agent's log so far (stderr), for failure messages.
    pub fn log(&self) -> String {
        self.process.stderr_so_far()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        self.node.http_get(ADMIN.parse()?, path)
    }

    pub fn status(&self) -> Result<StatusReport> {
        let (code, body) = self.get("/status")?;
        if code != 200 {
            bail!("/status answered {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("parsing /status: {body}"))
    }

    /// The kernel counters of an enrolled pod, as the agent reports them.
    pub fn counters(&self, pod: &Pod) -> Result<PodCountersView> {
        let status = self.status()?;
        let entry = status
            .pods
            .iter()
            .find(|p| p.name == pod.name())
            .with_context(|| format!("pod {} is not in the agent's status", pod.name()))?;
        entry.counters.with_context(|| {
            format!(
                "pod {} has no counters (not enrolled?): {:?}",
                pod.name(),
                entry.error
            )
        })
    }

    /// Sends a signal and waits for a clean exit; returns the agent's log.
    pub fn stop(mut self, signal: Signal, deadline: Duration) -> Result<String> {
        self.process.signal(signal)?;
        let out = self.process.wait_with_deadline(deadline)?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned() + &self.process.stderr_so_far();
        if !out.status.success() {
            bail!(
                "the agent exited with {} after {signal:?}; log:\n{log}",
                out.status
            );
        }
        Ok(log)
    }
}

impl Drop for RunningAgent<'_> {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// The pods file entry of a test-bed pod.
pub fn pod_yaml(pod: &Pod) -> String {
    format!(
        "  - name: {}\n    namespace: default\n    serviceAccount: {}\n    labels: {{app: {}}}\n    ipv4: {}\n    ipv6: \"{}\"\n    netns: {}\n    cgroup: {}\n",
        pod.name(),
        pod.name(),
        pod.name(),
        pod.ipv4(),
        pod.ipv6(),
        pod.netns_path().display(),
        pod.cgroup_dir().display()
    )
}

fn write_config(node: &Node, pods: &[&Pod], extra_pods_yaml: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("mesh-e2e").join(format!(
        "{}-{}",
        node.netns_name(),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("node.yaml"),
        format!("name: {}\nadminAddress: {ADMIN}\n", node.name()),
    )?;
    let mut pods_yaml = String::from("pods:\n");
    for pod in pods {
        pods_yaml.push_str(&pod_yaml(pod));
    }
    let _ = write!(pods_yaml, "{extra_pods_yaml}");
    std::fs::write(dir.join("pods.yaml"), pods_yaml)?;
    Ok(dir)
}
