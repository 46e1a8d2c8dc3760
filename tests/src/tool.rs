//! `pod-tool`, this package's binary (`src/bin/pod-tool`): every server and
//! client the tests run inside pods and nodes (traffic server, echo clients,
//! HTTP, TLS probes). See `pod-tool --help`.
//!
//! Where it is found, in this order:
//! 1. the path given to [`use_binary`] (xtask, after building it);
//! 2. `$MESH_POD_TOOL`;
//! 3. next to the running executable, or one directory up: cargo puts test
//!    executables in `target/<profile>/deps/` and binaries in
//!    `target/<profile>/`. `cargo test` of this package (its integration test
//!    `tests/pod_tool.rs` needs the binary) or of the workspace builds it
//!    there; `cargo test -p mesh-e2e` alone does not.
//!
//! Found next to the executable, it must not be older than its sources
//! (when they are where it was built from): an old one is an error that says
//! how to rebuild it, as is a missing one. Tests never skip for want of it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};

/// The binary's file name.
pub const NAME: &str = "pod-tool";
/// Environment variable naming the binary to use.
pub const ENV: &str = "MESH_POD_TOOL";
/// How to build it, for messages.
const BUILD: &str = "cargo build -p mesh-testbed --bin pod-tool";

static CHOSEN: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Makes every later spawn use the binary at `path` (which must exist).
pub fn use_binary(path: impl Into<PathBuf>) -> Result<()> {
    let path = path.into();
    if !path.is_file() {
        bail!("{} is not a file", path.display());
    }
    *CHOSEN.lock().unwrap_or_else(PoisonError::into_inner) = Some(path);
    Ok(())
}

/// The path of the `pod-tool` binary (see the module's documentation), or
/// an error that says why it is not there and how to build it.
pub fn path() -> Result<PathBuf> {
    if let Some(path) = CHOSEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    {
        return Ok(path);
    }
    if let Some(path) = std::env::var_os(ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("${ENV} is {}, which is not a file", path.display());
        }
        return Ok(path);
    }
    // Looked up once per process: the answer does not change.
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| next_to_executable().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn next_to_executable() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the running executable's path")?;
    let dir = exe.parent().context("the running executable's directory")?;
    let candidates: Vec<PathBuf> = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(NAME))
        .collect();
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "the test bed's `{NAME}` binary is not built: looked for {}. Cargo builds it with \
             this package's tests (`cargo test -p mesh-testbed`, `cargo test --workspace`, \
             `cargo xtask test`); or run `{BUILD}`, or set ${ENV} to one",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        );
    };
    check_fresh(
        found,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/pod-tool"),
    )?;
    Ok(found.clone())
}

/// Fails if a file under `sources` (when they exist) is newer than `binary`.
fn check_fresh(binary: &Path, sources: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(sources) else {
        return Ok(()); // not where it was built from: nothing to compare
    };
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("the modification time of {}", binary.display()))?;
    for entry in entries.flatten() {
        let modified = entry.metadata().and_then(|m| m.modified());
        if modified.is_ok_and(|m: SystemTime| m > built) {
            bail!(
                "{} is older than its source {}: rebuild it (`{BUILD}`, or run the tests \
                 with `cargo test --workspace`)",
                binary.display(),
                entry.path().display()
            );
        }
    }
    Ok(())
}

/// A command running `pod-tool` with `args`, for `Pod::spawn_with` and
/// `Node::spawn_with`.
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Result<Command> {
    let mut cmd = Command::new(path()?);
    cmd.args(args);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_binary_is_refused_and_a_fresh_one_accepted() {
        let dir = std::env::temp_dir().join(format!("mesh-tool-fresh-{}", std::process::id()));
        let sources = dir.join("src");
        std::fs::create_dir_all(&sources).unwrap();
        let binary = dir.join(NAME);
        std::fs::write(&binary, "").unwrap();
        let source = sources.join("main.rs");
        std::fs::write(&source, "").unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&binary)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let err = check_fresh(&binary, &sources).unwrap_err().to_string();
        assert!(
            err.contains("older than its source") && err.contains(BUILD),
            "{err}"
        );
        std::fs::File::options()
            .write(true)
            .open(&source)
            .unwrap()
            .set_modified(old - std::time::Duration::from_secs(60))
            .unwrap();
        check_fresh(&binary, &sources).unwrap();
        // No sources where it was built from: nothing to compare.
        check_fresh(&binary, &dir.join("elsewhere")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
