//! Outbound hooks: `connect()` of IPv4 and IPv6 TCP sockets in enrolled pods.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use aya_log_ebpf::debug;

use crate::maps::{POD_COUNTERS, PODS};

/// Returned by a sock_addr program to let the call proceed.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V6)
}

fn on_connect(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return ALLOW;
    };
    if let Some(counters) = POD_COUNTERS.get_ptr_mut(pod.slot) {
        // SAFETY: per-CPU slot: no other CPU writes this copy.
        unsafe {
            match family {
                Family::V4 => (*counters).connect4 += 1,
                Family::V6 => (*counters).connect6 += 1,
            }
        }
    }
    debug!(ctx, "connect from pod slot {}", pod.slot);
    ALLOW
}
