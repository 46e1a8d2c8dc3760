//! The byte relay of the transparent TCP proxy.
//!
//! The agent holds two TCP connections for one proxied flow: the captured one
//! from the application (*downstream*) and the one it opened to the real
//! destination (*upstream*). [`relay`] copies bytes both ways until both
//! directions are done, so that each application sees what it would have seen
//! over a direct connection:
//!
//! * **Half-close.** TCP lets each side end its own sending direction (FIN)
//!   while still receiving. When the relay reads end-of-stream from one side it
//!   shuts down the *write* half of the other side, so that peer reads EOF too,
//!   and it keeps relaying the opposite direction until that one also ends.
//!   Only when both directions have seen EOF are the sockets closed, cleanly.
//!
//! * **Reset.** If one peer resets the connection (RST) or its socket fails in
//!   any other way, the other peer must learn that the conversation was
//!   *aborted*, not that it ended: a plain `close()` would send FIN, which the
//!   other application would read as a clean end of stream (and could, for
//!   example, take a truncated response for a complete one). So the relay sets
//!   `SO_LINGER` to zero on both sockets before closing them: a close with a
//!   zero linger time discards unsent data and sends RST instead of FIN, and the
//!   other application gets `ECONNRESET` on its next read or write, just as with
//!   a direct connection. A failure is noticed whether the relay is reading
//!   from the failed socket (`ECONNRESET`), writing to it (`EPIPE` or
//!   `ECONNRESET`), or doing neither: the relay also waits for the error
//!   readiness (`EPOLLERR`) of both sockets, so a reset arriving after that
//!   side's EOF, or while the relay is stuck writing elsewhere, still ends the
//!   relay at once. Whichever direction fails, the other one is abandoned.
//!
//! * **Idle timeout** (optional, [`relay_with_idle_timeout`]). If no byte moves
//!   in either direction for the given time, both sockets are reset, for the
//!   same reason as above: the applications must not mistake it for an orderly
//!   end.
//!
//! Both directions run as futures of the caller's task (no spawning). Neither
//! holds a buffer while idle: a read goes into the thread's scratch buffer of
//! [`BUFFER_SIZE`] bytes and is written on at once;
//! only what the other side cannot take yet is kept, on the heap, until it
//! is written (see also `crate::pump`). Ten thousand idle connections cost
//! their sockets and little else.

use std::future::{self, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::Shutdown;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of the buffer used for each direction.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Why the relay ended, and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes written to upstream that were read from downstream.
    pub downstream_to_upstream: u64,
    /// Bytes written to downstream that were read from upstream.
    pub upstream_to_downstream: u64,
    pub outcome: RelayOutcome,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Both sides finished cleanly (FIN both ways); both sockets were closed.
    Closed,
    /// The downstream peer reset (or its socket failed); upstream was reset too.
    DownstreamReset,
    /// The upstream peer reset (or its socket failed); downstream was reset too.
    UpstreamReset,
    /// Nothing moved for the idle timeout; both sides were reset.
    IdleTimeout,
}

/// Told how far each direction of a relay got (the kernel fast path uses it
/// to know when a spliced flow may bypass the agent).
pub trait RelayObserver: Sync {
    /// `total` bytes of this direction have been written to the other side.
    fn forwarded(&self, to_upstream: bool, total: u64);
    /// This direction read end-of-stream (its sender shut down writing).
    fn finished(&self, to_upstream: bool);
}

/// Observes nothing.
struct Unobserved;

impl RelayObserver for Unobserved {
    fn forwarded(&self, _: bool, _: u64) {}
    fn finished(&self, _: bool) {}
}

/// Relays bytes between `downstream` and `upstream` until both directions
/// are done, propagating half-closes and resets (see the module docs).
pub async fn relay(downstream: TcpStream, upstream: TcpStream) -> RelayStats {
    run(downstream, upstream, None, &Unobserved).await
}

/// Like [`relay`], telling `observer` the progress of each direction.
pub async fn relay_observed(
    downstream: TcpStream,
    upstream: TcpStream,
    observer: &dyn RelayObserver,
) -> RelayStats {
    run(downstream, upstream, None, observer).await
}

