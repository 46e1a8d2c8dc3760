//! Connection pools to service endpoints for per-request balancing: requests
//! of many client connections share upstream connections, and one client
//! connection spreads over all endpoints.
//!
//! A pool is keyed by (source pod, endpoint, expected peer identity,
//! protocol): the source pod decides the identity a tunnel presents and the
//! namespace a connection leaves from; the peer identity is what the
//! connection's TLS handshake verified.
//! - HTTP/1.1: idle keep-alive connections are reused one request at a time;
//!   when none is ready a new one is dialled; at most `max_idle` are kept.
//! - HTTP/2: one connection per key, multiplexed; replaced when it closes.
//!
//! To a remote endpoint a "connection" is a stream of the node-to-node mTLS
//! tunnel (itself one HTTP/2 connection per node pair), so many pooled
//! connections cost one TLS session.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{Either, Full};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::l7::idle::{drive_until_idle, watch_bytes};

/// The body of a request sent upstream: the client's, streamed (and
/// copied for mirrors, if any), or a buffered one (bodiless requests,
/// which may be retried; mirrored copies).
pub type UpstreamBody = Either<super::mirror::TeeBody, Full<Bytes>>;

/// Any upstream byte stream (a TCP connection or a tunnel stream).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_pod: String,
    pub endpoint: SocketAddr,
    /// The identity the endpoint proved (tunnel), if any: a connection made
    /// for one expected identity never serves another.
    pub peer_identity: Option<String>,
    pub http2: bool,
}

/// A response, and when its request left on a ready connection: the
/// balancer measures latency from there, so a connection's set-up (dial,
/// mTLS handshake) never makes one endpoint look slow for good.
pub struct Sent {
    pub response: Response<Incoming>,
    pub dispatched: Instant,
    /// Sent on a connection made for it: the far side may have set things
    /// up for it too (a tunnel stream, a connection to the pod).
    pub fresh_connection: bool,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The endpoint could not be reached: nothing was sent.
    #[error("connecting: {0:#}")]
    Connect(anyhow::Error),
    /// The request failed once sent (reset, closed, protocol error).
    #[error("request: {0}")]
    Request(hyper::Error),
}

/// A connection, with the requests it has been given.
struct Used<S> {
    sender: S,
    requests: u32,
}

/// The HTTP/2 connection of a key; locked while it is being (re)made.
type Http2Slot = Arc<tokio::sync::Mutex<Option<Used<http2::SendRequest<UpstreamBody>>>>>;

/// A connection is given at most this many requests (a DestinationRule's
/// `maxRequestsPerConnection`), then closed once they end; `None`: no
/// bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestsPerConnection(pub Option<std::num::NonZeroU32>);

impl RequestsPerConnection {
    fn allows(self, requests: u32) -> bool {
        self.0.is_none_or(|max| requests < max.get())
    }
}

pub struct HttpPool {
    http1: Mutex<HashMap<PoolKey, Vec<Used<http1::SendRequest<UpstreamBody>>>>>,
    http2: Mutex<HashMap<PoolKey, Http2Slot>>,
    max_idle: usize,
    /// A connection that carried no byte for this long is closed.
    idle_timeout: Duration,
}

