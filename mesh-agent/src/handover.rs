//! Restart without an outage: a running agent hands its listening sockets to
//! the agent that replaces it.
//!
//! The sockets themselves move (SCM_RIGHTS over a Unix socket), not just
//! their addresses. Both processes accept from the same sockets for a moment,
//! so a connection waiting in an accept queue is never reset, and the kernel
//! programs see the same listener all along (the outbound "agent listening"
//! check, the sk_lookup listener map). Kernel programs and maps are pinned
//! and taken over by loading them again (see `ebpf`).
//!
//! The sequence, new agent B and old agent A on one node:
//! 1. B connects to A's handover socket and says `Hello`.
//! 2. A sends each enrolled pod's listeners, then the admin API's, then `End`.
//! 3. B enrols its pods on those sockets (binding the ones it did not get),
//!    becomes ready and says `Serving`.
//! 4. A closes its handover socket, answers `Released`, stops accepting and
//!    drains its own connections; it exits on SIGTERM (as Kubernetes sends
//!    once the new pod is ready), never on its own, so that a restart policy
//!    does not start it again over the new agent.
//! 5. B listens on the handover socket for its own successor.
//!
//! The handover socket is an abstract Unix socket, so it belongs to the
//! node's network namespace (no file to mount or clean up), named after the
//! pin directory: agents that share kernel state share it. Both ends check
//! that the peer runs as the same user.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
            SockType, UnixAddr, accept, bind, connect, getsockopt, listen, recvmsg, sendmsg,
            setsockopt, socket, sockopt,
        },
        time::TimeVal,
    },
    unistd::geteuid,
};
use serde::{Deserialize, Serialize};

/// Which of the agent's listeners a handed-over socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    OutboundV4,
    OutboundV6,
    InboundV4,
    InboundV6,
    TunnelV4,
    TunnelV6,
}

/// One pod's listeners, as an agent holds them.
pub struct PodSockets {
    pub netns_cookie: u64,
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
}

/// What a running agent offers its successor.
#[derive(Default)]
pub struct Offer {
    pub pods: HashMap<String, PodSockets>,
    pub admin: Option<OwnedFd>,
}

/// One message; the sockets of `Pod` and `Admin` travel with it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Message {
    Hello {
        version: u32,
    },
    #[serde(rename_all = "camelCase")]
    Pod {
        pod: String,
        netns_cookie: u64,
        listeners: Vec<ListenerKind>,
    },
    Admin,
    End,
    Serving,
    Released,
}

const VERSION: u32 = 1;
/// How long the old agent waits for the new one to serve (it enrols every
/// pod first), and how long either waits for any other message.
const SERVING_WAIT: Duration = Duration::from_secs(60);
const MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// A message's JSON (a pod key and a few listener names) is far below this.
const MAX_MESSAGE: usize = 64 * 1024;
/// Sockets per message at most (one pod's listeners).
const MAX_FDS: usize = 8;

/// The handover socket's (abstract) name for agents pinning under `pin_dir`.
pub fn socket_name(pin_dir: &Path) -> String {
    // FNV-1a: stable across builds, unlike std's hasher, so two versions of
    // the agent agree on the name.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pin_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mesh-agent.handover.{hash:016x}")
}

/// Sockets taken over from a running agent, and the line to tell it when
/// this agent serves.
pub struct Inherited {
    pub pods: HashMap<String, PodSockets>,
    pub admin: Option<OwnedFd>,
    connection: OwnedFd,
}

impl Inherited {
    /// Tells the old agent this one serves; returns once it has let go of
    /// the handover socket (so this agent can listen on it).
    pub fn serving(self) -> Result<()> {
        send(&self.connection, &Message::Serving, &[])?;
        match receive(&self.connection)? {
            (Message::Released, _) => Ok(()),
            (other, _) => bail!("the old agent answered {other:?} instead of Released"),
        }
    }
}

