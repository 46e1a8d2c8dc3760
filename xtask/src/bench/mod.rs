//! `cargo xtask bench`: the capture (passthrough) path against a direct
//! connection, measured in the same run, alternating, on the test bed.
//!
//! Paths: pod a -> pod b on the same node, and pod a -> pod c on another node.
//! "direct": the agents run but enrol no pod; "agent": a, b and c are enrolled,
//! so a->b is one agent hop (delivered inside b) and a->c is two (out of a's
//! node, into c's). Figures: connection set-up (connect to first byte back, p50)
//! and bulk throughput of one stream. Reported as medians over rounds and as
//! ratios agent/direct.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Node, Pod, Process, Topology, e2e_preflight, wait_until};

use crate::{setup, step};

const SCRIPT: &str = include_str!("bench.py");
const PORT: u16 = 9000;
const ADMIN: &str = "127.0.0.1:15000";

struct Plan {
    rounds: usize,
    setups: u32,
    bulk_mib: u32,
}

pub fn run(workspace: &Path, quick: bool) -> Result<()> {
    e2e_preflight().map_err(|why| anyhow::anyhow!("the benchmark uses the test bed: {why}"))?;
    let plan = if quick {
        Plan {
            rounds: 1,
            setups: 300,
            bulk_mib: 200,
        }
    } else {
        Plan {
            rounds: 5,
            setups: 2000,
            bulk_mib: 1000,
        }
    };
    setup::build_ebpf(workspace)?;
    step("building mesh-agent (release)");
    let agent_bin = setup::build_agent_release(workspace)?;

    let topo = Topology::builder("bench")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()?;
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let _servers: Vec<Process> = [b, c]
        .into_iter()
        .map(start_server)
        .collect::<Result<_>>()?;
    let mut agents = Vec::new();
    for node in topo.nodes() {
        agents.push(start_agent(&agent_bin, node, &topo)?);
    }

    // results[path][mode] = samples
    let paths = [("same node a->b", b), ("across nodes a->c", c)];
    let mut setup_us = vec![[Vec::new(), Vec::new()]; paths.len()];
    let mut mib_s = vec![[Vec::new(), Vec::new()]; paths.len()];
    for round in 0..plan.rounds {
        for (mode, enrolled) in [(0, false), (1, true)] {
            enrol(&topo, enrolled)?;
            for (i, (name, target)) in paths.iter().enumerate() {
                let host = target.ipv4().to_string();
                let out = run_client(
                    a,
                    &["setup", &host, &PORT.to_string(), &plan.setups.to_string()],
                )?;
                setup_us[i][mode].push(field(&out, "p50_us")?);
                let out = run_client(
                    a,
                    &["bulk", &host, &PORT.to_string(), &plan.bulk_mib.to_string()],
                )?;
                mib_s[i][mode].push(field(&out, "mib_per_s")?);
                step(format!(
                    "round {}/{} {:<6} {name}: set-up p50 {:.0} µs, bulk {:.0} MiB/s",
                    round + 1,
                    plan.rounds,
                    if enrolled { "agent" } else { "direct" },
                    setup_us[i][mode].last().unwrap(),
                    mib_s[i][mode].last().unwrap()
                ));
            }
        }
    }
    enrol(&topo, false)?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "Machine: {} cores, kernel {}",
        num_cpus(),
        kernel_release()
    );
    let _ = writeln!(
        table,
        "Rounds: {}, {} set-ups and a {} MiB stream per path, mode and round (medians shown).\n",
        plan.rounds, plan.setups, plan.bulk_mib
    );
    let _ = writeln!(
        table,
        "| path | set-up p50 direct | via agent | ratio | bulk direct | via agent | ratio |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    for (i, (name, _)) in paths.iter().enumerate() {
        let (sd, sa) = (median(&setup_us[i][0]), median(&setup_us[i][1]));
        let (bd, ba) = (median(&mib_s[i][0]), median(&mib_s[i][1]));
        let _ = writeln!(
            table,
            "| {name} | {sd:.0} µs | {sa:.0} µs | {:.2}x | {bd:.0} MiB/s | {ba:.0} MiB/s | {:.2} |",
            sa / sd,
            ba / bd
        );
    }
    println!("\n{table}");
    let out_dir = workspace.join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("capture.md"), &table)?;
    step(format!(
        "written to {}",
        out_dir.join("capture.md").display()
    ));
    drop(agents);
    Ok(())
}

