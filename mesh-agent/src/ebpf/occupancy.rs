//! How full the kernel's hash maps are. A full connection map means refused
//! connections, so operators watch it before it fills.
//!
//! Each gauge holds its own descriptor of the pinned map and walks its keys
//! with `BPF_MAP_GET_NEXT_KEY`: no lock of the data path is taken, and a
//! scrape costs one system call per entry (a few milliseconds for tens of
//! thousands).

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::MapData;

/// One map's entries, counted on demand.
pub struct MapGauge {
    pub name: &'static str,
    pub capacity: u32,
    fd: OwnedFd,
    key_size: usize,
}

impl MapGauge {
    /// Opens the map pinned at `path`.
    pub fn open(name: &'static str, path: &Path) -> Result<Self> {
        let map = MapData::from_pin(path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let info = map.info()?;
        let fd = map.fd().as_fd().try_clone_to_owned()?;
        Ok(Self {
            name,
            capacity: info.max_entries(),
            fd,
            key_size: info.key_size() as usize,
        })
    }

    /// Entries now. A map changing under the walk may be counted a little
    /// off; never beyond its capacity.
    pub fn entries(&self) -> u32 {
        let mut key = vec![0u8; self.key_size.max(1)];
        let mut next = vec![0u8; self.key_size.max(1)];
        let mut count = 0;
        let mut first = true;
        while count < self.capacity {
            if !next_key(&self.fd, (!first).then_some(&key), &mut next) {
                break;
            }
            first = false;
            std::mem::swap(&mut key, &mut next);
            count += 1;
        }
        count
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first without one);
/// false at the end (ENOENT) or on any error.
fn next_key(fd: &OwnedFd, key: Option<&Vec<u8>>, next: &mut [u8]) -> bool {
    /// The `bpf_attr` of map element commands.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: next.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: a valid map descriptor, key and next-key buffers of the map's
    // key size, and an attribute struct of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    rc == 0
}
