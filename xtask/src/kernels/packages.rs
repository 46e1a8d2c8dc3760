//! What a guest kernel run needs on the host: QEMU, a static busybox and kmod
//! (apt-get), and each Debian kernel package, downloaded, unpacked under
//! `.tools/kernels/` with its modules indexed and an initramfs of our own.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{setup::run, step};

/// A Debian long-term kernel the matrix boots.
pub struct GuestKernel {
    /// What users call it: "6.1", "6.12".
    pub series: &'static str,
    /// Debian's package is `<prefix><n><suffix>`; the newest n available is
    /// taken (older builds leave the archive as new ones arrive).
    prefix: &'static str,
    suffix: &'static str,
    /// Where apt finds it.
    source: Source,
    /// Whether the agent supports it: a kernel it does not support is in the
    /// matrix to show that the agent refuses it by name.
    pub supported: bool,
}

/// Where apt finds a kernel package.
#[derive(Clone, Copy)]
enum Source {
    /// The machine's own apt sources (bookworm, with our backports entry).
    System,
    /// A Debian release of its own, in a project-local apt state under
    /// `.tools/apt/<suite>/` (the machine's sources are not touched): first
    /// from deb.debian.org, then from archive.debian.org once it has moved.
    Local { suite: &'static str },
}

/// Debian 12's kernel (6.1) and its 6.12 (bookworm-backports): the long-term
/// kernels of most managed node images; and Debian 11's 5.10, which lacks
/// what the agent needs (SO_NETNS_COOKIE, 5.14; bpf_get_netns_cookie from
/// sock_ops, 5.15).
pub const GUEST_KERNELS: [GuestKernel; 3] = [
    GuestKernel {
        series: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        source: Source::System,
        supported: true,
    },
    GuestKernel {
        series: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        source: Source::System,
        supported: true,
    },
    GuestKernel {
        series: "5.10",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        source: Source::Local { suite: "bullseye" },
        supported: false,
    },
];

/// A kernel ready to boot.
pub struct PreparedKernel {
    /// The Debian package it came from.
    pub package: String,
    /// Its `uname -r`.
    pub release: String,
    /// The unpacked package (its modules are under `lib/modules/<release>`).
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// Modules the guest's /init needs before the root file system is there
/// (with their dependencies); whatever a test needs later, the guest loads
/// on demand.
const EARLY_MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/mesh-bookworm-backports.sources";

/// Installs QEMU (from bookworm-backports, whose 9p and TCG the matrix was
/// checked with), a static busybox for the initramfs, and kmod's depmod.
pub fn ensure_host_tools() -> Result<()> {
    let qemu_ok = Path::new("/usr/bin/qemu-system-x86_64").is_file();
    let busybox_ok = dpkg_installed("busybox-static");
    let kmod_ok = Path::new("/usr/sbin/depmod").is_file() || Path::new("/sbin/depmod").is_file();
    if qemu_ok && busybox_ok && kmod_ok && Path::new(BACKPORTS_SOURCE).is_file() {
        return Ok(());
    }
    step(
        "installing what the kernel matrix needs: qemu-system-x86 (bookworm-backports), busybox-static, kmod",
    );
    if !Path::new(BACKPORTS_SOURCE).is_file() {
        fs::write(
            BACKPORTS_SOURCE,
            "# Added by the mesh project's `cargo xtask test --kernel`: QEMU and Debian's 6.12\n\
             # kernel come from bookworm-backports.\n\
             Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {BACKPORTS_SOURCE}"))?;
    }
    apt(&["update", "-q"])?;
    apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
        "qemu-system-x86",
    ])?;
    apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "busybox-static",
        "kmod",
    ])?;
    Ok(())
}

fn apt(args: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null()))
    .with_context(|| format!("apt-get {}", args.join(" ")))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
}

/// apt options that make apt-get and apt-cache use `source`'s state.
fn apt_options(workspace: &Path, source: Source, mirror: &str) -> Result<Vec<String>> {
    let Source::Local { suite } = source else {
        return Ok(Vec::new());
    };
    let dir = workspace.join(".tools/apt").join(suite);
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let list = dir.join("sources.list");
    let signed = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    fs::write(
        &list,
        format!(
            "deb {signed} http://{mirror}/debian {suite} main\n\
             deb {signed} http://{mirror}/debian-security {suite}-security main\n"
        ),
    )?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/dev/null".to_string(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        // An old release's Release file may be past its Valid-Until.
        "-oAcquire::Check-Valid-Until=false".to_string(),
    ])
}

/// The newest package of `kernel` its apt source offers (after one `apt-get
/// update` if none is known yet), and the apt options to fetch it with.
fn newest_package(workspace: &Path, kernel: &GuestKernel) -> Result<(String, Vec<String>)> {
    match kernel.source {
        Source::System => Ok((newest_from(kernel, &[])?, Vec::new())),
        Source::Local { .. } => {
            let mut errors = Vec::new();
            for mirror in ["deb.debian.org", "archive.debian.org"] {
                let options = apt_options(workspace, kernel.source, mirror)?;
                match newest_from(kernel, &options) {
                    Ok(name) => return Ok((name, options)),
                    Err(err) => errors.push(format!("{mirror}: {err:#}")),
                }
            }
            bail!("{}", errors.join("; "))
        }
    }
}

