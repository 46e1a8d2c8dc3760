//! The files as a source of the desired state: the directory is watched,
//! and every change is read and validated whole. A valid one is sent as a
//! new desired state, an invalid one as a rejection naming file, line and
//! field (the previous state keeps serving). A policy file that does not
//! load is the exception: it keeps its last good version (or stays out if
//! it never loaded) and the other changes apply, with the refusal shown.

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::{kept_back_reason, load_dir_keeping_policies, watch::Changes};
use crate::desired::Update;

/// Follows `dir` until the receiver goes. The watch (`changes`) started
/// before this first read, so a change made at any time after the agent's
/// own load is seen.
pub async fn run(dir: PathBuf, mut changes: Changes, updates: mpsc::Sender<Update>) {
    let mut first_pass = true;
    // The policy files of the last load sent: a policy file that does not
    // load keeps its version from there (none yet: all-or-nothing).
    let mut last_good: Option<Vec<(PathBuf, String)>> = None;
    while std::mem::take(&mut first_pass) || changes.changed().await {
        let loaded = match &last_good {
            Some(files) => load_dir_keeping_policies(&dir, files),
            None => super::load_dir(&dir).map(|desired| (desired, Vec::new())),
        };
        let update = match loaded {
            Ok((desired, kept_back)) => {
                last_good = Some(desired.policies.files.clone());
                if kept_back.is_empty() {
                    Update::Desired(Box::new(desired))
                } else {
                    Update::DesiredFilesRefused(Box::new(desired), kept_back_reason(&kept_back))
                }
            }
            Err(err) => Update::Rejected(err.to_string()),
        };
        if updates.send(update).await.is_err() {
            return;
        }
    }
}
