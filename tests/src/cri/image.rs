//! The pod sandbox ("pause") image, made here: no registry is reachable, so
//! nothing may ever be pulled. `pause.c` is compiled `gcc -static` and put
//! alone in a one-layer image written as a docker-archive tarball, which
//! `ctr images import` loads into each containerd.
//!
//! Built once per machine: the binary and the tarball are cached under
//! `$TMPDIR/mesh-testbed-cache/pause-<hash>/`, the hash covering the source
//! and the image layout, so a changed `pause.c` gets a new image and tag.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use ring::digest::{SHA256, digest};

const SOURCE: &str = include_str!("pause.c");
/// Bumped whenever the tarball's layout changes.
const LAYOUT: &str = "docker-archive v1";

/// A built pause image: its tarball and the name it is imported under.
#[derive(Debug, Clone)]
pub(crate) struct PauseImage {
    pub tarball: PathBuf,
    /// `localhost/mesh-testbed-pause:<hash>` (the `sandbox_image`).
    pub reference: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The image's architecture as Go (and so OCI) names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The cached image, built first if it is not there yet. Safe to call from
/// several processes at once: each builds in a private directory and
/// renames it into place; the loser of the race uses the winner's.
pub(crate) fn pause_image() -> anyhow::Result<PauseImage> {
    let hash = sha256_hex(format!("{LAYOUT}\n{}\n{SOURCE}", go_arch()).as_bytes());
    let hash = &hash[..16];
    let cache = std::env::temp_dir().join("mesh-testbed-cache");
    let dir = cache.join(format!("pause-{hash}"));
    let image = PauseImage {
        tarball: dir.join("image.tar"),
        reference: format!("localhost/mesh-testbed-pause:{hash}"),
    };
    if image.tarball.is_file() {
        return Ok(image);
    }
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    let staging = cache.join(format!(
        "pause-{hash}.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let built = build(&staging, &image.reference);
    let result = built.and_then(|()| match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(()),
        // Another process was quicker: its image is the same.
        Err(_) if image.tarball.is_file() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot rename to {}", dir.display())),
    });
    let _ = std::fs::remove_dir_all(&staging);
    result.context("cannot build the pause image")?;
    Ok(image)
}

fn build(dir: &Path, reference: &str) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let source = dir.join("pause.c");
    std::fs::write(&source, SOURCE)?;
    let binary = dir.join("pause");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .context("cannot run gcc (apt-get install gcc libc6-dev)")?;
    if !out.status.success() {
        bail!(
            "`gcc -static -O2 -s -o {} {}` failed ({}): {}",
            binary.display(),
            source.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pause = std::fs::read(&binary)?;
    let tarball = docker_archive(&pause, reference)?;
    let mut file = std::fs::File::create(dir.join("image.tar"))?;
    file.write_all(&tarball)?;
    file.sync_all()?;
    Ok(())
}

/// A tar entry header owned by root, dated 0, so that the same input
/// always gives the same bytes (and the same layer digest).
fn header(path: &str, size: usize, mode: u32) -> anyhow::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path)?;
    header.set_size(size as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(header)
}

/// `docker save`'s format: `manifest.json`, the config and one layer tar
/// holding `/pause` (the entrypoint).
fn docker_archive(pause: &[u8], reference: &str) -> anyhow::Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    layer.append(&header("pause", pause.len(), 0o755)?, pause)?;
    let layer = layer.into_inner()?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));

    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": { "Entrypoint": ["/pause"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "mesh-testbed (tests/src/cri/image.rs)" }],
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": ["layer.tar"],
    }]))?;

    let mut archive = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("layer.tar", layer.as_slice()),
        (config_name.as_str(), config.as_slice()),
        ("manifest.json", manifest.as_slice()),
    ] {
        archive.append(&header(name, bytes.len(), 0o644)?, bytes)?;
    }
    Ok(archive.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_reproducible_and_well_formed() {
        let a = docker_archive(b"binary", "localhost/x:1").unwrap();
        assert_eq!(a, docker_archive(b"binary", "localhost/x:1").unwrap());
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names.len(), 3);
        assert_eq!(names[0], "layer.tar");
        assert!(names[1].ends_with(".json"), "{names:?}");
        assert_eq!(names[2], "manifest.json");
    }
}
