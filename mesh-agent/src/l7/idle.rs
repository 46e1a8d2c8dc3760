//! When an HTTP connection has been idle too long, measured by what it
//! carries rather than by a timer started when it began waiting.
//!
//! Downstream ([`Activity`]): a connection is idle while no request is in
//! progress (from its head to the end of its answer's body); idle for
//! `idle_timeout` it is closed gracefully. On HTTP/1 a request head must
//! arrive whole within `header_read_timeout` of its first byte (slow
//! clients cannot hold a connection with a trickled head). hyper's own
//! header timer starts as soon as it waits for the next head, so it closed
//! every keep-alive connection idle for that long: it is not used.
//!
//! Upstream ([`LastBytes`]): no byte either way for `idle_timeout` closes
//! the connection (pooled or not).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::tap::{Tap, Tapped};

/// Why a downstream connection is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request for the idle timeout: closed gracefully.
    Idle,
    /// A request head started and did not complete in time: closed.
    HeadTimeout,
}

/// The requests of one downstream connection, for its timeouts.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_progress: usize,
    idle_since: Instant,
    head_started: Option<Instant>,
}

/// What to do next about a connection's timeouts.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Expired(Expiry),
    WaitUntil(Instant),
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                in_progress: 0,
                idle_since: Instant::now(),
                head_started: None,
            }),
        })
    }

    /// A request's head arrived; it is in progress until the guard drops
    /// (with the answer's body, or with the request's handler).
    pub fn request_started(self: &Arc<Self>) -> InProgress {
        let mut state = self.state.lock();
        state.in_progress += 1;
        state.head_started = None;
        InProgress(self.clone())
    }

    /// Bytes arrived from the client (HTTP/1): between requests, they are
    /// the start of the next head.
    fn bytes_read(&self) {
        let mut state = self.state.lock();
        if state.in_progress == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
        }
    }

    fn check(&self, now: Instant, idle_timeout: Duration, header_timeout: Duration) -> Check {
        let state = self.state.lock();
        if state.in_progress > 0 {
            return Check::WaitUntil(now + idle_timeout.min(header_timeout));
        }
        if let Some(started) = state.head_started {
            let deadline = started + header_timeout;
            return if now >= deadline {
                Check::Expired(Expiry::HeadTimeout)
            } else {
                Check::WaitUntil(deadline)
            };
        }
        let deadline = state.idle_since + idle_timeout;
        if now >= deadline {
            Check::Expired(Expiry::Idle)
        } else {
            // Looked at again within a head timeout: a head that starts
            // meanwhile is timed from its first byte.
            Check::WaitUntil(deadline.min(now + header_timeout))
        }
    }

    /// Resolves when the connection has been idle for `idle_timeout`, or a
    /// request head has been arriving for `header_timeout`.
    pub async fn expired(&self, idle_timeout: Duration, header_timeout: Duration) -> Expiry {
        loop {
            match self.check(Instant::now(), idle_timeout, header_timeout) {
                Check::Expired(expiry) => return expiry,
                Check::WaitUntil(deadline) => tokio::time::sleep_until(deadline).await,
            }
        }
    }
}

/// A request in progress (see [`Activity::request_started`]).
#[derive(Debug)]
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_progress = state.in_progress.saturating_sub(1);
        if state.in_progress == 0 {
            state.idle_since = Instant::now();
        }
    }
}

