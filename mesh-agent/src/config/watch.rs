//! One file watcher for everything the agent reads from disk: the
//! configuration directory and the identity material (issuer, trust bundle,
//! certificate files), each turned into its own debounced stream of changes.
//!
//! Directories are watched, not files, so Kubernetes ConfigMap and Secret
//! updates, which swap a `..data` symlink, are seen; the configuration
//! directory recursively, so subdirectories (e.g. `policies/`, often a volume
//! of its own) are too. Bursts of events are debounced into one change.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last event before a change is reported.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The running watcher; dropping it stops both streams.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Changes of one set of paths.
pub struct Changes {
    events: mpsc::UnboundedReceiver<()>,
}

impl FileWatch {
    /// Watches `config_dir` (recursively) and the directories holding
    /// `identity_files`. Returns the watcher and the two change streams.
    pub fn start(
        config_dir: &Path,
        identity_files: &[PathBuf],
    ) -> Result<(Self, Changes, Changes)> {
        let (config_tx, config) = mpsc::unbounded_channel();
        let (identity_tx, identity) = mpsc::unbounded_channel();
        let identity_dirs: BTreeSet<PathBuf> = identity_files
            .iter()
            .map(|f| {
                if f.is_dir() {
                    f.clone()
                } else {
                    f.parent().map(Path::to_path_buf).unwrap_or_default()
                }
            })
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
        let (watched_config, watched_identity) = (config_dir.to_path_buf(), identity_dirs.clone());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                let touches = |dir: &Path| event.paths.iter().any(|p| p.starts_with(dir));
                if touches(&watched_config) {
                    let _ = config_tx.send(());
                }
                if watched_identity.iter().any(|d| touches(d)) {
                    let _ = identity_tx.send(());
                }
            })
            .context("creating the file watcher")?;
        watcher
            .watch(config_dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", config_dir.display()))?;
        // Directories inside the configuration directory are watched already.
        // One that cannot be watched (not there yet) costs only its own
        // changes, never the configuration's.
        for dir in identity_dirs.iter().filter(|d| !d.starts_with(config_dir)) {
            if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %err, "identity files here will not be reloaded when they change");
            }
        }
        Ok((
            Self { _watcher: watcher },
            Changes { events: config },
            Changes { events: identity },
        ))
    }
}

impl Changes {
    /// Waits for a change, then for the paths to be quiet for [`DEBOUNCE`].
    /// False once the watcher is gone.
    pub async fn changed(&mut self) -> bool {
        if self.events.recv().await.is_none() {
            return false;
        }
        loop {
            match tokio::time::timeout(DEBOUNCE, self.events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_and_identity_changes_come_on_their_own_streams() {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("config");
        let secrets = root.path().join("secrets");
        std::fs::create_dir_all(config.join("policies")).unwrap();
        std::fs::create_dir_all(&secrets).unwrap();
        let bundle = secrets.join("bundle.pem");
        std::fs::write(&bundle, "x").unwrap();
        let (_watch, mut config_changes, mut identity_changes) =
            FileWatch::start(&config, std::slice::from_ref(&bundle)).unwrap();
        let within = Duration::from_secs(5);

        std::fs::write(config.join("policies/p.yaml"), "a").unwrap();
        assert!(
            tokio::time::timeout(within, config_changes.changed())
                .await
                .unwrap()
        );
        std::fs::write(&bundle, "y").unwrap();
        assert!(
            tokio::time::timeout(within, identity_changes.changed())
                .await
                .unwrap()
        );
        // Each stream saw only its own.
        assert!(
            tokio::time::timeout(DEBOUNCE * 3, config_changes.changed())
                .await
                .is_err(),
            "an identity change reached the configuration stream"
        );
    }
}
