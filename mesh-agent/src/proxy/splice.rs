//! Splicing an authorized L4 flow between two pods of this node: the kernel
//! moves each application's sends straight into the other application's
//! socket, and the agent's two relay sockets stay open but idle, carrying
//! only what the applications sent before the switch, and the close or
//! reset at the end (see `mesh-ebpf/src/fastpath.rs` for why byte order
//! holds).
//!
//! The agent arms both directions as soon as the flow is authorized and
//! connected, then relays as usual, telling the kernel after every write how
//! many bytes of that direction it has relayed; a direction switches to the
//! kernel at the first send made once the agent has caught up.

use parking_lot::Mutex;

use mesh_common::{SockKey, SockState};
use tokio::net::TcpStream;

use super::relay::RelayObserver;
use crate::ebpf::{FastPath, fastpath::sock_key};

/// One flow's splice: client application `a`, server application `b`, and
/// the agent's relay sockets `down` (facing `a`) and `up` (facing `b`).
pub struct Splice<'f> {
    fast_path: &'f FastPath,
    a: SockKey,
    b: SockKey,
    down: SockKey,
    up: SockKey,
    /// What the kernel counted for each application, read when its direction ends.
    sent: Mutex<[Option<SockState>; 2]>,
}

/// What a spliced flow moved, per direction (all paths).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplicedBytes {
    pub client_sent: u64,
    pub server_sent: u64,
    /// Bytes that went straight from one application to the other.
    pub spliced: u64,
}

impl<'f> Splice<'f> {
    /// Arms both directions; `None` (the flow is relayed as usual) when the
    /// sockets' addresses cannot be read or the kernel map is full.
    pub fn arm(
        fast_path: &'f FastPath,
        client_netns: u64,
        downstream: &TcpStream,
        server_netns: u64,
        upstream: &TcpStream,
    ) -> Option<Self> {
        let down = sock_key(
            client_netns,
            downstream.local_addr().ok()?,
            downstream.peer_addr().ok()?,
        );
        let up = sock_key(
            server_netns,
            upstream.local_addr().ok()?,
            upstream.peer_addr().ok()?,
        );
        let (a, b) = (down.peer(), up.peer());
        let armed = fast_path
            .arm(a, b, up)
            .and_then(|()| fast_path.arm(b, a, down));
        if let Err(error) = armed {
            tracing::debug!(
                error = format!("{error:#}"),
                "splice not armed; relayed as usual"
            );
            fast_path.disarm(&a);
            fast_path.disarm(&b);
            return None;
        }
        Some(Self {
            fast_path,
            a,
            b,
            down,
            up,
            sent: Mutex::new([None, None]),
        })
    }

    /// Forgets the splice; what each application sent, as far as known.
    pub fn finish(self, relayed_up: u64, relayed_down: u64) -> SplicedBytes {
        self.fast_path.disarm(&self.a);
        self.fast_path.disarm(&self.b);
        let [a, b] = *self.sent.lock();
        let a = a.or_else(|| self.fast_path.state(&self.a));
        let b = b.or_else(|| self.fast_path.state(&self.b));
        SplicedBytes {
            client_sent: a.map_or(relayed_up, |s| s.sent.max(relayed_up)),
            server_sent: b.map_or(relayed_down, |s| s.sent.max(relayed_down)),
            spliced: a.map_or(0, |s| s.spliced) + b.map_or(0, |s| s.spliced),
        }
    }
}

impl RelayObserver for Splice<'_> {
    fn forwarded(&self, to_upstream: bool, total: u64) {
        if to_upstream {
            self.fast_path.forwarded(&self.a, self.b, self.up, total);
        } else {
            self.fast_path.forwarded(&self.b, self.a, self.down, total);
        }
    }

    fn finished(&self, to_upstream: bool) {
        // The sender shut down writing but its socket is still open (the
        // agent has not closed its side yet): its counters are still there.
        let (key, slot) = if to_upstream {
            (self.a, 0)
        } else {
            (self.b, 1)
        };
        if let Some(state) = self.fast_path.state(&key) {
            self.sent.lock()[slot] = Some(state);
        }
    }
}
