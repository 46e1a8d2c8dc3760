//! Processes started inside a pod or node: spawned straight into the target
//! cgroup and netns, output captured to files, killed by PID on drop.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::Backoff;

/// How long killing and reaping a process may take before we give up.
const REAP_DEADLINE: Duration = Duration::from_secs(10);

/// State a topology shares with its nodes, pods and processes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub id: String,
    pub test_name: String,
    /// Per-topology temp dir for captured output.
    pub tmp_dir: PathBuf,
    seq: AtomicU64,
    /// Every process started in this topology, so teardown can kill the
    /// ones the test still holds (or leaked with `mem::forget`).
    procs: Mutex<Vec<Weak<Mutex<ChildState>>>>,
}

impl Shared {
    pub(crate) fn new(id: String, test_name: String, tmp_dir: PathBuf) -> Self {
        Shared {
            id,
            test_name,
            tmp_dir,
            seq: AtomicU64::new(0),
            procs: Mutex::new(Vec::new()),
        }
    }

    /// PIDs of this topology's processes not reaped yet.
    pub(crate) fn unreaped_pids(&self) -> HashSet<u32> {
        lock(&self.procs)
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|state| {
                let state = lock(&state);
                state.status.is_none().then(|| state.child.id())
            })
            .collect()
    }

    /// Kills (by PID) and reaps every process of this topology still running.
    pub(crate) fn kill_all(&self) {
        let procs = std::mem::take(&mut *lock(&self.procs));
        for state in procs.iter().filter_map(Weak::upgrade) {
            let mut state = lock(&state);
            if let Err(e) = state.kill_and_reap() {
                eprintln!("mesh-testbed {}: {e:#}", self.id);
            }
        }
    }
}

/// Where a process runs: a pod, or a node's `system` cgroup.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    /// For messages, e.g. "pod `a` on node `n1` (topology `t`, mtb-1-2-0)".
    pub what: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// The child and, once reaped, its exit status. Behind a mutex shared with the
/// topology: a PID is only signalled while we know the child is not reaped,
/// so a recycled PID can never be hit.
#[derive(Debug)]
pub(crate) struct ChildState {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildState {
    fn poll(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for pid {}", self.child.id()))?;
        }
        Ok(self.status)
    }

    fn kill_and_reap(&mut self) -> anyhow::Result<()> {
        if self.poll()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id();
        // Not reaped yet, so the PID is still ours (possibly a zombie).
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
            .with_context(|| format!("cannot SIGKILL pid {pid}"))?;
        let until = Instant::now() + REAP_DEADLINE;
        let mut backoff = Backoff::new();
        while self.poll()?.is_none() {
            if Instant::now() >= until {
                bail!("pid {pid} did not die within {REAP_DEADLINE:?} of SIGKILL");
            }
            backoff.pause(until);
        }
        Ok(())
    }
}

/// Locks a mutex, ignoring poisoning: teardown must go on after a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A child process started in a pod or node. Killed (SIGKILL, by its own
/// PID) and reaped on drop, and when its topology is dropped.
#[derive(Debug)]
pub struct Process {
    state: Arc<Mutex<ChildState>>,
    pid: u32,
    place: String,
    command: String,
    // Read handles on the capture files: they stay readable even after the
    // topology removed its temp dir.
    stdout: File,
    stderr: File,
}