impl HttpPool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            http1: Mutex::default(),
            http2: Mutex::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// Sends `request` to the endpoint of `key` over a pooled connection, or
    /// one made by `connect`. A request that could not be written on a pooled
    /// connection (it closed meanwhile) is sent again on a new one: it never
    /// reached the endpoint.
    pub async fn send<C, Fut>(
        &self,
        key: &PoolKey,
        connect: C,
        request: Request<UpstreamBody>,
        limit: RequestsPerConnection,
    ) -> Result<Sent, SendError>
    where
        C: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<BoxIo>>,
    {
        if key.http2 {
            self.send_http2(key, connect, request, limit).await
        } else {
            self.send_http1(key, connect, request, limit).await
        }
    }

    async fn send_http1<C, Fut>(
        &self,
        key: &PoolKey,
        connect: C,
        mut request: Request<UpstreamBody>,
        limit: RequestsPerConnection,
    ) -> Result<Sent, SendError>
    where
        C: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<BoxIo>>,
    {
        // One retry on a fresh connection when a pooled one turned out closed.
        for fresh in [false, true] {
            let pooled = if fresh { None } else { self.idle_http1(key) };
            let fresh_connection = pooled.is_none();
            let mut used = match pooled {
                Some(used) => used,
                None => {
                    let io = connect().await.map_err(SendError::Connect)?;
                    Used {
                        sender: dial_http1(io, self.idle_timeout).await?,
                        requests: 0,
                    }
                }
            };
            let dispatched = Instant::now();
            match used.sender.try_send_request(request).await {
                Ok(response) => {
                    used.requests += 1;
                    // Past its bound it is dropped: it closes once this
                    // response has been read.
                    if limit.allows(used.requests) {
                        self.put_http1(key, used);
                    }
                    return Ok(Sent {
                        response,
                        dispatched,
                        fresh_connection,
                    });
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
        unreachable!("the fresh attempt returns")
    }

    fn idle_http1(&self, key: &PoolKey) -> Option<Used<http1::SendRequest<UpstreamBody>>> {
        let mut pools = self.http1.lock();
        let idle = pools.get_mut(key)?;
        idle.retain(|used| !used.sender.is_closed());
        let ready = idle.iter().position(|used| used.sender.is_ready())?;
        Some(idle.swap_remove(ready))
    }

    /// Back to the pool as soon as the response head is in: it becomes ready
    /// again when the response body has been read.
    fn put_http1(&self, key: &PoolKey, used: Used<http1::SendRequest<UpstreamBody>>) {
        let mut pools = self.http1.lock();
        let idle = pools.entry(key.clone()).or_default();
        idle.retain(|used| !used.sender.is_closed());
        if idle.len() < self.max_idle {
            idle.push(used);
        }
    }

    async fn send_http2<C, Fut>(
        &self,
        key: &PoolKey,
        connect: C,
        mut request: Request<UpstreamBody>,
        limit: RequestsPerConnection,
    ) -> Result<Sent, SendError>
    where
        C: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<BoxIo>>,
    {
        let slot = self.http2.lock().entry(key.clone()).or_default().clone();
        for fresh in [false, true] {
            let (mut sender, fresh_connection) = {
                // Held while dialling, so concurrent first requests share one
                // connection instead of each making their own.
                // A connection past its bound is replaced: dropped here, it
                // closes once its streams end.
                let mut current = slot.lock().await;
                match current.as_mut() {
                    Some(used)
                        if !fresh && !used.sender.is_closed() && limit.allows(used.requests) =>
                    {
                        used.requests += 1;
                        (used.sender.clone(), false)
                    }
                    _ => {
                        let io = connect().await.map_err(SendError::Connect)?;
                        let sender = dial_http2(io, self.idle_timeout).await?;
                        *current = Some(Used {
                            sender: sender.clone(),
                            requests: 1,
                        });
                        (sender, true)
                    }
                }
            };
            if let Err(err) = sender.ready().await {
                if fresh {
                    return Err(SendError::Request(err));
                }
                continue;
            }
            let dispatched = Instant::now();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        dispatched,
                        fresh_connection,
                    });
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
        unreachable!("the fresh attempt returns")
    }

    /// Connections held now (idle HTTP/1.1 plus open HTTP/2), for metrics.
    pub fn pooled(&self) -> usize {
        let http1: usize = self
            .http1
            .lock()
            .values()
            .map(|idle| idle.iter().filter(|used| !used.sender.is_closed()).count())
            .sum();
        let http2 = self
            .http2
            .lock()
            .values()
            .filter(|slot| {
                slot.try_lock()
                    .map(|s| s.as_ref().is_some_and(|used| !used.sender.is_closed()))
                    .unwrap_or(true)
            })
            .count();
        http1 + http2
    }

    /// Drops the pools of endpoints no longer in `keep` (their connections
    /// close once their in-flight requests end).
    pub fn retain(&self, keep: impl Fn(&PoolKey) -> bool) {
        self.http1.lock().retain(|k, _| keep(k));
        self.http2.lock().retain(|k, _| keep(k));
    }
}

async fn dial_http1(
    io: BoxIo,
    idle_timeout: Duration,
) -> Result<http1::SendRequest<UpstreamBody>, SendError> {
    let (io, last_bytes) = watch_bytes(io);
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Request)?;
    tokio::spawn(async move {
        match drive_until_idle(connection, last_bytes, idle_timeout).await {
            Some(Err(error)) => tracing::debug!(%error, "pooled HTTP/1.1 connection failed"),
            None => tracing::debug!("pooled HTTP/1.1 connection idle: closed"),
            Some(Ok(())) => {}
        }
    });
    Ok(sender)
}

