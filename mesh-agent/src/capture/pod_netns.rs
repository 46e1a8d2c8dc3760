//! Sockets inside a pod's network namespace, made on the calling thread.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses
//! it later. So to make one in a pod, the calling thread enters the pod's
//! namespace (setns), creates the socket and goes back at once, before
//! anything else can run on it; the tokio runtime then drives the socket like
//! any other. This replaced a worker thread per pod: measured side by side
//! (`cargo bench -p mesh-agent --bench netns_sockets`), entering on the
//! caller is 12–22 µs faster per connect at p50 (same p99) and saves a
//! thread and about 10 KiB of RSS per pod (docs/capture.md has the figures).

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// A pod's network namespace, held open.
pub struct PodNetns {
    /// None only for tests that hold pods but make no sockets.
    ns: Option<OwnedFd>,
    path: PathBuf,
}

/// The agent's own network namespace, where every thread returns to.
fn home() -> std::io::Result<&'static OwnedFd> {
    static HOME: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let fd: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
    Ok(HOME.get_or_init(|| fd))
}

/// Puts the thread back into the agent's namespace when dropped, also when
/// the work in the pod's namespace panics. A thread that cannot go back must
/// not go on: its next socket would be made in the pod.
struct Return<'a>(&'a OwnedFd);

impl Drop for Return<'_> {
    fn drop(&mut self) {
        if let Err(err) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %err, "a thread could not return to the agent's network namespace; aborting");
            std::process::abort();
        }
    }
}

impl PodNetns {
    /// Opens the namespace at `path`; fails clearly if it is not a network
    /// namespace (or cannot be entered).
    pub fn open(path: &Path) -> Result<Self> {
        let ns: OwnedFd = File::open(path)
            .with_context(|| format!("opening the network namespace {}", path.display()))?
            .into();
        let netns = Self {
            ns: Some(ns),
            path: path.to_path_buf(),
        };
        netns
            .run(|| ())
            .map_err(|err| anyhow!("{} is not a network namespace: {err:#}", path.display()))?;
        Ok(netns)
    }

    /// A namespace that cannot be entered: every call fails. For tests of
    /// code that holds pods but makes no sockets.
    #[cfg(test)]
    pub fn detached() -> Self {
        Self {
            ns: None,
            path: PathBuf::from("/nonexistent/netns"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread in the pod's namespace, then returns
    /// the thread to the agent's. `f` must not block for long: it runs on
    /// the caller's thread (make sockets, bind, listen; no I/O that waits).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let ns = self
            .ns
            .as_ref()
            .ok_or_else(|| anyhow!("no network namespace at {}", self.path.display()))?;
        let home = home().context("opening the agent's own network namespace")?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering the network namespace {}", self.path.display()))?;
        let _back = Return(home);
        Ok(f())
    }

    /// A new, unconnected TCP socket in the namespace, ready for tokio.
    pub fn tcp_socket(&self, ipv6: bool) -> Result<tokio::net::TcpSocket> {
        let socket = self.socket(ipv6, socket2::Type::STREAM, socket2::Protocol::TCP)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A new UDP socket in the namespace, bound to a port of its own on
    /// every address, ready for tokio.
    pub fn udp_socket(&self, ipv6: bool) -> Result<tokio::net::UdpSocket> {
        let socket = self.socket(ipv6, socket2::Type::DGRAM, socket2::Protocol::UDP)?;
        let any: std::net::SocketAddr = if ipv6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        socket.bind(&any.into())?;
        Ok(tokio::net::UdpSocket::from_std(socket.into())?)
    }

    /// A non-blocking socket made in the namespace.
    fn socket(
        &self,
        ipv6: bool,
        kind: socket2::Type,
        protocol: socket2::Protocol,
    ) -> Result<socket2::Socket> {
        let domain = if ipv6 {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        let socket = self.run(|| socket2::Socket::new(domain, kind, Some(protocol)))??;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// The agent's DNS proxy socket on `addr`, made in the calling thread's
/// namespace (run it in the pod's). SO_REUSEPORT: an agent taking over binds
/// its own while the one it replaces still serves on its.
pub fn dns_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A listening socket made in the calling thread's namespace (run it in the
/// pod's with [`PodNetns::run`]). SO_REUSEADDR so a restarted agent can bind
/// again at once.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused_and_the_thread_stays_home() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = PodNetns::open(file.path())
            .err()
            .expect("a plain file is no namespace");
        assert!(
            format!("{err:#}").contains("is not a network namespace"),
            "{err:#}"
        );
        // The thread is still in the namespace it started in.
        let here = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let process = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(here, process);
    }
}