/// Shell-like rendering of a command for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Starts `cmd` in `place`: into its cgroup and netns before exec, stdin
/// from /dev/null, stdout and stderr into files in the topology temp dir.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    place: &Place,
    mut cmd: Command,
) -> anyhow::Result<Process> {
    let command = describe(&cmd);
    let fail = || format!("{}: cannot start `{command}`", place.what);

    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let program = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let program: String = program
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect();
    let capture = |stream: &str| -> anyhow::Result<(File, File)> {
        let path = shared.tmp_dir.join(format!("{seq:03}-{program}.{stream}"));
        let write =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let read = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok((write, read))
    };
    let (out_w, out_r) = capture("stdout").with_context(fail)?;
    let (err_w, err_r) = capture("stderr").with_context(fail)?;

    // Opened in the parent: after fork only raw syscalls are allowed.
    let procs_path = place.cgroup.join("cgroup.procs");
    let procs = File::options()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("cannot open {}", procs_path.display()))
        .with_context(fail)?;
    let netns = File::open(&place.netns)
        .with_context(|| format!("cannot open netns {}", place.netns.display()))
        .with_context(fail)?;
    let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());

    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    // SAFETY: the closure runs in the forked child and only makes two raw
    // syscalls on descriptors that stay open until spawn() returns; it does
    // not allocate or take locks.
    unsafe {
        cmd.pre_exec(move || {
            // Writing "0" moves the writer itself into the cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(fail)?;
    drop((procs, netns));

    let pid = child.id();
    let state = Arc::new(Mutex::new(ChildState {
        child,
        status: None,
    }));
    {
        let mut procs = lock(&shared.procs);
        procs.retain(|w| w.strong_count() > 0);
        procs.push(Arc::downgrade(&state));
    }
    Ok(Process {
        state,
        pid,
        place: place.what.clone(),
        command,
        stdout: out_r,
        stderr: err_r,
    })
}

fn read_all(file: &File) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match file.read_at(&mut chunk, buf.len() as u64) {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Exit status if the process has exited (it is reaped then), else `None`.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        lock(&self.state).poll()
    }

    /// Waits for the process to exit and returns its status and output. On
    /// timeout, kills it and fails with a message that includes its output.
    pub fn wait_with_deadline(&mut self, deadline: Duration) -> anyhow::Result<Output> {
        let until = Instant::now() + deadline;
        let mut backoff = Backoff::new();
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Output {
                    status,
                    stdout: read_all(&self.stdout),
                    stderr: read_all(&self.stderr),
                });
            }
            if Instant::now() >= until {
                self.kill();
                bail!(
                    "{}: `{}` (pid {}) did not finish within {deadline:?}; killed it\n{}",
                    self.place,
                    self.command,
                    self.pid,
                    self.output_report()
                );
            }
            backoff.pause(until);
        }
    }

    /// Like [`Process::wait_with_deadline`], and also fails unless the exit
    /// status is success; the error shows where, what, status and output.
    pub fn wait_success(&mut self, deadline: Duration) -> anyhow::Result<Output> {
        let output = self.wait_with_deadline(deadline)?;
        if !output.status.success() {
            bail!(
                "{}: `{}` failed: {}\n{}",
                self.place,
                self.command,
                output.status,
                self.output_report()
            );
        }
        Ok(output)
    }

    /// Sends `sig` to the process; an error if it has already been reaped.
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let mut state = lock(&self.state);
        if let Some(status) = state.poll()? {
            bail!(
                "cannot send {sig} to `{}` (pid {}): it already exited ({status})",
                self.command,
                self.pid
            );
        }
        // Holding the lock: nobody can reap it before the signal is sent.
        kill(Pid::from_raw(self.pid as i32), sig)
            .with_context(|| format!("cannot send {sig} to pid {}", self.pid))
    }

    /// Everything the process wrote to stdout so far (lossy UTF-8).
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&read_all(&self.stdout)).into_owned()
    }

    /// Everything the process wrote to stderr so far (lossy UTF-8).
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&read_all(&self.stderr)).into_owned()
    }

    /// stdout and stderr, formatted for an error message.
    pub fn output_report(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout_so_far().trim_end(),
            self.stderr_so_far().trim_end()
        )
    }

    /// SIGKILLs the process (by its PID, only while it is not reaped) and
    /// reaps it. Idempotent; failures are printed, not returned.
    pub fn kill(&mut self) {
        if let Err(e) = lock(&self.state).kill_and_reap() {
            eprintln!("mesh-testbed: {}: `{}`: {e:#}", self.place, self.command);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
