//! `kubernetes-validate` (PyPI) in a project-local virtualenv under .tools/:
//! the deploy/ manifests are validated strictly against the Kubernetes
//! schemas it ships, offline (no API server, no discovery).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{setup, step};

pub const VERSION: &str = "1.37.0";

/// The environment variable that tells the manifest checks where it is.
pub const ENV: &str = "MESH_KUBERNETES_VALIDATE";

/// Installs it if needed; returns the executable.
pub fn ensure(workspace: &Path) -> Result<PathBuf> {
    let venv = workspace
        .join(".tools")
        .join(format!("kubernetes-validate-{VERSION}"));
    let bin = venv.join("bin").join("kubernetes-validate");
    if bin.is_file() {
        return Ok(bin);
    }
    step(format!(
        "installing kubernetes-validate {VERSION} (PyPI) into {}",
        venv.display()
    ));
    setup::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("making a Python virtualenv (python3-venv)")?;
    setup::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("kubernetes-validate=={VERSION}")),
    )
    .context("installing kubernetes-validate from PyPI")?;
    Ok(bin)
}
