//! Putting the plugin into a node's CNI configuration and taking it out.
//!
//! The runtime uses the first network configuration of its directory in
//! name order (libcni's order; containerd and CRI-O load that one). The
//! plugin is appended to that conflist's `plugins`, after the pod
//! network's own plugins, so it sees their result. The file's bytes before
//! the change are kept in the backup directory; uninstalling puts them back
//! exactly when nothing else changed the file meanwhile, and otherwise
//! removes only the plugin's entry.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{PLUGIN_TYPE, spec::PluginSettings};

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The plugin was appended to this conflist.
    Added(PathBuf),
    /// The conflist had the plugin already; its settings were brought up
    /// to date where they differed.
    AlreadyThere(PathBuf),
}

/// What [`uninstall`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uninstalled {
    /// The conflist's bytes from before the install were put back.
    Restored(PathBuf),
    /// The conflist changed since the install: only the plugin's entry was
    /// removed.
    EntryRemoved(PathBuf),
    /// No conflist had the plugin.
    NotInstalled,
}

/// The network configuration the runtime uses: the first `.conflist`,
/// `.conf` or `.json` file in `conf_dir` by name.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot list {}: {e}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        format!(
            "no CNI network configuration in {} yet (the pod network's plugin writes it)",
            conf_dir.display()
        )
    })
}

fn backup_of(backup_dir: &Path, conflist: &Path) -> PathBuf {
    let name = conflist
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    backup_dir.join(format!("{name}.before-mesh-cni"))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

fn plugins_mut<'a>(conf: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, String> {
    conf.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            format!(
                "{}: has no `plugins` list; only a conflist can chain plugins (convert the single-plugin .conf to a .conflist)",
                path.display()
            )
        })
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN_TYPE
}

/// Written to a temporary file in the same directory and renamed over
/// the old one, with the old one's permissions: the runtime never reads
/// half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_file_name(format!(
        ".{}.mesh-cni-tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes)
        .and_then(|()| {
            if let Ok(meta) = std::fs::metadata(path) {
                std::fs::set_permissions(&tmp, meta.permissions())?;
            }
            std::fs::rename(&tmp, path)
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
}

/// Copies the plugin `binary` into `bin_dir` and chains it into the
/// primary conflist of `conf_dir` with `settings`.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    backup_dir: &Path,
    settings: &PluginSettings,
) -> Result<Installed, String> {
    std::fs::create_dir_all(bin_dir)
        .map_err(|e| format!("cannot create {}: {e}", bin_dir.display()))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(binary, &tmp)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&tmp, &target)
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!(
                "cannot copy {} to {}: {e}",
                binary.display(),
                target.display()
            )
        })?;

    let path = primary_config(conf_dir)?;
    let original =
        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut conf: Value = serde_json::from_slice(&original)
        .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let mut entry = serde_json::to_value(settings).expect("settings serialize");
    entry["type"] = Value::from(PLUGIN_TYPE);
    let plugins = plugins_mut(&mut conf, &path)?;
    if let Some(existing) = plugins.iter_mut().find(|p| is_ours(p)) {
        if *existing != entry {
            *existing = entry;
            write_atomically(&path, &pretty(&conf))?;
        }
        return Ok(Installed::AlreadyThere(path));
    }
    plugins.push(entry);
    std::fs::create_dir_all(backup_dir)
        .map_err(|e| format!("cannot create {}: {e}", backup_dir.display()))?;
    let backup = backup_of(backup_dir, &path);
    std::fs::write(&backup, &original)
        .map_err(|e| format!("cannot keep the original in {}: {e}", backup.display()))?;
    write_atomically(&path, &pretty(&conf))?;
    Ok(Installed::Added(path))
}

fn pretty(conf: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(conf).expect("JSON serializes");
    bytes.push(b'\n');
    bytes
}

