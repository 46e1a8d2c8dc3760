//! `cargo xtask test`: the whole suite, kernel build included.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{setup, step};

pub fn run(workspace: &Path, cargo_test_args: &[String]) -> Result<()> {
    let started = Instant::now();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match effective_uid() {
        Some(0) => step("running as root: the end-to-end tests will load real kernel programs"),
        uid => {
            let who = uid.map_or("an unknown user".to_string(), |u| format!("uid {u}"));
            if ci {
                bail!(
                    "CI=true but this runs as {who}: the end-to-end tests need root \
                     (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and must not be skipped in CI"
                );
            }
            step(format!(
                "running as {who}, not root: the end-to-end tests will be SKIPPED, each saying why \
                 (run as root to include them)"
            ));
        }
    }
    setup::build_ebpf(workspace)?;
    // The end-to-end tests create pods through a real container runtime.
    if effective_uid() == Some(0) {
        setup::ensure_container_runtime()?;
    }
    let kubernetes_validate = crate::kube_validate::ensure(workspace)?;
    step("building and running the test suite (unit and end-to-end)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    setup::run(
        Command::new(cargo)
            .current_dir(workspace)
            .args(["test", "--workspace", "--exclude", "xtask"])
            .args(cargo_test_args)
            .env(crate::kube_validate::ENV, &kubernetes_validate),
    )
    .context("the test suite failed")?;
    // A filtered run (test name given) is someone's quick check: no fuzzing,
    // no kernel matrix.
    if cargo_test_args.is_empty() {
        crate::fuzz::run(workspace, crate::fuzz::TEST_SECONDS, &[])?;
        // The kernel-facing tests again, on Debian's long-term kernels.
        if effective_uid() == Some(0) {
            crate::kernels::run(
                workspace,
                &[
                    crate::kernels::KernelChoice::V6_1,
                    crate::kernels::KernelChoice::V6_12,
                    crate::kernels::KernelChoice::V5_10,
                ],
            )?;
        } else {
            step("not root: the kernel matrix (6.1, 6.12, 5.10 under QEMU) is SKIPPED");
        }
    }
    step(format!(
        "all tests passed ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The effective uid, from /proc (no libc needed here).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
