//! Outbound capture: every TCP `connect()` of an enrolled pod is redirected to the
//! agent's listener in the pod's own network namespace, and where it was going
//! is recorded for the agent.
//!
//! connect4/connect6 (cgroup hooks, before the kernel picks a source port):
//!   record socket cookie -> original destination in PENDING, rewrite the
//!   destination to 127.0.0.1:15001 / [::1]:15001.
//! sock_ops TCP_CONNECT (the source port is now known, no packet sent yet):
//!   record (netns cookie, client port, family) -> socket cookie in CLIENTS,
//!   which the agent can compute from the socket it accepts.
//! getpeername4/6: applications still see the address they dialled.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_tuple},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp,
        bpf_sk_lookup_udp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    CidrKey, ClientKey, DIRECTION_OUTBOUND, FAMILY_IPV4, FAMILY_IPV6, OUTBOUND_PORT, OrigDst,
    PodAddr, PortKey,
};

use crate::maps::{CLIENTS, DNS_SOCKETS, EXCLUDED_CIDRS, EXCLUDED_PORTS, PENDING, PODS, count};

/// sock_addr verdicts.
pub const ALLOW: i32 = 1;
/// The call fails with EPERM: fail closed, and fast.
pub const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_NOEXIST: u64 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, true)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, ipv6_socket: bool) -> i32 {
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return crate::dns::on_udp(ctx, ipv6_socket);
    }
    // SAFETY: the helper only reads the socket behind the context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(pod) = (unsafe { PODS.get(&netns_cookie) }) else {
        return ALLOW;
    };
    let slot = pod.slot;
    count(slot, |c| {
        if ipv6_socket {
            c.connect6 += 1
        } else {
            c.connect4 += 1
        }
    });

    let (dst, port) = destination(sa, ipv6_socket);
    if dst.is_loopback() {
        return ALLOW;
    }
    if is_excluded(slot, &dst, port) {
        count(slot, |c| c.excluded += 1);
        return ALLOW;
    }
    // An IPv4-mapped destination on an IPv6 socket goes to the IPv4 listener.
    let family = if dst.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    };
    if !agent_listening(ctx, family) {
        count(slot, |c| c.refused_agent_absent += 1);
        debug!(
            ctx,
            "pod slot {}: no agent listening, connect refused", slot
        );
        return REFUSE;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
    if PENDING.insert(&socket_cookie, &orig, BPF_NOEXIST).is_err() {
        count(slot, |c| c.refused_map_full += 1);
        debug!(ctx, "pod slot {}: pending map full, connect refused", slot);
        return REFUSE;
    }
    redirect_to_agent(sa, ipv6_socket, family);
    count(slot, |c| c.captured_outbound += 1);
    debug!(ctx, "pod slot {}: connect to port {} captured", slot, port);
    ALLOW
}

