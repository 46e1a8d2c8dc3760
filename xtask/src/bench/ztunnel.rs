//! Istio's ztunnel on the benchmark's topology, as the incumbent to measure
//! the agent against: one ztunnel per side in dedicated mode (in the
//! client pod a and in the server pod c), both minting from its `FAKE_CA`
//! test root, with a local XDS file describing a and c as HBONE workloads.
//!
//! ztunnel does not capture by itself. Its client side is reached through
//! the SOCKS5 listener ztunnel offers for that (`UNSTABLE_ENABLE_SOCKS5`,
//! [`SOCKS5`]): the load client connects there and names c. No packet
//! filter is involved, for ztunnel or the agent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};
use mesh_testbed::{Pod, Process, wait_until};

/// ztunnel's mark on its own sockets (required in dedicated mode).
const PACKET_MARK: u32 = 1337;
/// ztunnel's SOCKS5 listener, in the client pod.
pub const SOCKS5: &str = "127.0.0.1:15080";

/// `ZTUNNEL_BIN`, else `../shared/peer/ztunnel` beside the workspace.
pub fn binary(workspace: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("ZTUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("../shared/peer/ztunnel"));
    path.is_file().then_some(path)
}

/// The two ztunnels of the path; stopped on drop.
pub struct Pair {
    processes: Vec<Process>,
}

impl Pair {
    /// Starts ztunnel in `client` (with its SOCKS5 listener) and in
    /// `server`, and waits until both are ready.
    pub fn start(binary: &Path, dir: &Path, client: &Pod, server: &Pod) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let xds = dir.join("local-xds.yaml");
        std::fs::write(&xds, local_xds(&[(client, "n1"), (server, "n2")]))?;
        let mut pair = Pair {
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
                .env("UNSTABLE_ENABLE_SOCKS5", "true")
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
        Ok(pair)
    }

    /// The ztunnels' PIDs (for CPU, RSS and context switches).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::pid).collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for process in &mut self.processes {
            process.kill();
        }
    }
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
