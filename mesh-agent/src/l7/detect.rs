//! Protocol detection: read the first bytes of a downstream connection and
//! decide between HTTP/2 with prior knowledge, HTTP/1.x and "not HTTP".
//!
//! Bytes read while deciding are never lost: they are handed on in a
//! [`PrefixedIo`] (to hyper, or back to the caller inside
//! [`NotHttp`](super::NotHttp)).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token accepted as the start of HTTP/1.x. Standard methods
/// are at most 7 bytes; extension methods (WebDAV, ...) are longer but short.
const MAX_METHOD_LEN: usize = 32;

/// The wire protocol found on a downstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection started with the preface.
    Http2,
}

/// Why the first bytes of a connection were judged not to be HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHttpReason {
    /// The bytes are not a method token followed by a space (nor the h2 preface).
    NotAMethod,
    /// The peer sent too little within the detection timeout (possibly
    /// nothing: a server-first protocol).
    Timeout,
    /// The peer closed its write side before the bytes were conclusive.
    Eof,
}

impl std::fmt::Display for NotHttpReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotAMethod => "first bytes are not an HTTP request line or the HTTP/2 preface",
            Self::Timeout => "no conclusive bytes within the detection timeout",
            Self::Eof => "peer closed before the first bytes were conclusive",
        })
    }
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Classification {
    Http(Protocol),
    NotHttp,
    /// Too few bytes to tell.
    NeedMore,
}

/// An RFC 9110 `tchar` (the characters of a method token).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes of a connection.
pub(super) fn classify(buf: &[u8]) -> Classification {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        // "PRI " is also a method token followed by a space: keep reading
        // until the whole preface is there (or the bytes diverge from it).
        return if n == H2_PREFACE.len() {
            Classification::Http(Protocol::Http2)
        } else {
            Classification::NeedMore
        };
    }
    for (i, &b) in buf.iter().enumerate() {
        if b == b' ' {
            return if i == 0 {
                Classification::NotHttp
            } else {
                Classification::Http(Protocol::Http1)
            };
        }
        if !is_tchar(b) || i >= MAX_METHOD_LEN {
            return Classification::NotHttp;
        }
    }
    Classification::NeedMore
}

/// Result of [`sniff`].
pub(super) enum Sniffed<D> {
    Http(Protocol, PrefixedIo<D>),
    NotHttp(NotHttpReason, Vec<u8>, D),
    /// The peer closed without sending a byte.
    Closed,
}

/// Reads from `io` until the first bytes are conclusive or `timeout` passes.
pub(super) async fn sniff<D>(mut io: D, timeout: Duration) -> io::Result<Sniffed<D>>
where
    D: AsyncRead + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout_at(deadline, io.read(&mut chunk)).await;
        let n = match read {
            Err(_elapsed) => return Ok(Sniffed::NotHttp(NotHttpReason::Timeout, buf, io)),
            Ok(result) => result?,
        };
        if n == 0 {
            return Ok(if buf.is_empty() {
                Sniffed::Closed
            } else {
                Sniffed::NotHttp(NotHttpReason::Eof, buf, io)
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify(&buf) {
            Classification::Http(protocol) => {
                return Ok(Sniffed::Http(protocol, PrefixedIo::new(buf, io)));
            }
            Classification::NotHttp => {
                return Ok(Sniffed::NotHttp(NotHttpReason::NotAMethod, buf, io));
            }
            Classification::NeedMore => {}
        }
    }
}

/// A stream that yields `prefix` before reading from `inner`; writes go
/// straight to `inner`. Use it to replay bytes already read from a stream.
#[derive(Debug)]
pub struct PrefixedIo<D> {
    prefix: Vec<u8>,
    pos: usize,
    inner: D,
}

impl<D> PrefixedIo<D> {
    /// A stream that replays `prefix`, then continues with `inner`.
    pub fn new(prefix: Vec<u8>, inner: D) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The bytes of the prefix not read yet.
    pub fn unread_prefix(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }

    /// The unread part of the prefix and the inner stream.
    pub fn into_parts(mut self) -> (Vec<u8>, D) {
        self.prefix.drain(..self.pos);
        (self.prefix, self.inner)
    }
}

impl<D: AsyncRead + Unpin> AsyncRead for PrefixedIo<D> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<D: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<D> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
