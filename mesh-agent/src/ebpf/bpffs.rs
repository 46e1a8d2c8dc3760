//! The BPF filesystem, where programs and maps can be pinned.

use std::path::Path;

use anyhow::{Context, Result};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `path` unless one is mounted there already.
pub fn ensure_mounted(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let fs = statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    if fs.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs on {} (needs CAP_SYS_ADMIN)", path.display()))?;
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}
