//! Unique, sweepable names.
//!
//! Every object a topology creates (netns, cgroup dir, bpffs dir, temp dir)
//! is named `mtb-<pid>-<starttime>-<n>[-...]`: the owning process's PID and
//! its start time (field 22 of `/proc/<pid>/stat`, in clock ticks since
//! boot), then a per-process counter. The start time lets the sweeper tell a
//! live owner from a recycled PID (pid_max can be as low as 32768).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix shared by every name the test bed creates.
pub(crate) const PREFIX: &str = "mtb-";

/// The owner part of a name: which process created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

impl Owner {
    /// The current process.
    pub(crate) fn current() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            // /proc/self/stat of our own process cannot be missing on Linux.
            let start_time = proc_start_time(pid).unwrap_or(0);
            Owner { pid, start_time }
        })
    }

    /// Whether the owning process still runs (same PID *and* same start time).
    pub(crate) fn is_alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start_time)
    }

    /// Parses the owner out of `mtb-<pid>-<starttime>-...`; `None` for names
    /// that do not follow the scheme (they are never touched).
    pub(crate) fn parse(name: &str) -> Option<Owner> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(3, '-');
        let pid = parts.next()?.parse().ok()?;
        let start_time = parts.next()?.parse().ok()?;
        // Require at least the counter after the owner.
        parts.next().filter(|s| !s.is_empty())?;
        Some(Owner { pid, start_time })
    }
}

/// A fresh topology id `mtb-<pid>-<starttime>-<n>`.
pub(crate) fn next_id(kind: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let me = Owner::current();
    format!("{PREFIX}{}-{}-{kind}{n}", me.pid, me.start_time)
}

/// Start time (clock ticks since boot) of `pid`, `None` if it does not exist.
pub(crate) fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may contain spaces and parentheses: skip past the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) onwards; starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Checks a node or pod name: it becomes part of netns and cgroup names, and
/// `-` separates components of those names, so only `[A-Za-z0-9_]` is allowed.
pub(crate) fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 32
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "invalid {what} name {name:?}: use 1 to 32 characters from [A-Za-z0-9_]"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_owner() {
        assert_eq!(
            Owner::parse("mtb-12-345-0-n1-a"),
            Some(Owner {
                pid: 12,
                start_time: 345
            })
        );
        assert_eq!(
            Owner::parse("mtb-12-345-7"),
            Some(Owner {
                pid: 12,
                start_time: 345
            })
        );
        assert_eq!(Owner::parse("mtb-12-345"), None);
        assert_eq!(Owner::parse("mtb-x-345-1"), None);
        assert_eq!(Owner::parse("other-12-345-1"), None);
    }

    #[test]
    fn current_owner_is_alive() {
        let me = Owner::current();
        assert!(me.is_alive());
        assert!(me.start_time > 0);
        let id = next_id("");
        assert_eq!(Owner::parse(&id), Some(me));
        assert!(
            !Owner {
                start_time: me.start_time + 1,
                ..me
            }
            .is_alive()
        );
    }

    #[test]
    fn names() {
        assert!(check_name("node", "n1").is_ok());
        assert!(check_name("node", "a-b").is_err());
        assert!(check_name("node", "").is_err());
    }
}
