//! Kernel programs of the mesh agent.
//!
//! Loaded and attached by `mesh-agent` (see `mesh-agent/src/ebpf/`). The programs
//! are attached to the cgroup of each enrolled pod; they look the pod up by the
//! network-namespace cookie of the socket, which the pod cannot forge.
#![no_std]
#![no_main]

mod capture;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; there is no unwinding in BPF.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