fn start_server(pod: &Pod) -> Result<Process> {
    let server = pod.spawn("python3", &["-c", SCRIPT, "serve", &PORT.to_string()])?;
    wait_until(
        &format!("bench server in {}", pod.name()),
        Duration::from_secs(10),
        || Ok(server.stdout_so_far().contains("ready")),
    )?;
    Ok(server)
}

fn run_client(pod: &Pod, args: &[&str]) -> Result<String> {
    let mut argv = vec!["-c", SCRIPT];
    argv.extend_from_slice(args);
    let out = pod.run("python3", &argv, Duration::from_secs(300))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, name: &str) -> Result<f64> {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().context("value")?.parse().context("number");
        }
    }
    bail!("no {name} in {out:?}")
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn config_dir(topo: &Topology, node: &Node) -> std::path::PathBuf {
    topo.tmp_dir().join(format!("bench-config-{}", node.name()))
}

fn start_agent(bin: &Path, node: &Node, topo: &Topology) -> Result<Process> {
    let dir = config_dir(topo, node);
    std::fs::create_dir_all(&dir)?;
    let pin_dir = topo.bpffs_dir().join(node.name());
    std::fs::write(
        dir.join("node.yaml"),
        format!(
            "name: {}\nadminAddress: {ADMIN}\npinDir: {}\n",
            node.name(),
            pin_dir.display()
        ),
    )?;
    std::fs::write(dir.join("pods.yaml"), "pods: []\n")?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&dir)
        .env("MESH_LOG", "warn");
    let mut agent = node.spawn_with(cmd)?;
    wait_until(
        &format!("the agent on {}", node.name()),
        Duration::from_secs(20),
        || {
            if let Some(status) = agent.try_status()? {
                bail!("the agent exited with {status}");
            }
            Ok(node
                .http_get(ADMIN.parse()?, "/readyz")
                .map(|(c, _)| c == 200)
                .unwrap_or(false))
        },
    )
    .with_context(|| agent.stderr_so_far())?;
    Ok(agent)
}

/// Enrols all pods of every node, or none, and waits until the agents agree.
fn enrol(topo: &Topology, enrolled: bool) -> Result<()> {
    for node in topo.nodes() {
        let mut pods = String::from("pods:\n");
        if enrolled {
            for pod in node.pods() {
                let _ = write!(
                    pods,
                    "  - name: {}\n    namespace: bench\n    ipv4: {}\n    ipv6: \"{}\"\n    netns: {}\n    cgroup: {}\n",
                    pod.name(),
                    pod.ipv4(),
                    pod.ipv6(),
                    pod.netns_path().display(),
                    pod.cgroup_dir().display()
                );
            }
        } else {
            pods.push_str("  []\n");
        }
        let dir = config_dir(topo, node);
        std::fs::write(dir.join(".pods.tmp"), pods)?;
        std::fs::rename(dir.join(".pods.tmp"), dir.join("pods.yaml"))?;
        let want = if enrolled { node.pods().len() } else { 0 };
        wait_until(
            &format!("{want} pods enrolled on {}", node.name()),
            Duration::from_secs(10),
            || {
                let (_, body) = node.http_get(ADMIN.parse()?, "/status")?;
                let status: serde_json::Value = serde_json::from_str(&body)?;
                let enrolled = status["pods"]
                    .as_array()
                    .map_or(0, |p| p.iter().filter(|p| p["enrolled"] == true).count());
                let total = status["pods"].as_array().map_or(0, |p| p.len());
                Ok(enrolled == want && total == want)
            },
        )?;
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
