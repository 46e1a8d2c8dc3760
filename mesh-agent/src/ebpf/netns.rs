//! Network-namespace cookies: the kernel's own id for a pod's network namespace.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// Reads the cookie of the network namespace at `path` (a /run/netns file or
/// /proc/PID/ns/net). It is what `bpf_get_netns_cookie` returns for sockets in it.
pub fn netns_cookie(path: &Path) -> Result<u64> {
    let ns = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // setns affects only the calling thread; do it on a short-lived thread so the
    // agent's own threads stay in the node's namespace.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<u64> {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("{} is not a network namespace", path.display()))?;
                // Any socket will do; the wildcard address works even with no link up.
                let socket = std::net::UdpSocket::bind("0.0.0.0:0")
                    .context("creating a socket in the namespace")?;
                socket_netns_cookie(socket.as_fd())
            })
            .join()
            .map_err(|_| anyhow!("netns cookie thread panicked"))?
    })
}

/// The cookie of the calling thread's network namespace (run it on a thread that
/// joined the namespace).
pub fn current_netns_cookie() -> Result<u64> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").context("creating a socket in the namespace")?;
    socket_netns_cookie(socket.as_fd())
}

/// The cookie of the network namespace a socket belongs to
/// (SO_NETNS_COOKIE, Linux 5.14; neither std, nix nor socket2 wrap it).
pub fn socket_netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 buffer with its length, as SO_NETNS_COOKIE wants.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}
