//! Istio's ztunnel on the benchmark's topology, as the incumbent to measure
//! the agent against: one ztunnel per side in dedicated mode (in the
//! client pod a and in the server pod c), both minting from its `FAKE_CA`
//! test root, with a local XDS file describing a and c as HBONE workloads.
//!
//! ztunnel does not capture by itself. Its client side is captured the way
//! ztunnel's own docs describe for dedicated mode: an iptables `nat OUTPUT`
//! REDIRECT to its 15001 in pod a, for traffic to c only, excluding the
//! packets ztunnel marks itself (`PACKET_MARK`). This concerns the peer
//! only: the agent never uses packet-filter rules. The rule goes with a's
//! namespace at the end of the run, and is removed when this path ends.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Pod, Process, wait_until};

/// ztunnel's mark on its own sockets, excluded from the redirect.
const PACKET_MARK: u32 = 1337;

/// `ZTUNNEL_BIN`, else `../shared/peer/ztunnel` beside the workspace.
pub fn binary(workspace: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("ZTUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("../shared/peer/ztunnel"));
    path.is_file().then_some(path)
}

/// The two ztunnels of the path; stopped (and a's redirect removed) on drop.
pub struct Pair<'t> {
    client: &'t Pod,
    processes: Vec<Process>,
}

impl<'t> Pair<'t> {
    /// Starts ztunnel in `client` and in `server`, ready, with `client`'s
    /// traffic to `server` redirected to its ztunnel.
    pub fn start(binary: &Path, dir: &Path, client: &'t Pod, server: &Pod) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let xds = dir.join("local-xds.yaml");
        std::fs::write(&xds, local_xds(&[(client, "n1"), (server, "n2")]))?;
        let mut pair = Pair {
            client,
            processes: Vec::new(),
        };
        for pod in [client, server] {
            let mut cmd = Command::new(binary);
            cmd.arg("proxy")
                .current_dir(dir)
                .env("FAKE_CA", "true")
                .env("XDS_ADDRESS", "")
                .env("LOCAL_XDS_PATH", &xds)
                .env("PROXY_MODE", "dedicated")
                .env(
                    "PROXY_WORKLOAD_INFO",
                    format!("default/{0}/{0}", pod.name()),
                )
                .env("NODE_NAME", pod.node_name())
                .env("PACKET_MARK", PACKET_MARK.to_string())
                .env("ENABLE_ORIG_SRC", "false")
                .env("RUST_LOG", "warn");
            let mut process = pod.spawn_with(cmd)?;
            let ready = wait_until(
                &format!("ztunnel in {} to be ready", pod.name()),
                Duration::from_secs(30),
                || {
                    if let Some(status) = process.try_status()? {
                        bail!("ztunnel exited with {status}");
                    }
                    Ok(pod
                        .run(
                            "curl",
                            &["-sf", "http://127.0.0.1:15021/healthz/ready"],
                            Duration::from_secs(5),
                        )
                        .is_ok())
                },
            );
            if let Err(e) = ready {
                bail!("{e:#}\n{}", process.output_report());
            }
            pair.processes.push(process);
        }
        let rule = redirect_rule(server);
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        client
            .run("iptables", &args, Duration::from_secs(10))
            .context("redirecting a's traffic to c into its ztunnel (iptables)")?;
        Ok(pair)
    }

    /// The ztunnels' PIDs (for CPU, RSS and context switches).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::pid).collect()
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        let _ = self.client.run(
            "iptables",
            &["-t", "nat", "-F", "OUTPUT"],
            Duration::from_secs(10),
        );
        for process in &mut self.processes {
            process.kill();
        }
    }
}

/// `iptables -t nat -A OUTPUT ...`: a's TCP to `server`, but ztunnel's
/// own (marked) packets, to ztunnel's outbound port.
fn redirect_rule(server: &Pod) -> Vec<String> {
    [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &server.ipv4().to_string(),
        "-m",
        "mark",
        "!",
        "--mark",
        &format!("0x{PACKET_MARK:x}/0xfff"),
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]
    .into_iter()
    .map(str::to_string)
    .collect()
}

/// ztunnel's local XDS file: the pods as HBONE workloads of their nodes.
fn local_xds(pods: &[(&Pod, &str)]) -> String {
    let mut xds = String::from("workloads:\n");
    for (pod, node) in pods {
        xds.push_str(&format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            name = pod.name(),
            ip = pod.ipv4(),
        ));
    }
    xds.push_str("services: []\npolicies: []\n");
    xds
}