/// Takes the listeners of the agent running on this node, if there is one.
pub fn take_over(name: &str) -> Result<Option<Inherited>> {
    let connection = seqpacket()?;
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    match connect(connection.as_raw_fd(), &addr) {
        Ok(()) => {}
        // Nobody listens: no agent runs here.
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
        Err(err) => return Err(err).context("connecting to the running agent's handover socket"),
    }
    check_peer(&connection)?;
    set_timeout(&connection, MESSAGE_WAIT)?;
    send(&connection, &Message::Hello { version: VERSION }, &[])?;
    let mut offer = Offer::default();
    loop {
        let (message, mut fds) = receive(&connection)?;
        match message {
            Message::Pod {
                pod,
                netns_cookie,
                listeners,
            } => {
                if listeners.len() != fds.len() {
                    bail!(
                        "the old agent sent {} sockets for the {} listeners of {pod}",
                        fds.len(),
                        listeners.len()
                    );
                }
                let listeners = listeners.into_iter().zip(fds).collect();
                offer.pods.insert(
                    pod,
                    PodSockets {
                        netns_cookie,
                        listeners,
                    },
                );
            }
            Message::Admin => offer.admin = fds.pop(),
            Message::End => break,
            other => bail!("unexpected handover message {other:?}"),
        }
    }
    set_timeout(&connection, SERVING_WAIT)?;
    Ok(Some(Inherited {
        pods: offer.pods,
        admin: offer.admin,
        connection,
    }))
}

/// What a running agent does at each step of a handover.
pub trait Handing: Send + 'static {
    /// A successor said hello: the sockets to give it. From here on this
    /// agent leaves the kernel state to it.
    fn offer(&mut self) -> Offer;
    /// The successor went away before it served: this agent never stopped
    /// serving, and takes the kernel state back.
    fn resume(&mut self);
    /// The successor serves: this agent stops accepting and drains.
    fn handed_over(self);
}

/// Serves the handover socket on a thread of its own, until one successor
/// has taken over.
pub fn serve(name: String, mut handing: impl Handing) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            let listener = match listen_on(&name) {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "no handover socket: a new agent on this node cannot take over without an outage");
                    return;
                }
            };
            loop {
                let connection = match accept(listener.as_raw_fd()) {
                    // SAFETY: accept returned a new descriptor that we own.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(Errno::EINTR) => continue,
                    Err(err) => {
                        tracing::error!(error = %err, "handover accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&connection, &mut handing) {
                    Ok(()) => {
                        // Let go of the name first: the new agent listens on
                        // it once it hears Released.
                        drop(listener);
                        if let Err(err) = send(&connection, &Message::Released, &[]) {
                            tracing::warn!(error = format!("{err:#}"), "telling the new agent the handover socket is free failed");
                        }
                        handing.handed_over();
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(
                            error = format!("{err:#}"),
                            "a new agent did not complete the handover; this agent keeps serving"
                        );
                        handing.resume();
                    }
                }
            }
        })
        .context("starting the handover thread")
}

/// The abstract name may still be held for a moment by the agent that just
/// handed over; wait for it.
fn listen_on(name: &str) -> Result<OwnedFd> {
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    let deadline = std::time::Instant::now() + MESSAGE_WAIT;
    let fd = seqpacket()?;
    loop {
        match bind(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EADDRINUSE) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                return Err(err).context(format!("binding the handover socket @{name}"));
            }
        }
    }
    listen(&fd, Backlog::new(4)?).context("listening on the handover socket")?;
    tracing::info!(socket = %format!("@{name}"), "handover socket listening");
    Ok(fd)
}

