//! Checks that end-to-end tests can run here.

use std::path::Path;
use std::sync::OnceLock;

use crate::{bpffs, cgroup, naming, netns};

/// Checks the privileges and kernel features end-to-end tests need. The
/// error names exactly what is missing: root, a cgroup2 mount, iproute2
/// `ip`, bpffs (it is mounted on /sys/fs/bpf if needed), kernel BTF, or
/// network namespace creation. The result is computed once per process.
pub fn e2e_preflight() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(check).clone()
}

fn check() -> Result<(), String> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        // Everything else would fail for this reason too.
        return Err(format!("not running as root (euid {euid})"));
    }
    let mut missing = Vec::new();
    if cgroup::cgroup2_mount().is_none() {
        missing.push("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)".to_string());
    }
    if let Err(e) = bpffs::ensure_mounted() {
        missing.push(format!("bpffs cannot be mounted: {e:#}"));
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("/sys/kernel/btf/vmlinux is missing (kernel built without BTF)".to_string());
    }
    if netns::ip_binary().is_none() {
        missing.push("iproute2 `ip` not found in PATH, /usr/sbin or /sbin".to_string());
    } else {
        // A sweepable name, in case we die between add and delete.
        let name = naming::next_id("preflight");
        let created = netns::add(&name);
        if let Err(e) = netns::delete(&name) {
            eprintln!("mesh-testbed: preflight: {e:#}");
        }
        if let Err(e) = created {
            missing.push(format!("cannot create a network namespace: {e:#}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Call at the top of every end-to-end test; returns whether it should run.
/// If [`e2e_preflight`] fails: with `CI=true` in the environment this
/// panics with the reason (CI must never skip quietly), otherwise it prints
/// `SKIPPED <test>: <reason>` to stderr and returns false.
pub fn e2e_enabled(test_name: &str) -> bool {
    runs_or_skips(
        test_name,
        "end-to-end prerequisites missing",
        e2e_preflight(),
    )
}

/// Whether a test whose prerequisite is `ready` runs: `Ok` runs; a missing
/// prerequisite (`what`: why, in a few words) panics with `CI=true` (CI
/// never skips quietly) and otherwise prints `SKIPPED <test>: <reason>` and
/// skips.
pub fn runs_or_skips(test_name: &str, what: &str, ready: Result<(), String>) -> bool {
    match ready {
        Ok(()) => true,
        Err(reason) => {
            let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
            if ci {
                panic!("{test_name}: {what} and CI=true: {reason}");
            }
            eprintln!("SKIPPED {test_name}: {reason}");
            false
        }
    }
}
