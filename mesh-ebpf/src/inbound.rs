//! Inbound capture: TCP connections to an enrolled pod's address from outside its
//! network namespace are handed to the agent's inbound listener in that
//! namespace (sk_lookup runs before the kernel picks a listening socket). The
//! accepted socket keeps the original destination as its local address.
//!
//! Connections made inside the pod's own namespace are left alone:
//! - the agent's deliveries: their sockets are bound to the loopback device,
//!   so the kernel reports lo as their ingress interface, whatever their
//!   source (the client's own address, or 127.0.0.6 / ::1). Nothing from
//!   outside the namespace arrives on its loopback;
//! - a loopback source or the pod's own address (the pod talking to itself).
//!   Neither can come from outside: the kernel drops such packets arriving
//!   on an interface as martians. (Here the ingress interface cannot tell:
//!   for a connection to the pod's own address from an unbound socket the
//!   kernel reports the address's device, not lo.)
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{DIRECTION_INBOUND, LOOPBACK_IFINDEX, PodAddr, PortKey, TUNNEL_PORT};

use crate::maps::{EXCLUDED_PORTS, INBOUND_LISTENERS, POD_ADDRS, count};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: ctx.lookup is the kernel's bpf_sk_lookup for this packet.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let ipv4 = lookup.family == AF_INET;
    let (local, remote) = if ipv4 {
        (
            PodAddr::from_ipv4(lookup.local_ip4.to_ne_bytes()),
            PodAddr::from_ipv4(lookup.remote_ip4.to_ne_bytes()),
        )
    } else {
        (ipv6(&lookup.local_ip6), ipv6(&lookup.remote_ip6))
    };
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX || remote.is_loopback() || remote == local {
        return SK_PASS;
    }
    // Tunnel connections from other nodes' agents go to this agent's tunnel
    // listener as they are: they are already the mesh (mutual TLS).
    if lookup.local_port == u32::from(TUNNEL_PORT) {
        return SK_PASS;
    }
    // SAFETY: read-only lookup of a plain-data value.
    let Some(&slot) = (unsafe { POD_ADDRS.get(&local) }) else {
        return SK_PASS;
    };
    let port_key = PortKey {
        slot,
        port: lookup.local_port as u16,
        direction: DIRECTION_INBOUND,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(&port_key) }.is_some() {
        count(slot, |c| c.excluded += 1);
        return SK_PASS;
    }
    let index = slot * 2 + if ipv4 { 0 } else { 1 };
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => {
            count(slot, |c| c.captured_inbound += 1);
            SK_PASS
        }
        Err(_) => {
            // No agent listening for this pod: refuse (the client gets a reset),
            // never deliver around the agent.
            count(slot, |c| c.refused_agent_absent += 1);
            SK_DROP
        }
    }
}

fn ipv6(words: &[u32; 4]) -> PodAddr {
    let mut octets = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    PodAddr::from_ipv6(octets)
}
