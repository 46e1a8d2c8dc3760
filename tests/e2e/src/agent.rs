//! The agent under test, run in a node of the test bed, with a config directory
//! that outlives any one agent process (so tests can stop, kill and restart it).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_agent::{
    proxy::connections::ConnectionRecord,
    state::{PodCountersView, StatusReport},
};
use mesh_testbed::{Node, Pod, Process, Topology, wait_until};
use nix::sys::signal::Signal;

/// Where every test agent listens for admin requests, inside its node's netns.
pub const ADMIN: &str = "127.0.0.1:15000";
/// The agent binary built from the same sources as the tests: cargo builds a
/// package's binaries before its integration tests, next to their `deps/` dir.
pub fn agent_binary() -> PathBuf {
    package_binary("mesh-agent-e2e")
}

/// The CNI plugin built from the same sources as the tests.
pub fn cni_plugin_binary() -> PathBuf {
    package_binary("mesh-cni-e2e")
}

fn package_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join(name);
    assert!(
        binary.is_file(),
        "{} is missing: run the tests with cargo (`cargo xtask test`)",
        binary.display()
    );
    binary
}

/// The pods file entry of a test-bed pod; `extra` is appended (indented fields
/// such as `    captureExclusions: {...}\n`).
pub fn pod_yaml(pod: &Pod, extra: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: default\n    serviceAccount: {name}\n    labels: {{app: {name}}}\n    ipv4: {}\n    ipv6: \"{}\"\n    netns: {}\n    cgroup: {}\n{extra}",
        pod.ipv4(),
        pod.ipv6(),
        pod.netns_path().display(),
        pod.cgroup_dir().display(),
        name = pod.name(),
    )
}

/// `pods:` followed by the entries of `pods`.
pub fn pods_yaml(pods: &[&Pod]) -> String {
    let mut yaml = String::from("pods:\n");
    for pod in pods {
        yaml.push_str(&pod_yaml(pod, ""));
    }
    yaml
}

/// A node's agent: its config directory, and the running process if any.
pub struct NodeAgent<'t> {
    node: &'t Node,
    config_dir: PathBuf,
    process: Option<Process>,
    /// RLIMIT_NOFILE (soft and hard) the agent is started with, if set.
    open_file_limit: Option<u64>,
    /// Environment variables agents started from now on get.
    env: Vec<(String, String)>,
}

impl<'t> NodeAgent<'t> {
    /// Writes the config (pins under the topology's bpffs dir; `node_extra` adds
    /// node.yaml lines) and starts the agent, waiting until it is ready.
    pub fn start(
        topo: &Topology,
        node: &'t Node,
        pods_yaml: &str,
        node_extra: &str,
    ) -> Result<Self> {
        Self::start_with(topo, node, pods_yaml, node_extra, &[])
    }

    /// Like [`Self::start`], also writing `extra_files` (name, content) into the
    /// config directory (e.g. workloads.yaml).
    pub fn start_with(
        topo: &Topology,
        node: &'t Node,
        pods_yaml: &str,
        node_extra: &str,
        extra_files: &[(&str, String)],
    ) -> Result<Self> {
        let mut agent = Self::configure(topo, node, pods_yaml, node_extra, extra_files)?;
        agent.restart()?;
        Ok(agent)
    }

    /// Writes the config as [`Self::start_with`] does, without starting an
    /// agent.
    pub fn configure(
        topo: &Topology,
        node: &'t Node,
        pods_yaml: &str,
        node_extra: &str,
        extra_files: &[(&str, String)],
    ) -> Result<Self> {
        let config_dir = topo.tmp_dir().join(format!("agent-config-{}", node.name()));
        std::fs::create_dir_all(&config_dir)?;
        let pin_dir = topo.bpffs_dir().join(node.name());
        std::fs::write(
            config_dir.join("node.yaml"),
            format!(
                "name: {}\nadminAddress: {ADMIN}\npinDir: {}\n{node_extra}",
                node.name(),
                pin_dir.display()
            ),
        )?;
        std::fs::write(config_dir.join("pods.yaml"), pods_yaml)?;
        for (name, content) in extra_files {
            let path = config_dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        Ok(Self {
            node,
            config_dir,
            process: None,
            open_file_limit: None,
            env: Vec::new(),
        })
    }

    /// Agents started from now on may open at most `limit` file descriptors
    /// (soft and hard RLIMIT_NOFILE, so the agent cannot raise it).
    pub fn limit_open_files(&mut self, limit: u64) {
        self.open_file_limit = Some(limit);
    }

    /// Agents started from now on get `key=value` in their environment.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts the agent process without waiting for it to be ready.
    pub fn start_process(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("the agent is still running");
        }
        self.process = Some(self.spawn()?);
        Ok(())
    }

