// How the kernel crate is built: one definition shared by `cargo xtask build-ebpf`
// and mesh-agent's build script (which `include!`s this file, so it must only use
// `std`). xtask additionally installs what is missing; the build script only builds
// and, if a tool is missing, says which one and how to get it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The toolchain that compiles the kernel crate (needs `-Z build-std`).
pub const EBPF_TOOLCHAIN: &str = "nightly";
/// The BPF target: little-endian, as on every host we run on.
pub const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The bpf-linker release known to build against the rustup toolchain's libLLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Facts about the nightly toolchain, read at run time (never hard-coded).
#[derive(Debug, Clone)]
pub struct EbpfToolchain {
    /// The toolchain's sysroot (`rustc --print sysroot`).
    pub sysroot: PathBuf,
    /// LLVM major version rustc was built with, e.g. 22.
    pub llvm_major: u32,
    /// File name of the toolchain's shared libLLVM with its full soname,
    /// e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    pub llvm_lib_name: String,
}

impl EbpfToolchain {
    /// Reads the toolchain facts through rustup.
    pub fn detect() -> Result<Self, String> {
        let version = capture(rustup().args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"])).map_err(|e| {
            format!(
                "the `{EBPF_TOOLCHAIN}` Rust toolchain is needed to build the kernel programs but \
                 `rustup run {EBPF_TOOLCHAIN} rustc -vV` failed: {e}\n\
                 fix: rustup toolchain install {EBPF_TOOLCHAIN} --profile minimal"
            )
        })?;
        let llvm_major = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.trim().parse().ok())
            .ok_or_else(|| format!("no `LLVM version` line in `rustc -vV` output:\n{version}"))?;
        let sysroot = PathBuf::from(
            capture(rustup().args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"]))?.trim(),
        );
        let lib_dir = sysroot.join("lib");
        let entries = std::fs::read_dir(&lib_dir)
            .map_err(|e| format!("cannot list {}: {e}", lib_dir.display()))?;
        // The soname form (`libLLVM.so.<major>.<minor>-rust-...`) is what the
        // toolchain's own binaries link against.
        let soname_prefix = format!("libLLVM.so.{llvm_major}");
        let llvm_lib_name = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| name.starts_with(&soname_prefix))
            .ok_or_else(|| {
                format!(
                    "the {EBPF_TOOLCHAIN} toolchain has no shared LLVM library ({soname_prefix}*) in {}; \
                     bpf-linker needs it.\nfix: rustup component add llvm-tools --toolchain {EBPF_TOOLCHAIN}, \
                     or reinstall the toolchain",
                    lib_dir.display()
                )
            })?;
        Ok(Self {
            sysroot,
            llvm_major,
            llvm_lib_name,
        })
    }

    /// Whether the `rust-src` component (needed by `-Z build-std=core`) is present.
    pub fn has_rust_src(&self) -> bool {
        self.sysroot
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
    }
}

/// Where bpf-linker and its LLVM links live: one directory per libLLVM build, so a
/// toolchain update gets a matching linker instead of a stale one.
pub fn bpf_linker_root(workspace: &Path, toolchain: &EbpfToolchain) -> PathBuf {
    workspace.join(".tools").join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-{}",
        toolchain.llvm_lib_name
    ))
}

/// The bpf-linker binary for this toolchain.
pub fn bpf_linker_path(workspace: &Path, toolchain: &EbpfToolchain) -> PathBuf {
    bpf_linker_root(workspace, toolchain)
        .join("bin")
        .join("bpf-linker")
}

/// Cargo target directory of the kernel build (shared by all host profiles).
pub fn ebpf_target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("bpf")
}

/// The linked kernel object (an ELF file named after the bin target).
pub fn ebpf_object_path(workspace: &Path) -> PathBuf {
    ebpf_target_dir(workspace)
        .join(EBPF_TARGET)
        .join("release")
        .join("mesh-ebpf")
}

/// Checks that everything the kernel build needs is present; the error says what
/// is missing and how to get it.
#[allow(
    dead_code,
    reason = "used by mesh-agent's build script, which installs nothing"
)]
pub fn check_ebpf_prerequisites(workspace: &Path) -> Result<(EbpfToolchain, PathBuf), String> {
    let toolchain = EbpfToolchain::detect()?;
    if !toolchain.has_rust_src() {
        return Err(format!(
            "the `rust-src` component of the {EBPF_TOOLCHAIN} toolchain is missing (needed for \
             -Z build-std=core).\nfix: cargo xtask build-ebpf (installs it), or \
             rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}"
        ));
    }
    let linker = bpf_linker_path(workspace, &toolchain);
    if !linker.is_file() {
        return Err(format!(
            "bpf-linker for LLVM {} is missing at {}.\nfix: cargo xtask build-ebpf (builds it \
             against the toolchain's own libLLVM, into .tools/)",
            toolchain.llvm_major,
            linker.display()
        ));
    }
    Ok((toolchain, linker))
}

/// The command that builds the kernel crate. Environment set by an outer cargo
/// (when run from a build script) is removed so it cannot leak into this build.
pub fn ebpf_build_command(workspace: &Path, linker: &Path) -> Command {
    let mut cmd = rustup();
    cmd.args([
        "run",
        EBPF_TOOLCHAIN,
        "cargo",
        "build",
        "--release",
        "--bins",
    ])
    .args(["-Z", "build-std=core", "--target", EBPF_TARGET])
    .arg("--manifest-path")
    .arg(workspace.join("mesh-ebpf").join("Cargo.toml"))
    .arg("--target-dir")
    .arg(ebpf_target_dir(workspace));
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        let inherited_from_cargo = (key_str.starts_with("CARGO") && key_str != "CARGO_HOME")
            || key_str.starts_with("RUST")
                && !matches!(
                    key_str.as_ref(),
                    "RUSTUP_HOME" | "RUST_BACKTRACE" | "RUST_LOG"
                );
        let build_script_vars = matches!(
            key_str.as_ref(),
            "TARGET" | "HOST" | "OUT_DIR" | "PROFILE" | "OPT_LEVEL" | "DEBUG" | "NUM_JOBS"
        );
        if inherited_from_cargo || build_script_vars {
            cmd.env_remove(&key);
        }
    }
    // The flags aya-build passes: the arch cfg aya-ebpf needs, and BTF for the loader.
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH);
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    cmd.env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", linker);
    cmd
}

/// rustup from PATH, or from the cargo home when PATH does not have it.
fn rustup() -> Command {
    let in_cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join("rustup"))
        .filter(|p| p.is_file());
    Command::new(in_cargo_home.unwrap_or_else(|| PathBuf::from("rustup")))
}

fn capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{cmd:?} printed non-UTF-8: {e}"))
}
