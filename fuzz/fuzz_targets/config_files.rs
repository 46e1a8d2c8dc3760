//! The config loader on arbitrary files: an error (with file, line, field)
//! or a configuration, never a panic. The input is node.yaml, pods.yaml,
//! services.yaml and workloads.yaml, separated by lines `#file`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = DIR
        .get_or_init(|| tempfile::tempdir().expect("a temp dir"))
        .path();
    let mut parts = text.split("\n#file\n");
    for name in ["node.yaml", "pods.yaml", "services.yaml", "workloads.yaml"] {
        let path = dir.join(name);
        match parts.next() {
            Some(part) => std::fs::write(&path, part).expect("writing"),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if let Ok(desired) = mesh_agent::config::load_dir(dir) {
        // What a reload builds before anything changes: services, remote
        // workloads, compiled policies.
        let _ = mesh_agent::proxy::Plan::build(&desired, &mesh_agent::proxy::Snapshot::empty());
    }
});
