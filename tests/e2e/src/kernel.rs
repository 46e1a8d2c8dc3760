//! The kernel's own view, asked directly (not through the agent): which programs
//! are attached to a cgroup.

use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};

/// `enum bpf_attach_type` values of the hooks the agent uses.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum AttachType {
    CgroupSockOps = 3,
    CgroupInet4Connect = 10,
    CgroupInet6Connect = 11,
    CgroupInet4Getpeername = 29,
    CgroupInet6Getpeername = 30,
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// Number of programs attached directly to `cgroup` at `attach_type`
/// (BPF_PROG_QUERY, the same query `bpftool cgroup show` makes).
pub fn attached_programs(cgroup: &Path, attach_type: AttachType) -> Result<u32> {
    let dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    // The `query` member of union bpf_attr: target_fd, attach_type, query_flags,
    // attach_flags, prog_ids (u64 pointer; null asks for the count only), prog_cnt.
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut attr = Query {
        target_fd: dir.as_raw_fd() as u32,
        attach_type: attach_type as u32,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a correctly laid out, zero-padded attr of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut Query,
            std::mem::size_of::<Query>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_PROG_QUERY {attach_type:?} on {}", cgroup.display()));
    }
    Ok(attr.prog_cnt)
}
