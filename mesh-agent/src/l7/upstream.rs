//! The upstream of traffic into a pod: one connection per client
//! connection, made on its first forwarded request (the caller's
//! `connect`, then the client handshake of the client's own protocol), and
//! closed when idle or when the client's connection ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Protocol;
use super::idle::drive_until_idle;
use super::service::{Forward, ResponseBody, is_extended_connect, is_upgrade, local_response};

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Upstream, String>> + Send>>;

/// Makes the upstream connection (once).
pub(super) type Connector = Box<dyn FnOnce() -> ConnectFuture + Send>;

/// A handle to send requests on the upstream connection.
#[derive(Clone)]
pub(super) enum Upstream {
    /// One request at a time (the downstream side is HTTP/1 too, so requests
    /// arrive one at a time anyway).
    Http1(Arc<tokio::sync::Mutex<client1::SendRequest<Incoming>>>),
    Http2(client2::SendRequest<Incoming>),
}

/// Wraps the caller's `connect` into a [`Connector`] that also runs the
/// client handshake for `protocol` and spawns the connection driver.
/// `upstream_closed` is notified when the upstream connection ends.
pub(super) fn connector<C, Fut, U>(
    protocol: Protocol,
    connect: C,
    upstream_closed: Arc<Notify>,
    idle_timeout: std::time::Duration,
    upgrading: Arc<AtomicBool>,
) -> Connector
where
    C: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<U>> + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::new(move || {
        Box::pin(async move {
            let io = connect()
                .await
                .map_err(|e| format!("connecting upstream: {e}"))?;
            let (io, last_bytes) = super::idle::watch_bytes(io);
            let io = TokioIo::new(io);
            match protocol {
                Protocol::Http1 => {
                    let (sender, connection) = client1::handshake(io)
                        .await
                        .map_err(|e| format!("upstream HTTP/1.1 handshake: {e}"))?;
                    tokio::spawn(async move {
                        // With upgrades: a 101 hands the connection to the
                        // client's upgraded one (WebSocket).
                        let connection = connection.with_upgrades();
                        match drive_until_idle(connection, last_bytes, idle_timeout).await {
                            Some(Err(error)) => {
                                tracing::debug!(%error, "upstream HTTP/1.1 connection failed");
                            }
                            None => tracing::debug!("upstream HTTP/1.1 connection idle: closed"),
                            // Handed over to an upgrade: the client's side is
                            // being upgraded too, and must not be told to
                            // close (its 101 would say `Connection: close`).
                            Some(Ok(())) if upgrading.load(Ordering::Relaxed) => return,
                            Some(Ok(())) => {}
                        }
                        upstream_closed.notify_one();
                    });
                    Ok(Upstream::Http1(Arc::new(tokio::sync::Mutex::new(sender))))
                }
                Protocol::Http2 => {
                    let (sender, connection) = client2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await
                        .map_err(|e| format!("upstream HTTP/2 handshake: {e}"))?;
                    tokio::spawn(async move {
                        match drive_until_idle(connection, last_bytes, idle_timeout).await {
                            Some(Err(error)) => {
                                tracing::debug!(%error, "upstream HTTP/2 connection failed");
                            }
                            None => tracing::debug!("upstream HTTP/2 connection idle: closed"),
                            Some(Ok(())) => {}
                        }
                        upstream_closed.notify_one();
                    });
                    Ok(Upstream::Http2(sender))
                }
            }
        }) as ConnectFuture
    })
}

/// The upstream connection's life: made on the first forwarded request.
enum Slot {
    Idle(Connector),
    /// The connect runs in a task of its own, so a request cancelled while
    /// waiting for it (an h2 stream reset) does not lose the connection.
    Connecting(JoinHandle<Result<Upstream, String>>),
    Ready(Upstream),
    Failed(String),
    /// Transient, while moving from `Idle` to `Connecting`.
    Empty,
}

/// One upstream connection for the whole downstream connection, made by the
/// caller's `connect` on the first forwarded request.
pub(super) struct SingleUpstream {
    upstream: tokio::sync::Mutex<Slot>,
    /// Set once an upgrade is asked for (see [`connector`]).
    upgrading: Arc<AtomicBool>,
}

impl SingleUpstream {
    pub(super) fn new(connector: Connector, upgrading: Arc<AtomicBool>) -> Self {
        Self {
            upstream: tokio::sync::Mutex::new(Slot::Idle(connector)),
            upgrading,
        }
    }
}

impl Forward for SingleUpstream {
    fn forward(
        &self,
        request: Request<Incoming>,
        downstream: Protocol,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        Box::pin(self.relay(request, downstream == Protocol::Http1))
    }

    fn relays_upgrades(&self) -> bool {
        true
    }
}

impl SingleUpstream {
    /// Relays an allowed request upstream and hands back the response.
    async fn relay(&self, request: Request<Incoming>, h1: bool) -> Response<ResponseBody> {
        if is_upgrade(request.headers()) || is_extended_connect(&request) {
            self.upgrading.store(true, Ordering::Relaxed);
        }
        let upstream = match self.upstream().await {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::debug!(error, "no upstream");
                return local_response(StatusCode::BAD_GATEWAY, "Bad Gateway", h1);
            }
        };
        let result = match upstream {
            Upstream::Http1(sender) => {
                let mut sender = sender.lock().await;
                match sender.ready().await {
                    Ok(()) => sender.send_request(request).await,
                    Err(error) => Err(error),
                }
            }
            Upstream::Http2(mut sender) => match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(error) => Err(error),
            },
        };
        match result {
            Ok(response) => response.map(Either::Left),
            Err(error) => {
                tracing::debug!(%error, "upstream request failed");
                // An HTTP/1.1 upstream that failed cannot be replaced (the
                // connect runs once): close, the client will reconnect.
                local_response(StatusCode::BAD_GATEWAY, "Bad Gateway", h1)
            }
        }
    }

    /// The upstream, connecting it on first use.
    async fn upstream(&self) -> Result<Upstream, String> {
        let mut slot = self.upstream.lock().await;
        loop {
            match &mut *slot {
                Slot::Ready(upstream) => return Ok(upstream.clone()),
                Slot::Failed(error) => return Err(error.clone()),
                Slot::Connecting(task) => {
                    // Cancellation-safe: if this request goes away, the task
                    // stays in the slot for the next one.
                    let outcome = task.await;
                    *slot = match outcome {
                        Ok(Ok(upstream)) => Slot::Ready(upstream),
                        Ok(Err(error)) => Slot::Failed(error),
                        Err(error) => Slot::Failed(format!("upstream connect task: {error}")),
                    };
                }
                Slot::Idle(_) => {
                    let Slot::Idle(connector) = std::mem::replace(&mut *slot, Slot::Empty) else {
                        unreachable!("matched Idle")
                    };
                    *slot = Slot::Connecting(tokio::spawn(connector()));
                }
                Slot::Empty => return Err("upstream connect lost".to_owned()),
            }
        }
    }
}
