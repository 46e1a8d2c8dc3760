//! `cargo xtask bench --compare <git revision>`: this tree's agent against
//! another revision's, on the agent paths (same node; across nodes, mTLS
//! L4; mTLS + L7), interleaved in one sitting. Each round runs both agents
//! one after the other, in alternating order (A B, B A, ...), so what drifts
//! on a shared machine (another job, CPU frequency, steal) falls on both;
//! the direct paths are measured every round as the drift's witness.
//! Output: target/bench/compare.md.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{
    Bed, Mode, PATHS, Sample, Tools, build_tools, measure, median, plan, set_mode, set_policies,
    start_agent,
};
use crate::{setup, step};

/// The modes compared (the fast path is kernel work, the same for both).
const MODES: [Mode; 3] = [Mode::Passthrough, Mode::Mtls, Mode::MtlsL7];

pub fn run(workspace: &Path, revision: &str, rounds: usize) -> Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let plan = plan(true);
    let (tools, http_serve) = build_tools(workspace)?;
    let other = build_revision(workspace, revision)
        .with_context(|| format!("building the agent of {revision}"))?;
    let binaries = [("this tree", tools.agent.clone()), (revision, other)];
    let ca = crate::pki::BenchCa::new().context("the bench CA")?;
    let bed = Bed::build(&http_serve, &ca).context("the test bed")?;
    let topo = &bed.topo;
    let a = topo.pod("a");
    // samples[binary][path index]; direct paths under binary 0 only.
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); PATHS.len()]; 2];
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (label, binary) = &binaries[which];
            let agents = topo
                .nodes()
                .iter()
                .map(|node| start_agent(binary, node, topo, &bed.pki, ""))
                .collect::<Result<Vec<_>>>()?;
            if which == 0 {
                // The direct paths (agents up, enrolling nothing): the
                // drift's witness, once a round.
                set_mode(topo, Mode::Direct)?;
                for (i, path) in PATHS
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.mode == Mode::Direct)
                {
                    let sample = measure(&plan, &tools, a, topo.pod(path.target), path, &[])?;
                    step(format!(
                        "round {}/{rounds} {}: p50 {:.0} µs, saturation {:.0} req/s",
                        round + 1,
                        path.name,
                        sample.p50_us,
                        sample.saturation_rps
                    ));
                    samples[0][i].push(sample);
                }
            }
            let pids: Vec<u32> = agents.iter().map(|p| p.pid()).collect();
            for mode in MODES {
                set_mode(topo, mode)?;
                set_policies(topo, topo.node("n2"), mode == Mode::MtlsL7)?;
                for (i, path) in PATHS.iter().enumerate().filter(|(_, p)| p.mode == mode) {
                    let tools = Tools {
                        agent: binary.clone(),
                        http_load: tools.http_load.clone(),
                        ca_load: tools.ca_load.clone(),
                    };
                    let sample = measure(&plan, &tools, a, topo.pod(path.target), path, &pids)?;
                    step(format!(
                        "round {}/{rounds} [{label}] {}: p50 {:.0} µs, saturation {:.0} req/s, {:.3} CPU s/1k req",
                        round + 1,
                        path.name,
                        sample.p50_us,
                        sample.saturation_rps,
                        sample.agent_cpu_s_per_1k
                    ));
                    samples[which][i].push(sample);
                }
            }
            set_policies(topo, topo.node("n2"), false)?;
            drop(agents);
        }
    }
    let table = report(
        &binaries.map(|(label, _)| label.to_string()),
        &samples,
        rounds,
    );
    println!("\n{table}");
    let out_dir = workspace.join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("compare.md"), &table)?;
    step(format!(
        "written to {}",
        out_dir.join("compare.md").display()
    ));
    Ok(())
}

/// A figure's name and how to read it from a sample.
type Figure = (&'static str, fn(&Sample) -> f64);

fn report(labels: &[String; 2], samples: &[Vec<Vec<Sample>>], rounds: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Agent paths, `{}` against `{}`, {rounds} rounds interleaved (A B, B A, ...); each round as `--quick`. Medians over rounds; per-round values in order. Ratio: {} / {}.\n",
        labels[0], labels[1], labels[0], labels[1]
    );
    let _ = writeln!(
        t,
        "| path | figure | {} | {} | ratio | rounds ({}) | rounds ({}) |",
        labels[0], labels[1], labels[0], labels[1]
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    let figures: [Figure; 4] = [
        ("p50 µs", |s| s.p50_us),
        ("p99 µs", |s| s.p99_us),
        ("saturation req/s", |s| s.saturation_rps),
        ("agent CPU s / 1k req", |s| s.agent_cpu_s_per_1k),
    ];
    for (i, path) in PATHS.iter().enumerate() {
        let direct = path.mode == Mode::Direct;
        if !direct && !MODES.contains(&path.mode) {
            continue;
        }
        for (name, figure) in figures {
            if direct && name.starts_with("agent") {
                continue;
            }
            let values = |which: usize| samples[which][i].iter().map(figure).collect::<Vec<f64>>();
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(" · ")
            };
            let this = values(0);
            if direct {
                let _ = writeln!(
                    t,
                    "| {} | {name} | {:.3} | | | {} | |",
                    path.name,
                    median(&this),
                    list(&this)
                );
                continue;
            }
            let other = values(1);
            let _ = writeln!(
                t,
                "| {} | {name} | {:.3} | {:.3} | {:.3} | {} | {} |",
                path.name,
                median(&this),
                median(&other),
                median(&this) / median(&other),
                list(&this),
                list(&other)
            );
        }
    }
    t
}

/// The release agent of `revision`, built in a worktree under
/// target/bench-compare (its own target directory, kept between runs).
fn build_revision(workspace: &Path, revision: &str) -> Result<PathBuf> {
    let commit = git(
        workspace,
        &["rev-parse", "--verify", &format!("{revision}^{{commit}}")],
    )
    .with_context(|| format!("{revision:?} is not a revision of this repository"))?;
    let dir = workspace.join("target/bench-compare").join(&commit[..12]);
    if !dir.join(".git").exists() {
        std::fs::create_dir_all(dir.parent().expect("a parent"))?;
        git(
            workspace,
            &[
                "worktree",
                "add",
                "--detach",
                &dir.to_string_lossy(),
                &commit,
            ],
        )?;
    }
    // The kernel toolchain (bpf-linker) installed for this tree serves both.
    let tools = dir.join(".tools");
    if !tools.exists() && workspace.join(".tools").exists() {
        std::os::unix::fs::symlink(workspace.join(".tools"), &tools)?;
    }
    step(format!(
        "building the agent of {revision} ({}) in {}",
        &commit[..12],
        dir.display()
    ));
    setup::build_ebpf(&dir)?;
    setup::build_agent_release(&dir)
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("git").current_dir(dir).args(args).output()?;
    if !output.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
