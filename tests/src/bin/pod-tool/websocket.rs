//! WebSocket (RFC 6455) with tungstenite: an echo server and a client that
//! checks its echoes, for what a real WebSocket peer does through the
//! mesh's HTTP relay (the `Upgrade` handshake, then frames both ways).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{current_thread, listen, runtime};

/// Echoes every text and binary message of every connection; prints
/// `ready` once listening.
pub fn server(port: u16) -> Result<()> {
    runtime(2)?.block_on(async move {
        let listener = listen(SocketAddr::from(([0, 0, 0, 0], port)), false)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("ready");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                use futures_util::{SinkExt, StreamExt};
                while let Some(Ok(message)) = ws.next().await {
                    let echo = match message {
                        Message::Text(_) | Message::Binary(_) => message,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Sends `messages` messages (text and binary in turn) and checks each echo.
pub fn client(url: &str, messages: u32) -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    current_thread()?.block_on(async move {
        let exchange = async {
            let (mut ws, response) = tokio_tungstenite::connect_async(url)
                .await
                .with_context(|| format!("WebSocket handshake with {url}"))?;
            if response.status() != 101 {
                bail!("handshake answered {}", response.status());
            }
            for i in 0..messages {
                let message = if i.is_multiple_of(2) {
                    Message::text(format!("message {i}"))
                } else {
                    Message::binary(vec![i as u8; 1000 + i as usize])
                };
                ws.send(message.clone()).await.context("sending")?;
                let echo = ws
                    .next()
                    .await
                    .context("the connection ended before the echo")?
                    .context("reading the echo")?;
                if echo != message {
                    bail!("message {i}: echo differs");
                }
            }
            ws.close(None).await.context("closing")?;
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .context("no end within 20 s")??;
        println!("ok {messages}");
        Ok(())
    })
}
