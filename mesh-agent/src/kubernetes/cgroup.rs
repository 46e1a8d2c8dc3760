//! A pod's cgroup, from its UID and QoS class, where the kubelet puts it.
//!
//! The kubelet makes one cgroup per pod under `kubepods`, by QoS class, named
//! after the pod's UID; the container runtime puts every container of the pod
//! inside it. The kernel programs attach there. Two layouts, by the kubelet's
//! cgroup driver (KEP-2254 / kubelet `cm/cgroup_manager_linux.go`):
//! - cgroupfs: `kubepods/pod<uid>`, `kubepods/burstable/pod<uid>`,
//!   `kubepods/besteffort/pod<uid>`;
//! - systemd: `kubepods.slice/kubepods-pod<uid_>.slice`,
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`,
//!   … with the UID's dashes written as underscores.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CgroupDriver {
    #[default]
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The QoS level's own cgroup name under `kubepods` (Guaranteed pods sit
    /// directly in `kubepods`).
    fn level(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod's cgroup directory under `root` (the cgroup2 mount joined with
/// the kubelet's `--cgroup-root`, `/` by default).
pub fn pod_cgroup(root: &Path, driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Cgroupfs => {
            let mut path = root.join("kubepods");
            if let Some(level) = qos.level() {
                path.push(level);
            }
            path.join(format!("pod{uid}"))
        }
        CgroupDriver::Systemd => {
            // systemd slices nest by name: each level repeats its parents'.
            let mut path = root.join("kubepods.slice");
            let mut prefix = "kubepods".to_string();
            if let Some(level) = qos.level() {
                prefix = format!("{prefix}-{level}");
                path.push(format!("{prefix}.slice"));
            }
            path.join(format!("{prefix}-pod{}.slice", uid.replace('-', "_")))
        }
    }
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_mount_in(&mountinfo)
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 filesystem in /proc/self/mountinfo"))
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mountpoint options [optional...] - fstype source ...`
        let (before, after) = line.split_once(" - ")?;
        after
            .starts_with("cgroup2 ")
            .then(|| before.split(' ').nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50";

    #[test]
    fn cgroupfs_paths_for_every_qos_class() {
        let root = Path::new("/sys/fs/cgroup");
        let path = |qos| pod_cgroup(root, CgroupDriver::Cgroupfs, qos, UID);
        assert_eq!(
            path(QosClass::Guaranteed),
            Path::new("/sys/fs/cgroup/kubepods/pod5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50")
        );
        assert_eq!(
            path(QosClass::Burstable),
            Path::new("/sys/fs/cgroup/kubepods/burstable/pod5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50")
        );
        assert_eq!(
            path(QosClass::BestEffort),
            Path::new("/sys/fs/cgroup/kubepods/besteffort/pod5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50")
        );
    }

    #[test]
    fn systemd_paths_for_every_qos_class() {
        let root = Path::new("/sys/fs/cgroup");
        let path = |qos| pod_cgroup(root, CgroupDriver::Systemd, qos, UID);
        assert_eq!(
            path(QosClass::Guaranteed),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod5f0c6a3e_1b2d_4c5e_8f9a_0b1c2d3e4f50.slice"
            )
        );
        assert_eq!(
            path(QosClass::Burstable),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c6a3e_1b2d_4c5e_8f9a_0b1c2d3e4f50.slice"
            )
        );
        assert_eq!(
            path(QosClass::BestEffort),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f0c6a3e_1b2d_4c5e_8f9a_0b1c2d3e4f50.slice"
            )
        );
    }

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_in(unified), Some("/sys/fs/cgroup".into()));
        let hybrid = "30 23 0:27 / /sys/fs/cgroup ro shared:4 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:28 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw\n\
                      32 30 0:29 / /sys/fs/cgroup/cpu rw shared:6 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            cgroup2_mount_in("32 30 0:29 / /x rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }
}
