//! Byte relay between an accepted CONNECT stream and its upstream.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::server::{Relayed, Upstream};
use super::stream::TunnelStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Stream,
    Upstream,
}

struct Failure {
    side: Side,
    error: io::Error,
}

/// Relays both ways until both directions reached EOF (each EOF is passed
/// on as a half-close: END_STREAM one way, FIN the other).
///
/// An error on either side aborts both directions:
/// * stream side (reset by the peer, connection lost): the upstream is reset
///   (SO_LINGER 0, so close sends RST), as RFC 9113 §8.5 asks;
/// * upstream side (e.g. RST from the app): the stream is reset with
///   CONNECT_ERROR (RFC 9113 §8.5), which the client's agent passes on as a
///   TCP reset.
pub(super) async fn relay(stream: TunnelStream, upstream: Upstream, dest: SocketAddr) {
    match upstream {
        Upstream::Tcp(tcp) => {
            relay_tcp(stream, tcp, dest).await;
        }
        Upstream::Observed(tcp, done) => done(relay_tcp(stream, tcp, dest).await),
        // The handler serves the stream itself, on this task.
        Upstream::Handler(handler) => handler(stream).await,
    }
}

async fn relay_tcp(stream: TunnelStream, mut upstream: TcpStream, dest: SocketAddr) -> Relayed {
    let (mut stream_rd, mut stream_wr) = tokio::io::split(stream);
    let (mut up_rd, mut up_wr) = upstream.split();
    let (mut to_upstream, mut from_upstream) = (0, 0);
    let result = tokio::try_join!(
        pump(
            &mut stream_rd,
            &mut up_wr,
            Side::Stream,
            Side::Upstream,
            &mut to_upstream
        ),
        pump(
            &mut up_rd,
            &mut stream_wr,
            Side::Upstream,
            Side::Stream,
            &mut from_upstream
        ),
    );
    let aborted = match result {
        Ok(_) => {
            tracing::debug!(%dest, to_upstream, from_upstream, "HBONE stream finished");
            false
        }
        Err(Failure { side, error }) => {
            tracing::debug!(%dest, ?side, %error, "HBONE stream aborted");
            match side {
                Side::Stream => {
                    let _ = upstream.set_zero_linger();
                }
                Side::Upstream => stream_rd.unsplit(stream_wr).abort(),
            }
            true
        }
    };
    Relayed {
        to_upstream,
        from_upstream,
        aborted,
    }
}

/// Copies until EOF (passed on as a shutdown); `total` counts what was
/// written, also when it ends in an error.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    from: Side,
    to: Side,
    total: &mut u64,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    crate::pump::pump(r, w, |n| *total += n as u64)
        .await
        .map_err(|err| match err {
            crate::pump::PumpError::Read(error) => Failure { side: from, error },
            crate::pump::PumpError::Write(error) => Failure { side: to, error },
        })
}
