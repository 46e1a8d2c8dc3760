//! One QEMU guest: boots a prepared kernel with the host's root shared
//! read-only, runs a script as root in it, and reads its exit status from the
//! console. KVM when the host runs ordinary guests with it, else software
//! emulation (TCG).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::packages::PreparedKernel;

/// How the guest's CPU is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only with a hardware KVM module: other /dev/kvm providers (this
    /// machine's PVM, for one) run only specially built guests and hang
    /// with Debian's kernels. `MESH_KERNEL_ACCEL=tcg|kvm` overrides.
    pub fn detect() -> Self {
        match std::env::var("MESH_KERNEL_ACCEL").as_deref() {
            Ok("kvm") => return Self::Kvm,
            Ok("tcg") => return Self::Tcg,
            _ => {}
        }
        let hardware_kvm = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|m| Path::new(m).exists());
        if Path::new("/dev/kvm").exists() && hardware_kvm {
            Self::Kvm
        } else {
            Self::Tcg
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Kvm => &["-enable-kvm", "-cpu", "host", "-smp", "2"],
            // Two emulated CPUs, one host thread each.
            Self::Tcg => &["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"],
        }
    }
}

/// The QEMU process, stopped (by its handle: our own child) when dropped,
/// so a deadline or a panic never leaves a guest running.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// How one guest run ended.
pub struct GuestRun {
    /// The script's exit status; None if the guest never printed one
    /// (it crashed, hung or was stopped at the deadline).
    pub status: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Boots `kernel`, runs `script` (sh) in the guest with `out_dir` writable at
/// /tmp/out, and waits at most `deadline`. The console goes to
/// `out_dir/console.log`, the guest's kernel log to `out_dir/dmesg.txt`.
pub fn run(
    kernel: &PreparedKernel,
    accel: Accel,
    out_dir: &Path,
    script: &str,
    deadline: Duration,
) -> Result<GuestRun> {
    if out_dir.exists() {
        fs::remove_dir_all(out_dir)?;
    }
    fs::create_dir_all(out_dir)?;
    fs::write(out_dir.join("run.sh"), script)?;
    let console_path = out_dir.join("console.log");
    let console = fs::File::create(&console_path)?;
    let share = |tag: &str, path: &Path, readonly: bool| {
        [
            "-fsdev".to_string(),
            format!(
                "local,id={tag},path={},security_model=none{}",
                path.display(),
                if readonly { ",readonly=on" } else { "" }
            ),
            "-device".to_string(),
            format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"),
        ]
    };
    let started = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args(["-m", "3G", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .args(share("hostroot", Path::new("/"), true))
        .args(share("out", out_dir, false))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 kdir={}",
            kernel.root.display()
        ))
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut qemu = Vm(qemu);
    let mut timed_out = false;
    loop {
        if qemu.0.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(qemu);
    let console = fs::read(&console_path).unwrap_or_default();
    let console = String::from_utf8_lossy(&console);
    let status = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GUEST-RC: "))
        .next_back()
        .and_then(|rc| rc.trim().parse().ok());
    Ok(GuestRun {
        status,
        timed_out,
        elapsed: started.elapsed(),
    })
}
