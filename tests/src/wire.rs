//! Capturing what crosses the node-to-node wire (the fabric), to prove that
//! traffic between nodes is encrypted: [`WireCapture`] records every TCP
//! segment that enters the fabric, [`WireReport`] answers questions about
//! them (does any payload contain some plaintext, which ports carried data,
//! is everything on a port TLS records).
//!
//! # What is captured, and why each frame is seen once
//!
//! One `AF_PACKET`/`SOCK_RAW` socket with protocol `ETH_P_ALL`, not bound to
//! any interface, is created on a thread that joined the fabric netns. In
//! that netns a frame from node `i` to node `j` is seen up to three times:
//! entering the bridge on port `n<i>` (incoming, `PACKET_OTHERHOST` or
//! `PACKET_HOST`), leaving it on port `n<j>` (`PACKET_OUTGOING`), and, for
//! broadcasts and multicasts only, once more on `br0` itself. Binding to
//! `br0` would not do: forwarded unicast frames never reach the bridge
//! device. So the capture keeps only frames **entering the fabric from a
//! node**: incoming frames (outgoing ones are dropped by the kernel with
//! `PACKET_IGNORE_OUTGOING`, and filtered again here) on the bridge ports
//! `n1`, `n2`, ... (not `br0`, not `lo`). Every frame on the wire is counted
//! exactly once.
//!
//! # Offloads
//!
//! veth does TSO/GSO, so the capture sees GSO super-frames: one "frame" with
//! up to 64 KiB of TCP payload, larger than the MTU. Lengths are taken from
//! the IP header, capped at the captured length; checksums are not checked
//! (they are partial/offloaded on veth). Frames are read with a 256 KiB
//! buffer, enough for any GSO frame on veth; the socket receive buffer is
//! 64 MiB (`SO_RCVBUFFORCE`), and kernel drops (`PACKET_STATISTICS`) are
//! reported in [`WireReport::dropped`].
//!
//! # Memory
//!
//! Segments are kept in memory up to 256 MiB (payload plus a fixed
//! per-segment overhead); after that frames are only counted and
//! [`WireReport::truncated`] is set. A test that asserts the *absence* of
//! something should also assert [`WireReport::complete`].

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sched::CloneFlags;

use crate::{Topology, netns};

/// Payload (plus [`SEGMENT_OVERHEAD`] per segment) kept before truncating.
const STORE_LIMIT: u64 = 256 << 20;
/// Accounted per stored segment on top of its payload (addresses, vec).
const SEGMENT_OVERHEAD: u64 = 96;
/// Receive buffer of the packet socket.
const RCVBUF: libc::c_int = 64 << 20;
/// Read buffer: any GSO frame on veth (64 KiB of IP packet) fits.
const FRAME_BUF: usize = 256 << 10;
/// Frames read in a row before checking whether we were asked to stop.
const BATCH: usize = 256;
/// After `finish`, how long the queued frames are still drained. Frames are
/// queued synchronously as they cross the bridge, so what was sent before
/// `finish` is already in the socket; this only bounds the time spent
/// reading it when traffic is still flowing.
const FINAL_DRAIN: Duration = Duration::from_secs(1);
/// The kernel's default `ip_local_port_range`, for telling client from
/// server ports when no SYN was captured.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// Largest TLS record length on the wire (TLSCiphertext: 2^14 + 2048).
const TLS_MAX_RECORD: usize = (1 << 14) + 2048;

/// TCP flag bits, as in [`TcpSegment::flags`].
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

static NEXT_CAPTURE: AtomicU64 = AtomicU64::new(0);

/// A running capture of the fabric of a topology; see the module docs.
/// Stops (and joins its thread) on [`WireCapture::finish`] or on drop.
pub struct WireCapture {
    /// Write end of the stop pipe: closing it wakes the capture thread.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<anyhow::Result<Collected>>>,
    frames: Arc<AtomicU64>,
    fabric: String,
    thread_name: String,
    socket_inode: u64,
}

/// Everything a [`WireCapture`] saw.
#[derive(Clone, Default)]
pub struct WireReport {
    /// TCP segments (IPv4 and IPv6) in order of arrival, possibly cut short
    /// (see `truncated`).
    pub segments: Vec<TcpSegment>,
    /// UDP datagrams (IPv4 and IPv6), in order of arrival.
    pub datagrams: Vec<UdpDatagram>,
    /// Frames that entered the fabric from a node (any protocol, counted
    /// also after `truncated`).
    pub frames: u64,
    /// True if the storage limit was hit: later segments were not kept.
    pub truncated: bool,
    /// Frames the kernel dropped because the socket buffer was full
    /// (`PACKET_STATISTICS`); should be 0.
    pub dropped: u64,
}

/// One TCP segment as seen on the wire. A GSO super-frame is one segment
/// whose payload can be larger than the MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TCP flags (the low 8 bits: CWR ECE URG ACK PSH RST SYN FIN); see
    /// [`SYN`], [`ACK`], ...
    pub flags: u8,
    /// Sequence number, used to drop retransmitted bytes when reassembling.
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// What the capture thread hands back.
#[derive(Default)]
struct Collected {
    segments: Vec<TcpSegment>,
    datagrams: Vec<UdpDatagram>,
    stored: u64,
    truncated: bool,
    dropped: u64,
}

impl Collected {
    /// Whether a payload may still be kept (and counts it); past the
    /// storage limit the capture is truncated.
    fn room_for(&mut self, payload: &[u8]) -> bool {
        let cost = payload.len() as u64 + SEGMENT_OVERHEAD;
        if self.stored + cost > STORE_LIMIT {
            self.truncated = true;
            return false;
        }
        self.stored += cost;
        true
    }
}

