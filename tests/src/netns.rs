//! Network namespaces: creating and deleting them (`ip netns add` and its
//! inverse), running `ip` in them, and running code on a thread that has
//! joined one with setns(2).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, umount2};
use nix::sched::CloneFlags;

/// Where `ip netns` keeps its named namespaces.
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of a named netns.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// The `ip` binary: from `PATH`, else the usual sbin places (root's `PATH`
/// under `sudo` or in CI does not always include them).
pub(crate) fn ip_binary() -> Option<&'static Path> {
    static IP: OnceLock<Option<PathBuf>> = OnceLock::new();
    IP.get_or_init(|| {
        let from_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        from_path
            .into_iter()
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join("ip"))
            .find(|p| p.is_file())
    })
    .as_deref()
}

fn ip_command() -> anyhow::Result<Command> {
    let ip = ip_binary().context("iproute2 `ip` not found in PATH, /usr/sbin or /sbin")?;
    let mut cmd = Command::new(ip);
    cmd.stdin(Stdio::null());
    Ok(cmd)
}

/// Runs `ip <args>`; the error shows the command and its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = ip_command()?
        .args(args)
        .output()
        .context("cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs the `ip` commands in `script` (one per line, without the leading
/// `ip`) inside netns `ns` with a single `ip -batch` process.
pub(crate) fn ip_batch(ns: &str, script: &str) -> anyhow::Result<()> {
    let mut child = ip_command()?
        .args(["-netns", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `ip -batch`")?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(script.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch`")?;
    if !out.status.success() || written.is_err() {
        let numbered: Vec<String> = script
            .lines()
            .enumerate()
            .map(|(i, l)| format!("  {:>2}: ip {l}", i + 1))
            .collect();
        bail!(
            "`ip -netns {ns} -batch` failed ({}): {}\nscript:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            numbered.join("\n")
        );
    }
    Ok(())
}

/// Cross-process lock for host-global setup steps that race when run
/// concurrently: the first `ip netns add` makes /run/netns a shared mount
/// point, and bpffs must not be mounted twice on top of itself. flock(2)
/// locks belong to the open file description, so this also excludes other
/// threads of this process.
pub(crate) fn host_lock() -> anyhow::Result<Flock<File>> {
    let path = "/run/mesh-testbed.lock";
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file {path}"))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {path}: {e}"))
}

/// Creates the named netns `name` (visible in `ip netns list`).
pub(crate) fn add(name: &str) -> anyhow::Result<()> {
    let _lock = host_lock()?;
    ip(&["netns", "add", name])
}

/// Deletes a named netns like `ip netns del` does: detach the bind mount,
/// then remove the file. The namespace (and the veths in it) goes away once
/// nothing else holds it. A missing netns is not an error.
pub(crate) fn delete(name: &str) -> anyhow::Result<()> {
    let path = netns_path(name);
    if let Err(e) = umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (half-created); ENOENT: already gone.
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            bail!("cannot unmount netns {}: {e}", path.display());
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Names in /run/netns.
pub(crate) fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_RUN_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has joined the netns at `path`; only that
/// thread changes namespace, and it ends with `f`. A panic in `f` is passed
/// on to the caller; failing to join the netns is an error.
pub(crate) fn try_in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    // Opened here so that a missing netns is reported on the caller's thread.
    let ns = File::open(path).with_context(|| format!("cannot open netns {}", path.display()))?;
    let shown = path.display().to_string();
    let handle = std::thread::Builder::new()
        .name("mtb-netns".into())
        .spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({shown}, CLONE_NEWNET) failed"))?;
            drop(ns);
            Ok(f())
        })
        .context("cannot spawn a thread")?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Writes sysctl values (paths relative to /proc/sys) inside a netns:
/// /proc/sys/net is resolved per task, so a setns'd thread sees its netns.
pub(crate) fn set_sysctls(path: &Path, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    try_in_netns(path, move || -> anyhow::Result<()> {
        for (key, value) in settings {
            let file = Path::new("/proc/sys").join(&key);
            std::fs::write(&file, &value)
                .with_context(|| format!("cannot set {} = {value}", file.display()))?;
        }
        Ok(())
    })?
}
