//! Pool of HTTP/2 connections, keyed by [`PoolKey`].
//!
//! Each pooled connection has a driver task that polls the h2 connection,
//! pings the peer to notice it gone, and closes the connection once it has
//! carried no stream for `idle_timeout`. The
//! stream count lives in a `watch` channel so the driver can restart its idle
//! timer on every change without polling.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

use super::client::PoolKey;

pub(super) type Sender = SendRequest<Bytes>;
pub(super) type Conn = Connection<TlsStream<TcpStream>, Bytes>;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

pub(super) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    idle_timeout: Duration,
    max_streams: usize,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    conns: HashMap<PoolKey, Vec<Arc<PooledConn>>>,
    // One dial at a time per key, so a burst of connects shares one
    // connection instead of racing to open one each.
    dial_locks: HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>,
}

pub(super) struct PooledConn {
    pub(super) id: u64,
    key: PoolKey,
    sender: Sender,
    active: watch::Sender<usize>,
    // The peer's SETTINGS_MAX_CONCURRENT_STREAMS, refreshed by the driver.
    peer_max_streams: AtomicUsize,
    closed: AtomicBool,
    // No new stream from then on: a certificate of its handshake expires.
    // The streams open carry on (TLS checks certificates at the handshake).
    usable_until: Option<SystemTime>,
    // Why the connection ended, set by the driver before it drops the
    // connection (so before h2 fails the requests still pending on it).
    ended: watch::Sender<Option<String>>,
}

impl PooledConn {
    pub(super) fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Why the connection ended, waiting up to `wait` for the driver to
    /// notice: a request can fail a moment before the driver sees the
    /// connection error (e.g. the TLS alert of a peer rejecting our
    /// certificate, which TLS 1.3 delivers after the client's handshake).
    pub(super) async fn end_reason(&self, wait: Duration) -> Option<String> {
        let mut rx = self.ended.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        rx.borrow().clone()
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self
                .usable_until
                .is_none_or(|until| SystemTime::now() < until)
    }

    /// Our own cap, lowered to the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
    fn stream_limit(&self, max_streams: usize) -> usize {
        max_streams
            .min(self.peer_max_streams.load(Ordering::Relaxed))
            .max(1)
    }
}

/// Counts one stream against its connection while alive.
pub(super) struct StreamLease {
    conn: Arc<PooledConn>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.conn.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Pool {
    pub(super) fn new(idle_timeout: Duration, max_streams: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle_timeout,
                max_streams: max_streams.max(1),
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    /// A live connection for `key` with room for one more stream, already
    /// counting that stream.
    pub(super) fn checkout(&self, key: &PoolKey) -> Option<(Arc<PooledConn>, StreamLease)> {
        let mut state = self.inner.lock();
        let list = state.conns.get_mut(key)?;
        list.retain(|c| c.usable());
        let max = self.inner.max_streams;
        let conn = list
            .iter()
            .find(|c| *c.active.borrow() < c.stream_limit(max))?
            .clone();
        Some(lease(conn))
    }

    pub(super) fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .lock()
            .dial_locks
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Adds a freshly handshaken connection, leased for its first stream, and
    /// starts its driver.
    pub(super) fn insert(
        &self,
        key: PoolKey,
        sender: Sender,
        connection: Conn,
        usable_until: Option<SystemTime>,
    ) -> (Arc<PooledConn>, StreamLease) {
        let conn = Arc::new(PooledConn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            key: key.clone(),
            sender,
            active: watch::Sender::new(0),
            peer_max_streams: AtomicUsize::new(connection.max_concurrent_send_streams()),
            closed: AtomicBool::new(false),
            usable_until,
            ended: watch::Sender::new(None),
        });
        let leased = {
            let mut state = self.inner.lock();
            state.conns.entry(key).or_default().push(conn.clone());
            lease(conn.clone())
        };
        tokio::spawn(drive(
            connection,
            conn,
            Arc::downgrade(&self.inner),
            self.inner.idle_timeout,
        ));
        leased
    }

    /// Takes a connection out of the pool (it failed a request).
    pub(super) fn evict(&self, conn: &Arc<PooledConn>) {
        self.inner.remove(conn);
    }

    /// Forgets the dial lock of a key with no connections and no waiters.
    pub(super) fn gc_dial_lock(&self, key: &PoolKey) {
        self.inner.lock().gc_dial_lock(key);
    }

    pub(super) fn len(&self) -> usize {
        let state = self.inner.lock();
        state
            .conns
            .values()
            .flatten()
            .filter(|c| c.usable())
            .count()
    }
}

fn lease(conn: Arc<PooledConn>) -> (Arc<PooledConn>, StreamLease) {
    conn.active.send_modify(|n| *n += 1);
    (conn.clone(), StreamLease { conn })
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the map consistent.
        self.state.lock()
    }

