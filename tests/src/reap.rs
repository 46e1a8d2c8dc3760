//! Reaping the orphans a topology leaves behind.
//!
//! Processes started by a test may fork (`sh -c 'x &'`, daemons). When
//! teardown kills them, their orphans are re-parented to the nearest "child
//! subreaper", by default PID 1 — which on some hosts (containers, minimal
//! VMs) never reaps, so every test run would leave zombies. The test bed
//! therefore makes the test process a subreaper and reaps exactly the
//! orphans that came from its own cgroups.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::wait::Backoff;

/// Makes this process the subreaper of its descendants (once).
pub(crate) fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            eprintln!(
                "mesh-testbed: PR_SET_CHILD_SUBREAPER failed: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

struct Stat {
    state: char,
    ppid: u32,
    start_time: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), [1] field 4 (ppid), [19] field 22 (starttime).
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Processes in a cgroup subtree, noted before it is killed.
pub(crate) struct Doomed {
    /// (pid, start time) of the processes, except those with a `Child`
    /// handle (our [`crate::Process`]es), which are reaped through it.
    procs: Vec<(u32, u64)>,
    pids: HashSet<u32>,
}

impl Doomed {
    /// Notes the processes in `cgroup_dir`'s subtree, except `children`.
    /// Any other child of ours in there (a reparented orphan, or a child the
    /// test moved there itself) will be reaped by [`Doomed::reap`].
    pub(crate) fn snapshot(cgroup_dir: &Path, children: &HashSet<u32>) -> Doomed {
        let pids: HashSet<u32> = crate::cgroup::procs_recursive(cgroup_dir)
            .into_iter()
            .collect();
        let procs = pids
            .iter()
            .filter(|pid| !children.contains(pid))
            .filter_map(|&pid| Some((pid, stat(pid)?.start_time)))
            .collect();
        Doomed { procs, pids }
    }

    /// After the subtree was killed: reaps those of the noted processes that
    /// became our zombie children. Waits (up to `deadline`) for processes
    /// whose parent is also dying, since they are re-parented to us only
    /// when that parent is gone.
    pub(crate) fn reap(mut self, deadline: Duration) {
        let me = std::process::id();
        let until = Instant::now() + deadline;
        let mut backoff = Backoff::new();
        loop {
            self.procs.retain(|&(pid, start_time)| match stat(pid) {
                // Gone, or the PID now belongs to another process.
                None => false,
                Some(s) if s.start_time != start_time => false,
                Some(s) if s.ppid == me => {
                    if s.state == 'Z' {
                        // Our zombie, and no Child handle exists for it.
                        let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
                        false
                    } else {
                        true // killed, not dead yet
                    }
                }
                // Its parent is dying too: it will come to us.
                Some(s) => self.pids.contains(&s.ppid),
            });
            if self.procs.is_empty() || Instant::now() >= until {
                return;
            }
            backoff.pause(until);
        }
    }
}
