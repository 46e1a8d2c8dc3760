//! Proof that a topology holds no iptables or nftables state: the product
//! captures traffic with eBPF and must never need packet-filter rules.
//!
//! The kernel is asked directly, from a thread that joined each namespace
//! (no `nft`/`iptables` binaries are needed):
//! - nf_tables: a `NFT_MSG_GETTABLE` dump over a `NETLINK_NETFILTER`
//!   socket, for all families;
//! - legacy x_tables: `/proc/thread-self/net/{ip,ip6,arp}_tables_names`,
//!   which list the tables instantiated in the reading thread's netns
//!   (`/proc/self/net` would show the thread-group leader's netns instead).
//!
//! Not covered: legacy ebtables (no procfs listing; querying a table by
//! getsockopt would instantiate it).
//!
//! [`add_nftables_table`] creates a real nf_tables table with a netlink
//! batch, so tests can prove the checker does fail.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::netns;

/// What packet-filter state a network namespace holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketFilterState {
    /// nf_tables tables as `family:name` (e.g. `inet:filter`), from a
    /// netlink dump.
    pub nftables_tables: Vec<String>,
    /// Legacy x_tables tables instantiated in the netns, as `ip:filter`,
    /// `ip6:nat`, `arp:filter`...
    pub xtables_tables: Vec<String>,
    /// Set (with the reason) when the kernel has no nf_tables at all: then
    /// no nft rule can exist and `nftables_tables` is empty for that reason.
    pub nftables_unavailable: Option<String>,
}

impl PacketFilterState {
    /// No table of either kind. (A kernel without nf_tables has no nft
    /// tables, so `nftables_unavailable` does not make this false.)
    pub fn is_empty(&self) -> bool {
        self.nftables_tables.is_empty() && self.xtables_tables.is_empty()
    }
}

/// Reads the state of the namespace at `netns_path` (e.g.
/// `/run/netns/NAME`), on a thread that joins it.
pub fn packet_filter_state(netns_path: &Path) -> anyhow::Result<PacketFilterState> {
    let shown = netns_path.display().to_string();
    netns::try_in_netns(netns_path, || -> anyhow::Result<PacketFilterState> {
        let xtables_tables = xtables_tables()?;
        let (nftables_tables, nftables_unavailable) = match nftables_tables()? {
            NftTables::Tables(t) => (t, None),
            NftTables::Unavailable(why) => (Vec::new(), Some(why)),
        };
        Ok(PacketFilterState {
            nftables_tables,
            xtables_tables,
            nftables_unavailable,
        })
    })?
    .with_context(|| format!("reading packet-filter state of netns {shown}"))
}

