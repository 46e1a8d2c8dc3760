//! What a [`super::ContainerRuntime`] leaves outside the test bed's own
//! netns, cgroups and temp dir, written down as it is made so that it can
//! be removed: by the runtime's drop, or, after a test process died without
//! dropping it, by [`sweep_leftovers`].
//!
//! containerd, runc and the CNI plugins make things the test bed does not
//! know about: the sandboxes' netns bind mounts (`/var/run/netns/cni-…`),
//! overlay and tmpfs mounts under the runtime's directory, cgroup dirs in
//! every cgroup v1 hierarchy of a hybrid host, shim sockets in
//! `/run/containerd/s/`, CNI result caches in `/var/lib/cni/results/`. Each
//! runtime appends them to a ledger, `/run/mesh-testbed-cri/<name>`, named
//! like the test bed's objects (`mtb-<pid>-<starttime>-…`) so that the
//! sweeper can tell whether its owner is still alive.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::naming::{Owner, proc_start_time};
use crate::wait::Backoff;

/// Where the ledgers are (tmpfs: a reboot removes them with what they list).
pub(crate) const LEDGER_DIR: &str = "/run/mesh-testbed-cri";
/// Where libcni caches each attachment's result.
pub(crate) const CNI_RESULTS: &str = "/var/lib/cni/results";
/// How long killed processes and busy cgroups are waited for.
const DEADLINE: Duration = Duration::from_secs(5);

/// Something to remove; one line of a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A directory, removed whole after the mounts below it.
    Dir(PathBuf),
    /// A process (PID and start time), killed if it still runs.
    Pid(u32, u64),
    /// A netns bind mount (a sandbox's), unmounted and removed.
    Netns(PathBuf),
    /// A cgroup directory created for a sandbox (any hierarchy).
    Cgroup(PathBuf),
    /// A file (a shim's socket).
    File(PathBuf),
    /// A CNI network name: its cached results are removed.
    CniNetwork(String),
    /// A directory that did not exist before: removed if empty.
    EmptyDir(PathBuf),
}

impl Entry {
    fn to_line(&self) -> String {
        match self {
            Entry::Dir(p) => format!("dir {}", p.display()),
            Entry::Pid(pid, start) => format!("pid {pid} {start}"),
            Entry::Netns(p) => format!("netns {}", p.display()),
            Entry::Cgroup(p) => format!("cgroup {}", p.display()),
            Entry::File(p) => format!("file {}", p.display()),
            Entry::CniNetwork(n) => format!("cni-network {n}"),
            Entry::EmptyDir(p) => format!("empty-dir {}", p.display()),
        }
    }

    fn parse(line: &str) -> Option<Entry> {
        let (kind, rest) = line.split_once(' ')?;
        let path = || PathBuf::from(rest);
        Some(match kind {
            "dir" => Entry::Dir(path()),
            "pid" => {
                let (pid, start) = rest.split_once(' ')?;
                Entry::Pid(pid.parse().ok()?, start.parse().ok()?)
            }
            "netns" => Entry::Netns(path()),
            "cgroup" => Entry::Cgroup(path()),
            "file" => Entry::File(path()),
            "cni-network" => Entry::CniNetwork(rest.to_string()),
            "empty-dir" => Entry::EmptyDir(path()),
            _ => return None,
        })
    }
}

/// The entries of one runtime, in memory and appended to its ledger file.
#[derive(Debug)]
pub(crate) struct Ledger {
    path: PathBuf,
    file: Option<File>,
    entries: Vec<Entry>,
}

