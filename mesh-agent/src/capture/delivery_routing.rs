//! What lets the agent deliver a connection into a pod from the client's own
//! address (`preserveSourceAddress`, docs/capture.md), with socket options
//! and policy routing only, no netfilter.
//!
//! The agent's delivery socket is transparent (it may bind the client's
//! address), bound to the pod's loopback device and marked
//! [`DELIVERY_MARK`]. Its SYN reaches the application over lo. The replies
//! are addressed to the client, which the pod would route out of its
//! interface; instead, inside the pod:
//! - `net.ipv4.tcp_fwmark_accept = 1`: the application's accepted socket
//!   takes the mark of the SYN, so everything it sends is marked;
//! - `net.ipv4.fwmark_reflect` / `net.ipv6.fwmark_reflect = 1`: the kernel's
//!   own answers to marked packets (a reset when nothing listens) are marked;
//! - a rule `fwmark DELIVERY_MARK lookup DELIVERY_TABLE` and, in that table,
//!   `local default dev lo`: marked packets are delivered locally, to the
//!   agent's socket.
//!
//! Unmarked traffic (everything else the pod sends) is untouched, so all of
//! it stays when a pod is released: connections delivered before still need
//! it, and it changes nothing for anything else.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use mesh_common::{DELIVERY_MARK, DELIVERY_RULE_PRIORITY, DELIVERY_TABLE, LOOPBACK_IFINDEX};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::pod_netns::PodNetns;

/// Where sysctls are written: the agent's own `/proc/sys`, else (read-only
/// in a container) the node's, which the DaemonSet mounts here. Either
/// serves: files under `net/` are the opening thread's namespace's.
const SYSCTL_ROOTS: [&str; 2] = ["/proc/sys", "/host/proc/sys"];

/// The sysctls set in the pod, and whether they are IPv6's.
const SYSCTLS: [(&str, bool); 3] = [
    ("net/ipv4/tcp_fwmark_accept", false),
    ("net/ipv4/fwmark_reflect", false),
    ("net/ipv6/fwmark_reflect", true),
];

/// Sets up the pod's namespace for deliveries from clients' addresses.
/// Idempotent: what is already there (a restarted agent) is kept.
pub fn install(netns: &PodNetns, ipv6: bool) -> Result<()> {
    let socket = netns.run(|| -> io::Result<Socket> {
        for (name, needs_ipv6) in SYSCTLS {
            if needs_ipv6 && !ipv6 {
                continue;
            }
            set_sysctl(name)?;
        }
        route_socket()
    })??;
    let families: &[AddressFamily] = if ipv6 {
        &[AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        &[AddressFamily::Inet]
    };
    for &family in families {
        let rule = RouteNetlinkMessage::NewRule(rule(family));
        create(&socket, rule).with_context(|| format!("adding the delivery rule ({family:?})"))?;
        let route = RouteNetlinkMessage::NewRoute(route(family));
        create(&socket, route)
            .with_context(|| format!("adding the delivery route ({family:?})"))?;
    }
    Ok(())
}

/// Sets `name` to 1 in the calling thread's network namespace.
fn set_sysctl(name: &str) -> io::Result<()> {
    let mut failures = Vec::new();
    for root in SYSCTL_ROOTS {
        let path = format!("{root}/{name}");
        match std::fs::write(&path, "1") {
            Ok(()) => return Ok(()),
            Err(err) => failures.push(format!("{path}: {err}")),
        }
    }
    Err(io::Error::other(format!(
        "setting {name}: {}",
        failures.join("; ")
    )))
}

fn route_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// `fwmark DELIVERY_MARK lookup DELIVERY_TABLE`.
fn rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::Priority(DELIVERY_RULE_PRIORITY),
        RuleAttribute::FwMark(DELIVERY_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(DELIVERY_TABLE),
    ];
    rule
}

/// `local default dev lo table DELIVERY_TABLE`.
fn route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    let any = if family == AddressFamily::Inet6 {
        RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED)
    } else {
        RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)
    };
    route.attributes = vec![
        RouteAttribute::Destination(any),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
        RouteAttribute::Table(DELIVERY_TABLE),
    ];
    route
}

/// Adds an object; one that exists already is fine.
fn create(socket: &Socket, message: RouteNetlinkMessage) -> io::Result<()> {
    match send(socket, message, NLM_F_CREATE | NLM_F_EXCL) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// One request and its acknowledgement.
fn send(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|err| io::Error::other(format!("netlink reply: {err}")))?;
    match reply.payload {
        NetlinkPayload::Error(error) if error.code.is_none() => Ok(()),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::other(format!(
            "unexpected netlink reply {}",
            other.message_type()
        ))),
    }
}
