//! `dns-query <server> <name> [--aaaa] [--unconnected]`: one DNS query over
//! UDP, from a connected socket (as glibc's resolver) or an unconnected one
//! (sendto/recvfrom, as musl's). Prints `from <address the answer came
//! from> rcode <code> answers <ip>,<ip>...`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};

pub fn query(server: IpAddr, name: &str, aaaa: bool, unconnected: bool) -> Result<()> {
    let mut message = Message::query();
    message.metadata.id = std::process::id() as u16;
    message.metadata.recursion_desired = true;
    let kind = if aaaa {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    message.add_query(Query::query(Name::from_ascii(name)?, kind));
    let bytes = message.to_vec()?;
    let server = SocketAddr::new(server, 53);
    let local: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 65_535];
    let (n, from) = if unconnected {
        socket.send_to(&bytes, server).context("sendto")?;
        socket.recv_from(&mut buf).context("recvfrom")?
    } else {
        socket.connect(server).context("connect")?;
        socket.send(&bytes).context("send")?;
        let n = socket.recv(&mut buf).context("recv")?;
        (n, socket.peer_addr()?)
    };
    let reply = Message::from_vec(&buf[..n])?;
    if reply.metadata.id != message.metadata.id {
        bail!(
            "the answer carries ID {}, not {}",
            reply.metadata.id,
            message.metadata.id
        );
    }
    let answers: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "from {from} rcode {} answers {}",
        reply.metadata.response_code,
        answers.join(",")
    );
    Ok(())
}