/// A response body that keeps its request in progress until it is done.
pub struct Tracked<B> {
    inner: B,
    _in_progress: InProgress,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_progress: InProgress) -> Self {
        Self {
            inner,
            _in_progress: in_progress,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's side of an HTTP/1 connection, telling [`Activity`] when
/// bytes arrive.
pub type HeadWatch<T> = Tapped<T, Arc<Activity>>;

impl Tap for Activity {
    fn read(&self, _bytes: usize) {
        self.bytes_read();
    }
}

/// When a byte last went either way on an upstream connection.
#[derive(Debug)]
pub struct LastBytes {
    opened: Instant,
    /// Milliseconds since `opened`.
    at_ms: AtomicU64,
}

impl LastBytes {
    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.at_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When no byte will have moved for `timeout`, as things stand.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        self.opened + Duration::from_millis(self.at_ms.load(Ordering::Relaxed)) + timeout
    }

    /// Resolves once no byte has moved for `timeout`.
    pub async fn idle_for(self: Arc<Self>, timeout: Duration) {
        loop {
            let deadline = self.idle_deadline(timeout);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Tap for LastBytes {
    fn read(&self, _bytes: usize) {
        self.touch();
    }
    fn wrote(&self, _bytes: usize) {
        self.touch();
    }
}

/// An upstream stream that notes when bytes move.
pub type BytesWatch<T> = Tapped<T, Arc<LastBytes>>;

/// `inner`, noting when bytes move, and its [`LastBytes`].
pub fn watch_bytes<T>(inner: T) -> (BytesWatch<T>, Arc<LastBytes>) {
    let last = Arc::new(LastBytes {
        opened: Instant::now(),
        at_ms: AtomicU64::new(0),
    });
    (Tapped::new(inner, last.clone()), last)
}

/// Drives an upstream connection until it ends, or until it has carried
/// no byte for `timeout` (then it is dropped: closed).
pub fn drive_until_idle<F>(
    connection: F,
    last: Arc<LastBytes>,
    timeout: Duration,
) -> impl std::future::Future<Output = Option<F::Output>> + Send
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let idle = Box::pin(last.idle_for(timeout));
    let connection = Box::pin(connection);
    async move {
        tokio::select! {
            output = connection => Some(output),
            () = idle => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEAD: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let activity = Activity::new();
        let start = Instant::now();
        assert_eq!(
            activity.check(start, IDLE, HEAD),
            Check::WaitUntil(start + HEAD)
        );
        let request = activity.request_started();
        tokio::time::advance(IDLE * 2).await;
        // In progress for longer than the idle timeout: never idle.
        assert!(matches!(
            activity.check(Instant::now(), IDLE, HEAD),
            Check::WaitUntil(_)
        ));
        drop(request);
        let ended = Instant::now();
        assert_eq!(
            activity.check(ended + IDLE - HEAD, IDLE, HEAD),
            Check::WaitUntil(ended + IDLE)
        );
        assert_eq!(
            activity.check(ended + IDLE, IDLE, HEAD),
            Check::Expired(Expiry::Idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_complete_within_its_timeout_of_its_first_byte() {
        let activity = Activity::new();
        tokio::time::advance(IDLE / 2).await;
        activity.bytes_read();
        let first_byte = Instant::now();
        assert_eq!(
            activity.check(first_byte, IDLE, HEAD),
            Check::WaitUntil(first_byte + HEAD)
        );
        assert_eq!(
            activity.check(first_byte + HEAD, IDLE, HEAD),
            Check::Expired(Expiry::HeadTimeout)
        );
        // The head completed: no head timeout any more.
        let request = activity.request_started();
        drop(request);
        assert!(matches!(
            activity.check(first_byte + HEAD, IDLE, HEAD),
            Check::WaitUntil(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_is_idle_after_no_byte_for_its_timeout() {
        let (near, mut far) = tokio::io::duplex(64);
        let (mut watched, last) = watch_bytes(near);
        let timeout = Duration::from_secs(30);
        tokio::time::advance(Duration::from_secs(20)).await;
        tokio::io::AsyncWriteExt::write_all(&mut watched, b"x")
            .await
            .unwrap();
        let written = Instant::now();
        last.clone().idle_for(timeout).await;
        assert!(Instant::now() >= written + timeout - Duration::from_millis(1));
        let mut buf = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut buf)
            .await
            .unwrap();
    }
}
