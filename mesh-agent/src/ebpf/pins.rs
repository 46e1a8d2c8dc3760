//! The pinned state on the BPF filesystem: one agent at a time holds it
//! (a lock on the directory), links are replaced without a gap, and an
//! uninstall removes it all.

use std::{fs::File, path::Path};

use anyhow::{Context, Result, bail};
use aya::programs::links::{FdLink, PinnedLink};
use nix::fcntl::{Flock, FlockArg};

/// Two agents on one pinned state would release each other's pods. The lock
/// goes away with the process, however it ends.
pub(super) fn lock_pin_dir(pin_dir: &Path, wait: std::time::Duration) -> Result<PinLock> {
    let mut dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((file, _)) if std::time::Instant::now() < deadline => {
                dir = file;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(_) => bail!(
                "another agent is running with the pin directory {} (only one agent per node's pinned state)",
                pin_dir.display()
            ),
        }
    }
}

/// The pin directory, locked for this agent until dropped.
pub type PinLock = Flock<File>;

/// Pins `link` at `path`. A pin left there by an earlier agent is removed only
/// after the new link is attached, so the pod is never without its program.
pub(super) fn pin_replacing(link: FdLink, path: &Path) -> Result<PinnedLink> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing the old pin {}", path.display()))?;
    }
    link.pin(path)
        .with_context(|| format!("pinning {}", path.display()))
}

pub(super) fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes everything pinned under `pin_dir` (links and maps): with no agent
/// running, this detaches every program of the node. For uninstalling.
pub fn remove_pinned_state(pin_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                remove_pins(&path);
            } else {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            removed += 1;
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}
