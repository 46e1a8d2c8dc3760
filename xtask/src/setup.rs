//! Sets up the kernel toolchain (reusing what is already there) and builds the
//! kernel programs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf_build::{
        BPF_LINKER_VERSION, EBPF_TOOLCHAIN, EbpfToolchain, bpf_linker_path, bpf_linker_root,
        ebpf_build_command, ebpf_object_path,
    },
    step,
};

/// Installs what is missing, then builds mesh-ebpf; returns the object's path.
pub fn build_ebpf(workspace: &Path) -> Result<PathBuf> {
    let toolchain = ensure_toolchain()?;
    ensure_rust_src(&toolchain)?;
    let linker = ensure_bpf_linker(workspace, &toolchain)?;
    step("building kernel programs (mesh-ebpf)");
    let started = Instant::now();
    run(&mut ebpf_build_command(workspace, &linker))
        .context("building the kernel crate mesh-ebpf failed (see the compiler output above)")?;
    let object = ebpf_object_path(workspace);
    if !object.is_file() {
        bail!(
            "the kernel build succeeded but {} is missing",
            object.display()
        );
    }
    step(format!(
        "kernel programs ready: {} ({:.1}s)",
        object.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(object)
}

fn ensure_toolchain() -> Result<EbpfToolchain> {
    if let Ok(toolchain) = EbpfToolchain::detect() {
        return Ok(toolchain);
    }
    step(format!(
        "installing the {EBPF_TOOLCHAIN} toolchain (minimal profile)"
    ));
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
    ]))
    .with_context(|| {
        format!(
            "the {EBPF_TOOLCHAIN} toolchain is missing and could not be installed; \
                 fix: rustup toolchain install {EBPF_TOOLCHAIN}"
        )
    })?;
    EbpfToolchain::detect().map_err(anyhow::Error::msg)
}

fn ensure_rust_src(toolchain: &EbpfToolchain) -> Result<()> {
    if toolchain.has_rust_src() {
        return Ok(());
    }
    step(format!(
        "installing rust-src for {EBPF_TOOLCHAIN} (needed by -Z build-std=core)"
    ));
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]))
        .with_context(|| {
            format!(
                "could not install rust-src; fix: rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}"
            )
        })?;
    if !toolchain.has_rust_src() {
        bail!(
            "rust-src was installed but its sources are not under {}",
            toolchain.sysroot.display()
        );
    }
    Ok(())
}

/// Builds bpf-linker from crates.io against the toolchain's own libLLVM, into
/// .tools/ (never a system path). Reused when it is already there.
fn ensure_bpf_linker(workspace: &Path, toolchain: &EbpfToolchain) -> Result<PathBuf> {
    let linker = bpf_linker_path(workspace, toolchain);
    if linker.is_file() {
        return Ok(linker);
    }
    let root = bpf_linker_root(workspace, toolchain);
    step(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {}) into {} (about a minute, once)",
        toolchain.llvm_lib_name,
        toolchain.llvm_major,
        root.display()
    ));
    let started = Instant::now();
    // A leftover of an interrupted build (cargo install writes the binary last, so
    // "no binary" means "not installed").
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    // bpf-linker's build finds LLVM through LLVM_PREFIX/lib, and that directory
    // becomes the binary's RUNPATH. The toolchain ships libLLVM under its soname
    // only, so give it both names as links.
    let llvm_prefix = root.join("llvm");
    let llvm_lib_dir = llvm_prefix.join("lib");
    fs::create_dir_all(&llvm_lib_dir)
        .with_context(|| format!("creating {}", llvm_lib_dir.display()))?;
    let real_lib = toolchain.sysroot.join("lib").join(&toolchain.llvm_lib_name);
    for name in ["libLLVM.so", toolchain.llvm_lib_name.as_str()] {
        std::os::unix::fs::symlink(&real_lib, llvm_lib_dir.join(name)).with_context(|| {
            format!(
                "linking {} in {}",
                real_lib.display(),
                llvm_lib_dir.display()
            )
        })?;
    }
    let mut install = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{}", toolchain.llvm_major)])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &llvm_prefix)
        .env(
            "CARGO_TARGET_DIR",
            workspace.join("target").join("bpf-linker-build"),
        );
    run(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed (see cargo's output above). It needs the crates.io \
             registry and the {EBPF_TOOLCHAIN} toolchain's libLLVM ({}).",
            real_lib.display()
        )
    })?;
    if !linker.is_file() {
        bail!("bpf-linker was built but {} is missing", linker.display());
    }
    step(format!(
        "bpf-linker ready ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(linker)
}

/// Runs a command with inherited output; an error names the command and its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the release agent (its build script builds the kernel object).
/// Builds the HTTP load generator and server (release) the benchmark runs in
/// the pods: `(http-load, http-serve)`.
pub fn build_load_tools_release(workspace: &Path) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).current_dir(workspace).args([
        "build",
        "--release",
        "-p",
        "mesh-e2e",
        "--bin",
        "http-load",
        "--bin",
        "http-serve",
    ]))?;
    let bins = (
        workspace.join("target/release/http-load"),
        workspace.join("target/release/http-serve"),
    );
    for bin in [&bins.0, &bins.1] {
        if !bin.is_file() {
            bail!(
                "cargo built the load tools but {} is missing",
                bin.display()
            );
        }
    }
    Ok(bins)
}

pub fn build_agent_release(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).current_dir(workspace).args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
    ]))?;
    let bin = workspace.join("target/release/mesh-agent");
    if !bin.is_file() {
        bail!("cargo built mesh-agent but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Builds `pod-tool`, the servers and clients the test bed runs in pods
/// (mesh-testbed's binary; a debug build, as the tests use), and makes the
/// test bed use that one.
pub fn build_pod_tool(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).current_dir(workspace).args([
        "build",
        "-p",
        "mesh-testbed",
        "--bin",
        mesh_testbed::tool::NAME,
    ]))?;
    let bin = workspace
        .join("target/debug")
        .join(mesh_testbed::tool::NAME);
    if !bin.is_file() {
        bail!("cargo built pod-tool but {} is missing", bin.display());
    }
    mesh_testbed::tool::use_binary(&bin)?;
    Ok(bin)
}
