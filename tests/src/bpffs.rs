//! bpffs: making sure /sys/fs/bpf is a bpf filesystem, per-topology dirs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

/// Where bpffs is conventionally mounted (the agent pins there too).
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// `/sys/fs/bpf/mesh-testbed`: holds one directory per topology.
pub(crate) fn base_dir() -> PathBuf {
    Path::new(BPFFS).join("mesh-testbed")
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf unless a bpf filesystem is already there.
/// Under the host lock: two racing mounts would stack two separate bpffs
/// instances, hiding pins made in the lower one.
pub(crate) fn ensure_mounted() -> anyhow::Result<()> {
    let target = Path::new(BPFFS);
    if is_bpffs(target) {
        return Ok(());
    }
    let _lock = crate::netns::host_lock()?;
    if is_bpffs(target) {
        return Ok(());
    }
    mount(
        Some("bpf"),
        target,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("cannot mount bpffs on {BPFFS}"))
}
