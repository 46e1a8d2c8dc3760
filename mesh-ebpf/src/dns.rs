//! DNS capture: UDP to port 53 from an enrolled pod goes to the agent's DNS
//! proxy in the pod's own namespace (127.0.0.1:15053 / [::1]:15053), and the
//! answers are shown to come from the server the pod addressed.
//!
//! connect4/6 (a connected socket, as glibc's resolver makes) and
//! sendmsg4/6 (an unconnected one, as musl's): record socket cookie -> the
//! server addressed (DNS_SOCKETS) and netns -> that server (DNS_RESOLVERS,
//! where the agent forwards what it does not answer), and rewrite the
//! destination to the proxy. No proxy in the namespace (the agent is away):
//! EPERM, fail-closed as for TCP.
//! recvmsg4/6: a datagram from the proxy to a socket in DNS_SOCKETS is
//! reported as coming from the server it addressed (getpeername too, in
//! `capture`).
//!
//! Other UDP is left alone (docs/capture.md). DNS over TCP is captured with
//! all TCP, and the agent answers it.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{DNS_PORT, DNS_PROXY_PORT, FAMILY_IPV4, FAMILY_IPV6, OrigDst, PodAddr};

use crate::{
    capture::{
        ALLOW, REFUSE, agent_socket, destination, is_excluded, redirect_to_port, write_address,
    },
    maps::{DNS_RESOLVERS, DNS_SOCKETS, PODS, count},
};

const SOCK_DGRAM: u32 = 2;

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_udp(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_udp(&ctx, true)
}

/// A UDP socket of any pod addresses `user_ip:user_port` (connect or sendmsg).
#[inline(always)]
pub fn on_udp(ctx: &SockAddrContext, ipv6_socket: bool) -> i32 {
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_DGRAM {
        return ALLOW;
    }
    let (dst, port) = destination(sa, ipv6_socket);
    if port != DNS_PORT || dst.is_loopback() {
        return ALLOW;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(pod) = (unsafe { PODS.get(&netns_cookie) }) else {
        return ALLOW;
    };
    let slot = pod.slot;
    if is_excluded(slot, &dst, port) {
        count(slot, |c| c.excluded += 1);
        return ALLOW;
    }
    let family = if dst.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    };
    if !agent_socket(ctx, family, DNS_PROXY_PORT, true) {
        count(slot, |c| c.refused_agent_absent += 1);
        return REFUSE;
    }
    let orig = OrigDst {
        addr: dst,
        port,
        family,
        _pad: 0,
        slot,
        netns_cookie,
        // SAFETY: no arguments.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    // SAFETY: the helper only reads the socket behind the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // LRU maps: an insert makes room by itself.
    let _ = DNS_SOCKETS.insert(&socket_cookie, &orig, 0);
    let _ = DNS_RESOLVERS.insert(&netns_cookie, &orig, 0);
    redirect_to_port(sa, ipv6_socket, family, DNS_PROXY_PORT);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_server(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_server(&ctx, true)
}

/// A datagram from the agent's DNS proxy to a socket that addressed a DNS
/// server: its source becomes that server. (recvmsg hooks cannot refuse.)
#[inline(always)]
fn restore_server(ctx: &SockAddrContext, ipv6_socket: bool) -> i32 {
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (source, port) = destination(sa, ipv6_socket);
    if port != DNS_PROXY_PORT || !is_proxy_address(&source) {
        return ALLOW;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(orig) = (unsafe { DNS_SOCKETS.get(&socket_cookie) }) else {
        return ALLOW;
    };
    let orig = *orig;
    write_address(sa, ipv6_socket, &orig.addr, orig.port);
    ALLOW
}

/// 127.0.0.1 (also IPv4-mapped) or ::1: where the proxy answers from.
fn is_proxy_address(addr: &PodAddr) -> bool {
    *addr == PodAddr::from_ipv4([127, 0, 0, 1])
        || *addr == PodAddr::from_ipv6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
}
