//! The files as a source of the desired state: the directory is watched,
//! and every change is read and validated whole. A valid one is sent as a
//! new desired state, an invalid one as a rejection naming file, line and
//! field (the previous state keeps serving).

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::{load_dir, watch::Changes};
use crate::desired::Update;

/// Follows `dir` until the receiver goes. The watch (`changes`) started
/// before this first read, so a change made at any time after the agent's
/// own load is seen.
pub async fn run(dir: PathBuf, mut changes: Changes, updates: mpsc::Sender<Update>) {
    let mut first_pass = true;
    while std::mem::take(&mut first_pass) || changes.changed().await {
        let update = match load_dir(&dir) {
            Ok(desired) => Update::Desired(Box::new(desired)),
            Err(err) => Update::Rejected(err.to_string()),
        };
        if updates.send(update).await.is_err() {
            return;
        }
    }
}