impl WireCapture {
    /// Starts capturing every frame that enters the fabric netns of `topo`
    /// from a node. When this returns the socket is open: everything sent
    /// from now on is captured.
    pub fn start(topo: &Topology) -> anyhow::Result<WireCapture> {
        let fabric = topo.fabric_netns_name().to_string();
        let ns_path = netns::netns_path(&fabric);
        let ns = File::open(&ns_path)
            .with_context(|| format!("cannot open fabric netns {}", ns_path.display()))?;
        let ports: Vec<String> = topo
            .nodes()
            .iter()
            .map(|n| format!("n{}", n.index()))
            .collect();
        let (stop_r, stop_w) = pipe().context("cannot create the stop pipe")?;
        let frames = Arc::new(AtomicU64::new(0));
        let thread_name = format!(
            "mtb-wire-{}",
            NEXT_CAPTURE.fetch_add(1, Ordering::Relaxed) % 1_000_000
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let counter = frames.clone();
        let shown = fabric.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || -> anyhow::Result<Collected> {
                let setup = || -> anyhow::Result<(OwnedFd, Vec<libc::c_int>)> {
                    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns(fabric netns {shown}) failed"))?;
                    drop(ns);
                    open_socket(&ports)
                };
                let (sock, port_ifindexes) = match setup() {
                    Ok(v) => v,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        bail!("{msg}");
                    }
                };
                let _ = ready_tx.send(Ok(inode(sock.as_raw_fd())));
                drop(ready_tx);
                capture_loop(&sock, &stop_r, &port_ifindexes, &counter)
            })
            .context("cannot spawn the capture thread")?;
        let mut capture = WireCapture {
            stop: Some(stop_w),
            thread: Some(thread),
            frames,
            fabric,
            thread_name,
            socket_inode: 0,
        };
        match ready_rx.recv() {
            Ok(Ok(ino)) => {
                capture.socket_inode = ino;
                Ok(capture)
            }
            Ok(Err(e)) => {
                // The thread ends with the same error, already in `e`.
                let _ = capture.stop_thread();
                Err(e).with_context(|| {
                    format!("cannot start a capture in fabric netns {}", capture.fabric)
                })
            }
            Err(_) => {
                let result = capture.stop_thread();
                bail!(
                    "capture thread for fabric netns {} died while starting: {:?}",
                    capture.fabric,
                    result.err()
                );
            }
        }
    }

    /// Frames captured so far (for waiting until traffic was seen).
    pub fn frames_so_far(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Stops the capture (draining what is already queued, for at most about
    /// a second) and returns what was seen.
    pub fn finish(mut self) -> anyhow::Result<WireReport> {
        let collected = self
            .stop_thread()
            .with_context(|| format!("capture of fabric netns {}", self.fabric))?;
        Ok(WireReport {
            segments: collected.segments,
            datagrams: collected.datagrams,
            frames: self.frames.load(Ordering::Relaxed),
            truncated: collected.truncated,
            dropped: collected.dropped,
        })
    }

    /// Closes the stop pipe and joins the thread.
    fn stop_thread(&mut self) -> anyhow::Result<Collected> {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            bail!("the capture was already stopped");
        };
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(e) = self.stop_thread()
        {
            eprintln!("mesh-testbed: wire capture of {}: {e:#}", self.fabric);
        }
    }
}

impl fmt::Debug for WireCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireCapture")
            .field("fabric", &self.fabric)
            .field("thread", &self.thread_name)
            .field("socket_inode", &self.socket_inode)
            .field("frames_so_far", &self.frames_so_far())
            .finish()
    }
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn inode(fd: RawFd) -> u64 {
    // SAFETY: fstat fills a plain struct; `fd` is open.
    let mut st: libc::stat = unsafe { zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        st.st_ino
    } else {
        0
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: passes a valid pointer to an int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Opens the packet socket in the current thread's netns and resolves the
/// bridge ports' ifindexes there.
fn open_socket(ports: &[String]) -> anyhow::Result<(OwnedFd, Vec<libc::c_int>)> {
    let mut ifindexes = Vec::new();
    for port in ports {
        let name = std::ffi::CString::new(port.as_str()).expect("no NUL in port names");
        // SAFETY: a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("no bridge port `{port}` in the fabric netns"));
        }
        ifindexes.push(index as libc::c_int);
    }
    let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot open an AF_PACKET socket (needs CAP_NET_RAW)");
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if !setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF)
        && !setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF)
    {
        return Err(std::io::Error::last_os_error()).context("cannot set SO_RCVBUF");
    }
    // Best effort (Linux >= 4.20); outgoing frames are also filtered below.
    setsockopt_int(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
    Ok((sock, ifindexes))
}

fn capture_loop(
    sock: &OwnedFd,
    stop: &OwnedFd,
    ports: &[libc::c_int],
    frames: &AtomicU64,
) -> anyhow::Result<Collected> {
    let mut collected = Collected::default();
    let mut buf = vec![0u8; FRAME_BUF];
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // No timeout needed: closing the stop pipe's write end wakes us.
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll on the capture socket");
        }
        if fds[1].revents != 0 {
            let until = Instant::now() + FINAL_DRAIN;
            while Instant::now() < until {
                if read_batch(sock, &mut buf, ports, frames, &mut collected)? < BATCH {
                    break;
                }
            }
            break;
        }
        if fds[0].revents != 0 {
            read_batch(sock, &mut buf, ports, frames, &mut collected)?;
        }
    }
    collected.dropped = drops(sock.as_raw_fd());
    Ok(collected)
}

/// Reads up to [`BATCH`] frames without blocking; returns how many were read
/// (fewer than `BATCH` means the queue is empty).
fn read_batch(
    sock: &OwnedFd,
    buf: &mut [u8],
    ports: &[libc::c_int],
    frames: &AtomicU64,
    collected: &mut Collected,
) -> anyhow::Result<usize> {
    for i in 0..BATCH {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
        let mut addr_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `addr` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut addr_len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(i),
                std::io::ErrorKind::Interrupted => continue,
                // An interface went away (topology teardown): keep going.
                _ if e.raw_os_error() == Some(libc::ENETDOWN) => continue,
                _ => return Err(e).context("recvfrom on the capture socket"),
            }
        }
        // With MSG_TRUNC, `n` is the frame's real length.
        let frame = &buf[..(n as usize).min(buf.len())];
        if addr.sll_pkttype == libc::PACKET_OUTGOING || !ports.contains(&addr.sll_ifindex) {
            continue;
        }
        frames.fetch_add(1, Ordering::Relaxed);
        if collected.truncated {
            continue;
        }
        if let Some(segment) = parse_frame(frame) {
            if collected.room_for(&segment.payload) {
                collected.segments.push(segment);
            }
        } else if let Some(datagram) = parse_udp_frame(frame)
            && collected.room_for(&datagram.payload)
        {
            collected.datagrams.push(datagram);
        }
    }
    Ok(BATCH)
}