/// Like [`relay`], but resets both sides once no byte has moved in either
/// direction for `idle_timeout`.
pub async fn relay_with_idle_timeout(
    downstream: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
) -> RelayStats {
    run(downstream, upstream, Some(idle_timeout), &Unobserved).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Downstream,
    Upstream,
}

/// Why the relay stopped before both directions finished cleanly.
#[derive(Debug)]
enum Abort {
    Failed { side: Side, error: io::Error },
    Idle,
}

impl Abort {
    fn failed(side: Side) -> impl FnOnce(io::Error) -> Abort {
        move |error| Abort::Failed { side, error }
    }

    fn log(&self) {
        match self {
            Abort::Failed { side, error } => {
                tracing::debug!(?side, %error, "connection failed; resetting both sides");
            }
            Abort::Idle => tracing::debug!("connection idle; resetting both sides"),
        }
    }

    fn outcome(&self) -> RelayOutcome {
        match self {
            Abort::Failed {
                side: Side::Downstream,
                ..
            } => RelayOutcome::DownstreamReset,
            Abort::Failed {
                side: Side::Upstream,
                ..
            } => RelayOutcome::UpstreamReset,
            Abort::Idle => RelayOutcome::IdleTimeout,
        }
    }
}

/// One of the two connections, labelled with the side it is on.
#[derive(Clone, Copy)]
struct Peer<'a> {
    stream: &'a TcpStream,
    side: Side,
}

/// When a byte last moved, in either direction. Atomics rather than cells
/// only so that the relay future is `Send`; all accesses are from one task.
struct Activity {
    start: Instant,
    last_nanos_after_start: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_nanos_after_start: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos_after_start.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_nanos_after_start.load(Ordering::Relaxed))
    }
}

thread_local! {
    /// The read buffer of every relay on this thread, zeroed once: relays
    /// hold no buffer of their own while idle, and a fresh zeroed one per
    /// read would cost a 64 KiB memset each time.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; BUFFER_SIZE].into_boxed_slice());
}

/// What one read brought.
enum Forwarded {
    /// Nothing to read after all, or all of it written on.
    Nothing,
    /// `from` ended.
    End,
    /// `to` took part of it: the rest, to write once it can.
    AllBut(Vec<u8>),
}

/// One direction of the relay: bytes read from `from` are written to `to`.
struct Direction<'a> {
    from: Peer<'a>,
    to: Peer<'a>,
    moved: &'a AtomicU64,
    activity: &'a Activity,
    observer: &'a dyn RelayObserver,
}

async fn run(
    downstream: TcpStream,
    upstream: TcpStream,
    idle_timeout: Option<Duration>,
    observer: &dyn RelayObserver,
) -> RelayStats {
    let to_upstream = AtomicU64::new(0);
    let to_downstream = AtomicU64::new(0);
    let activity = Activity::new();
    let down = Peer {
        stream: &downstream,
        side: Side::Downstream,
    };
    let up = Peer {
        stream: &upstream,
        side: Side::Upstream,
    };
    let down_to_up = Direction {
        from: down,
        to: up,
        moved: &to_upstream,
        activity: &activity,
        observer,
    };
    let up_to_down = Direction {
        from: up,
        to: down,
        moved: &to_downstream,
        activity: &activity,
        observer,
    };
    let result = relay_until_done(
        down_to_up.pump(),
        up_to_down.pump(),
        [down, up],
        &activity,
        idle_timeout,
    )
    .await;
    let outcome = match result {
        Ok(()) => RelayOutcome::Closed,
        Err(abort) => {
            abort.log();
            reset(&downstream);
            reset(&upstream);
            abort.outcome()
        }
    };
    RelayStats {
        downstream_to_upstream: to_upstream.into_inner(),
        upstream_to_downstream: to_downstream.into_inner(),
        outcome,
    }
}

