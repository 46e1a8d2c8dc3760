//! A stream that tells an observer how many bytes it read and wrote: one
//! mechanism behind the L7 byte counts (`proxy::counted`) and the idle
//! timers of HTTP connections (`l7::idle`).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Told about the bytes through a [`Tapped`] stream (as they move).
pub trait Tap {
    fn read(&self, _bytes: usize) {}
    fn wrote(&self, _bytes: usize) {}
}

impl<X: Tap + ?Sized> Tap for Arc<X> {
    fn read(&self, bytes: usize) {
        (**self).read(bytes);
    }
    fn wrote(&self, bytes: usize) {
        (**self).wrote(bytes);
    }
}

/// `inner`, with `tap` told of every read and write.
pub struct Tapped<T, O> {
    inner: T,
    tap: O,
}

impl<T, O> Tapped<T, O> {
    pub fn new(inner: T, tap: O) -> Self {
        Self { inner, tap }
    }

    /// The stream itself (the tap is no longer told).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin, O: Tap + Unpin> AsyncRead for Tapped<T, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.tap.read(read);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, O: Tap + Unpin> AsyncWrite for Tapped<T, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.tap.wrote(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.tap.wrote(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
