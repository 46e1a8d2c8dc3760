//! Same-node fast path: bytes between local sockets move inside the kernel.
//!
//! sock_ops ESTABLISHED (pod cgroups and the agent's own cgroup): a socket of
//! a loopback leg (application <-> agent listener on 15001, agent <-> local
//! pod from 127.0.0.6 or ::1) is added to SOCKS and its SOCK_STATE is reset.
//!
//! sk_msg (attached to SOCKS, so it runs for every send of those sockets):
//! 1. a spliced socket sends straight into its peer application's socket;
//! 2. a socket the agent asked to splice (SPLICE) switches to that once the
//!    agent has relayed every byte it sent before (`sent == forwarded`) and
//!    the agent's relay socket never used the normal path: the bytes the
//!    agent relayed are then ahead in the same queue, so order holds;
//! 3. otherwise a send goes into the socket at the other end of its own
//!    loopback connection (the agent, or the application);
//! 4. when that peer is not in the map, the send takes the normal TCP path,
//!    and so does every later send of that socket (SOCK_PASSED): a receiver
//!    reads redirected bytes before normal ones, so mixing could reorder.
//!
//! FIN and RST always travel the normal TCP path, after every byte sent
//! before them was queued, so close, half-close and reset behave as usual.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    AGENT_SOURCE_IPV4, DELIVERY_MARK, FASTPATH_LOOPBACK, FASTPATH_SPLICE, FP_INSERT_FAILED,
    FP_PASSED_BYTES, FP_PASSED_MSGS, FP_REDIRECTED_BYTES, FP_REDIRECTED_MSGS, FP_SOCKETS_ADDED,
    FP_SPLICED_BYTES, FP_SPLICED_MSGS, FP_SPLICES_ACTIVE, OUTBOUND_PORT, PodAddr, SOCK_PASSED,
    SOCK_SPLICED, SockKey, SockState,
};

use crate::maps::{FASTPATH_CONFIG, FASTPATH_STATS, SOCK_STATE, SOCKS, SPLICE};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPV6_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn config() -> u32 {
    FASTPATH_CONFIG.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn stat(index: u32, n: u64) {
    if let Some(value) = FASTPATH_STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's copy; programs on one CPU do not preempt each other here.
        unsafe { *value += n };
    }
}

/// A context's `remote_port`: the port in network byte order, which the
/// kernel puts in the upper 16 bits of the u32 on little-endian hosts (older
/// kernels: the lower 16).
fn port_from_be32(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

fn addr4(ip_be: u32) -> PodAddr {
    PodAddr::from_ipv4(ip_be.to_ne_bytes())
}

fn addr6(words_be: [u32; 4]) -> PodAddr {
    let mut octets = [0u8; 16];
    for (i, word) in words_be.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    PodAddr::from_ipv6(octets)
}

/// Whether a connection is one of the agent's local legs: by its mark (a
/// delivery from the client's own address, both ends: the application's
/// accepted socket takes the mark of the agent's SYN), its port, or the
/// agent's loopback source.
fn is_agent_leg(key: &SockKey, mark: u32) -> bool {
    if mark == DELIVERY_MARK {
        return true;
    }
    if key.local_port == OUTBOUND_PORT || key.remote_port == OUTBOUND_PORT {
        return true;
    }
    let agent_v4 = PodAddr::from_ipv4(AGENT_SOURCE_IPV4);
    if key.local == agent_v4 || key.remote == agent_v4 {
        return true;
    }
    // The agent's IPv6 connections into a pod leave from ::1 to the pod's own
    // address; an application's loopback traffic stays on loopback.
    let local_lo = key.local.addr == IPV6_LOOPBACK;
    let remote_lo = key.remote.addr == IPV6_LOOPBACK;
    (local_lo && !key.remote.is_loopback()) || (remote_lo && !key.local.is_loopback())
}

/// Reads a context field with a load of its own (volatile: never merged with
/// another load into one at a computed offset).
macro_rules! field {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: $ptr is the kernel's context for this call.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// The [`SockKey`] of a context with the socket fields of `bpf_sock_ops`
/// and `sk_msg_md` (same names, same byte orders).
macro_rules! sock_key {
    ($ctx:expr, $ptr:expr) => {{
        let ptr = $ptr;
        // Every field is read up front, whatever the family: loads chosen by
        // a branch get merged by the compiler into one load at a computed
        // context offset, which the verifier refuses.
        let family = field!(ptr, family);
        let local4 = field!(ptr, local_ip4);
        let remote4 = field!(ptr, remote_ip4);
        let local6 = [
            field!(ptr, local_ip6[0]),
            field!(ptr, local_ip6[1]),
            field!(ptr, local_ip6[2]),
            field!(ptr, local_ip6[3]),
        ];
        let remote6 = [
            field!(ptr, remote_ip6[0]),
            field!(ptr, remote_ip6[1]),
            field!(ptr, remote_ip6[2]),
            field!(ptr, remote_ip6[3]),
        ];
        let local_port = field!(ptr, local_port);
        let remote_port = field!(ptr, remote_port);
        match family {
            AF_INET | AF_INET6 => {
                let (local, remote) = if family == AF_INET {
                    (addr4(local4), addr4(remote4))
                } else {
                    (addr6(local6), addr6(remote6))
                };
                Some(SockKey {
                    // SAFETY: the helper only reads the socket behind the context.
                    netns_cookie: unsafe { bpf_get_netns_cookie($ctx.as_ptr()) },
                    local,
                    remote,
                    local_port: local_port as u16,
                    remote_port: port_from_be32(remote_port),
                    _pad: 0,
                })
            }
            _ => None,
        }
    }};
}

fn ops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    sock_key!(ctx, ctx.ops)
}

/// The socket's mark (0 when the context has no full socket).
fn ops_mark(ctx: &SockOpsContext) -> u32 {
    let sk = field!(ctx.ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return 0;
    }
    field!(sk, mark)
}

/// sock_ops hook: called from `mesh_sockops` for every op.
pub fn on_sock_op(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only sockets this program added ask for state callbacks.
        if ctx.arg(1) == BPF_TCP_CLOSE
            && let Some(key) = ops_key(ctx)
        {
            let _ = SOCK_STATE.remove(&key);
            let _ = SPLICE.remove(&key);
        }
        return;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    if config() & FASTPATH_LOOPBACK == 0 {
        return;
    }
    let Some(mut key) = ops_key(ctx) else {
        return;
    };
    if !is_agent_leg(&key, ops_mark(ctx)) {
        return;
    }
    // A fresh state: a key can be reused by a later connection.
    let _ = SOCK_STATE.insert(&key, &SockState::default(), 0);
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this call.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0) {
        Ok(()) => {
            stat(FP_SOCKETS_ADDED, 1);
            // To forget its state when it closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        Err(_) => {
            // Not in the map: its sends take the normal path (the sk_msg
            // program never runs for it), and its peer's sends find no peer.
            stat(FP_INSERT_FAILED, 1);
            let _ = SOCK_STATE.remove(&key);
        }
    }
}

fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    sock_key!(ctx, ctx.msg)
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let pass = SK_PASS;
    let size = u64::from(ctx.size());
    let Some(mut key) = msg_key(&ctx) else {
        return pass;
    };
    let Some(state) = SOCK_STATE.get_ptr_mut(&key) else {
        stat(FP_PASSED_MSGS, 1);
        stat(FP_PASSED_BYTES, size);
        return pass;
    };
    // SAFETY: the socket's own state; its sends are serialised by the socket lock.
    let state = unsafe { &mut *state };
    let config = config();
    let verdict = decide(&ctx, &mut key, state, config, size);
    state.sent += size;
    verdict
}

fn decide(
    ctx: &SkMsgContext,
    key: &mut SockKey,
    state: &mut SockState,
    config: u32,
    size: u64,
) -> u32 {
    if state.flags & SOCK_SPLICED != 0 {
        let mut peer = state.peer;
        if SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == i64::from(SK_PASS) {
            state.spliced += size;
            stat(FP_SPLICED_MSGS, 1);
            stat(FP_SPLICED_BYTES, size);
            return SK_PASS;
        }
        // The peer application closed: the flow is ending; the agent's relay
        // sockets are still there to carry (and reset) what follows.
        stat(FP_PASSED_MSGS, 1);
        stat(FP_PASSED_BYTES, size);
        return SK_PASS;
    }
    if config & FASTPATH_SPLICE != 0
        // SAFETY: read-only lookup of a plain-data value.
        && let Some(splice) = (unsafe { SPLICE.get(&*key) })
        && splice.forwarded == state.sent
    {
        // SAFETY: read-only lookup of a plain-data value.
        let via_clean =
            unsafe { SOCK_STATE.get(&splice.via) }.is_some_and(|via| via.flags & SOCK_PASSED == 0);
        if via_clean {
            let mut peer = splice.peer;
            if SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == i64::from(SK_PASS) {
                state.flags |= SOCK_SPLICED;
                state.peer = splice.peer;
                state.spliced += size;
                stat(FP_SPLICES_ACTIVE, 1);
                stat(FP_SPLICED_MSGS, 1);
                stat(FP_SPLICED_BYTES, size);
                return SK_PASS;
            }
        }
    }
    if config & FASTPATH_LOOPBACK != 0 && state.flags & SOCK_PASSED == 0 {
        let mut peer = key.peer();
        if SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == i64::from(SK_PASS) {
            stat(FP_REDIRECTED_MSGS, 1);
            stat(FP_REDIRECTED_BYTES, size);
            return SK_PASS;
        }
    }
    state.flags |= SOCK_PASSED;
    stat(FP_PASSED_MSGS, 1);
    stat(FP_PASSED_BYTES, size);
    SK_PASS
}
