//! The kernel matrix (`cargo xtask test --kernel <6.1|6.12|host|all>`): the
//! kernel-facing part of the suite, the smoke set below, on Debian's
//! long-term kernels, each booted under QEMU with the host's root shared
//! read-only (the same test binaries, at the same paths), and on the host's
//! own kernel. `cargo xtask test` runs it on 6.1 and 6.12 after the suite.

mod guest;
mod packages;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{setup, step};
pub use packages::GUEST_KERNELS;

/// The guest's /init.
const GUEST_INIT: &str = include_str!("guest_init.sh");

/// How long one guest may take for the whole smoke set.
const GUEST_DEADLINE: Duration = Duration::from_secs(25 * 60);

/// One e2e test binary of the smoke set, and which of its tests.
struct SmokeTest {
    target: &'static str,
    /// libtest name filters (all of the binary's tests when empty).
    filters: &'static [&'static str],
    shows: &'static str,
}

/// What must hold on a kernel for the agent to support it.
const SMOKE: [SmokeTest; 7] = [
    SmokeTest {
        target: "kernel_programs",
        filters: &[],
        shows: "programs load, attach per pod, count and detach; the kernel probe",
    },
    SmokeTest {
        target: "capture",
        filters: &[
            "outbound_connections_are_captured",
            "inbound_connections_from_outside_the_mesh_are_captured",
            "capture_needs_no_iptables",
        ],
        shows: "capture out (connect, getpeername) and in (sk_lookup), IPv4 and IPv6",
    },
    SmokeTest {
        target: "failure",
        filters: &["a_stopped_agent_means_refused_connections"],
        shows: "fail closed: captured pods refused while no agent serves",
    },
    SmokeTest {
        target: "mtls",
        filters: &[],
        shows: "mTLS (HBONE) across two nodes",
    },
    SmokeTest {
        target: "policy_l7",
        filters: &["every_http_request_is_authorized_on_its_own"],
        shows: "an HTTP policy decision per request",
    },
    SmokeTest {
        target: "fast_path",
        filters: &[],
        shows: "the same-node fast path (sock_ops, sk_msg)",
    },
    SmokeTest {
        target: "dns",
        filters: &["dns_of_enrolled_pods_goes_through_the_agent"],
        shows: "UDP capture (sendmsg, recvmsg) of DNS",
    },
];

/// Which kernels to run the smoke set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    /// Debian 11's kernel, which the agent must refuse, naming what it lacks.
    #[value(name = "5.10")]
    V5_10,
    /// The kernel this machine runs, without a guest.
    Host,
    /// 6.1, 6.12, 5.10 (refused) and the host's.
    All,
}

