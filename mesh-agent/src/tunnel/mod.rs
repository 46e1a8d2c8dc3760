//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS 1.3, as
//! Istio ambient's ztunnel does on port 15008.
//!
//! * [`TunnelClient`] (source node) opens one CONNECT stream per proxied
//!   TCP connection, with `:authority` = original destination `ip:port` and
//!   `Forwarded: for="client"`, multiplexed over pooled connections keyed by
//!   [`PoolKey`].
//! * [`serve_connection`] (destination node) terminates TLS + HTTP/2 on one
//!   accepted connection and relays each stream to the upstream its `open`
//!   callback returns, or answers 400/403/503.
//!
//! Both ends speak HTTP/2 with the `h2` crate directly (as ztunnel does):
//! a CONNECT stream's handles are the byte stream ([`TunnelStream`]), read
//! and written by the relay's own task. TLS configs come from the caller
//! (identities, peer checks).

mod client;
mod headers;
mod pool;
mod relay;
mod server;
mod stream;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use client::{PeerRefused, PoolKey, TunnelClient, TunnelClientConfig, TunnelTarget};
pub use headers::{format_authority, format_forwarded, parse_authority, parse_forwarded_for};
pub use server::{
    ConnectRequest, Rejection, Relayed, ServeError, StreamHandler, Upstream, accept_tls,
    serve_connection, serve_connection_until, serve_tls,
};
pub use stream::TunnelStream;

/// The HBONE port on every pod address.
pub const HBONE_PORT: u16 = 15008;

// Flow control sized for throughput, as ztunnel does: a stream may have
// 4 MiB in flight, a connection 16 MiB; 1 MiB frames cut per-frame overhead.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams a peer may open on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// HTTP/2 pings on both ends notice a dead peer (node gone, no FIN/RST).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; resolves, with the reason,
/// once a ping goes unanswered for [`KEEPALIVE_TIMEOUT`] or fails. Runs
/// beside the connection it pings (whose polling carries the frames).
async fn keepalive(ping_pong: Option<h2::PingPong>) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let ping = ping_pong.ping(h2::Ping::opaque());
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping).await {
            Err(_) => return format!("no answer to a ping within {KEEPALIVE_TIMEOUT:?}"),
            Ok(Err(e)) => return format!("ping failed: {}", pool::error_chain(&e)),
            Ok(Ok(_pong)) => {}
        }
    }
}