fn newest_from(kernel: &GuestKernel, options: &[String]) -> Result<String> {
    for attempt in 0..2 {
        let output = Command::new("apt-cache")
            .args(options)
            .args(["pkgnames", kernel.prefix])
            .output()
            .context("running apt-cache")?;
        let names = String::from_utf8_lossy(&output.stdout);
        let newest = names
            .lines()
            .filter_map(|name| {
                let n = name
                    .strip_prefix(kernel.prefix)?
                    .strip_suffix(kernel.suffix)?;
                Some((n.parse::<u32>().ok()?, name.to_string()))
            })
            .max();
        if let Some((_, name)) = newest {
            return Ok(name);
        }
        if attempt == 0 {
            let mut update = vec!["update", "-q"];
            update.extend(options.iter().map(String::as_str));
            apt(&update)?;
        }
    }
    bail!(
        "no package {}<n>{} in the apt sources (is bookworm-backports in {BACKPORTS_SOURCE}?)",
        kernel.prefix,
        kernel.suffix
    )
}

/// Downloads and unpacks the kernel (once; kept under `.tools/kernels/`),
/// indexes its modules and builds the guest's initramfs.
pub fn prepare(workspace: &Path, kernel: &GuestKernel) -> Result<PreparedKernel> {
    let (package, apt_options) = newest_package(workspace, kernel)?;
    let root = workspace.join(".tools/kernels").join(&package);
    let initrd = root.join("mesh-initrd.gz");
    if !initrd.is_file() {
        step(format!("fetching Debian's {package}"));
        let download = workspace.join(".tools/kernels/download");
        fs::create_dir_all(&download)?;
        run(Command::new("apt-get")
            .args(&apt_options)
            .args(["download", "-q", &package])
            .current_dir(&download))
        .with_context(|| format!("apt-get download {package}"))?;
        let deb = fs::read_dir(&download)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get downloaded no {package}_*.deb"))?;
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_file(&deb)?;
        let release = release_of(&root)?;
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        build_initrd(&root, &release, &initrd)?;
    }
    let release = release_of(&root)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing from {package}", vmlinuz.display());
    }
    Ok(PreparedKernel {
        package,
        release,
        root,
        vmlinuz,
        initrd,
    })
}

/// The one `lib/modules/<release>` of an unpacked kernel package.
fn release_of(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        n => bail!(
            "{} holds {n} kernel releases, expected one",
            modules.display()
        ),
    }
}

/// busybox, the early modules in load order, and our /init, as a gzipped
/// newc cpio archive.
fn build_initrd(root: &Path, release: &str, out: &Path) -> Result<()> {
    let modules_dir = root.join("lib/modules").join(release);
    let dep_file = modules_dir.join("modules.dep");
    let deps: HashMap<String, Vec<String>> = fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {}", dep_file.display()))?
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect();
    let mut order = Vec::new();
    for name in EARLY_MODULES {
        let found = deps.keys().find(|path| {
            let file = path.rsplit('/').next().unwrap_or(path);
            file == format!("{name}.ko") || file == format!("{name}.ko.xz")
        });
        // Not a module: built into this kernel.
        if let Some(path) = found {
            add_with_deps(path, &deps, &mut order);
        }
    }

    let staging = out.with_extension("staging");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    for dir in ["bin", "proc", "sys", "dev", "mnt", "mods"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox")).context("copying /bin/busybox")?;
    let mut names = Vec::new();
    for path in &order {
        let source = modules_dir.join(path);
        let file = path.rsplit('/').next().unwrap_or(path);
        let name = file.strip_suffix(".xz").unwrap_or(file).to_string();
        if file.ends_with(".xz") {
            let output = Command::new("xz")
                .arg("-dc")
                .arg(&source)
                .output()
                .context("running xz")?;
            if !output.status.success() {
                bail!("xz -dc {} failed", source.display());
            }
            fs::write(staging.join("mods").join(&name), output.stdout)?;
        } else {
            fs::copy(&source, staging.join("mods").join(&name))?;
        }
        names.push(name);
    }
    fs::write(staging.join("mods/order"), names.join("\n") + "\n")?;
    let init = staging.join("init");
    fs::write(&init, super::GUEST_INIT)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > \"$0\"")
        .arg(out)
        .current_dir(&staging))
    .context("packing the initramfs")?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// Appends `module` after everything it depends on (modules.dep lists a
/// module's dependencies, the deepest last).
fn add_with_deps(module: &str, deps: &HashMap<String, Vec<String>>, order: &mut Vec<String>) {
    if order.iter().any(|m| m == module) {
        return;
    }
    for dep in deps.get(module).into_iter().flatten().rev() {
        add_with_deps(dep, deps, order);
    }
    order.push(module.to_string());
}
