//! The DNS part of the bench: dnsmasq in a pod as the resolver, and a
//! service for the agent to answer by name.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use mesh_testbed::{Node, Pod, Process, Topology, wait_until};

/// (row, name looked up).
pub const NAMES: [(&str, &str); 2] = [
    (
        "a name the resolver answers (forwarded by the agent)",
        "other.example",
    ),
    (
        "a mesh service's name (answered by the agent; direct: NXDOMAIN from dnsmasq)",
        "web.bench.svc.cluster.local",
    ),
];

const SERVICES: &str = "services:\n  - name: web\n    namespace: bench\n    vips: [10.96.0.10]\n    ports: [{port: 80}]\n";

/// dnsmasq on port 53 of `pod`: `other.example` answered, NXDOMAIN for the
/// rest of `cluster.local`, no logging (it would cost more than the lookup).
pub fn start_dnsmasq(pod: &Pod) -> Result<Process> {
    let listen = format!("--listen-address={}", pod.ipv4());
    let mut process = pod.spawn(
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            &listen,
            "--address=/other.example/192.0.2.10",
            "--local=/cluster.local/",
        ],
    )?;
    let started = wait_until("dnsmasq", Duration::from_secs(10), || {
        if let Some(status) = process.try_status()? {
            anyhow::bail!("dnsmasq exited ({status})");
        }
        Ok(process.stderr_so_far().contains("started, version"))
    });
    started.with_context(|| process.output_report())?;
    Ok(process)
}

/// A service named `web` in every node's configuration.
pub fn write_services(topo: &Topology, dir: impl Fn(&Node) -> PathBuf) -> Result<()> {
    for node in topo.nodes() {
        let dir = dir(node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("services.yaml"), SERVICES)
            .with_context(|| format!("writing {}", dir.join("services.yaml").display()))?;
    }
    Ok(())
}

pub fn remove_services(topo: &Topology, dir: impl Fn(&Node) -> PathBuf) -> Result<()> {
    for node in topo.nodes() {
        let _ = std::fs::remove_file(dir(node).join("services.yaml"));
    }
    Ok(())
}
