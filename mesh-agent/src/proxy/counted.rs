//! The client's bytes of a connection served at L7 (the relay in between
//! has buffers of its own, so only the client's side tells what the client
//! sent and got): its stream, tapped.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::tap::{Tap, Tapped};

/// Bytes through a [`Counted`] stream so far.
#[derive(Debug, Default)]
pub struct ByteCounts {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteCounts {
    /// Read from the stream: what the client sent.
    pub fn read_total(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Written to the stream: what the client received.
    pub fn written_total(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Tap for ByteCounts {
    fn read(&self, bytes: usize) {
        self.read.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn wrote(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// A client's stream, counting.
pub type Counted<T> = Tapped<T, Arc<ByteCounts>>;

/// `inner`, counting, and its counts.
pub fn counting<T>(inner: T) -> (Counted<T>, Arc<ByteCounts>) {
    let counts = Arc::new(ByteCounts::default());
    (Tapped::new(inner, counts.clone()), counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways() {
        let (near, mut far) = tokio::io::duplex(64);
        let (mut counted, counts) = counting(near);
        far.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(b"answer!").await.unwrap();
        assert_eq!((counts.read_total(), counts.written_total()), (5, 7));
    }
}