/// The address and port (host order) a sock_addr call names. Inlined into
/// each program, where `ipv6_socket` is a constant: a hook of one family may
/// not read the other family's fields.
#[inline(always)]
pub fn destination(sa: &aya_ebpf::bindings::bpf_sock_addr, ipv6_socket: bool) -> (PodAddr, u16) {
    let dst = if ipv6_socket {
        let ip = sa.user_ip6;
        let mut octets = [0u8; 16];
        for (i, word) in ip.iter().enumerate() {
            // user_ip6 words are in network byte order.
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        PodAddr::from_ipv6(octets)
    } else {
        PodAddr::from_ipv4(sa.user_ip4.to_ne_bytes())
    };
    (dst, u16::from_be(sa.user_port as u16))
}

/// Writes `addr:port` into a sock_addr context (for an IPv6 socket, an IPv4
/// address as IPv4-mapped).
#[inline(always)]
pub fn write_address(
    sa: &mut aya_ebpf::bindings::bpf_sock_addr,
    ipv6_socket: bool,
    addr: &PodAddr,
    port: u16,
) {
    sa.user_port = u32::from(port.to_be());
    let a = addr.addr;
    if ipv6_socket {
        for i in 0..4 {
            sa.user_ip6[i] =
                u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
        }
    } else {
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
}

pub fn is_excluded(slot: u32, dst: &PodAddr, port: u16) -> bool {
    let port_key = PortKey {
        slot,
        port,
        direction: DIRECTION_OUTBOUND,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(&port_key) }.is_some() {
        return true;
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        CidrKey {
            slot_be: slot.to_be_bytes(),
            addr: *dst,
        },
    );
    EXCLUDED_CIDRS.get(&key).is_some()
}

/// Whether the agent's outbound listener exists in this pod's namespace. It goes
/// away with the agent process, so a stopped or crashed agent means refused
/// connections, never uncaptured ones.
fn agent_listening(ctx: &SockAddrContext, family: u8) -> bool {
    agent_socket(ctx, family, OUTBOUND_PORT, false)
}

/// Whether the agent has a socket on loopback `port` (TCP or UDP) in this
/// namespace.
pub fn agent_socket(ctx: &SockAddrContext, family: u8, port: u16, udp: bool) -> bool {
    // SAFETY: a zeroed tuple is a valid (wildcard) tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if family == FAMILY_IPV4 {
        // SAFETY: writing the ipv4 member of the union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.daddr = u32::from_ne_bytes([127, 0, 0, 1]);
            t.dport = port.to_be();
        }
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        // SAFETY: writing the ipv6 member of the union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.daddr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
            t.dport = port.to_be();
        }
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: valid context, tuple and size; the returned reference is released.
    unsafe {
        let lookup = if udp {
            bpf_sk_lookup_udp
        } else {
            bpf_sk_lookup_tcp
        };
        let sk = lookup(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

fn redirect_to_agent(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ipv6_socket: bool, family: u8) {
    redirect_to_port(sa, ipv6_socket, family, OUTBOUND_PORT);
}

/// Rewrites the destination to the agent's loopback `port` of the family.
#[inline(always)]
pub fn redirect_to_port(
    sa: &mut aya_ebpf::bindings::bpf_sock_addr,
    ipv6_socket: bool,
    family: u8,
    port: u16,
) {
    sa.user_port = u32::from(port.to_be());
    if !ipv6_socket {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    } else if family == FAMILY_IPV4 {
        // ::ffff:127.0.0.1, reaching the IPv4 listener.
        sa.user_ip6 = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([127, 0, 0, 1]),
        ];
    } else {
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        note_client_port(&ctx);
    }
    crate::fastpath::on_sock_op(&ctx);
    1
}

/// At TCP_CONNECT the client port is chosen and no packet has left yet: index the
/// pending entry by what the agent will see on accept.
fn note_client_port(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket behind the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(orig) = (unsafe { PENDING.get(&socket_cookie) }) else {
        return;
    };
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let key = ClientKey {
        netns_cookie: orig.netns_cookie,
        port: ctx.local_port() as u16,
        family: orig.family,
        _pad: [0; 5],
    };
    // If this fails the agent finds no entry and closes the connection.
    let _ = CLIENTS.insert(&key, &socket_cookie, 0);
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_dialled_address(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_dialled_address(&ctx, true)
}

/// A captured socket is connected to the agent; its peer address is reported as
/// the one the application dialled.
#[inline(always)]
fn restore_dialled_address(ctx: &SockAddrContext, ipv6_socket: bool) -> i32 {
    // SAFETY: the helper only reads the socket behind the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookups of plain-data values.
    let orig = match unsafe { PENDING.get(&socket_cookie) } {
        Some(orig) => *orig,
        // A connected UDP socket of a DNS client.
        None => match unsafe { DNS_SOCKETS.get(&socket_cookie) } {
            Some(orig) => *orig,
            None => return ALLOW,
        },
    };
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    write_address(sa, ipv6_socket, &orig.addr, orig.port);
    ALLOW
}