    /// Enrols `pods` with default settings.
    pub fn enrolling(topo: &Topology, node: &'t Node, pods: &[&Pod]) -> Result<Self> {
        Self::start(topo, node, &pods_yaml(pods), "")
    }

    /// Starts an agent process (again) with the same config and waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("the agent is still running");
        }
        self.process = Some(self.spawn()?);
        self.wait_ready(Duration::from_secs(20))
    }

    fn spawn(&self) -> Result<Process> {
        let mut cmd = std::process::Command::new(agent_binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_dir)
            // MESH_E2E_AGENT_LOG: a finer filter while chasing a failure.
            .env(
                "MESH_LOG",
                std::env::var("MESH_E2E_AGENT_LOG")
                    .unwrap_or_else(|_| "info,mesh_ebpf=debug".to_owned()),
            );
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(limit) = self.open_file_limit {
            use std::os::unix::process::CommandExt;
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `rlimit`.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        self.node.spawn_with(cmd)
    }

    /// Starts a new agent process next to the running one, as a rolling
    /// update does, and waits until it has taken over (the old one handed
    /// its listeners over). From then on this handle is the new agent; the
    /// old process is returned, still running (draining, then waiting for
    /// SIGTERM), to be stopped with [`RetiredAgent::stop`].
    pub fn replace(&mut self) -> Result<RetiredAgent> {
        let mut old = self.process.take().context("the agent is not running")?;
        let mut new = self.spawn()?;
        let waited = wait_until(
            "the new agent to take over",
            Duration::from_secs(30),
            || {
                if let Some(status) = new.try_status()? {
                    bail!("the new agent exited with {status}");
                }
                Ok(new.stderr_so_far().contains(TOOK_OVER))
            },
        );
        if let Err(err) = waited {
            let log = new.stderr_so_far();
            new.kill();
            self.process = Some(old);
            return Err(err.context(format!("new agent log:\n{log}")));
        }
        if let Some(status) = old.try_status()? {
            bail!("the old agent exited ({status}) during the handover");
        }
        self.process = Some(new);
        Ok(RetiredAgent { process: old })
    }

    /// Waits until `/readyz` answers 200 (the process must keep running).
    pub fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let admin: SocketAddr = ADMIN.parse()?;
        let node = self.node;
        let process = self.process.as_mut().expect("started");
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

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Replaces pods.yaml atomically (write, then rename), as a ConfigMap update
    /// would.
    pub fn write_pods(&self, pods_yaml: &str) -> Result<()> {
        let tmp = self.config_dir.join(".pods.yaml.tmp");
        std::fs::write(&tmp, pods_yaml)?;
        std::fs::rename(&tmp, self.config_dir.join("pods.yaml"))?;
        Ok(())
    }

    /// Writes `relative` (e.g. `policies/allow.yaml`) in the config directory
    /// atomically, creating directories as needed.
    pub fn write_file(&self, relative: &str, content: &str) -> Result<()> {
        let path = self.config_dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Waits until the agent has applied a configuration newer than `generation`.
    pub fn wait_generation_after(&self, generation: u64) -> Result<()> {
        wait_until(
            "the agent to apply the new configuration",
            Duration::from_secs(5),
            || Ok(self.status()?.config_generation > generation),
        )
    }

    /// The agent's log so far (stderr), for failure messages.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stderr_so_far())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        self.node.http_get(ADMIN.parse()?, path)
    }

    /// The sum of a metric's series whose labels include `labels`, from
    /// `/metrics`.
    pub fn metric_sum(&self, metric: &str, labels: &[(&str, &str)]) -> u64 {
        let (_, text) = self.get("/metrics").unwrap_or_default();
        text.lines()
            .filter(|line| line.split(['{', ' ']).next() == Some(metric))
            .filter(|line| {
                labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// `/metrics`, checked line by line with a Prometheus text-format
    /// parser: every sample line must parse (the parser skips what it does
    /// not understand, so the samples it returns are counted against the
    /// lines), and every family must have its HELP and TYPE.
    pub fn scrape_valid_metrics(&self) -> Result<prometheus_parse::Scrape> {
        let (code, text) = self.get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines)
            .with_context(|| format!("parsing /metrics:\n{text}"))?;
        let sample_lines = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count();
        let parsed: usize = scrape
            .samples
            .iter()
            // A histogram's `_sum` and `_count` come back as samples of
            // their own; its buckets as one sample.
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => buckets.len(),
                prometheus_parse::Value::Summary(quantiles) => quantiles.len(),
                _ => 1,
            })
            .sum();
        if parsed != sample_lines {
            bail!("{sample_lines} sample lines, {parsed} parsed:\n{text}");
        }
        for sample in &scrape.samples {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.metric.strip_suffix(suffix))
                .filter(|base| scrape.docs.contains_key(*base))
                .unwrap_or(&sample.metric);
            if !scrape.docs.contains_key(family) {
                bail!("{} has no HELP line", sample.metric);
            }
            if !text.contains(&format!("# TYPE {family} ")) {
                bail!("{family} has no TYPE line");
            }
        }
        Ok(scrape)
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

    /// Connections the agent proxied (most recent last).
    pub fn connections(&self) -> Result<Vec<ConnectionRecord>> {
        let (code, body) = self.get("/debug/connections")?;
        if code != 200 {
            bail!("/debug/connections answered {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("parsing /debug/connections: {body}"))
    }

    /// Waits until the agent has recorded a finished connection matching `pred`.
    pub fn wait_for_connection(
        &self,
        what: &str,
        pred: impl Fn(&ConnectionRecord) -> bool,
    ) -> Result<ConnectionRecord> {
        let mut found = None;
        wait_until(what, Duration::from_secs(10), || {
            found = self.connections()?.into_iter().find(|c| pred(c));
            Ok(found.is_some())
        })
        .with_context(|| {
            format!(
                "connections seen: {:#?}",
                self.connections().unwrap_or_default()
            )
        })?;
        Ok(found.expect("found"))
    }

    /// Sends a signal and waits for a clean exit; returns the agent's log.
    pub fn stop(&mut self, signal: Signal) -> Result<String> {
        let mut process = self.process.take().context("the agent is not running")?;
        process.signal(signal)?;
        let out = process.wait_with_deadline(Duration::from_secs(10))?;
        let log = process.stderr_so_far();
        fail_on_panic(&log);
        if !out.status.success() {
            bail!(
                "the agent exited with {} after {signal:?}; log:\n{log}",
                out.status
            );
        }
        Ok(log)
    }

    /// Waits for the agent to exit on its own (after a signal sent with
    /// [`Self::signal`]); its log. Fails if it exits with an error.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<String> {
        let mut process = self.process.take().context("the agent is not running")?;
        let out = process.wait_with_deadline(deadline)?;
        let log = process.stderr_so_far();
        fail_on_panic(&log);
        if !out.status.success() {
            bail!("the agent exited with {}; log:\n{log}", out.status);
        }
        Ok(log)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) -> Result<()> {
        let mut process = self.process.take().context("the agent is not running")?;
        process.kill();
        fail_on_panic(&process.stderr_so_far());
        Ok(())
    }

    /// SIGSTOP / SIGCONT: the agent is there but does nothing.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.process
            .as_ref()
            .context("the agent is not running")?
            .signal(signal)
    }
}