enum Target {
    Guest(&'static packages::GuestKernel),
    Host,
}

impl KernelChoice {
    fn targets(self) -> Vec<Target> {
        let guest = |series: &str| {
            Target::Guest(
                GUEST_KERNELS
                    .iter()
                    .find(|k| k.series == series)
                    .expect("a listed series"),
            )
        };
        match self {
            Self::V6_1 => vec![guest("6.1")],
            Self::V6_12 => vec![guest("6.12")],
            Self::V5_10 => vec![guest("5.10")],
            Self::Host => vec![Target::Host],
            Self::All => vec![guest("6.1"), guest("6.12"), guest("5.10"), Target::Host],
        }
    }
}

/// One smoke test's outcome on one kernel.
struct Outcome {
    kernel: String,
    target: &'static str,
    passed: bool,
    seconds: Option<u64>,
    log: PathBuf,
}

/// Runs the smoke set on `kernels`; Ok only if it passed on every one.
pub fn run(workspace: &Path, kernels: &[KernelChoice]) -> Result<()> {
    let started = Instant::now();
    if crate::test::effective_uid() != Some(0) {
        bail!("the kernel matrix needs root: it installs QEMU and runs the end-to-end tests");
    }
    let mut targets: Vec<Target> = kernels.iter().flat_map(|k| k.targets()).collect();
    targets.dedup_by(|a, b| match (a, b) {
        (Target::Host, Target::Host) => true,
        (Target::Guest(a), Target::Guest(b)) => a.series == b.series,
        _ => false,
    });
    setup::build_ebpf(workspace)?;
    let binaries = build_smoke_binaries(workspace)?;
    let pod_tool = setup::build_pod_tool(workspace)?;
    if targets.iter().any(|t| matches!(t, Target::Guest(_))) {
        packages::ensure_host_tools()?;
    }
    let accel = guest::Accel::detect();
    let results_dir = workspace.join("target/kernels");
    let mut outcomes = Vec::new();
    let mut kernel_lines = Vec::new();
    for target in &targets {
        let kernel_started = Instant::now();
        match target {
            Target::Guest(kernel) => {
                let prepared = packages::prepare(workspace, kernel)?;
                let out_dir = results_dir.join(kernel.series);
                step(format!(
                    "kernel {} ({}, {}): booting it under QEMU ({accel:?}) for {}",
                    kernel.series,
                    prepared.release,
                    prepared.package,
                    if kernel.supported {
                        "the smoke set"
                    } else {
                        "the agent's refusal"
                    }
                ));
                let script = if kernel.supported {
                    guest_script(workspace, &pod_tool, &binaries)
                } else {
                    refusal_script(workspace, &agent_binary(&binaries)?)
                };
                let run = guest::run(&prepared, accel, &out_dir, &script, GUEST_DEADLINE)?;
                let found = read_results(&out_dir, &prepared.release);
                if kernel.supported {
                    for test in &SMOKE {
                        let result = found.iter().find(|(t, _, _)| t == test.target);
                        outcomes.push(Outcome {
                            kernel: prepared.release.clone(),
                            target: test.target,
                            passed: result.is_some_and(|(_, rc, _)| *rc == 0),
                            seconds: result.map(|(_, _, s)| *s),
                            log: out_dir.join(format!("{}.log", test.target)),
                        });
                    }
                } else {
                    outcomes.extend(refusal_outcomes(&prepared.release, &out_dir, &found));
                }
                let how = match (run.status, run.timed_out) {
                    (_, true) => format!(
                        "stopped at the {}-minute deadline",
                        GUEST_DEADLINE.as_secs() / 60
                    ),
                    (Some(rc), _) => format!("script exit status {rc}"),
                    (None, _) => "no exit status on the console (the guest crashed?)".to_string(),
                };
                kernel_lines.push(format!(
                    "{} ({}): {how}, {:.0} s in the guest ({:.0} s with download and set-up); console {}, kernel log {}",
                    prepared.release,
                    prepared.package,
                    run.elapsed.as_secs_f64(),
                    kernel_started.elapsed().as_secs_f64(),
                    out_dir.join("console.log").display(),
                    out_dir.join("dmesg.txt").display(),
                ));
            }
            Target::Host => {
                let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
                    .trim()
                    .to_string();
                step(format!("kernel {release} (this machine's): the smoke set"));
                let out_dir = results_dir.join("host");
                fs::create_dir_all(&out_dir)?;
                for test in &SMOKE {
                    let (exe, filters) = binaries
                        .iter()
                        .find(|(t, _, _)| *t == test.target)
                        .map(|(_, e, f)| (e, f))
                        .expect("every smoke binary was built");
                    let log = out_dir.join(format!("{}.log", test.target));
                    let test_started = Instant::now();
                    let status = Command::new(exe)
                        .arg("--test-threads=1")
                        .args(*filters)
                        .current_dir(workspace)
                        .env("CI", "true")
                        .env(mesh_testbed::tool::ENV, &pod_tool)
                        .stdout(fs::File::create(&log)?)
                        .stderr(fs::File::options().append(true).open(&log)?)
                        .status()
                        .with_context(|| format!("running {}", exe.display()))?;
                    outcomes.push(Outcome {
                        kernel: release.clone(),
                        target: test.target,
                        passed: status.success(),
                        seconds: Some(test_started.elapsed().as_secs()),
                        log,
                    });
                }
                kernel_lines.push(format!(
                    "{release} (this machine's): {:.0} s",
                    kernel_started.elapsed().as_secs_f64()
                ));
            }
        }
    }
    let summary = summary(&outcomes, &kernel_lines);
    fs::create_dir_all(&results_dir)?;
    fs::write(results_dir.join("summary.md"), &summary)?;
    eprintln!("{summary}");
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    for outcome in &failed {
        let log = fs::read_to_string(&outcome.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "--- {} on {}: last lines of {} ---",
            outcome.target,
            outcome.kernel,
            outcome.log.display()
        );
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
    }
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed: {} (summary in {})",
            failed
                .iter()
                .map(|o| format!("{} on {}", o.target, o.kernel))
                .collect::<Vec<_>>()
                .join(", "),
            results_dir.join("summary.md").display()
        );
    }
    step(format!(
        "kernel matrix passed ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What the agent must say on a kernel it does not support: the features
/// Debian 11's 5.10 lacks, each with the release that brought it.
const REFUSAL_NAMES: [&str; 2] = [
    "[so_netns_cookie] (Linux 5.14",
    "[netns_cookie_in_sock_ops] (Linux 5.15",
];

/// The agent the e2e tests run (cargo builds it next to their executables).
fn agent_binary(binaries: &[(&'static str, PathBuf, &'static [&'static str])]) -> Result<PathBuf> {
    let exe = &binaries.first().context("no test binary")?.1;
    let agent = exe
        .parent()
        .and_then(Path::parent)
        .context("target/<profile>/deps/<test>")?
        .join("mesh-agent-e2e");
    if !agent.is_file() {
        bail!("{} is missing", agent.display());
    }
    Ok(agent)
}

/// The script for a kernel the agent must refuse: `mesh-agent check` and
/// `mesh-agent run` on a minimal node, each line `<name> <status> <seconds>`.
fn refusal_script(workspace: &Path, agent: &Path) -> String {
    let agent = agent.display();
    format!(
        "cd '{ws}'\n\
         mkdir -p /tmp/node\n\
         printf 'name: refused\\nadminAddress: 127.0.0.1:15000\\npinDir: /sys/fs/bpf/mesh-refused\\n' > /tmp/node/node.yaml\n\
         printf 'pods: []\\n' > /tmp/node/pods.yaml\n\
         echo \"kernel $(uname -r)\" > /tmp/out/results\n\
         '{agent}' check --config /tmp/node > /tmp/out/check.log 2>&1; echo \"check $? 0\" >> /tmp/out/results\n\
         timeout 60 '{agent}' run --config /tmp/node > /tmp/out/run.log 2>&1; echo \"run $? 0\" >> /tmp/out/results\n\
         cat /tmp/out/check.log /tmp/out/run.log\n",
        ws = workspace.display()
    )
}

/// The refusal holds if `check` and `run` both failed (not timed out) and
/// each named every feature of [`REFUSAL_NAMES`].
fn refusal_outcomes(release: &str, out_dir: &Path, found: &[(String, i32, u64)]) -> Vec<Outcome> {
    ["check", "run"]
        .into_iter()
        .map(|step| {
            let log = out_dir.join(format!("{step}.log"));
            let text = fs::read_to_string(&log).unwrap_or_default();
            let status = found
                .iter()
                .find(|(t, _, _)| t == step)
                .map(|(_, rc, _)| *rc);
            let refused = matches!(status, Some(rc) if rc != 0 && rc != 124);
            Outcome {
                kernel: release.to_string(),
                target: if step == "check" {
                    "refused: mesh-agent check"
                } else {
                    "refused: mesh-agent run"
                },
                passed: refused && REFUSAL_NAMES.iter().all(|name| text.contains(name)),
                seconds: None,
                log,
            }
        })
        .collect()
}

/// Builds the smoke set's test binaries: (target, executable, filters).
fn build_smoke_binaries(
    workspace: &Path,
) -> Result<Vec<(&'static str, PathBuf, &'static [&'static str])>> {
    step("building the kernel matrix's test binaries");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args([
        "test",
        "-p",
        "mesh-e2e",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for test in &SMOKE {
        cmd.args(["--test", test.target]);
    }
    let output = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the smoke set's tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if let Some(test) = SMOKE.iter().find(|t| t.target == name)
            && is_test
        {
            found.push((test.target, PathBuf::from(exe), test.filters));
        }
    }
    for test in &SMOKE {
        if !found.iter().any(|(t, _, _)| *t == test.target) {
            bail!("cargo built no executable for the test {}", test.target);
        }
    }
    Ok(found)
}

/// The script the guest runs: each smoke binary in turn, its output in
/// /tmp/out/<target>.log and a line `<target> <status> <seconds>` in
/// /tmp/out/results.
fn guest_script(
    workspace: &Path,
    pod_tool: &Path,
    binaries: &[(&'static str, PathBuf, &'static [&'static str])],
) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut script = String::new();
    let _ = writeln!(script, "cd {}", quote(&workspace.display().to_string()));
    let _ = writeln!(
        script,
        "export {}={}",
        mesh_testbed::tool::ENV,
        quote(&pod_tool.display().to_string())
    );
    let _ = writeln!(script, "echo \"kernel $(uname -r)\" > /tmp/out/results");
    let _ = writeln!(script, "failed=0");
    for (target, exe, filters) in binaries {
        let filters: Vec<String> = filters.iter().map(|f| quote(f)).collect();
        let _ = writeln!(
            script,
            "echo \"GUEST: {target}\"; s=$(date +%s); {} --test-threads=1 {} > /tmp/out/{target}.log 2>&1; rc=$?; \
             echo \"{target} $rc $(( $(date +%s) - s ))\" >> /tmp/out/results; echo \"GUEST: {target} exit $rc\"; \
             [ $rc -eq 0 ] || failed=1",
            quote(&exe.display().to_string()),
            filters.join(" ")
        );
    }
    let _ = writeln!(script, "exit $failed");
    script
}

/// The guest's `results` lines: (target, status, seconds), if they come from
/// the expected kernel.
fn read_results(out_dir: &Path, release: &str) -> Vec<(String, i32, u64)> {
    let Ok(text) = fs::read_to_string(out_dir.join("results")) else {
        return Vec::new();
    };
    let mut lines = text.lines();
    if lines.next() != Some(&format!("kernel {release}")) {
        return Vec::new();
    }
    lines
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((
                fields.next()?.to_string(),
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn summary(outcomes: &[Outcome], kernel_lines: &[String]) -> String {
    let mut out = String::from(
        "# Kernel matrix\n\n| kernel | test | shows | result | s |\n|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let shows = SMOKE.iter().find(|t| t.target == o.target).map_or(
            "an unsupported kernel refused, its missing features named",
            |t| t.shows,
        );
        let _ = writeln!(
            out,
            "| {} | {} | {shows} | {} | {} |",
            o.kernel,
            o.target,
            if o.passed { "passed" } else { "FAILED" },
            o.seconds.map_or("-".to_string(), |s| s.to_string())
        );
    }
    out.push('\n');
    for line in kernel_lines {
        let _ = writeln!(out, "- {line}");
    }
    out
}