/// Frames the kernel dropped since the socket was opened.
fn drops(fd: RawFd) -> u64 {
    // SAFETY: tpacket_stats is plain data, and its size is passed.
    let mut stats: libc::tpacket_stats = unsafe { zeroed() };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if r == 0 { stats.tp_drops.into() } else { 0 }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The IP layer of a frame carrying TCP or UDP: addresses, protocol (6 or
/// 17) and the transport header with its payload. Non-first fragments are
/// skipped (no transport header in them).
fn parse_ip(frame: &[u8]) -> Option<(IpAddr, IpAddr, u8, &[u8])> {
    let mut ethertype = be16(frame, 12)?;
    let mut at = 14;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(frame, at + 2)?;
        at += 4;
    }
    let ip = frame.get(at..)?;
    let (src, dst, protocol, l4) = match ethertype {
        0x0800 => {
            let vihl = *ip.first()?;
            if vihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            let total = usize::from(be16(ip, 2)?);
            if ihl < 20 || (total != 0 && total < ihl) {
                return None;
            }
            // Not the first fragment: no TCP header here.
            if be16(ip, 6)? & 0x1fff != 0 || !matches!(ip[9], 6 | 17) {
                return None;
            }
            let src = Ipv4Addr::from(be32(ip, 12)?);
            let dst = Ipv4Addr::from(be32(ip, 16)?);
            // total == 0 happens with some TSO paths: take what was captured.
            let end = if total == 0 {
                ip.len()
            } else {
                total.min(ip.len())
            };
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                ip[9],
                ip.get(ihl..end)?,
            )
        }
        0x86dd => {
            if *ip.first()? >> 4 != 6 {
                return None;
            }
            let payload_len = usize::from(be16(ip, 4)?);
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            // 0 is a jumbogram (BIG TCP): take what was captured.
            let end = if payload_len == 0 {
                ip.len()
            } else {
                (40 + payload_len).min(ip.len())
            };
            let mut next = ip[6];
            let mut off = 40;
            loop {
                match next {
                    6 | 17 => break,
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        next = *ip.get(off)?;
                        off += (usize::from(*ip.get(off + 1)?) + 1) * 8;
                    }
                    // Fragment: only the first one has the TCP header.
                    44 => {
                        if be16(ip, off + 2)? & 0xfff8 != 0 {
                            return None;
                        }
                        next = *ip.get(off)?;
                        off += 8;
                    }
                    _ => return None,
                }
            }
            let src = IpAddr::from(Ipv6Addr::from(src));
            let dst = IpAddr::from(Ipv6Addr::from(dst));
            (src, dst, next, ip.get(off..end.max(off))?)
        }
        _ => return None,
    };
    Some((src, dst, protocol, l4))
}

/// Parses an Ethernet frame (optionally 802.1Q/802.1ad tagged) carrying
/// TCP over IPv4 (with options; non-first fragments are skipped) or IPv6
/// (skipping hop-by-hop, routing, destination options and fragment
/// headers). Lengths come from the IP header, capped at what was captured.
/// Anything else is `None`.
pub fn parse_frame(frame: &[u8]) -> Option<TcpSegment> {
    let (src, dst, protocol, tcp) = parse_ip(frame)?;
    if protocol != 6 {
        return None;
    }
    let sport = be16(tcp, 0)?;
    let dport = be16(tcp, 2)?;
    let seq = be32(tcp, 4)?;
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    if doff < 20 {
        return None;
    }
    Some(TcpSegment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        flags,
        seq,
        payload: tcp.get(doff..).unwrap_or_default().to_vec(),
    })
}

/// One UDP datagram as captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// [`parse_frame`] for UDP.
pub fn parse_udp_frame(frame: &[u8]) -> Option<UdpDatagram> {
    let (src, dst, protocol, udp) = parse_ip(frame)?;
    if protocol != 17 {
        return None;
    }
    let length = usize::from(be16(udp, 4)?);
    let end = if length >= 8 {
        length.min(udp.len())
    } else {
        udp.len()
    };
    Some(UdpDatagram {
        src: SocketAddr::new(src, be16(udp, 0)?),
        dst: SocketAddr::new(dst, be16(udp, 2)?),
        payload: udp.get(8..end.max(8)).unwrap_or_default().to_vec(),
    })
}

/// One direction of one TCP connection, reassembled.
#[derive(Debug)]
struct Stream {
    src: SocketAddr,
    dst: SocketAddr,
    data: Vec<u8>,
    /// Offsets in `data` before which bytes are missing from the capture.
    gaps: Vec<usize>,
}

/// Segments of one direction of one connection, as captured.
struct RawStream<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    /// (sequence number of the first payload byte, payload).
    segments: Vec<(u32, &'a [u8])>,
}

impl WireReport {
    /// True if nothing was lost: not truncated and no kernel drops. Checks
    /// for the absence of something are only sound on a complete report.
    pub fn complete(&self) -> bool {
        !self.truncated && self.dropped == 0
    }

    /// Reassembles the payload of each direction of each connection by
    /// sequence number: the packet socket may receive a flow's frames out of
    /// order (two CPUs), so arrival order is not enough. Bytes seen twice
    /// (retransmissions) are kept once; bytes never seen are recorded as gaps.
    /// A SYN starts a new stream for a reused 4-tuple.
    fn streams(&self) -> Vec<Stream> {
        let mut raw: Vec<RawStream<'_>> = Vec::new();
        let mut current: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
        for seg in &self.segments {
            let key = (seg.src, seg.dst);
            let syn = seg.flags & SYN != 0;
            let idx = match current.get(&key) {
                Some(&i) if !syn || raw[i].segments.is_empty() => i,
                _ => {
                    raw.push(RawStream {
                        src: seg.src,
                        dst: seg.dst,
                        segments: Vec::new(),
                    });
                    current.insert(key, raw.len() - 1);
                    raw.len() - 1
                }
            };
            // SYN takes one sequence number before the data.
            let seq = if syn {
                seg.seq.wrapping_add(1)
            } else {
                seg.seq
            };
            if syn || !seg.payload.is_empty() {
                raw[idx].segments.push((seq, &seg.payload));
            }
        }
        raw.into_iter().map(reassemble).collect()
    }

    /// Server port of each connection: the destination of a SYN without
    /// ACK if one was captured; else the port outside the kernel's default
    /// ephemeral range (32768..=60999) if exactly one is; else the lower.
    fn server_ports(&self) -> HashMap<(SocketAddr, SocketAddr), u16> {
        let mut ports = HashMap::new();
        for seg in &self.segments {
            if seg.flags & (SYN | ACK) == SYN {
                ports.insert(conn_key(seg.src, seg.dst), seg.dst.port());
            }
        }
        ports
    }

    fn server_port(
        known: &HashMap<(SocketAddr, SocketAddr), u16>,
        a: SocketAddr,
        b: SocketAddr,
    ) -> u16 {
        if let Some(&p) = known.get(&conn_key(a, b)) {
            return p;
        }
        let (pa, pb) = (a.port(), b.port());
        match (EPHEMERAL.contains(&pa), EPHEMERAL.contains(&pb)) {
            (true, false) => pb,
            (false, true) => pa,
            _ => pa.min(pb),
        }
    }

    /// True if `needle` occurs in the payload of any captured segment, or in
    /// the reassembled payload of any direction of any connection (so also
    /// across segment boundaries). An empty needle is always found.
    pub fn contains(&self, needle: &[u8]) -> bool {
        if needle.is_empty() {
            return true;
        }
        self.segments.iter().any(|s| find(&s.payload, needle))
            || self.streams().iter().any(|s| find(&s.data, needle))
    }

