//! One direction of a relayed byte stream, with no memory held while idle.
//!
//! A node proxy holds thousands of connections that mostly sit idle (pooled
//! database and HTTP connections). A fixed buffer per direction costs its
//! size for every one of them, moving or not. Here each read goes into a
//! scratch buffer on the thread's stack, and is written on at once; only
//! what the receiver cannot take yet is kept, on the heap, until it is
//! written. An idle direction holds nothing; a busy one, at most one read's
//! worth.

use std::{
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes (on the stack of the polling thread).
pub const READ_SIZE: usize = 64 * 1024;

/// Which side of a pump failed.
#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies from `from` to `to` until `from` ends, then shuts down `to`'s
/// writing. `written(n)` is called for every `n` bytes written to `to`.
pub async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut written: impl FnMut(usize),
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut unwritten: Option<Unwritten> = None;
    let mut ended = false;
    poll_fn(|cx| poll_pump(cx, from, to, &mut unwritten, &mut ended, &mut written)).await
}

/// Bytes read but not yet taken by the receiver.
struct Unwritten {
    bytes: Vec<u8>,
    offset: usize,
}

fn poll_pump<R, W>(
    cx: &mut Context<'_>,
    from: &mut R,
    to: &mut W,
    unwritten: &mut Option<Unwritten>,
    ended: &mut bool,
    written: &mut impl FnMut(usize),
) -> Poll<Result<(), PumpError>>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    loop {
        if let Some(rest) = unwritten {
            while rest.offset < rest.bytes.len() {
                let n = ready!(poll_write(cx, to, &rest.bytes[rest.offset..]))?;
                rest.offset += n;
                written(n);
            }
            *unwritten = None;
        }
        if *ended {
            return Pin::new(&mut *to)
                .poll_shutdown(cx)
                .map_err(PumpError::Write);
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut read)).map_err(PumpError::Read)?;
        let data = read.filled();
        if data.is_empty() {
            *ended = true;
            continue;
        }
        let mut offset = 0;
        while offset < data.len() {
            match poll_write(cx, to, &data[offset..]) {
                Poll::Ready(n) => {
                    let n = n?;
                    offset += n;
                    written(n);
                }
                Poll::Pending => {
                    // The receiver is full: keep the rest until it drains.
                    *unwritten = Some(Unwritten {
                        bytes: data[offset..].to_vec(),
                        offset: 0,
                    });
                    return Poll::Pending;
                }
            }
        }
    }
}

fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    to: &mut W,
    bytes: &[u8],
) -> Poll<Result<usize, PumpError>> {
    match ready!(Pin::new(&mut *to).poll_write(cx, bytes)) {
        Ok(0) => Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into()))),
        Ok(n) => Poll::Ready(Ok(n)),
        Err(err) => Poll::Ready(Err(PumpError::Write(err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A megabyte through a pipe whose far end is read slowly, so that the
    /// pump has to keep what the receiver cannot take: every byte arrives,
    /// in order, and the end is passed on.
    #[tokio::test]
    async fn everything_arrives_in_order_through_a_slow_receiver() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut source_writer, mut source) = tokio::io::duplex(1024);
        let (mut sink, mut sink_reader) = tokio::io::duplex(100);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            source_writer.write_all(&sent).await.unwrap();
            source_writer.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 37];
            loop {
                let n = sink_reader.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
            }
        });
        let mut total = 0;
        pump(&mut source, &mut sink, |n| total += n).await.unwrap();
        writer.await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(total, data.len());
        assert!(got == data, "the bytes differ");
    }

    #[tokio::test]
    async fn a_failing_receiver_is_a_write_error() {
        let (mut source_writer, mut source) = tokio::io::duplex(1024);
        let (mut sink, sink_reader) = tokio::io::duplex(1024);
        drop(sink_reader);
        source_writer.write_all(b"hello").await.unwrap();
        let result = pump(&mut source, &mut sink, |_| {}).await;
        assert!(matches!(result, Err(PumpError::Write(_))), "{result:?}");
    }
}
