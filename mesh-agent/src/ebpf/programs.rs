//! The programs of the kernel object by name, and the forwarding of their
//! log records into the agent's log.

use anyhow::{Result, anyhow};
use aya::{
    Ebpf,
    programs::{CgroupSockAddr, SkLookup, SockOps},
};

use super::{SK_LOOKUP_PROGRAM, SOCK_OPS_PROGRAM};

pub(super) fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut CgroupSockAddr> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} is missing from the kernel object"))?;
    Ok(program.try_into()?)
}

pub(super) fn sock_ops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps> {
    let program = ebpf
        .program_mut(SOCK_OPS_PROGRAM)
        .ok_or_else(|| anyhow!("program {SOCK_OPS_PROGRAM} missing"))?;
    Ok(program.try_into()?)
}

pub(super) fn sk_lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    let program = ebpf
        .program_mut(SK_LOOKUP_PROGRAM)
        .ok_or_else(|| anyhow!("program {SK_LOOKUP_PROGRAM} missing"))?;
    Ok(program.try_into()?)
}

/// Forwards records of aya-log-ebpf into the agent's log (through the `log` facade,
/// which tracing-subscriber picks up).
pub(super) fn start_kernel_log_forwarding(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::warn!(error = %err, "kernel log forwarding is off");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer fd, which stays open and the same for
    // as long as the logger lives inside the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(error = %err, "kernel log forwarding is off");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(err) => {
                    tracing::warn!(error = %err, "kernel log forwarding stopped");
                    return;
                }
            }
        }
    });
}
