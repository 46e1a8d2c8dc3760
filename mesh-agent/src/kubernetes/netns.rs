//! A pod's network namespace, found on the node by the pod's IP.
//!
//! Container runtimes (containerd, CRI-O) bind-mount each pod sandbox's
//! network namespace under `/var/run/netns` (`cni-<random>`), a new name at
//! every pod start. The API says the pod's IP; the namespace holding that IP
//! on an interface is the pod's. Each namespace is entered once and its
//! addresses remembered by its inode, so a scan costs one visit per new
//! namespace, not one per pod per change.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::capture::pod_netns::PodNetns;

/// The namespaces seen in one directory, by inode, with their addresses.
pub struct NetnsFinder {
    dir: PathBuf,
    seen: HashMap<PathBuf, Seen>,
}

struct Seen {
    inode: u64,
    addresses: Vec<IpAddr>,
}

impl NetnsFinder {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            seen: HashMap::new(),
        }
    }

    /// The namespace holding any of `ips`. None if no namespace in the
    /// directory does (yet); an error if more than one does: a node never
    /// gives two pods one address, so that is a stale namespace, and which
    /// one is the pod's is not guessed.
    /// Blocking: it enters namespaces on this thread.
    pub fn find(&mut self, ips: &[IpAddr]) -> Result<Option<PathBuf>, String> {
        let entries: Vec<(PathBuf, u64)> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| Some((e.path(), e.metadata().ok()?.ino())))
                .collect(),
            Err(err) => {
                return Err(format!(
                    "cannot list network namespaces in {}: {err}",
                    self.dir.display()
                ));
            }
        };
        self.seen
            .retain(|path, _| entries.iter().any(|(p, _)| p == path));
        // Namespaces not seen yet, replaced (new inode), or without a global
        // address when last seen (a CNI plugin adds it after the namespace
        // exists) are entered; the others are known.
        for (path, inode) in entries {
            let stale = match self.seen.get(&path) {
                Some(seen) => seen.inode != inode || seen.addresses.is_empty(),
                None => true,
            };
            if stale {
                let addresses = addresses_in(&path).unwrap_or_default();
                self.seen.insert(path, Seen { inode, addresses });
            }
        }
        let mut holding: Vec<&PathBuf> = self
            .seen
            .iter()
            .filter(|(_, seen)| seen.addresses.iter().any(|a| ips.contains(a)))
            .map(|(path, _)| path)
            .collect();
        holding.sort();
        match holding.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => Err(format!(
                "{} network namespaces hold its IP ({}): not guessing which is the pod's",
                many.len(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// The global addresses of every interface in the namespace at `path`
/// (loopback and link-local left out: every namespace has them).
fn addresses_in(path: &Path) -> anyhow::Result<Vec<IpAddr>> {
    let netns = PodNetns::open(path)?;
    let addrs = netns.run(nix::ifaddrs::getifaddrs)??;
    Ok(addrs
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(address.as_sockaddr_in6()?.ip())
            };
            let local = match ip {
                IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
            };
            (!local).then_some(ip)
        })
        .collect())
}