impl Ledger {
    /// A new ledger `/run/mesh-testbed-cri/<name>`; `name` must start with
    /// the owner (`mtb-<pid>-<starttime>-`).
    pub(crate) fn create(name: &str) -> anyhow::Result<Ledger> {
        let path = Path::new(LEDGER_DIR).join(name);
        let open = || {
            std::fs::create_dir_all(LEDGER_DIR)?;
            File::options().create(true).append(true).open(&path)
        };
        // Once more if another runtime removed the (empty) directory
        // between the two steps.
        let file = open()
            .or_else(|_| open())
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Ledger {
            path,
            file: Some(file),
            entries: Vec::new(),
        })
    }

    /// Notes an entry (once), on disk before it is used.
    pub(crate) fn record(&mut self, entry: Entry) {
        if self.entries.contains(&entry) {
            return;
        }
        if let Some(file) = &mut self.file {
            // Best-effort: the in-memory copy is what our own drop uses.
            if let Err(e) = writeln!(file, "{}", entry.to_line()) {
                eprintln!(
                    "mesh-testbed: cannot write {}: {e} (a crash would leave {entry:?})",
                    self.path.display()
                );
            }
        }
        self.entries.push(entry);
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Removes everything recorded, then the ledger itself.
    pub(crate) fn clean_up(&mut self) {
        clean(&self.entries);
        self.file = None;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("mesh-testbed: cannot remove {}: {e}", self.path.display()),
        }
        // Kept while another runtime has a ledger in it.
        let _ = std::fs::remove_dir(LEDGER_DIR);
    }
}

/// Removes what the ledgers of dead owners list, and the ledgers; mounts
/// left under temp dirs of dead topologies too, even without a ledger.
/// Best-effort, failures printed. Run by the test bed's own
/// [`crate::sweep_leftovers`] first (the mounts would keep the dead
/// topology's directories busy), and by every `ContainerRuntime::start`.
pub fn sweep_leftovers() {
    let dead = |name: &str| Owner::parse(name).is_some_and(|o| !o.is_alive());
    if let Ok(dir) = std::fs::read_dir(LEDGER_DIR) {
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !dead(&name) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let entries: Vec<Entry> = text.lines().filter_map(Entry::parse).collect();
            clean(&entries);
            let _ = std::fs::remove_file(entry.path());
        }
        let _ = std::fs::remove_dir(LEDGER_DIR);
    }
    let base = std::env::temp_dir().join("mesh-testbed");
    let dead_dirs: Vec<PathBuf> = std::fs::read_dir(&base)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(dead))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    // The test bed's sweeper could not remove these while our mounts were
    // in them; now it can be done.
    unmount_below(&dead_dirs);
    for dir in dead_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes `entries`: processes first, then mounts, cgroups, files, dirs.
fn clean(entries: &[Entry]) {
    let report = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("mesh-testbed: cleaning up after containerd: {what}: {e}");
    };
    let pids: Vec<(u32, u64)> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Pid(pid, start) => Some((*pid, *start)),
            _ => None,
        })
        .collect();
    kill_and_reap(&pids, Duration::ZERO);

    for entry in entries {
        if let Entry::Netns(path) = entry
            && let Err(e) = remove_netns(path)
        {
            report(&format!("netns {}", path.display()), &e);
        }
    }
    let dirs: Vec<PathBuf> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Dir(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    unmount_below(&dirs);

    let mut cgroups: Vec<&PathBuf> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Cgroup(p) => Some(p),
            _ => None,
        })
        .collect();
    remove_cgroups(&mut cgroups);

    for entry in entries {
        match entry {
            Entry::File(path) => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report(&path.display().to_string(), &e),
            },
            Entry::CniNetwork(name) => remove_cni_results(name),
            _ => {}
        }
    }
    for dir in &dirs {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report(&dir.display().to_string(), &e),
        }
    }
    // Deepest first; a directory someone else uses is not empty: kept.
    let mut empty: Vec<&PathBuf> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::EmptyDir(p) => Some(p),
            _ => None,
        })
        .collect();
    empty.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for dir in empty {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Waits up to `grace` for the processes to exit by themselves, then
/// SIGKILLs those still running (same PID and start time) and waits for
/// them to go; reaps those that are our children (a test process is the
/// subreaper of containerd's shims and, if a shim died, of its pause).
pub(crate) fn kill_and_reap(pids: &[(u32, u64)], grace: Duration) {
    let start = Instant::now();
    let mut killed = false;
    let mut backoff = Backoff::new();
    loop {
        let running: Vec<u32> = pids
            .iter()
            .filter(|(pid, started)| !reap_or_gone(*pid, *started))
            .map(|(pid, _)| *pid)
            .collect();
        if running.is_empty() {
            return;
        }
        if !killed && start.elapsed() >= grace {
            for pid in &running {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            killed = true;
        }
        if start.elapsed() >= grace + DEADLINE {
            eprintln!("mesh-testbed: processes {running:?} did not die of SIGKILL");
            return;
        }
        backoff.pause(start + grace + DEADLINE);
    }
}

/// Reaps those of the processes that are our exited children, without
/// waiting (shims exit a moment after their sandbox was removed).
pub(crate) fn reap_exited(pids: &[(u32, u64)]) {
    for (pid, started) in pids {
        reap_or_gone(*pid, *started);
    }
}

/// Reaps `pid` if it is our exited child; whether it is gone (a zombie that
/// is not ours counts as gone: it is no longer running).
fn reap_or_gone(pid: u32, started: u64) -> bool {
    if proc_start_time(pid) != Some(started) {
        return true;
    }
    match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // Not our child: running unless it is a zombie.
        Err(_) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let state = s[s.rfind(')')? + 1..].split_whitespace().next()?;
                Some(state == "Z" || state == "X")
            })
            .unwrap_or(true),
    }
}

