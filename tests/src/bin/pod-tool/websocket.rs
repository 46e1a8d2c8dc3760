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

/// An HTTP/2 server that accepts extended CONNECT (RFC 8441, `:protocol
/// websocket`) and then echoes the stream's bytes; anything else gets 404.
/// Prints `ready` once listening.
pub fn h2_tunnel_server(port: u16) -> Result<()> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
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
                let service = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let extended = req.method() == Method::CONNECT
                            && req.extensions().get::<hyper::ext::Protocol>().is_some();
                        let mut response = Response::new(Empty::<Bytes>::new());
                        if !extended {
                            *response.status_mut() = StatusCode::NOT_FOUND;
                            return Ok::<_, std::convert::Infallible>(response);
                        }
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = upgrade.await {
                                let (mut read, mut write) =
                                    tokio::io::split(TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut read, &mut write).await;
                            }
                        });
                        Ok(response)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// Opens an extended CONNECT (`:protocol websocket`) to `path` over HTTP/2
/// (prior knowledge), then sends `messages` messages and checks each echo;
/// prints `ok <messages>`. A refusal fails with its status.
pub fn h2_tunnel_client(
    host: std::net::IpAddr,
    port: u16,
    path: &str,
    messages: u32,
) -> Result<()> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper::{Method, Request};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    current_thread()?.block_on(async move {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((host, port))
                .await
                .with_context(|| format!("connecting to {host}:{port}"))?;
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .context("HTTP/2 handshake")?;
            tokio::spawn(connection);
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("http://{}{path}", SocketAddr::new(host, port)))
                .body(Empty::<Bytes>::new())?;
            request
                .extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
            let mut response = sender.send_request(request).await.context("CONNECT")?;
            if !response.status().is_success() {
                bail!("extended CONNECT answered {}", response.status());
            }
            let upgraded = hyper::upgrade::on(&mut response)
                .await
                .context("the tunnel")?;
            let mut stream = TokioIo::new(upgraded);
            for i in 0..messages {
                let message = format!("message {i} {}\n", "x".repeat(i as usize * 100));
                stream.write_all(message.as_bytes()).await?;
                let mut echo = vec![0u8; message.len()];
                stream
                    .read_exact(&mut echo)
                    .await
                    .with_context(|| format!("the echo of message {i}"))?;
                if echo != message.as_bytes() {
                    bail!("message {i}: echo differs");
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .context("no end within 20 s")??;
        println!("ok {messages}");
        Ok(())
    })
}
