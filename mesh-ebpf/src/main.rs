//! Kernel programs of the mesh agent.
//!
//! Loaded and attached by `mesh-agent` (see `mesh-agent/src/ebpf/`):
//! - `capture`: connect4/connect6 and sock_ops, attached to each enrolled pod's
//!   cgroup: outbound connections go to the agent;
//! - `dns`: connect4/6 for UDP, sendmsg4/6 and recvmsg4/6 (the same cgroups):
//!   DNS queries go to the agent's DNS proxy;
//! - `inbound`: sk_lookup, attached to each enrolled pod's network namespace:
//!   inbound connections go to the agent;
//! - `fastpath`: sock_ops (the same program, also attached to the agent's own
//!   cgroup) and sk_msg (attached to the socket map): bytes between local
//!   sockets move inside the kernel.
//!
//! Pods are looked up by the network-namespace cookie of the socket (or, for
//! inbound, by their address inside their own namespace), which a pod cannot forge.
#![no_std]
#![no_main]

mod capture;
mod dns;
mod fastpath;
mod inbound;
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