/// Unmounts and removes a netns bind mount like `ip netns del`.
pub(crate) fn remove_netns(path: &Path) -> anyhow::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => anyhow::bail!("cannot unmount: {e}"),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Mount points in /proc/self/mountinfo (octal escapes undone).
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Lazily unmounts every mount at or below `dirs`, deepest first
/// (containerd's overlay rootfs and the sandboxes' /dev/shm tmpfs).
pub(crate) fn unmount_below(dirs: &[PathBuf]) {
    if dirs.is_empty() {
        return;
    }
    let mut below: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below.dedup();
    for mount in below {
        match umount2(&mount, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => eprintln!("mesh-testbed: cannot unmount {}: {e}", mount.display()),
        }
    }
}

/// rmdir, deepest first. A cgroup with child cgroups is kept quietly (a
/// parent shared with another pod or runtime); one that stays busy without
/// children (processes still leaving) is retried for a while, then reported.
pub(crate) fn remove_cgroups(dirs: &mut Vec<&PathBuf>) {
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    dirs.dedup();
    let until = Instant::now() + DEADLINE;
    for dir in dirs.iter() {
        let mut backoff = Backoff::new();
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if has_subdirs(dir) => break,
                Err(e) if Instant::now() >= until => {
                    eprintln!("mesh-testbed: cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                Err(_) => backoff.pause(until),
            }
        }
    }
}

fn has_subdirs(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    })
}

/// libcni's cache files are `<network>-<container id>-<ifname>`.
fn remove_cni_results(network: &str) {
    let prefix = format!("{network}-");
    let Ok(dir) = std::fs::read_dir(CNI_RESULTS) else {
        return;
    };
    for entry in dir.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_lines_round_trip() {
        for entry in [
            Entry::Dir("/tmp/a b/c".into()),
            Entry::Pid(12, 345),
            Entry::Netns("/var/run/netns/cni-1".into()),
            Entry::Cgroup("/sys/fs/cgroup/unified/x".into()),
            Entry::File("/run/containerd/s/ab".into()),
            Entry::CniNetwork("mtb-1-2-3-n1".into()),
            Entry::EmptyDir("/run/containerd".into()),
        ] {
            assert_eq!(Entry::parse(&entry.to_line()), Some(entry));
        }
        assert_eq!(Entry::parse("bogus x"), None);
        assert_eq!(Entry::parse("pid x 1"), None);
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
    }
}
