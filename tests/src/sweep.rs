//! Removing leftovers of earlier runs that died without tearing down (e.g.
//! SIGKILLed test processes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::naming::Owner;
use crate::{bpffs, cgroup, netns};

const SWEEP_DEADLINE: Duration = Duration::from_secs(10);

/// Removes leftovers (netns, cgroup dirs and the processes in them, bpffs
/// dirs, temp dirs) whose owning process is dead: its PID is gone, or was
/// reused by a process with another start time. Objects of live processes,
/// such as a test binary running in parallel, are never touched, nor are
/// names that do not follow the `mtb-<pid>-<starttime>-...` scheme.
/// Best-effort: failures are printed. Called by [`crate::TopologyBuilder::build`].
pub fn sweep_leftovers() {
    #[cfg(test)]
    let _gate = tests_gate::SWEEPS.read().unwrap_or_else(|p| p.into_inner());
    // A crashed run's container runtime first: its mounts keep the
    // topology's directories busy.
    crate::cri::sweep_leftovers();
    let dead = |name: &str| Owner::parse(name).is_some_and(|o| !o.is_alive());
    let report = |what: &Path, e: anyhow::Error| {
        // A parallel sweeper may have removed it first: that is fine.
        if what.exists() {
            eprintln!("mesh-testbed: sweeping {}: {e:#}", what.display());
        }
    };

    for name in netns::list().into_iter().filter(|n| dead(n)) {
        if let Err(e) = netns::delete(&name) {
            report(&netns::netns_path(&name), e);
        }
    }

    if let Ok(base) = cgroup::base_dir() {
        for dir in dead_entries(&base, &dead) {
            let removed = cgroup::kill_all(&dir, SWEEP_DEADLINE)
                .and_then(|()| cgroup::remove_tree(&dir, SWEEP_DEADLINE));
            if let Err(e) = removed {
                report(&dir, e);
            }
        }
    }

    // Without bpffs mounted there can be no pins left; do not mount it here.
    if bpffs::is_bpffs(Path::new(bpffs::BPFFS)) {
        for dir in dead_entries(&bpffs::base_dir(), &dead) {
            remove_dir_all(&dir, &report);
        }
    }

    for dir in dead_entries(&std::env::temp_dir().join("mesh-testbed"), &dead) {
        remove_dir_all(&dir, &report);
    }
}

fn dead_entries(dir: &Path, dead: &impl Fn(&str) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(dead))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_dir_all(dir: &Path, report: &impl Fn(&Path, anyhow::Error)) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report(dir, e.into()),
    }
}

/// Lets the sweeper's own test set up fake leftovers without a concurrent
/// test's `build()` sweeping them half-made.
#[cfg(test)]
pub(crate) mod tests_gate {
    pub(crate) static SWEEPS: std::sync::RwLock<()> = std::sync::RwLock::new(());
}
