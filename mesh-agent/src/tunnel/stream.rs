//! The client's view of one tunnelled connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamLease;

/// One HTTP/2 CONNECT stream after the peer answered 200, as a byte stream.
///
/// * `shutdown()` ends our half (END_STREAM); reading goes on until the peer
///   ends theirs (EOF).
/// * Dropping it before both halves finished: hyper sends END_STREAM and
///   then RST_STREAM(CANCEL) (hyper's upgraded streams always close the send
///   half on drop). The receiving agent therefore half-closes the upstream
///   first, and resets it as soon as it has anything more to relay.
/// * hyper reads RST_STREAM(NO_ERROR|CANCEL) as EOF, so a peer that resets
///   the stream (what an agent does when its upstream sent RST) shows here as
///   EOF on read and an error on the next writes, not as a read error.
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    // Counts the stream against its pooled connection until dropped.
    _lease: StreamLease,
}

impl TunnelStream {
    pub(super) fn new(upgraded: Upgraded, lease: StreamLease) -> Self {
        Self {
            io: TokioIo::new(upgraded),
            _lease: lease,
        }
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
