//! Builds the kernel programs (mesh-ebpf) as part of every build of the agent, so
//! an agent can never embed a stale kernel object. Cargo's own fingerprints keep
//! this cheap when nothing changed. The toolchain pieces (nightly rust-src,
//! bpf-linker) are set up by `cargo xtask build-ebpf`; if one is missing this says
//! which, and how to get it.

use std::path::{Path, PathBuf};

/// One definition of the kernel build, shared with xtask (which uses all of it).
#[allow(dead_code)]
mod ebpf_build {
    include!("../xtask/src/ebpf_build.rs");
}
use ebpf_build::{check_ebpf_prerequisites, ebpf_build_command, ebpf_object_path};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("mesh-agent is one level below the workspace");
    for input in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-ebpf/Cargo.lock",
        "mesh-common/src",
        "mesh-common/Cargo.toml",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    if let Err(err) = build(workspace) {
        // A build-script panic shows the message verbatim; make it the first thing read.
        panic!("\n\nmesh-agent needs the kernel programs and could not build them:\n{err}\n\n");
    }
}

fn build(workspace: &Path) -> Result<(), String> {
    let (_toolchain, linker) = check_ebpf_prerequisites(workspace)?;
    println!("cargo:rerun-if-changed={}", linker.display());
    let mut cmd = ebpf_build_command(workspace, &linker);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building mesh-ebpf failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Copy into OUT_DIR so a later kernel build cannot change the file under a
    // compile that is embedding it.
    let object = ebpf_object_path(workspace);
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let embedded = out_dir.join("mesh-ebpf.o");
    std::fs::copy(&object, &embedded).map_err(|e| {
        format!(
            "copying {} to {}: {e}",
            object.display(),
            embedded.display()
        )
    })?;
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", embedded.display());
    Ok(())
}