    fn remove(&self, conn: &Arc<PooledConn>) {
        conn.closed.store(true, Ordering::Release);
        let mut state = self.lock();
        if let Some(list) = state.conns.get_mut(&conn.key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
        }
        state.gc_dial_lock(&conn.key);
    }

    /// Removes `conn` if it carries no stream; checked under the pool lock so
    /// that a concurrent checkout either sees it closed or keeps it alive.
    fn remove_if_idle(&self, conn: &Arc<PooledConn>) -> bool {
        let mut state = self.lock();
        if *conn.active.borrow() != 0 {
            return false;
        }
        conn.closed.store(true, Ordering::Release);
        if let Some(list) = state.conns.get_mut(&conn.key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
        }
        state.gc_dial_lock(&conn.key);
        true
    }
}

impl PoolState {
    fn gc_dial_lock(&mut self, key: &PoolKey) {
        if self.conns.get(key).is_some_and(|l| l.is_empty()) {
            self.conns.remove(key);
        }
        if !self.conns.contains_key(key)
            && self
                .dial_locks
                .get(key)
                .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            self.dial_locks.remove(key);
        }
    }
}

async fn drive(
    mut connection: Conn,
    conn: Arc<PooledConn>,
    pool: Weak<PoolInner>,
    idle_timeout: Duration,
) {
    let mut active = conn.active.subscribe();
    let keepalive = super::keepalive(connection.ping_pong());
    tokio::pin!(keepalive);
    let mut connection = Box::pin(connection);
    // Polls the connection and keeps the peer's stream limit current (it
    // arrives in SETTINGS after the handshake and may change).
    let connection = std::future::poll_fn(|cx| {
        let res = connection.as_mut().poll(cx);
        conn.peer_max_streams
            .store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
        res
    });
    tokio::pin!(connection);
    loop {
        tokio::select! {
            // The connection's own end says more than a failed ping.
            biased;
            res = &mut connection => {
                let reason = match res {
                    Ok(()) => "closed by the peer".to_string(),
                    Err(e) => error_chain(&e),
                };
                tracing::debug!(conn = conn.id, %reason, "HBONE connection ended");
                conn.ended.send_replace(Some(reason));
                break;
            }
            reason = &mut keepalive => {
                tracing::debug!(conn = conn.id, %reason, "HBONE connection lost");
                conn.ended.send_replace(Some(reason));
                break;
            }
            () = idle_for(&mut active, idle_timeout) => {
                let Some(pool) = pool.upgrade() else { break };
                if pool.remove_if_idle(&conn) {
                    tracing::debug!(conn = conn.id, "closing idle HBONE connection");
                    conn.ended.send_replace(Some("closed when idle".to_string()));
                    break;
                }
            }
        }
    }
    // The connection (and its socket) is dropped on return.
    conn.closed.store(true, Ordering::Release);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&conn);
    }
}

/// Resolves once the stream count has been zero for `idle` without change.
async fn idle_for(active: &mut watch::Receiver<usize>, idle: Duration) {
    loop {
        let count = *active.borrow_and_update();
        if count == 0 {
            match tokio::time::timeout(idle, active.changed()).await {
                Err(_elapsed) => return,
                Ok(Ok(())) => continue,
                // The sender lives in `PooledConn`, which the driver holds.
                Ok(Err(_)) => std::future::pending::<()>().await,
            }
        } else if active.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// `e: cause: cause...`, since `Display` often shows only the top level.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
