//! `cargo xtask fuzz`: the libFuzzer targets in fuzz/ (cargo-fuzz, nightly,
//! AddressSanitizer). `cargo xtask test` runs each one briefly on its
//! committed seeds; longer runs are `cargo xtask fuzz --seconds N`.
//!
//! New inputs a run finds go to target/fuzz-corpus/<target> (not the
//! committed seeds); a crash leaves its input in fuzz/artifacts/<target>/,
//! and the run fails naming it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{ebpf_build::EBPF_TOOLCHAIN, setup, step};

/// Every target in fuzz/Cargo.toml.
pub const TARGETS: [&str; 5] = [
    "config_files",
    "policies",
    "path_normalization",
    "http_request",
    "tunnel_connect",
];

/// Seconds per target inside `cargo xtask test`.
pub const TEST_SECONDS: u32 = 20;

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs `targets` (all when empty) for `seconds` each.
pub fn run(workspace: &Path, seconds: u32, targets: &[String]) -> Result<()> {
    let started = Instant::now();
    // The targets link mesh-agent, whose build script needs the kernel
    // programs (and so bpf-linker) built first.
    setup::build_ebpf(workspace)?;
    let cargo_fuzz = ensure_cargo_fuzz(workspace)?;
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t}; the targets: {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    step(format!(
        "fuzzing {} targets for {seconds} s each (builds with AddressSanitizer first)",
        chosen.len()
    ));
    setup::run(
        Command::new("rustup")
            .args(["run", EBPF_TOOLCHAIN])
            .arg(&cargo_fuzz)
            .args(["fuzz", "build"])
            .current_dir(workspace),
    )
    .context("building the fuzz targets")?;
    for target in chosen {
        let corpus = workspace.join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = workspace.join("fuzz").join("seeds").join(target);
        let target_started = Instant::now();
        // libFuzzer reports every new input: that goes to a log file, and
        // only its last lines are shown if the target fails.
        let log_path = workspace.join("target").join(format!("fuzz-{target}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let status = Command::new("rustup")
            .args(["run", EBPF_TOOLCHAIN])
            .arg(&cargo_fuzz)
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .current_dir(workspace)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("starting cargo-fuzz")?;
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            let lines: Vec<&str> = output.lines().collect();
            eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
            bail!(
                "fuzz target {target} failed ({status}; whole log: {}): the input is in \
                 fuzz/artifacts/{target}/; reproduce with `cargo +nightly fuzz run {target} <that file>`",
                log_path.display()
            );
        }
        let runs = output
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units: "))
            .unwrap_or("?");
        step(format!(
            "fuzz target {target}: {runs} runs in {:.0} s, no crash",
            target_started.elapsed().as_secs_f64()
        ));
    }
    step(format!(
        "fuzzing done ({:.0} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// cargo-fuzz, installed into .tools/ once (never a system path).
fn ensure_cargo_fuzz(workspace: &Path) -> Result<PathBuf> {
    let root = workspace
        .join(".tools")
        .join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let binary = root.join("bin").join("cargo-fuzz");
    if binary.is_file() {
        return Ok(binary);
    }
    step(format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (about a minute, once)",
        root.display()
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    setup::run(
        Command::new(cargo)
            .args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
            ])
            .arg("--root")
            .arg(&root),
    )
    .context("installing cargo-fuzz")?;
    Ok(binary)
}