/// Checks every namespace of the topology (fabric, nodes, pods); the error
/// lists each namespace that holds tables (or could not be read).
pub fn assert_no_packet_filter_rules(topo: &crate::Topology) -> anyhow::Result<()> {
    let mut spaces = vec![("fabric".to_string(), topo.fabric_netns_name().to_string())];
    for node in topo.nodes() {
        spaces.push((format!("node `{}`", node.name()), node.netns_name().into()));
        for pod in node.pods() {
            let what = format!("pod `{}` on node `{}`", pod.name(), node.name());
            spaces.push((what, pod.netns_name().into()));
        }
    }
    let mut problems = Vec::new();
    for (what, name) in &spaces {
        match packet_filter_state(&netns::netns_path(name)) {
            Ok(state) => {
                if let Some(why) = &state.nftables_unavailable {
                    eprintln!("mesh-testbed: {what} (netns {name}): no nf_tables: {why}");
                }
                if !state.is_empty() {
                    problems.push(format!(
                        "{what} (netns {name}): nftables tables {:?}, x_tables tables {:?}",
                        state.nftables_tables, state.xtables_tables
                    ));
                }
            }
            Err(e) => problems.push(format!("{what} (netns {name}): cannot check: {e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "packet-filter state found in topology of test `{}` ({}):\n  {}",
            topo.test_name(),
            topo.id(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Creates the nf_tables table `inet <name>` in the netns at `netns_path`
/// with a real netlink batch, and waits for the kernel's ack.
pub fn add_nftables_table(netns_path: &Path, name: &str) -> anyhow::Result<()> {
    let shown = netns_path.display().to_string();
    let name = name.to_string();
    let what = format!("creating nf_tables table inet {name} in netns {shown}");
    netns::try_in_netns(netns_path, move || new_table_batch(&name))?.context(what)
}

// ---------------------------------------------------------------------------
// Legacy x_tables

/// Tables listed in `/proc/thread-self/net/*_tables_names`, prefixed with
/// their family. A missing file means that family's module is not loaded:
/// none of its tables can exist.
fn xtables_tables() -> anyhow::Result<Vec<String>> {
    let mut tables = Vec::new();
    for (family, file) in [
        ("ip", "ip_tables_names"),
        ("ip6", "ip6_tables_names"),
        ("arp", "arp_tables_names"),
    ] {
        let path = Path::new("/proc/thread-self/net").join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => tables.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| format!("{family}:{l}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(tables)
}

// ---------------------------------------------------------------------------
// Netlink constants (linux/netlink.h, linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h)

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// (subsystem << 8) | NFT_MSG_NEWTABLE (0).
const NFT_MSG_NEWTABLE: u16 = NFNL_SUBSYS_NFTABLES << 8;
const NFT_MSG_GETTABLE: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 1;
const NFTA_TABLE_NAME: u16 = 1;
/// nla_type without the NLA_F_NESTED and NLA_F_NET_BYTEORDER bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

const AF_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFNETLINK_V0: u8 = 0;

/// How long to wait for each netlink datagram from the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a table dump that the kernel flags as interrupted.
const DUMP_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------
// Building messages

/// Rounds up to the netlink alignment (4 bytes).
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends an nfnetlink message header (nlmsghdr + nfgenmsg) to `buf` and
/// returns where the message starts; [`end_msg`] fills in its length.
/// Netlink headers are in host byte order, nfgenmsg.res_id is big endian.
fn begin_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by end_msg
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 = to the kernel
    buf.extend_from_slice(&[family, NFNETLINK_V0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

/// Appends an attribute (nlattr header, payload, padding to 4 bytes).
fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(NLA_HDRLEN + payload.len()).expect("attribute fits in 64 KiB");
    buf.extend_from_slice(&len.to_ne_bytes()); // nla_len excludes the padding
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// Sets nlmsg_len of the message starting at `start` (it runs to the end of
/// `buf`, which is already 4-byte aligned after headers and attributes).
fn end_msg(buf: &mut [u8], start: usize) {
    debug_assert_eq!(buf.len() % 4, 0);
    let len = u32::try_from(buf.len() - start).expect("message fits in 4 GiB");
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A NUL-terminated string attribute payload.
fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The dump request: GETTABLE for every family.
fn gettable_dump_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    let m = begin_msg(
        &mut buf,
        NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        AF_UNSPEC,
        0,
    );
    end_msg(&mut buf, m);
    buf
}

/// A batch creating table `inet <name>`: BATCH_BEGIN (seq), NEWTABLE
/// (seq + 1, acked), BATCH_END (seq + 2).
fn newtable_batch(seq: u32, name: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    let (ty, subsys) = (NFNL_MSG_BATCH_BEGIN, NFNL_SUBSYS_NFTABLES);
    let m = begin_msg(&mut buf, ty, NLM_F_REQUEST, seq, AF_UNSPEC, subsys);
    end_msg(&mut buf, m);
    let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
    let m = begin_msg(&mut buf, NFT_MSG_NEWTABLE, flags, seq + 1, NFPROTO_INET, 0);
    put_attr(&mut buf, NFTA_TABLE_NAME, &c_string(name));
    end_msg(&mut buf, m);
    let (ty, subsys) = (NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES);
    let m = begin_msg(&mut buf, ty, NLM_F_REQUEST, seq + 2, AF_UNSPEC, subsys);
    end_msg(&mut buf, m);
    buf
}

// ---------------------------------------------------------------------------
// Parsing messages

/// One netlink message of a datagram.
#[derive(Debug)]
struct NlMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    /// After the nlmsghdr, up to nlmsg_len.
    payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Splits a datagram into its messages, checking every length.
fn parse_msgs(mut buf: &[u8]) -> anyhow::Result<Vec<NlMsg<'_>>> {
    let mut msgs = Vec::new();
    while !buf.is_empty() {
        anyhow::ensure!(
            buf.len() >= NLMSG_HDRLEN,
            "truncated netlink header ({} bytes)",
            buf.len()
        );
        let len = u32_at(buf, 0) as usize;
        anyhow::ensure!(
            (NLMSG_HDRLEN..=buf.len()).contains(&len),
            "bad nlmsg_len {len} ({} bytes left)",
            buf.len()
        );
        msgs.push(NlMsg {
            ty: u16_at(buf, 4),
            flags: u16_at(buf, 6),
            seq: u32_at(buf, 8),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        // The last message may lack its trailing padding.
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(msgs)
}

/// The attributes in `buf` as (type without flag bits, payload).
fn parse_attrs(mut buf: &[u8]) -> anyhow::Result<Vec<(u16, &[u8])>> {
    let mut attrs = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16_at(buf, 0) as usize;
        anyhow::ensure!(
            (NLA_HDRLEN..=buf.len()).contains(&len),
            "bad nla_len {len} ({} bytes left)",
            buf.len()
        );
        attrs.push((u16_at(buf, 2) & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(attrs)
}

/// The error code of an NLMSG_ERROR (0 = ack, else -errno) or NLMSG_DONE
/// (0, or -errno when a dump failed) message.
fn error_code(msg: &NlMsg) -> anyhow::Result<i32> {
    anyhow::ensure!(msg.payload.len() >= 4, "truncated error/done message");
    Ok(i32::from_ne_bytes(
        msg.payload[..4].try_into().expect("4 bytes"),
    ))
}

fn errno_of(code: i32) -> Errno {
    Errno::from_raw(-code)
}

/// Name of an nf_tables family (NFPROTO_*).
fn family_name(family: u8) -> String {
    match family {
        1 => "inet".into(),
        2 => "ip".into(),
        3 => "arp".into(),
        5 => "netdev".into(),
        7 => "bridge".into(),
        10 => "ip6".into(),
        other => format!("family{other}"),
    }
}

/// `family:name` of a NEWTABLE message.
fn table_of(msg: &NlMsg) -> anyhow::Result<String> {
    anyhow::ensure!(msg.payload.len() >= NFGENMSG_LEN, "truncated nfgenmsg");
    let family = family_name(msg.payload[0]);
    let attrs = parse_attrs(&msg.payload[NFGENMSG_LEN..])?;
    let (_, raw) = attrs
        .into_iter()
        .find(|(ty, _)| *ty == NFTA_TABLE_NAME)
        .context("NEWTABLE without NFTA_TABLE_NAME")?;
    let name = raw.split(|b| *b == 0).next().unwrap_or_default();
    Ok(format!("{family}:{}", String::from_utf8_lossy(name)))
}

// ---------------------------------------------------------------------------
// The socket

/// A NETLINK_NETFILTER socket in the calling thread's netns.
struct Nfnl {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Nfnl {
    fn open() -> Result<Nfnl, Errno> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        let timeout = TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        Ok(Nfnl {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one datagram (unbound: the kernel autobinds, and an unbound
    /// netlink socket sends to the kernel).
    fn send(&self, msg: &[u8]) -> anyhow::Result<()> {
        let sent = loop {
            match nix::sys::socket::send(self.fd.as_raw_fd(), msg, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                r => break r.context("netlink send")?,
            }
        };
        anyhow::ensure!(
            sent == msg.len(),
            "netlink send: {sent} of {} bytes",
            msg.len()
        );
        Ok(())
    }

    /// Receives one datagram; an error if it was truncated or none came.
    fn recv(&mut self) -> anyhow::Result<&[u8]> {
        let fd = self.fd.as_raw_fd();
        // MSG_TRUNC: returns the datagram's real length, to detect truncation.
        let len = loop {
            match nix::sys::socket::recv(fd, &mut self.buf, MsgFlags::MSG_TRUNC) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => bail!("no netlink reply within {RECV_TIMEOUT:?}"),
                r => break r.context("netlink recv")?,
            }
        };
        anyhow::ensure!(
            len <= self.buf.len(),
            "netlink reply of {len} bytes truncated"
        );
        Ok(&self.buf[..len])
    }
}

// ---------------------------------------------------------------------------
// nf_tables requests (run on a thread inside the target netns)

enum NftTables {
    Tables(Vec<String>),
    /// The kernel has no nf_tables (the reason, for the record).
    Unavailable(String),
}

/// Dumps the nf_tables tables of the calling thread's netns.
///
/// "Unavailable" only for the kernel's answers to a missing subsystem: no
/// NETLINK_NETFILTER protocol at all (EPROTONOSUPPORT from socket(2)), or
/// nfnetlink without the nf_tables subsystem, which it answers with EINVAL
/// (EOPNOTSUPP in batches). Every other failure is an error.
fn nftables_tables() -> anyhow::Result<NftTables> {
    for _ in 0..DUMP_ATTEMPTS {
        let mut nl = match Nfnl::open() {
            Ok(nl) => nl,
            Err(Errno::EPROTONOSUPPORT) => {
                return Ok(NftTables::Unavailable(
                    "socket(AF_NETLINK, NETLINK_NETFILTER): EPROTONOSUPPORT (no nfnetlink)".into(),
                ));
            }
            Err(e) => return Err(e).context("cannot open a NETLINK_NETFILTER socket"),
        };
        let seq = 1;
        nl.send(&gettable_dump_request(seq))?;
        let mut tables = Vec::new();
        let mut interrupted = false;
        'recv: loop {
            for msg in parse_msgs(nl.recv()?)? {
                if msg.seq != seq {
                    continue; // not a reply to our request
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                match msg.ty {
                    NLMSG_DONE | NLMSG_ERROR => match error_code(&msg)? {
                        0 => break 'recv,
                        code => {
                            let errno = errno_of(code);
                            if matches!(errno, Errno::EINVAL | Errno::EOPNOTSUPP) {
                                return Ok(NftTables::Unavailable(format!(
                                    "NFT_MSG_GETTABLE dump answered {errno} (no nf_tables subsystem)"
                                )));
                            }
                            bail!("NFT_MSG_GETTABLE dump failed: {errno}");
                        }
                    },
                    NFT_MSG_NEWTABLE => tables.push(table_of(&msg)?),
                    NLMSG_NOOP => {}
                    other => bail!("unexpected netlink message type {other:#x} in table dump"),
                }
            }
        }
        if !interrupted {
            tables.sort();
            return Ok(NftTables::Tables(tables));
        }
    }
    bail!("NFT_MSG_GETTABLE dump interrupted by concurrent changes {DUMP_ATTEMPTS} times")
}

/// Sends a batch creating table `inet <name>` and waits for its ack.
fn new_table_batch(name: &str) -> anyhow::Result<()> {
    let mut nl = match Nfnl::open() {
        Ok(nl) => nl,
        Err(Errno::EPROTONOSUPPORT) => {
            bail!("this kernel has no nfnetlink (NETLINK_NETFILTER: EPROTONOSUPPORT)")
        }
        Err(e) => return Err(e).context("cannot open a NETLINK_NETFILTER socket"),
    };
    let seq = 1;
    nl.send(&newtable_batch(seq, name))?;
    loop {
        for msg in parse_msgs(nl.recv()?)? {
            if !(seq..=seq + 2).contains(&msg.seq) {
                continue;
            }
            match msg.ty {
                NLMSG_ERROR => {
                    let code = error_code(&msg)?;
                    if code == 0 && msg.seq == seq + 1 {
                        return Ok(()); // NEWTABLE acked
                    }
                    if code != 0 {
                        let errno = errno_of(code);
                        let hint = if matches!(errno, Errno::EOPNOTSUPP | Errno::EINVAL) {
                            " (is nf_tables available in this kernel?)"
                        } else {
                            ""
                        };
                        bail!(
                            "kernel rejected message {} of the batch: {errno}{hint}",
                            msg.seq - seq + 1
                        );
                    }
                }
                NLMSG_NOOP | NLMSG_DONE => {}
                other => bail!("unexpected netlink message type {other:#x} after batch"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Topology, e2e_enabled, naming};

    /// A named netns of its own (sweepable name), deleted on drop.
    struct ScratchNetns {
        name: String,
    }

    impl ScratchNetns {
        fn new() -> ScratchNetns {
            // Created after the guard exists: a half-made netns is removed too.
            let ns = ScratchNetns {
                name: naming::next_id("nf"),
            };
            netns::add(&ns.name).unwrap();
            ns
        }

        fn path(&self) -> std::path::PathBuf {
            netns::netns_path(&self.name)
        }
    }

    impl Drop for ScratchNetns {
        fn drop(&mut self) {
            if let Err(e) = netns::delete(&self.name) {
                eprintln!("netfilter test: {e:#}");
            }
        }
    }

    /// Instantiates the legacy `filter` table of iptables in the calling
    /// thread's netns, as `iptables -L` would: IPT_SO_GET_INFO on a table
    /// that is not yet there makes the kernel create it from its template.
    fn touch_iptables_filter() -> Result<(), Errno> {
        const IPT_SO_GET_INFO: libc::c_int = 64;
        // struct ipt_getinfo: name[32], valid_hooks, hook_entry[5],
        // underflow[5], num_entries, size.
        let mut info = [0u8; 32 + 4 + 5 * 4 + 5 * 4 + 4 + 4];
        info[..6].copy_from_slice(b"filter");
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )?;
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes, `len` is a valid pointer.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                IPT_SO_GET_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        Errno::result(r).map(drop)
    }

    #[test]
    fn state_is_empty() {
        assert!(PacketFilterState::default().is_empty());
        let unavailable = PacketFilterState {
            nftables_unavailable: Some("no nf_tables".into()),
            ..Default::default()
        };
        assert!(unavailable.is_empty());
        let nft = PacketFilterState {
            nftables_tables: vec!["inet:t".into()],
            ..Default::default()
        };
        assert!(!nft.is_empty());
        let xt = PacketFilterState {
            xtables_tables: vec!["ip:filter".into()],
            ..Default::default()
        };
        assert!(!xt.is_empty());
    }

    #[test]
    fn batch_layout() {
        let b = newtable_batch(7, "mesh_test");
        let msgs = parse_msgs(&b).unwrap();
        assert_eq!(msgs.len(), 3);
        // BATCH_BEGIN: nlmsghdr + nfgenmsg, res_id = subsystem, big endian.
        assert_eq!(u32_at(&b, 0), 20);
        assert_eq!(
            (msgs[0].ty, msgs[0].flags, msgs[0].seq),
            (0x10, NLM_F_REQUEST, 7)
        );
        assert_eq!(msgs[0].payload, [0, 0, 0, 10]);
        // NEWTABLE: 16 + 4 + attr(4 + "mesh_test\0" = 14, padded to 16) = 36.
        assert_eq!(u32_at(&b, 20), 36);
        assert_eq!(msgs[1].ty, 0x0a00);
        assert_eq!(msgs[1].flags, 0x1 | 0x4 | 0x400);
        assert_eq!(msgs[1].seq, 8);
        assert_eq!(msgs[1].payload[..4], [NFPROTO_INET, 0, 0, 0]);
        assert_eq!(u16_at(msgs[1].payload, 4), 14); // nla_len excludes padding
        assert_eq!(table_of(&msgs[1]).unwrap(), "inet:mesh_test");
        assert_eq!((msgs[2].ty, msgs[2].seq), (0x11, 9));
        assert_eq!(msgs[2].payload, [0, 0, 0, 10]);
        assert_eq!(b.len(), 20 + 36 + 20);
    }

    #[test]
    fn dump_request_layout() {
        let b = gettable_dump_request(3);
        assert_eq!(b.len(), 20);
        let msgs = parse_msgs(&b).unwrap();
        assert_eq!(msgs[0].ty, 0x0a01);
        assert_eq!(msgs[0].flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(msgs[0].payload, [0, 0, 0, 0]);
    }

    #[test]
    fn parse_rejects_bad_lengths() {
        let mut b = gettable_dump_request(1);
        b[..4].copy_from_slice(&24u32.to_ne_bytes()); // longer than the datagram
        assert!(parse_msgs(&b).is_err());
        b[..4].copy_from_slice(&8u32.to_ne_bytes()); // shorter than a header
        assert!(parse_msgs(&b).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err()); // nla_len < header
        assert!(parse_attrs(&[9, 0, 1, 0, b'a', 0]).is_err()); // past the end
    }

    #[test]
    fn nftables_table_is_detected() {
        if !e2e_enabled("nftables_table_is_detected") {
            return;
        }
        let ns = ScratchNetns::new();
        let other = ScratchNetns::new();

        let before = packet_filter_state(&ns.path()).unwrap();
        assert_eq!(
            before,
            PacketFilterState::default(),
            "fresh netns {}",
            ns.name
        );

        add_nftables_table(&ns.path(), "mesh_test").unwrap_or_else(|e| {
            panic!("cannot create an nf_tables table (this kernel must support nf_tables): {e:#}")
        });
        let after = packet_filter_state(&ns.path()).unwrap();
        assert_eq!(after.nftables_tables, ["inet:mesh_test"], "{after:?}");
        assert_eq!(after.nftables_unavailable, None);
        assert!(!after.is_empty());

        // Per namespace: the other one (and ours' neighbours) stay empty.
        let untouched = packet_filter_state(&other.path()).unwrap();
        assert!(untouched.is_empty(), "netns {}: {untouched:?}", other.name);
        assert_eq!(untouched.nftables_unavailable, None);

        // NLM_F_CREATE without NLM_F_EXCL: adding it again is a no-op, like
        // `nft add table`.
        add_nftables_table(&ns.path(), "mesh_test").unwrap();
        // A name over NFT_NAME_MAXLEN is rejected, and the error reaches us.
        let too_long = "x".repeat(300);
        let err = add_nftables_table(&ns.path(), &too_long).unwrap_err();
        assert!(format!("{err:#}").contains("rejected"), "{err:#}");
        let last = packet_filter_state(&ns.path()).unwrap();
        assert_eq!(last.nftables_tables, ["inet:mesh_test"], "{last:?}");
    }

    #[test]
    fn xtables_table_is_detected() {
        if !e2e_enabled("xtables_table_is_detected") {
            return;
        }
        let ns = ScratchNetns::new();
        assert!(packet_filter_state(&ns.path()).unwrap().is_empty());
        match netns::try_in_netns(&ns.path(), touch_iptables_filter).unwrap() {
            Ok(()) => {
                let state = packet_filter_state(&ns.path()).unwrap();
                assert_eq!(state.xtables_tables, ["ip:filter"], "{state:?}");
                assert!(state.nftables_tables.is_empty(), "{state:?}");
                assert!(!state.is_empty());
            }
            // Kernels without legacy iptables: nothing to instantiate, nor to find.
            Err(e @ (Errno::ENOPROTOOPT | Errno::ENOENT)) => {
                eprintln!("xtables_table_is_detected: no legacy iptables filter table ({e})");
                assert!(packet_filter_state(&ns.path()).unwrap().is_empty());
            }
            Err(e) => panic!("IPT_SO_GET_INFO(filter) failed: {e}"),
        }
    }

    #[test]
    fn topology_without_and_with_a_table() {
        if !e2e_enabled("topology_without_and_with_a_table") {
            return;
        }
        let topo = Topology::builder("nf")
            .node("n1", &["a"])
            .node("n2", &["b"])
            .build()
            .unwrap();
        assert_no_packet_filter_rules(&topo).unwrap();

        let b = topo.pod("b");
        add_nftables_table(&b.netns_path(), "mesh_test").unwrap_or_else(|e| {
            panic!("cannot create an nf_tables table (this kernel must support nf_tables): {e:#}")
        });
        let err = format!("{:#}", assert_no_packet_filter_rules(&topo).unwrap_err());
        assert!(err.contains(b.netns_name()), "{err}");
        assert!(err.contains("pod `b`"), "{err}");
        assert!(err.contains("inet:mesh_test"), "{err}");
        // Only that namespace is named.
        for other in [topo.pod("a").netns_name(), topo.fabric_netns_name()] {
            assert!(!err.contains(other), "{other} named in: {err}");
        }
        assert_eq!(err.matches("(netns ").count(), 1, "{err}");
    }
}