/// Takes the plugin out of every conflist in `conf_dir` that has it, and
/// its binary out of `bin_dir`.
pub fn uninstall(
    bin_dir: &Path,
    conf_dir: &Path,
    backup_dir: &Path,
) -> Result<Uninstalled, String> {
    let mut outcome = Uninstalled::NotInstalled;
    let entries = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot list {}: {e}", conf_dir.display()))?;
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.is_file()) {
        let Ok(mut conf) = read_json(&path) else {
            continue;
        };
        let Ok(plugins) = plugins_mut(&mut conf, &path) else {
            continue;
        };
        if !plugins.iter().any(is_ours) {
            continue;
        }
        plugins.retain(|p| !is_ours(p));
        let backup = backup_of(backup_dir, &path);
        let restored = match std::fs::read(&backup) {
            Ok(original)
                if serde_json::from_slice::<Value>(&original).ok() == Some(conf.clone()) =>
            {
                write_atomically(&path, &original)?;
                true
            }
            _ => {
                write_atomically(&path, &pretty(&conf))?;
                false
            }
        };
        let _ = std::fs::remove_file(&backup);
        outcome = if restored {
            Uninstalled::Restored(path)
        } else {
            Uninstalled::EntryRemoved(path)
        };
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove the plugin from {}: {e}",
                bin_dir.display()
            ));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"k8s-pod-network\",\n  \"plugins\": [ {\"type\": \"bridge\", \"bridge\": \"cni0\"},\n   {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}} ]\n}\n";

    fn settings() -> PluginSettings {
        PluginSettings {
            agent_socket: "/var/run/mesh-agent/cni.sock".into(),
            enrolled_namespaces_file: "/var/lib/mesh-agent/cni/namespaces.json".into(),
            timeout_seconds: 30,
        }
    }

    struct Node {
        _dir: tempfile::TempDir,
        bin: PathBuf,
        conf: PathBuf,
        backup: PathBuf,
        binary: PathBuf,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("10-calico.conflist"), ORIGINAL).unwrap();
        std::fs::write(conf.join("99-other.conflist"), ORIGINAL).unwrap();
        let binary = dir.path().join("mesh-cni-source");
        std::fs::write(&binary, b"#!/bin/true\n").unwrap();
        Node {
            bin: dir.path().join("bin"),
            backup: dir.path().join("backup"),
            conf,
            binary,
            _dir: dir,
        }
    }

    #[test]
    fn install_chains_the_plugin_last_in_the_first_conflist_and_uninstall_restores_its_bytes() {
        let n = node();
        let first = n.conf.join("10-calico.conflist");
        let done = install(&n.binary, &n.bin, &n.conf, &n.backup, &settings()).unwrap();
        assert_eq!(done, Installed::Added(first.clone()));
        let conf = read_json(&first).unwrap();
        let plugins = conf["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["type"], "mesh-cni");
        assert_eq!(plugins[2]["agentSocket"], "/var/run/mesh-agent/cni.sock");
        assert!(n.bin.join("mesh-cni").is_file());
        // The other conflist is not the runtime's: untouched.
        assert_eq!(
            std::fs::read_to_string(n.conf.join("99-other.conflist")).unwrap(),
            ORIGINAL
        );
        // Twice is once.
        let again = install(&n.binary, &n.bin, &n.conf, &n.backup, &settings()).unwrap();
        assert_eq!(again, Installed::AlreadyThere(first.clone()));
        assert_eq!(
            read_json(&first).unwrap()["plugins"]
                .as_array()
                .unwrap()
                .len(),
            3
        );

        assert_eq!(
            uninstall(&n.bin, &n.conf, &n.backup).unwrap(),
            Uninstalled::Restored(first.clone())
        );
        assert_eq!(std::fs::read_to_string(&first).unwrap(), ORIGINAL);
        assert!(!n.bin.join("mesh-cni").exists());
        assert_eq!(
            uninstall(&n.bin, &n.conf, &n.backup).unwrap(),
            Uninstalled::NotInstalled
        );
    }

    #[test]
    fn a_conflist_changed_since_the_install_keeps_the_change_and_loses_only_the_plugin() {
        let n = node();
        let first = n.conf.join("10-calico.conflist");
        install(&n.binary, &n.bin, &n.conf, &n.backup, &settings()).unwrap();
        let mut conf = read_json(&first).unwrap();
        conf["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(1, serde_json::json!({"type": "bandwidth"}));
        std::fs::write(&first, serde_json::to_vec(&conf).unwrap()).unwrap();
        assert_eq!(
            uninstall(&n.bin, &n.conf, &n.backup).unwrap(),
            Uninstalled::EntryRemoved(first.clone())
        );
        let types: Vec<String> = read_json(&first).unwrap()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, ["bridge", "bandwidth", "portmap"]);
    }

    #[test]
    fn what_cannot_be_chained_is_named() {
        let n = node();
        std::fs::write(
            n.conf.join("05-single.conf"),
            r#"{"cniVersion":"0.4.0","name":"x","type":"bridge"}"#,
        )
        .unwrap();
        let err = install(&n.binary, &n.bin, &n.conf, &n.backup, &settings()).unwrap_err();
        assert!(
            err.contains("05-single.conf") && err.contains("conflist"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        let err = install(&n.binary, &n.bin, empty.path(), &n.backup, &settings()).unwrap_err();
        assert!(err.contains("no CNI network configuration"), "{err}");
    }
}
