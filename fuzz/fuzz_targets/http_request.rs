//! The L7 relay on arbitrary bytes from a client (HTTP/1.1, HTTP/2 or
//! neither): it answers (400, 431, 403, the upstream's answer), closes, or
//! hands non-HTTP back, within its timeouts, and never panics.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_agent::l7::{AllowAll, L7Options, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn normalize(path: &str) -> Result<String, String> {
    mesh_agent::policy::normalize_path(path).map_err(|e| e.to_string())
}

/// An upstream that reads a request head and answers 200 (HTTP/1.1).
async fn upstream(mut far: tokio::io::DuplexStream) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut seen = Vec::new();
    while let Ok(n) = far.read(&mut buffer).await {
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buffer[..n]);
        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let _ = far
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            seen.clear();
        }
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(256 * 1024);
            let connect = || async {
                let (near, far) = tokio::io::duplex(64 * 1024);
                tokio::spawn(upstream(far));
                Ok::<_, std::io::Error>(near)
            };
            let options = L7Options {
                header_read_timeout: Duration::from_millis(200),
                detect_timeout: Duration::from_millis(200),
                ..L7Options::default()
            };
            let relay = tokio::spawn(serve(
                server,
                connect,
                Arc::new(AllowAll),
                normalize,
                options,
            ));
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // The client has said all it will: the relay must end (what it
            // hands back for non-HTTP is dropped here), then the client reads
            // what it was answered.
            let ended = tokio::time::timeout(Duration::from_secs(5), relay).await;
            assert!(
                ended.is_ok(),
                "the relay did not end after its client's EOF"
            );
            drop(ended);
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut answer)).await;
        });
    });
});