/// What the new agent logs once the old one has handed over.
const TOOK_OVER: &str = "took over from the previous agent";

/// An agent that handed over to a new one.
pub struct RetiredAgent {
    process: Process,
}

impl RetiredAgent {
    /// Sends SIGTERM (as Kubernetes does to the old pod) and waits for a
    /// clean exit; its log.
    pub fn stop(mut self, deadline: Duration) -> Result<String> {
        self.process.signal(Signal::SIGTERM)?;
        let out = self.process.wait_with_deadline(deadline)?;
        let log = self.process.stderr_so_far();
        if !out.status.success() {
            bail!("the old agent exited with {}; log:\n{log}", out.status);
        }
        Ok(log)
    }

    pub fn log(&self) -> String {
        self.process.stderr_so_far()
    }
}

impl Drop for RetiredAgent {
    fn drop(&mut self) {
        self.process.kill();
        fail_on_panic(&self.process.stderr_so_far());
    }
}

impl Drop for NodeAgent<'_> {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.signal(Signal::SIGCONT);
            process.kill();
            fail_on_panic(&process.stderr_so_far());
        }
    }
}

/// Every test fails if its agent panicked, whatever else it checked.
fn fail_on_panic(log: &str) {
    if !std::thread::panicking() && log.contains("panicked at") {
        panic!("the agent panicked; its log:\n{log}");
    }
}
