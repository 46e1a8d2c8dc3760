//! Polling with deadlines: the test bed never sleeps a fixed time hoping that
//! something happened; it re-checks a condition until a deadline.

use std::time::{Duration, Instant};

/// Sleeps between polls: starts at 1 ms and doubles up to 20 ms, so quick
/// conditions are seen at once and slow ones do not burn a core.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            next: Duration::from_millis(1),
        }
    }

    /// Waits before the next poll, never past `until`.
    pub(crate) fn pause(&mut self, until: Instant) {
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(self.next.min(left));
        self.next = (self.next * 2).min(Duration::from_millis(20));
    }
}

/// Polls `check` every few ms until it returns `Ok(true)` or `deadline` has
/// passed. The error names `what` and the last error (or `false`) that
/// `check` returned.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let until = start + deadline;
    let mut backoff = Backoff::new();
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => "the condition was still false".to_string(),
            Err(e) => format!("last error: {e:#}"),
        };
        if Instant::now() >= until {
            anyhow::bail!(
                "timed out after {:?} waiting for {what}; {last}",
                start.elapsed()
            );
        }
        backoff.pause(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_succeeds_and_times_out() {
        let mut n = 0;
        wait_until("three polls", Duration::from_secs(5), || {
            n += 1;
            Ok(n >= 3)
        })
        .unwrap();
        assert_eq!(n, 3);

        let err = wait_until("the impossible", Duration::from_millis(30), || {
            anyhow::bail!("still broken")
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("the impossible"), "{err}");
        assert!(err.contains("still broken"), "{err}");
    }
}
