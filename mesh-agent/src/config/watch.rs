//! Watches the configuration directory. The directory itself is watched (not
//! the files), so Kubernetes ConfigMap updates, which swap a `..data` symlink,
//! are seen; recursively, so subdirectories (e.g. `policies/`, often a volume
//! of its own) are too. Bursts of events are debounced into one reload.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last event before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// A running watch; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

impl ConfigWatch {
    pub fn start(dir: &Path) -> Result<Self> {
        let (tx, changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })
            .context("creating the configuration watcher")?;
        watcher
            .watch(dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            _watcher: watcher,
            changes,
        })
    }

    /// Waits for a change, then for the directory to be quiet for [`DEBOUNCE`].
    pub async fn changed(&mut self) -> bool {
        if self.changes.recv().await.is_none() {
            return false;
        }
        loop {
            match tokio::time::timeout(DEBOUNCE, self.changes.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }
}