fn hand_over(connection: &OwnedFd, handing: &mut impl Handing) -> Result<()> {
    check_peer(connection)?;
    set_timeout(connection, MESSAGE_WAIT)?;
    match receive(connection)? {
        (Message::Hello { version: VERSION }, _) => {}
        (Message::Hello { version }, _) => {
            bail!("the new agent speaks handover version {version}, this one {VERSION}")
        }
        (other, _) => bail!("expected Hello, got {other:?}"),
    }
    let offer = handing.offer();
    let pods = offer.pods.len();
    for (pod, sockets) in &offer.pods {
        let (kinds, fds): (Vec<ListenerKind>, Vec<BorrowedFd<'_>>) = sockets
            .listeners
            .iter()
            .map(|(kind, fd)| (*kind, fd.as_fd()))
            .unzip();
        let message = Message::Pod {
            pod: pod.clone(),
            netns_cookie: sockets.netns_cookie,
            listeners: kinds,
        };
        send(connection, &message, &fds)?;
    }
    if let Some(admin) = &offer.admin {
        send(connection, &Message::Admin, &[admin.as_fd()])?;
    }
    send(connection, &Message::End, &[])?;
    tracing::info!(
        pods,
        "listeners handed to a new agent; waiting for it to serve"
    );
    set_timeout(connection, SERVING_WAIT)?;
    match receive(connection)? {
        (Message::Serving, _) => Ok(()),
        (other, _) => bail!("expected Serving, got {other:?}"),
    }
}

fn seqpacket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a Unix socket")
}

/// Only a process of the same user may give or take the agent's sockets.
fn check_peer(connection: &OwnedFd) -> Result<()> {
    let peer = getsockopt(connection, sockopt::PeerCredentials)
        .context("reading the handover peer's credentials")?;
    let own = geteuid().as_raw();
    if peer.uid() != own {
        bail!(
            "handover refused: the peer (pid {}) runs as uid {}, this agent as {own}",
            peer.pid(),
            peer.uid()
        );
    }
    Ok(())
}

fn set_timeout(connection: &OwnedFd, wait: Duration) -> Result<()> {
    let wait = TimeVal::new(wait.as_secs() as _, wait.subsec_micros() as _);
    setsockopt(connection, sockopt::ReceiveTimeout, &wait)?;
    setsockopt(connection, sockopt::SendTimeout, &wait)?;
    Ok(())
}

