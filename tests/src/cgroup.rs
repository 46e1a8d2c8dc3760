//! cgroup v2 helpers: finding the hierarchy, emptying and removing subtrees.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::wait::Backoff;

/// Directory under the cgroup2 mount that holds every topology's cgroups.
pub(crate) const BASE: &str = "mesh-testbed";

/// Mount point of the cgroup2 hierarchy, read from /proc/self/mountinfo (it
/// is not always /sys/fs/cgroup: hybrid hosts mount it at .../unified).
pub(crate) fn cgroup2_mount() -> Option<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            find_cgroup2(&info)
        })
        .as_deref()
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `<cgroup2 mount>/mesh-testbed`.
pub(crate) fn base_dir() -> anyhow::Result<PathBuf> {
    let mount = cgroup2_mount().context("no cgroup2 filesystem is mounted")?;
    Ok(mount.join(BASE))
}

/// The cgroup2 path of `dir` as shown in /proc/<pid>/cgroup (`0::<path>`).
#[cfg(test)]
pub(crate) fn relative_path(dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(cgroup2_mount()?).ok()?;
    Some(format!("/{}", rel.display()))
}

/// Creates a cgroup directory.
pub(crate) fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("cannot create cgroup {}", dir.display()))
}

/// PIDs in `dir` and all cgroups below it.
pub(crate) fn procs_recursive(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(procs_recursive(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn is_populated(dir: &Path) -> anyhow::Result<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events"))
        .with_context(|| format!("cannot read {}/cgroup.events", dir.display()))?;
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

/// SIGKILLs every process in the subtree `dir` (these are processes inside
/// the test bed's own cgroups) and waits until the subtree is empty.
pub(crate) fn kill_all(dir: &Path, deadline: Duration) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let until = Instant::now() + deadline;
    let kill_file = dir.join("cgroup.kill");
    let mut backoff = Backoff::new();
    loop {
        if !is_populated(dir)? {
            return Ok(());
        }
        // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, even
        // processes forking meanwhile; otherwise kill the PIDs we can see.
        if kill_file.exists() {
            std::fs::write(&kill_file, "1")
                .with_context(|| format!("cannot write {}", kill_file.display()))?;
        } else {
            for pid in procs_recursive(dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if Instant::now() >= until {
            bail!(
                "cgroup {} still has processes after {deadline:?}: {:?}",
                dir.display(),
                procs_recursive(dir)
            );
        }
        backoff.pause(until);
    }
}

/// Removes the cgroup `dir` and its descendants, leaves first. rmdir can
/// fail with EBUSY for a moment after the last process died, so it retries
/// until the deadline. A missing directory is not an error.
pub(crate) fn remove_tree(dir: &Path, deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    remove_tree_until(dir, until)
}

fn remove_tree_until(dir: &Path, until: Instant) -> anyhow::Result<()> {
    for sub in subdirs(dir) {
        remove_tree_until(&sub, until)?;
    }
    let mut backoff = Backoff::new();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= until => {
                return Err(e).with_context(|| format!("cannot remove cgroup {}", dir.display()));
            }
            Err(_) => backoff.pause(until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(find_cgroup2("1 2 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }
}
