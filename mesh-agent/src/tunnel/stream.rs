//! One HTTP/2 CONNECT stream as a byte stream, on either end.
//!
//! Reads and writes go straight to h2's stream handles, on the task that
//! polls them: no task or channel between the relay and the connection
//! (hyper's upgraded streams put one there, a wake-up per write).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamLease;

/// One CONNECT stream after the 200, as a byte stream.
///
/// * `shutdown()` ends our half (END_STREAM); reading goes on until the peer
///   ends theirs (EOF).
/// * [`TunnelStream::abort`] resets it with CONNECT_ERROR, what RFC 9113
///   §8.5 asks for when the TCP connection on either end was reset; the
///   other end reads that as an error and resets its TCP connection.
/// * Dropping it before both halves finished resets the stream
///   (RST_STREAM(CANCEL)).
/// * RST_STREAM(NO_ERROR|CANCEL) from the peer reads as EOF (as hyper and
///   ztunnel read it); writes then fail with `BrokenPipe`. Other reset codes
///   (e.g. CONNECT_ERROR) and connection errors read as errors.
pub struct TunnelStream {
    recv: RecvStream,
    send: SendStream<Bytes>,
    // Received but not yet read.
    unread: Bytes,
    // On the client: counts the stream against its pooled connection until
    // dropped.
    _lease: Option<StreamLease>,
}

impl TunnelStream {
    pub(super) fn new(
        recv: RecvStream,
        send: SendStream<Bytes>,
        lease: Option<StreamLease>,
    ) -> Self {
        Self {
            recv,
            send,
            unread: Bytes::new(),
            _lease: lease,
        }
    }

    /// Resets the stream with CONNECT_ERROR: the TCP connection it carries
    /// was reset (or failed) on our side.
    pub fn abort(mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }

    fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            return Poll::Ready(match ready!(self.recv.poll_data(cx)) {
                None => Ok(Bytes::new()),
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // Reopens the window as soon as the bytes are ours.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    Ok(data)
                }
                Some(Err(e)) => match e.reason() {
                    Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(Bytes::new()),
                    Some(Reason::STREAM_CLOSED) => {
                        Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                    }
                    _ => Err(h2_to_io(e)),
                },
            });
        }
    }

    /// Why writing failed: the peer's reset, or the connection's error.
    fn poll_write_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => h2_to_io(reason.into()),
            Err(e) => h2_to_io(e),
        })
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream").finish_non_exhaustive()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            this.unread = ready!(this.poll_received(cx))?;
        }
        let n = buf.remaining().min(this.unread.len());
        buf.put_slice(&this.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        this.send.reserve_capacity(buf.len());
        // Errors here say less than the reset behind them (`poll_reset`).
        let written = match ready!(this.send.poll_capacity(cx)) {
            None => Some(0),
            Some(Ok(n)) => this
                .send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .ok()
                .map(|()| n),
            Some(Err(_)) => None,
        };
        match written {
            Some(n) => Poll::Ready(Ok(n)),
            None => this.poll_write_error(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go out as the connection task writes them.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        match ready!(this.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
            _ => this.poll_write_error(cx).map(Err),
        }
    }
}

pub(super) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into())
    } else {
        io::Error::other(e)
    }
}
