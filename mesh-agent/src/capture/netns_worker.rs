//! Sockets inside a pod's network namespace, made by a thread that lives there.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it
//! later. So each enrolled pod gets one small thread that joined the pod's
//! namespace once, and creates the agent's listeners and upstream sockets there
//! on request; the tokio runtime then drives them like any other socket.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::mpsc,
};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

type Job = Box<dyn FnOnce() + Send>;

pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl NetnsWorker {
    /// Starts the thread and joins the namespace at `path`; fails clearly if it is
    /// not a network namespace.
    pub fn start(path: &Path, name: &str) -> Result<Self> {
        let ns = File::open(path)
            .with_context(|| format!("opening the network namespace {}", path.display()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                if let Err(err) = setns(&ns, CloneFlags::CLONE_NEWNET) {
                    let _ =
                        ready_tx.send(Err(format!("{shown} is not a network namespace: {err}")));
                    return;
                }
                drop(ns);
                let _ = ready_tx.send(Ok(()));
                // Ends when the worker (the sender) is dropped.
                for job in queue {
                    job();
                }
            })
            .context("starting a namespace worker thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the namespace worker for {} died", path.display()))?
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            jobs,
            path: path.to_path_buf(),
        })
    }

    /// A worker with no thread behind it: every job fails. For tests of
    /// code that holds pods but makes no sockets.
    #[cfg(test)]
    pub fn detached() -> Self {
        let (jobs, _) = mpsc::channel();
        Self {
            jobs,
            path: PathBuf::from("/nonexistent/netns"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the namespace and waits for it (blocking; for enrolment).
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("the namespace worker for {} is gone", self.path.display()))?;
        rx.recv()
            .map_err(|_| anyhow!("the namespace worker for {} is gone", self.path.display()))
    }

    /// Runs `f` in the namespace from async code.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("the namespace worker for {} is gone", self.path.display()))?;
        rx.await
            .map_err(|_| anyhow!("the namespace worker for {} is gone", self.path.display()))
    }

    /// A new, unconnected TCP socket in the namespace, ready for tokio.
    pub async fn tcp_socket(&self, ipv6: bool) -> Result<tokio::net::TcpSocket> {
        let stream = self
            .run(move || -> std::io::Result<std::net::TcpStream> {
                let domain = if ipv6 {
                    socket2::Domain::IPV6
                } else {
                    socket2::Domain::IPV4
                };
                let socket = socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.set_nonblocking(true)?;
                Ok(socket.into())
            })
            .await??;
        Ok(tokio::net::TcpSocket::from_std_stream(stream))
    }
}

/// A listening socket made in the calling thread's namespace (run it on a
/// worker). SO_REUSEADDR so a restarted agent can bind again at once.
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