    /// The server-side ports (see below) of the connections that carried
    /// payload in either direction. The server port of a connection is the
    /// destination port of its SYN (without ACK) if that was captured;
    /// otherwise the one outside the default ephemeral range
    /// 32768..=60999 if exactly one is, otherwise the lower one.
    pub fn ports_with_payload(&self) -> BTreeSet<u16> {
        let known = self.server_ports();
        self.segments
            .iter()
            .filter(|s| !s.payload.is_empty())
            .map(|s| Self::server_port(&known, s.src, s.dst))
            .collect()
    }

    /// Total TCP payload of the captured segments from or to `port` (either
    /// side), both directions, retransmissions included.
    pub fn payload_bytes_on_port(&self, port: u16) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.src.port() == port || s.dst.port() == port)
            .map(|s| s.payload.len() as u64)
            .sum()
    }

    /// Checks that each direction of each connection from or to `port`
    /// (either side) that carried payload is a sequence of TLS records:
    /// content type 20..=23, version 0x0301..=0x0304, length at most
    /// 2^14 + 2048; the stream must parse completely, except that its last
    /// record (or record header) may be cut short. The error describes the
    /// first flow that is not TLS and shows its bytes there.
    pub fn all_tls_on_port(&self, port: u16) -> anyhow::Result<()> {
        for stream in self.streams() {
            if stream.data.is_empty() || (stream.src.port() != port && stream.dst.port() != port) {
                continue;
            }
            // Each stretch between capture gaps is checked; after a gap, parsing
            // resumes at the next pair of record headers (bytes are missing
            // from the capture, not from the wire: the tunnel's own TCP is
            // reliable).
            let mut bounds = stream.gaps.clone();
            bounds.push(stream.data.len());
            let mut start = 0;
            for (n, end) in bounds.into_iter().enumerate() {
                let stretch = &stream.data[start..end];
                let from = if n == 0 { Some(0) } else { resync_tls(stretch) };
                let checked = match from {
                    Some(from) => check_tls_records(&stretch[from..])
                        .map_err(|(o, why)| (start + from + o, why)),
                    None if stretch.len() <= 2 * (5 + TLS_MAX_RECORD) => Ok(()),
                    None => Err((
                        start,
                        "no TLS record boundary after a capture gap".to_string(),
                    )),
                };
                if let Err((offset, why)) = checked {
                    bail!(
                        "flow {} -> {} ({} bytes of payload, {} capture gaps) is not TLS: at offset {offset}: {why}; \
                         bytes there: {}",
                        stream.src,
                        stream.dst,
                        stream.data.len(),
                        stream.gaps.len(),
                        show_bytes(&stream.data[offset..])
                    );
                }
                start = end;
            }
        }
        Ok(())
    }

    /// One line per direction of each connection: addresses, segment
    /// count, payload bytes; for assertion messages.
    pub fn summary(&self) -> String {
        let mut flows: Vec<((SocketAddr, SocketAddr), (u64, u64))> = Vec::new();
        let mut index: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
        for s in &self.segments {
            let i = *index.entry((s.src, s.dst)).or_insert_with(|| {
                flows.push(((s.src, s.dst), (0, 0)));
                flows.len() - 1
            });
            flows[i].1.0 += 1;
            flows[i].1.1 += s.payload.len() as u64;
        }
        let mut out = format!(
            "{} frames, {} TCP segments kept{}{}",
            self.frames,
            self.segments.len(),
            if self.truncated { ", TRUNCATED" } else { "" },
            if self.dropped > 0 {
                format!(", {} DROPPED by the kernel", self.dropped)
            } else {
                String::new()
            }
        );
        for ((src, dst), (segments, bytes)) in flows {
            out.push_str(&format!(
                "\n  {src} -> {dst}: {segments} segments, {bytes} payload bytes"
            ));
        }
        out
    }
}

impl fmt::Debug for WireReport {
    /// The [`WireReport::summary`]: payloads can be hundreds of MiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireReport({})", self.summary())
    }
}

fn conn_key(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    let first = needle[0];
    let last_start = match haystack.len().checked_sub(needle.len()) {
        Some(n) => n,
        None => return false,
    };
    let mut at = 0;
    while at <= last_start {
        match haystack[at..=last_start].iter().position(|&b| b == first) {
            None => return false,
            Some(p) => {
                at += p;
                if &haystack[at..at + needle.len()] == needle {
                    return true;
                }
                at += 1;
            }
        }
    }
    false
}

/// Walks TLS records; `Err((offset, reason))` at the first bad one.
/// Orders a stream's segments by sequence number (relative to the first one
/// captured, so wrap-around is fine) and merges them.
fn reassemble(raw: RawStream<'_>) -> Stream {
    let mut stream = Stream {
        src: raw.src,
        dst: raw.dst,
        data: Vec::new(),
        gaps: Vec::new(),
    };
    let Some(&(base, _)) = raw.segments.first() else {
        return stream;
    };
    let mut segments: Vec<(i64, &[u8])> = raw
        .segments
        .iter()
        .map(|&(seq, p)| (i64::from(seq.wrapping_sub(base) as i32), p))
        .collect();
    segments.sort_by_key(|&(rel, _)| rel);
    let mut cursor = segments[0].0;
    for (start, payload) in segments {
        let end = start + payload.len() as i64;
        if end <= cursor {
            continue;
        }
        if start > cursor {
            stream.gaps.push(stream.data.len());
            stream.data.extend_from_slice(payload);
        } else {
            stream
                .data
                .extend_from_slice(&payload[(cursor - start) as usize..]);
        }
        cursor = end;
    }
    stream
}

/// After a gap, the first offset from which at least two TLS record headers
/// follow each other (or one reaches the end): where record parsing resumes.
fn resync_tls(data: &[u8]) -> Option<usize> {
    let header_ok = |at: usize| -> Option<usize> {
        let h = data.get(at..at + 5)?;
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        ((20..=23).contains(&h[0]) && h[1] == 3 && (1..=4).contains(&h[2]) && len <= TLS_MAX_RECORD)
            .then_some(at + 5 + len)
    };
    (0..data.len()).find(|&at| match header_ok(at) {
        Some(next) if next >= data.len() => true,
        Some(next) => header_ok(next).is_some(),
        None => false,
    })
}