/// Drives both directions until both finished, or until one fails, a socket
/// reports an error, or the idle timeout expires; the unfinished direction
/// is then dropped (abandoned).
async fn relay_until_done(
    down_to_up: impl Future<Output = Result<(), Abort>>,
    up_to_down: impl Future<Output = Result<(), Abort>>,
    [downstream, upstream]: [Peer<'_>; 2],
    activity: &Activity,
    idle_timeout: Option<Duration>,
) -> Result<(), Abort> {
    let mut down_to_up = pin!(down_to_up);
    let mut up_to_down = pin!(up_to_down);
    let (mut down_to_up_done, mut up_to_down_done) = (false, false);
    while !(down_to_up_done && up_to_down_done) {
        tokio::select! {
            result = &mut down_to_up, if !down_to_up_done => {
                result?;
                down_to_up_done = true;
            }
            result = &mut up_to_down, if !up_to_down_done => {
                result?;
                up_to_down_done = true;
            }
            abort = socket_error(downstream) => return Err(abort),
            abort = socket_error(upstream) => return Err(abort),
            () = idle_expiry(activity, idle_timeout) => return Err(Abort::Idle),
        }
    }
    Ok(())
}

impl Direction<'_> {
    /// Copies until EOF from `from`, then shuts down the write half of `to`.
    async fn pump(self) -> Result<(), Abort> {
        loop {
            self.from
                .stream
                .readable()
                .await
                .map_err(Abort::failed(self.from.side))?;
            match self.forward_now()? {
                Forwarded::Nothing => {}
                Forwarded::End => {
                    self.observer.finished(self.from.side == Side::Downstream);
                    return shut_down_writing(self.to.stream).map_err(Abort::failed(self.to.side));
                }
                Forwarded::AllBut(rest) => self
                    .write_all(&rest)
                    .await
                    .map_err(Abort::failed(self.to.side))?,
            }
        }
    }

    /// Reads what is there into the thread's scratch buffer and writes as
    /// much of it as `to` takes now; returns the rest, if any.
    fn forward_now(&self) -> Result<Forwarded, Abort> {
        SCRATCH.with_borrow_mut(|scratch| self.forward_through(&mut scratch[..]))
    }

    fn forward_through(&self, scratch: &mut [u8]) -> Result<Forwarded, Abort> {
        let read = match self.from.stream.try_read(scratch) {
            Err(error) if is_transient(&error) => return Ok(Forwarded::Nothing),
            result => result.map_err(Abort::failed(self.from.side))?,
        };
        if read == 0 {
            return Ok(Forwarded::End);
        }
        self.activity.touch();
        let mut offset = 0;
        while offset < read {
            match self.to.stream.try_write(&scratch[offset..read]) {
                Ok(0) => return Err(Abort::failed(self.to.side)(io::ErrorKind::WriteZero.into())),
                Ok(written) => {
                    offset += written;
                    self.count(written);
                }
                Err(error) if is_transient(&error) => break,
                Err(error) => return Err(Abort::failed(self.to.side)(error)),
            }
        }
        Ok(if offset == read {
            Forwarded::Nothing
        } else {
            Forwarded::AllBut(scratch[offset..read].to_vec())
        })
    }

    fn count(&self, written: usize) {
        let total = self.moved.fetch_add(written as u64, Ordering::Relaxed) + written as u64;
        self.activity.touch();
        self.observer
            .forwarded(self.from.side == Side::Downstream, total);
    }

    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let written = write_some(self.to.stream, bytes).await?;
            bytes = &bytes[written..];
            self.count(written);
        }
        Ok(())
    }
}

async fn write_some(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Err(error) if is_transient(&error) => continue,
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            result => return result,
        }
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Sends FIN to the peer while leaving the other direction open.
fn shut_down_writing(stream: &TcpStream) -> io::Result<()> {
    nix::sys::socket::shutdown(stream.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)
}

/// Resolves once the socket reports an error (`EPOLLERR`), e.g. after the
/// peer's RST, whatever the relay is currently doing with it.
async fn socket_error(peer: Peer<'_>) -> Abort {
    let error = match peer.stream.ready(Interest::ERROR).await {
        Ok(_) => match peer.stream.take_error() {
            Ok(Some(error)) | Err(error) => error,
            Ok(None) => io::Error::other("socket reported an error condition"),
        },
        Err(error) => error,
    };
    Abort::Failed {
        side: peer.side,
        error,
    }
}

/// Resolves once nothing moved for `idle_timeout`; never without a timeout.
async fn idle_expiry(activity: &Activity, idle_timeout: Option<Duration>) {
    let Some(idle_timeout) = idle_timeout else {
        return future::pending().await;
    };
    loop {
        let deadline = activity.last() + idle_timeout;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Makes the coming close send RST instead of FIN (zero linger time).
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "could not set SO_LINGER 0; the close will send FIN");
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
