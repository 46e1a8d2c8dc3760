//! The DNS part of the bench: dnsmasq in a pod as the resolver, and a
//! service for the agent to answer by name.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mesh_testbed::{Node, Pod, Topology, dnsmasq::Dnsmasq};

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
pub fn start_dnsmasq(pod: &Pod) -> Result<Dnsmasq> {
    Dnsmasq::start(
        pod,
        53,
        false,
        &[
            "--address=/other.example/192.0.2.10",
            "--local=/cluster.local/",
        ],
    )
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