fn check_tls_records(data: &[u8]) -> Result<(), (usize, String)> {
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        let content_type = rest[0];
        if !(20..=23).contains(&content_type) {
            return Err((
                off,
                format!("content type {content_type} is not a TLS one (20..=23)"),
            ));
        }
        if let Some(&major) = rest.get(1) {
            let minor = rest.get(2).copied();
            let ok = major == 3 && minor.is_none_or(|m| (1..=4).contains(&m));
            if !ok {
                return Err((
                    off,
                    format!(
                        "version {major:#04x}{} is not 0x0301..=0x0304",
                        minor.map(|m| format!("{m:02x}")).unwrap_or_default()
                    ),
                ));
            }
        }
        let Some(len) = be16(rest, 3) else {
            // A record header cut short at the end.
            return Ok(());
        };
        let len = usize::from(len);
        if len > TLS_MAX_RECORD {
            return Err((off, format!("record length {len} exceeds {TLS_MAX_RECORD}")));
        }
        // A last record cut short is fine: the loop ends.
        off += 5 + len;
    }
    Ok(())
}

/// Up to 32 bytes as hex and as (lossy, escaped) text.
fn show_bytes(b: &[u8]) -> String {
    let b = &b[..b.len().min(32)];
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{} {:?}", hex.join(" "), String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, Hasher};
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::{Pod, Process, e2e_enabled, wait_until};

    // ---- synthetic frames ----

    fn tcp(sport: u16, dport: u16, seq: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.push((((20 + options.len()) / 4) as u8) << 4);
        t.push(flags);
        t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(options);
        t.extend_from_slice(payload);
        t
    }

    fn eth(ethertype: u16, vlan: bool, l3: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let ihl = 20 + options.len();
        let total = (ihl + l4.len()) as u16;
        let mut p = vec![0x40 | (ihl / 4) as u8, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, 6, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(options);
        p.extend_from_slice(l4);
        p
    }

    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, hop_by_hop: bool, l4: &[u8]) -> Vec<u8> {
        let ext: Vec<u8> = if hop_by_hop {
            // Next header TCP, length 0 (8 bytes), PadN.
            vec![6, 0, 1, 4, 0, 0, 0, 0]
        } else {
            Vec::new()
        };
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        p.push(if hop_by_hop { 0 } else { 6 });
        p.push(64);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&ext);
        p.extend_from_slice(l4);
        p
    }

    fn report_of(segments: Vec<TcpSegment>) -> WireReport {
        WireReport {
            segments,
            datagrams: Vec::new(),
            frames: 0,
            truncated: false,
            dropped: 0,
        }
    }

    /// One TLS application-data record with `n` payload bytes.
    fn tls_record(n: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3, (n >> 8) as u8, n as u8];
        r.extend(std::iter::repeat_n(fill, n));
        r
    }

    #[test]
    fn out_of_order_frames_are_reassembled_by_sequence_number() {
        let (a, b) = ("10.1.0.2:40000", "10.2.0.2:15008");
        let r1 = tls_record(100, 1);
        let r2 = tls_record(100, 2);
        // The second segment is captured before the first.
        let report = report_of(vec![
            seg(a, b, 1000, SYN, b""),
            seg(a, b, 1001 + r1.len() as u32, ACK | PSH, &r2),
            seg(a, b, 1001, ACK | PSH, &r1),
        ]);
        report.all_tls_on_port(15008).unwrap();
        let stream = &report.streams()[0];
        assert_eq!(stream.data, [r1, r2].concat());
        assert!(stream.gaps.is_empty());
    }

    #[test]
    fn after_a_capture_gap_tls_parsing_resumes_but_plaintext_is_still_caught() {
        let (a, b) = ("10.1.0.2:40000", "10.2.0.2:15008");
        let records: Vec<Vec<u8>> = (0..4).map(|i| tls_record(50, i)).collect();
        let at = |i: usize| 1001 + records[..i].iter().map(Vec::len).sum::<usize>() as u32;
        // Record 1 was never captured.
        let report = report_of(vec![
            seg(a, b, 1000, SYN, b""),
            seg(a, b, at(0), ACK, &records[0]),
            seg(a, b, at(2), ACK, &records[2]),
            seg(a, b, at(3), ACK, &records[3]),
        ]);
        assert_eq!(report.streams()[0].gaps.len(), 1);
        report.all_tls_on_port(15008).unwrap();
        // Plaintext after a gap is still not TLS.
        let plain = vec![b'x'; 3 * (5 + TLS_MAX_RECORD)];
        let report = report_of(vec![
            seg(a, b, 1000, SYN, b""),
            seg(a, b, at(0), ACK, &records[0]),
            seg(a, b, at(2), ACK, &plain),
        ]);
        let err = report.all_tls_on_port(15008).unwrap_err().to_string();
        assert!(err.contains("1 capture gaps"), "{err}");
    }

    fn seg(src: &str, dst: &str, seq: u32, flags: u8, payload: &[u8]) -> TcpSegment {
        TcpSegment {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            flags,
            seq,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn wire_parses_ipv4_with_options_vlan_and_padding() {
        // MSS + NOP NOP + SACK-permitted... TCP options, IPv4 options (NOP x4).
        let l4 = tcp(
            40000,
            15008,
            7,
            PSH | ACK,
            &[2, 4, 5, 0xb4, 1, 1, 4, 2],
            b"hello",
        );
        let mut frame = eth(
            0x0800,
            true,
            &ipv4([10, 1, 0, 2], [10, 2, 0, 2], &[1, 1, 1, 1], 0, &l4),
        );
        // Ethernet padding after the IP packet must not become payload.
        frame.extend_from_slice(&[0; 6]);
        let s = parse_frame(&frame).unwrap();
        assert_eq!(
            s,
            seg("10.1.0.2:40000", "10.2.0.2:15008", 7, PSH | ACK, b"hello")
        );

        // A non-first fragment has no TCP header; UDP is not TCP.
        let frag = eth(
            0x0800,
            false,
            &ipv4([1, 1, 1, 1], [2, 2, 2, 2], &[], 0x0010, &l4),
        );
        assert_eq!(parse_frame(&frag), None);
        let mut udp = ipv4([1, 1, 1, 1], [2, 2, 2, 2], &[], 0, &l4);
        udp[9] = 17;
        assert_eq!(parse_frame(&eth(0x0800, false, &udp)), None);
        // ARP, runts, garbage.
        assert_eq!(parse_frame(&eth(0x0806, false, &[0; 28])), None);
        assert_eq!(parse_frame(&[0; 10]), None);
        assert_eq!(parse_frame(&eth(0x0800, false, &[0x45, 0, 0])), None);
    }

    #[test]
    fn wire_parses_udp_over_ipv4_and_ipv6_and_only_udp() {
        let mut udp = vec![0xa4, 0x10, 0, 53, 0, 13, 0, 0];
        udp.extend_from_slice(b"query");
        let mut v4 = ipv4([10, 1, 0, 2], [10, 2, 0, 2], &[], 0, &udp);
        v4[9] = 17;
        let mut frame = eth(0x0800, true, &v4);
        frame.extend_from_slice(&[0; 6]);
        let d = parse_udp_frame(&frame).unwrap();
        assert_eq!(d.src, "10.1.0.2:42000".parse().unwrap());
        assert_eq!(d.dst, "10.2.0.2:53".parse().unwrap());
        assert_eq!(d.payload, b"query", "the padding is not payload");
        assert_eq!(parse_frame(&frame), None, "UDP is not TCP");

        let (a, c): (Ipv6Addr, Ipv6Addr) = ("fd00::2".parse().unwrap(), "fd00::3".parse().unwrap());
        let mut v6 = ipv6(a, c, false, &udp);
        v6[6] = 17;
        let d = parse_udp_frame(&eth(0x86dd, false, &v6)).unwrap();
        assert_eq!(d.dst, "[fd00::3]:53".parse().unwrap());
        assert_eq!(d.payload, b"query");

        // TCP is not UDP; a non-first fragment has no UDP header.
        let l4 = tcp(40000, 53, 7, ACK, &[], b"x");
        assert_eq!(
            parse_udp_frame(&eth(
                0x0800,
                false,
                &ipv4([1, 1, 1, 1], [2, 2, 2, 2], &[], 0, &l4)
            )),
            None
        );
        v4[6] = 0x00;
        v4[7] = 0x10;
        assert_eq!(parse_udp_frame(&eth(0x0800, false, &v4)), None);
    }

    #[test]
    fn wire_parses_ipv6_with_extension_header() {
        let a: Ipv6Addr = "fd00:1::2".parse().unwrap();
        let c: Ipv6Addr = "fd00:2::2".parse().unwrap();
        for hbh in [false, true] {
            let l4 = tcp(7300, 50000, 1, SYN | ACK, &[1, 1, 1, 1], b"");
            let s = parse_frame(&eth(0x86dd, false, &ipv6(c, a, hbh, &l4))).unwrap();
            assert_eq!(
                s,
                seg("[fd00:2::2]:7300", "[fd00:1::2]:50000", 1, SYN | ACK, b"")
            );
            let l4 = tcp(7300, 50000, 1, ACK, &[], b"data!");
            let s = parse_frame(&eth(0x86dd, true, &ipv6(c, a, hbh, &l4))).unwrap();
            assert_eq!(s.payload, b"data!");
        }
    }

    #[test]
    fn wire_parses_gso_sized_and_cut_short_packets() {
        // A GSO super-frame: 60000 bytes of TCP payload in one "frame".
        let payload: Vec<u8> = (0..60000u32).map(|i| i as u8).collect();
        let l4 = tcp(1, 2, 3, ACK, &[], &payload);
        let frame = eth(
            0x0800,
            false,
            &ipv4([1, 1, 1, 1], [2, 2, 2, 2], &[], 0, &l4),
        );
        assert_eq!(parse_frame(&frame).unwrap().payload, payload);
        // Captured shorter than the IP header says: what was captured.
        let cut = &frame[..frame.len() - 1000];
        assert_eq!(parse_frame(cut).unwrap().payload, payload[..59000]);
        // IPv4 total length 0 (TSO), IPv6 payload length 0 (BIG TCP).
        let mut zero = frame.clone();
        zero[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(parse_frame(&zero).unwrap().payload, payload);
        let a: Ipv6Addr = "::1".parse().unwrap();
        let mut v6 = eth(0x86dd, false, &ipv6(a, a, false, &l4));
        v6[18..20].copy_from_slice(&[0, 0]);
        assert_eq!(parse_frame(&v6).unwrap().payload, payload);
    }

    #[test]
    fn wire_report_contains_reassembles_per_direction() {
        let c2s = ("10.1.0.2:40000", "10.2.0.2:7300");
        let report = WireReport {
            segments: vec![
                seg(c2s.0, c2s.1, 99, SYN, b""),
                seg(c2s.1, c2s.0, 500, SYN | ACK, b""),
                seg(c2s.0, c2s.1, 100, ACK, b"abc-sec"),
                // The other direction in between must not break the flow.
                seg(c2s.1, c2s.0, 501, ACK, b"zzz"),
                // A retransmission of the first bytes, then the rest.
                seg(c2s.0, c2s.1, 100, ACK, b"abc-s"),
                seg(c2s.0, c2s.1, 107, ACK, b"ret-def"),
                seg(c2s.0, c2s.1, 110, ACK, b"-defghi"),
            ],
            datagrams: Vec::new(),
            frames: 7,
            truncated: false,
            dropped: 0,
        };
        assert!(report.contains(b"secret-defghi"));
        assert!(report.contains(b"abc-secret-defghi"));
        assert!(report.contains(b"zzz"));
        assert!(report.contains(b""));
        // Not across directions, and the retransmission did not duplicate.
        assert!(!report.contains(b"seczzz"));
        assert!(!report.contains(b"abc-secabc"));
        assert!(!report.contains(b"abc-secret-defghij"));
        assert_eq!(report.ports_with_payload(), BTreeSet::from([7300]));
        assert_eq!(report.payload_bytes_on_port(7300), 7 + 3 + 5 + 7 + 7);
        assert_eq!(report.payload_bytes_on_port(40000), 29);
        assert_eq!(report.payload_bytes_on_port(1), 0);
        assert!(report.complete());
        let summary = format!("{report:?}");
        assert!(
            summary.contains("10.1.0.2:40000 -> 10.2.0.2:7300: 5 segments, 26 payload bytes"),
            "{summary}"
        );
    }

    #[test]
    fn wire_report_server_port_heuristics() {
        // No SYN captured: the non-ephemeral port; else the lower one.
        let report = WireReport {
            segments: vec![
                seg("10.0.0.1:40000", "10.0.0.2:61000", 1, ACK, b"x"),
                seg("10.0.0.2:9000", "10.0.0.1:50000", 1, ACK, b"x"),
                seg("10.0.0.1:1000", "10.0.0.2:2000", 1, ACK, b"x"),
                seg("10.0.0.1:3000", "10.0.0.2:4000", 1, ACK, b""),
                // The SYN names the server even if it is the higher port.
                seg("10.0.0.1:5000", "10.0.0.2:6000", 1, SYN, b""),
                seg("10.0.0.2:6000", "10.0.0.1:5000", 1, ACK, b"y"),
            ],
            ..Default::default()
        };
        assert_eq!(
            report.ports_with_payload(),
            BTreeSet::from([61000, 9000, 1000, 6000])
        );
    }

    fn record(content_type: u8, version: u16, len: usize) -> Vec<u8> {
        let mut r = vec![content_type];
        r.extend_from_slice(&version.to_be_bytes());
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(0xab, len));
        r
    }

    #[test]
    fn wire_tls_record_walk() {
        let mut tls = record(22, 0x0301, 300);
        tls.extend(record(22, 0x0303, 100));
        tls.extend(record(20, 0x0303, 1));
        tls.extend(record(23, 0x0303, 16384 + 256));
        assert_eq!(check_tls_records(&tls), Ok(()));
        // A last record (or header) cut short anywhere is fine.
        for cut in 1..tls.len() {
            assert_eq!(check_tls_records(&tls[..cut]), Ok(()), "cut at {cut}");
        }
        let bad = |data: &[u8]| check_tls_records(data).unwrap_err();
        assert_eq!(bad(b"GET / HTTP/1.1\r\n").0, 0);
        assert!(
            bad(b"GET /").1.contains("content type 71"),
            "{:?}",
            bad(b"GET /")
        );
        let mut after = record(23, 0x0303, 10);
        after.extend_from_slice(b"plaintext");
        assert_eq!(bad(&after).0, 15);
        assert!(bad(&record(23, 0x0200, 1)).1.contains("version"));
        assert!(bad(&record(23, 0x0305, 1)).1.contains("version"));
        assert!(bad(&[23, 4]).1.contains("version"));
        assert!(bad(&record(23, 0x0303, 20000)).1.contains("length 20000"));

        let flow = |payload: &[u8]| WireReport {
            segments: vec![
                seg(
                    "10.1.0.2:40000",
                    "10.2.0.2:15008",
                    10,
                    ACK,
                    &payload[..payload.len() / 2],
                ),
                seg(
                    "10.1.0.2:40000",
                    "10.2.0.2:15008",
                    10 + (payload.len() / 2) as u32,
                    ACK,
                    &payload[payload.len() / 2..],
                ),
                seg(
                    "10.2.0.2:15008",
                    "10.1.0.2:40000",
                    77,
                    ACK,
                    &record(23, 0x0303, 5),
                ),
                // Another port is not looked at.
                seg("10.1.0.2:40001", "10.2.0.2:80", 1, ACK, b"GET / HTTP/1.1"),
            ],
            ..Default::default()
        };
        // Records split across segments are reassembled.
        flow(&tls).all_tls_on_port(15008).unwrap();
        flow(&tls).all_tls_on_port(443).unwrap();
        let err = flow(&after).all_tls_on_port(15008).unwrap_err().to_string();
        assert!(
            err.contains("10.1.0.2:40000 -> 10.2.0.2:15008") && err.contains("offset 15"),
            "{err}"
        );
        assert!(err.contains("plaintext"), "{err}");
        let err = flow(&tls).all_tls_on_port(80).unwrap_err().to_string();
        assert!(err.contains("GET / HTTP"), "{err}");
    }

    // ---- end to end ----

    const DEADLINE: Duration = Duration::from_secs(30);

    fn marker(what: &str) -> String {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        format!("wire-marker-{what}-{:016x}", h.finish())
    }

    /// A line echo (`pod-tool line-echo-server`): dual-stack, answers each
    /// connection's first line and closes; over TLS (rustls) with `tls`'s
    /// certificate and key.
    fn start_server(pod: &Pod, port: u16, tls: Option<(&Path, &Path)>) -> Process {
        let port_s = port.to_string();
        let mode = if tls.is_some() { "tls" } else { "plain" };
        let mut args = vec!["line-echo-server", port_s.as_str()];
        if let Some((cert, key)) = tls {
            args.extend(["--cert", cert.to_str().unwrap()]);
            args.extend(["--key", key.to_str().unwrap()]);
        }
        let mut server = pod.spawn_tool(&args).unwrap();
        wait_until(
            &format!("{mode} server on {}:{port}", pod.name()),
            DEADLINE,
            || {
                if let Some(status) = server.try_status()? {
                    anyhow::bail!("it exited ({status}): {}", server.output_report());
                }
                Ok(server.stdout_so_far().contains("ready"))
            },
        )
        .unwrap();
        server
    }

    /// `pod-tool line-echo`: sends `pad` bytes of `p`, the marker and `\n`
    /// (over TLS with `tls`), checks the echo, prints `ok <bytes>`.
    fn client_args(to: IpAddr, port: u16, tls: bool, marker: &str, pad: usize) -> Vec<String> {
        ["line-echo"]
            .into_iter()
            .map(String::from)
            .chain([
                to.to_string(),
                port.to_string(),
                marker.to_string(),
                pad.to_string(),
            ])
            .chain(tls.then(|| "--tls".to_string()))
            .collect()
    }

    fn run_client(from: &Pod, to: IpAddr, port: u16, tls: bool, marker: &str, pad: usize) {
        let args = client_args(to, port, tls, marker, pad);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = from.run_tool(&args, DEADLINE).unwrap();
        let expected = format!("ok {}", pad + marker.len() + 1);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }

    fn max_payload(report: &WireReport) -> usize {
        report
            .segments
            .iter()
            .map(|s| s.payload.len())
            .max()
            .unwrap_or(0)
    }

    fn two_nodes(test: &str) -> Topology {
        Topology::builder(test)
            .node("n1", &["a", "b"])
            .node("n2", &["c"])
            .build()
            .unwrap()
    }

    #[test]
    fn wire_capture_sees_plaintext_across_nodes_v4_v6() {
        let test = "wire_capture_sees_plaintext_across_nodes_v4_v6";
        if !e2e_enabled(test) {
            return;
        }
        let topo = two_nodes(test);
        let (a, c) = (topo.pod("a"), topo.pod("c"));
        let port = 7300;
        let _server = start_server(c, port, None);
        let capture = WireCapture::start(&topo).unwrap();
        let (m4, m6) = (marker("v4"), marker("v6"));
        run_client(a, c.ipv4().into(), port, false, &m4, 0);
        // 4 MiB before the marker: GSO super-frames, marker deep in the flow.
        run_client(a, c.ipv6().into(), port, false, &m6, 4 << 20);
        let report = capture.finish().unwrap();
        eprintln!(
            "{test}: largest TCP payload in one frame: {} bytes\n{}",
            max_payload(&report),
            report.summary()
        );

        assert!(report.complete(), "{report:?}");
        assert!(report.contains(m4.as_bytes()), "{report:?}");
        assert!(report.contains(m6.as_bytes()), "{report:?}");
        assert!(report.ports_with_payload().contains(&port), "{report:?}");
        // Each direction carried the 4 MiB at least once.
        assert!(
            report.payload_bytes_on_port(port) >= 2 * (4 << 20),
            "{report:?}"
        );
        let err = report.all_tls_on_port(port).unwrap_err().to_string();
        assert!(err.contains("is not TLS"), "{err}");
        // Both families, with the pods' own addresses (nodes route, no NAT).
        for (src, dst) in [
            (IpAddr::from(a.ipv4()), IpAddr::from(c.ipv4())),
            (a.ipv6().into(), c.ipv6().into()),
        ] {
            assert!(
                report.segments.iter().any(|s| s.src.ip() == src
                    && s.dst == SocketAddr::new(dst, port)
                    && s.flags & SYN != 0),
                "no SYN {src} -> {dst}:{port}: {report:?}"
            );
        }
        // veth does GSO: super-frames larger than any MTU are seen.
        assert!(max_payload(&report) > 1500, "{report:?}");
    }

    fn self_signed_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = (dir.join("wire-cert.pem"), dir.join("wire-key.pem"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=wire-test",
                "-days",
                "1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap_or_else(|e| {
                panic!("this test needs the `openssl` command to make a TLS certificate: {e}")
            });
        assert!(
            out.status.success(),
            "openssl req failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (cert, key)
    }

    #[test]
    fn wire_capture_sees_only_tls_records_for_tls_across_nodes() {
        let test = "wire_capture_sees_only_tls_records_for_tls_across_nodes";
        if !e2e_enabled(test) {
            return;
        }
        let topo = two_nodes(test);
        let (cert, key) = self_signed_cert(topo.tmp_dir());
        let (a, c) = (topo.pod("a"), topo.pod("c"));
        let port = 15008;
        let _server = start_server(c, port, Some((&cert, &key)));
        let capture = WireCapture::start(&topo).unwrap();
        let (m4, m6) = (marker("tls-v4"), marker("tls-v6"));
        run_client(a, c.ipv4().into(), port, true, &m4, 0);
        run_client(a, c.ipv6().into(), port, true, &m6, 1 << 20);
        let report = capture.finish().unwrap();
        eprintln!(
            "{test}: largest TCP payload in one frame: {} bytes\n{}",
            max_payload(&report),
            report.summary()
        );

        assert!(report.complete(), "{report:?}");
        assert!(!report.contains(m4.as_bytes()), "{report:?}");
        assert!(!report.contains(m6.as_bytes()), "{report:?}");
        assert!(!report.contains(b"pppppppppppppppp"), "{report:?}");
        assert_eq!(
            report.ports_with_payload(),
            BTreeSet::from([port]),
            "{report:?}"
        );
        assert!(report.payload_bytes_on_port(port) > 2 << 20, "{report:?}");
        report.all_tls_on_port(port).unwrap();
    }

    #[test]
    fn wire_capture_does_not_see_traffic_within_a_node() {
        let test = "wire_capture_does_not_see_traffic_within_a_node";
        if !e2e_enabled(test) {
            return;
        }
        let topo = two_nodes(test);
        let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
        let (local, remote) = (7301, 7302);
        let _servers = [start_server(b, local, None), start_server(c, remote, None)];
        let capture = WireCapture::start(&topo).unwrap();
        let (m_local, m_remote) = (marker("local"), marker("remote"));
        run_client(a, b.ipv4().into(), local, false, &m_local, 0);
        run_client(a, b.ipv6().into(), local, false, &m_local, 0);
        // Control: cross-node traffic in the same capture is seen.
        run_client(a, c.ipv4().into(), remote, false, &m_remote, 0);
        let report = capture.finish().unwrap();

        assert!(report.complete(), "{report:?}");
        assert!(report.contains(m_remote.as_bytes()), "{report:?}");
        assert!(!report.contains(m_local.as_bytes()), "{report:?}");
        assert!(
            !report
                .segments
                .iter()
                .any(|s| s.src.port() == local || s.dst.port() == local),
            "{report:?}"
        );
        assert_eq!(
            report.ports_with_payload(),
            BTreeSet::from([remote]),
            "{report:?}"
        );
        assert_eq!(report.payload_bytes_on_port(local), 0);
    }

    /// Whether a thread of this process has the name `name`.
    fn thread_alive(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
    }

    /// Whether this process has a descriptor on the socket with `inode`.
    fn socket_open(inode: u64) -> bool {
        let want = format!("socket:[{inode}]");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
    }

    #[test]
    fn wire_capture_stops_promptly_and_cleans_up() {
        let test = "wire_capture_stops_promptly_and_cleans_up";
        if !e2e_enabled(test) {
            return;
        }
        let topo = two_nodes(test);
        let (a, c) = (topo.pod("a"), topo.pod("c"));
        let port = 7303;
        let _server = start_server(c, port, None);

        // Idle: finish returns at once.
        let capture = WireCapture::start(&topo).unwrap();
        let (name, inode) = (capture.thread_name.clone(), capture.socket_inode);
        assert!(thread_alive(&name) && socket_open(inode), "{capture:?}");
        let started = Instant::now();
        let report = capture.finish().unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "idle finish took {took:?}"
        );
        assert_eq!(report.segments.len(), 0, "{report:?}");
        assert!(!socket_open(inode));
        wait_until("idle capture thread gone", Duration::from_secs(5), || {
            Ok(!thread_alive(&name))
        })
        .unwrap();

        // Busy: stopped while a 256 MiB transfer is running.
        let capture = WireCapture::start(&topo).unwrap();
        let (name, inode) = (capture.thread_name.clone(), capture.socket_inode);
        let args = client_args(c.ipv4().into(), port, false, &marker("busy"), 256 << 20);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut client = a.spawn_tool(&args).unwrap();
        wait_until("bulk traffic on the wire", DEADLINE, || {
            if let Some(status) = client.try_status()? {
                anyhow::bail!("client exited early ({status}): {}", client.output_report());
            }
            Ok(capture.frames_so_far() > 200)
        })
        .unwrap();
        let started = Instant::now();
        let report = capture.finish().unwrap();
        let took = started.elapsed();
        assert!(
            took < FINAL_DRAIN + Duration::from_secs(2),
            "busy finish took {took:?}"
        );
        assert!(
            report.frames > 200 && report.payload_bytes_on_port(port) > 0,
            "{report:?}"
        );
        assert!(!socket_open(inode));
        wait_until("busy capture thread gone", Duration::from_secs(5), || {
            Ok(!thread_alive(&name))
        })
        .unwrap();
        eprintln!("{test}: busy finish took {took:?}; {}", report.summary());
        client.kill();

        // Dropping without finish stops it too.
        let capture = WireCapture::start(&topo).unwrap();
        let (name, inode) = (capture.thread_name.clone(), capture.socket_inode);
        drop(capture);
        assert!(!socket_open(inode));
        wait_until(
            "dropped capture thread gone",
            Duration::from_secs(5),
            || Ok(!thread_alive(&name)),
        )
        .unwrap();
    }
}