fn send(connection: &OwnedFd, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let bytes = serde_json::to_vec(message)?;
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
    sendmsg::<()>(
        connection.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .context("sending a handover message")?;
    Ok(())
}

fn receive(connection: &OwnedFd) -> Result<(Message, Vec<OwnedFd>)> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let received = loop {
        match recvmsg::<()>(
            connection.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => bail!("the handover peer did not answer in time"),
            other => break other.context("receiving a handover message")?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in received.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if received.flags.contains(MsgFlags::MSG_CTRUNC) {
        bail!("a handover message carried more sockets than expected");
    }
    let length = received.bytes;
    if length == 0 {
        bail!("the handover peer closed the connection");
    }
    let message = serde_json::from_slice(&buffer[..length])
        .map_err(|e| anyhow!("a handover message is not valid: {e}"))?;
    Ok((message, fds))
}

/// Checks that a socket handed over is what it claims: a listening TCP
/// socket on `port`, in the network namespace with `netns_cookie`.
pub fn check_listener(fd: &OwnedFd, port: u16, netns_cookie: u64) -> Result<()> {
    let socket = socket2::SockRef::from(fd);
    if !socket.is_listener()? {
        bail!("not a listening socket");
    }
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow!("not an IP socket"))?;
    if local.port() != port {
        bail!("listens on port {}, not {port}", local.port());
    }
    let cookie = crate::ebpf::socket_netns_cookie(fd.as_fd())?;
    if cookie != netns_cookie {
        bail!("belongs to network namespace {cookie}, not the pod's {netns_cookie}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(port: u16) -> OwnedFd {
        let socket = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        socket.into()
    }

    #[test]
    fn listeners_move_to_the_successor_and_keep_their_queue() {
        let name = format!("mesh-agent.test.{}", std::process::id());
        let outbound = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = outbound.local_addr().unwrap().port();
        let cookie = crate::ebpf::socket_netns_cookie(outbound.as_fd()).unwrap();
        let admin = listener(0);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let old = OldAgent {
            sockets: Some((OwnedFd::from(outbound), admin)),
            cookie,
            done: done_tx,
        };
        let thread = serve(name.clone(), old).unwrap();
        // A client connects before the handover: it waits in the queue.
        let inherited = take_over_once_listening(&name);
        let waiting = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let pod = &inherited.pods["ns/a"];
        assert_eq!(pod.netns_cookie, cookie);
        let (kind, fd) = &pod.listeners[0];
        assert_eq!(*kind, ListenerKind::OutboundV4);
        check_listener(fd, port, cookie).unwrap();
        assert!(
            check_listener(fd, port + 1, cookie).is_err(),
            "port checked"
        );
        assert!(
            check_listener(fd, port, cookie + 1).is_err(),
            "netns checked"
        );
        let taken = std::net::TcpListener::from(fd.try_clone().unwrap());
        let (accepted, _) = taken.accept().expect("the queued connection is there");
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        assert!(inherited.admin.is_some());
        inherited.serving().unwrap();
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(5)),
            Ok("handed over"),
            "the old side was told"
        );
        thread.join().unwrap();
        // The name is free again for the successor's own handover socket.
        let again = listen_on(&name).unwrap();
        drop(again);
    }

    /// The old side's thread may not listen yet: try until it does.
    fn take_over_once_listening(name: &str) -> Inherited {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(inherited) = take_over(name).unwrap() {
                return inherited;
            }
            assert!(std::time::Instant::now() < deadline, "the old side listens");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    struct OldAgent {
        sockets: Option<(OwnedFd, OwnedFd)>,
        cookie: u64,
        done: std::sync::mpsc::Sender<&'static str>,
    }

    impl Handing for OldAgent {
        fn offer(&mut self) -> Offer {
            let (outbound, admin) = self.sockets.take().expect("offered once");
            Offer {
                pods: HashMap::from([(
                    "ns/a".to_string(),
                    PodSockets {
                        netns_cookie: self.cookie,
                        listeners: vec![(ListenerKind::OutboundV4, outbound)],
                    },
                )]),
                admin: Some(admin),
            }
        }

        fn resume(&mut self) {
            self.done.send("resumed").expect("test waits");
        }

        fn handed_over(self) {
            self.done.send("handed over").expect("test waits");
        }
    }

    #[test]
    fn a_successor_that_goes_away_before_serving_changes_nothing() {
        let name = format!("mesh-agent.test.gone.{}", std::process::id());
        let outbound = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let cookie = crate::ebpf::socket_netns_cookie(outbound.as_fd()).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let old = OldAgent {
            sockets: Some((OwnedFd::from(outbound), listener(0))),
            cookie,
            done: done_tx,
        };
        let _thread = serve(name.clone(), old).unwrap();
        let inherited = take_over_once_listening(&name);
        drop(inherited);
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(5)),
            Ok("resumed"),
            "the old agent resumes"
        );
        // Still listening for the next successor.
        let connection = seqpacket().unwrap();
        connect(
            connection.as_raw_fd(),
            &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
        )
        .expect("the handover socket is still there");
    }

    #[test]
    fn without_a_running_agent_there_is_nothing_to_take() {
        let name = format!("mesh-agent.test.none.{}", std::process::id());
        assert!(take_over(&name).unwrap().is_none());
    }

    #[test]
    fn names_are_stable_and_differ_per_pin_dir() {
        assert_eq!(
            socket_name(Path::new("/sys/fs/bpf/mesh")),
            socket_name(Path::new("/sys/fs/bpf/mesh"))
        );
        assert_ne!(
            socket_name(Path::new("/sys/fs/bpf/mesh")),
            socket_name(Path::new("/sys/fs/bpf/other"))
        );
        // Pinned: a new version must find the old one's socket.
        assert_eq!(
            socket_name(Path::new("/sys/fs/bpf/mesh")),
            "mesh-agent.handover.d17dd547498754d8"
        );
    }
}
