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
        // The signer's load client (the bench's `ca` mode).
        "--bin",
        "ca-load",
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

/// Installs with apt-get what the test bed's container runtime
/// (`mesh_testbed::cri`) needs and is missing: containerd (with `ctr`), runc,
/// the CNI plugins, and gcc with a static libc for the pause program. The CRI
/// client is compiled from hand-written prost messages, so no protoc is
/// needed. Quick when everything is there. Services the packages would start
/// are kept from starting (policy-rc.d, as in container images), and a
/// containerd that starts anyway is stopped by its PID: the tests run their
/// own, one per node, and a system one would only be in the way.
/// Also the DNS tests' dnsmasq and dig (binaries only, no service).
pub fn ensure_container_runtime() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    // (package, a file it installs that the test bed uses)
    const NEEDED: [(&str, &str); 10] = [
        ("containerd", "/usr/bin/containerd"),
        ("containerd", "/usr/bin/ctr"),
        ("runc", "/usr/sbin/runc"),
        ("containernetworking-plugins", "/usr/lib/cni/bridge"),
        ("containernetworking-plugins", "/usr/lib/cni/host-local"),
        ("containernetworking-plugins", "/usr/lib/cni/loopback"),
        ("gcc", "/usr/bin/gcc"),
        // `gcc -static` links this one.
        ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
        // The DNS tests: a real resolver in a pod of the test bed, and a
        // real client (the binary only: no service is installed).
        ("dnsmasq-base", "/usr/sbin/dnsmasq"),
        ("bind9-dnsutils", "/usr/bin/dig"),
    ];
    let mut missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    step(format!(
        "installing what the test bed needs (container runtime, DNS tools): {}",
        missing.join(" ")
    ));
    let started = Instant::now();

    // Debian's maintainer scripts ask /usr/sbin/policy-rc.d before starting
    // a service; 101 means "not allowed". Ours only while we install, and
    // only if there was none (container images often ship one already).
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    struct RemovePolicy;
    impl Drop for RemovePolicy {
        fn drop(&mut self) {
            if let Err(e) = fs::remove_file(POLICY) {
                eprintln!("cannot remove {POLICY}: {e}");
            }
        }
    }
    let _policy = if Path::new(POLICY).exists() {
        None
    } else {
        fs::write(
            POLICY,
            "#!/bin/sh\n# mesh xtask: no service starts while it installs\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY}"))?;
        let guard = RemovePolicy;
        fs::set_permissions(POLICY, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY} executable"))?;
        Some(guard)
    };
    let before = containerd_pids();

    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        run(&mut cmd)
    };
    apt(&["update", "-q"]).context("apt-get update failed")?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    let installed = apt(&install);

    // Whatever containerd the install started anyway (no policy-rc.d
    // honoured, a postinst that starts it by hand): stop it by its PID. A
    // test's own containerd always has `--config`; a service's has not.
    for pid in containerd_pids().difference(&before) {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == b"--config") {
            continue;
        }
        step(format!(
            "stopping the containerd (pid {pid}) the install started"
        ));
        // SAFETY: kill(2) with integer arguments; the PID was seen just now.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    installed.with_context(|| {
        format!(
            "installing {} failed; fix: apt-get install -y --no-install-recommends {}",
            missing.join(" "),
            missing.join(" ")
        )
    })?;
    let still: Vec<&str> = NEEDED
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(_, file)| *file)
        .collect();
    if !still.is_empty() {
        bail!(
            "installed {} but {} still missing",
            missing.join(" "),
            still.join(", ")
        );
    }
    step(format!(
        "container runtime installed ({:.0}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// PIDs of the processes running /usr/bin/containerd.
fn containerd_pids() -> std::collections::BTreeSet<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe == Path::new("/usr/bin/containerd"))
        })
        .collect()
}