async fn dial_http2(
    io: BoxIo,
    idle_timeout: Duration,
) -> Result<http2::SendRequest<UpstreamBody>, SendError> {
    let (io, last_bytes) = watch_bytes(io);
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Request)?;
    tokio::spawn(async move {
        match drive_until_idle(connection, last_bytes, idle_timeout).await {
            Some(Err(error)) => tracing::debug!(%error, "pooled HTTP/2 connection failed"),
            None => tracing::debug!("pooled HTTP/2 connection idle: closed"),
            Some(Ok(())) => {}
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use http_body_util::BodyExt;
    use hyper::{server::conn::http1 as server, service::service_fn};

    use super::*;

    /// A connection that takes `delay` to make, to an HTTP/1.1 server that
    /// answers 204 at once.
    async fn slow_dial(delay: Duration, dials: &AtomicUsize) -> anyhow::Result<BoxIo> {
        dials.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        let (client, server_io) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let answer = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(204)
                        .body(Full::new(Bytes::new()))
                        .expect("response"),
                )
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(server_io), answer)
                .await;
        });
        Ok(Box::new(client))
    }

    fn request() -> Request<UpstreamBody> {
        Request::builder()
            .uri("/")
            .header("host", "endpoint")
            .body(Either::Right(Full::new(Bytes::new())))
            .expect("request")
    }

    #[tokio::test]
    async fn a_requests_latency_starts_once_its_connection_is_made() {
        let pool = HttpPool::new(4, Duration::from_secs(3600));
        let key = PoolKey {
            source_pod: "ns/a".into(),
            endpoint: "10.0.0.1:80".parse().unwrap(),
            peer_identity: None,
            http2: false,
        };
        let dials = AtomicUsize::new(0);
        let delay = Duration::from_millis(200);
        let connect = || slow_dial(delay, &dials);

        let started = Instant::now();
        let sent = pool
            .send(&key, connect, request(), RequestsPerConnection::default())
            .await
            .expect("sent");
        assert_eq!(sent.response.status(), 204);
        assert!(
            sent.dispatched.duration_since(started) >= delay,
            "the connection's set-up is not part of the request's latency"
        );
        assert!(sent.fresh_connection);
        assert_eq!(dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_is_given_at_most_its_bound_of_requests() {
        for http2 in [false, true] {
            let pool = HttpPool::new(4, Duration::from_secs(3600));
            let key = PoolKey {
                source_pod: "ns/a".into(),
                endpoint: "10.0.0.1:80".parse().unwrap(),
                peer_identity: None,
                http2,
            };
            let dials = AtomicUsize::new(0);
            let connect = || async {
                dials.fetch_add(1, Ordering::SeqCst);
                let (client, server_io) = tokio::io::duplex(4096);
                tokio::spawn(async move {
                    let answer = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    });
                    let io = TokioIo::new(server_io);
                    let _ = if http2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, answer)
                            .await
                    } else {
                        server::Builder::new().serve_connection(io, answer).await
                    };
                });
                Ok::<BoxIo, anyhow::Error>(Box::new(client))
            };
            let bound = RequestsPerConnection(std::num::NonZeroU32::new(2));
            for _ in 0..5 {
                let sent = pool
                    .send(&key, connect, request(), bound)
                    .await
                    .expect("sent");
                // Read whole, so an HTTP/1.1 connection is ready again.
                let _ = sent.response.into_body().collect().await;
            }
            assert_eq!(dials.load(Ordering::SeqCst), 3, "http2: {http2}");
            // Unbounded: one connection for all.
            let dials_before = dials.load(Ordering::SeqCst);
            let pool = HttpPool::new(4, Duration::from_secs(3600));
            for _ in 0..5 {
                let sent = pool
                    .send(&key, connect, request(), RequestsPerConnection::default())
                    .await
                    .expect("sent");
                let _ = sent.response.into_body().collect().await;
            }
            assert_eq!(
                dials.load(Ordering::SeqCst) - dials_before,
                1,
                "http2: {http2}"
            );
        }
    }
}
