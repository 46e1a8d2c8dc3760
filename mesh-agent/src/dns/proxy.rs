//! The DNS proxy's two transports: a pod's UDP socket (one task per pod and
//! family, a task per forwarded query) and a captured TCP connection to port
//! 53 (length-prefixed messages, RFC 1035 4.2.2).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::{
    Handled,
    answer::{self, Decision},
};
use crate::proxy::{PodHandle, ProxyContext};

/// How long the pod's resolver has to answer a forwarded query. Resolvers'
/// own clients retry after 5 s (glibc) or sooner; an answer later than that
/// is of no use to them.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest DNS message (over TCP; UDP datagrams are smaller).
const MAX_MESSAGE: usize = 65_535;

/// Forwarded UDP queries of one pod waiting for their answer at once; more
/// are dropped (and counted `failed`), as a loaded resolver drops them: each
/// holds a socket for up to [`FORWARD_TIMEOUT`].
pub const FORWARDS_IN_FLIGHT: usize = 256;

/// Serves `pod`'s DNS proxy socket until the task is aborted (the pod is
/// released or the agent stops).
pub async fn serve_udp(socket: UdpSocket, ctx: Arc<ProxyContext>, pod: Arc<PodHandle>) {
    let socket = Arc::new(socket);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                // ICMP errors of earlier sends surface here; the socket is fine.
                tracing::debug!(pod = %pod.key, error = %err, "DNS proxy receive");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        match answer::decide(&query, &ctx.snapshot().service_names) {
            Decision::Answer(reply) => {
                ctx.dns.count(Handled::Local);
                let _ = socket.send_to(&reply, client).await;
            }
            Decision::Drop => {}
            Decision::Forward => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    ctx.dns.count(Handled::Failed);
                    tracing::debug!(pod = %pod.key, "DNS query dropped: {FORWARDS_IN_FLIGHT} forwarded queries in flight");
                    continue;
                };
                let (socket, ctx, pod) = (socket.clone(), ctx.clone(), pod.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match forward_udp(&ctx, &pod, &query).await {
                        Ok(reply) => {
                            ctx.dns.count(Handled::Forwarded);
                            let _ = socket.send_to(&reply, client).await;
                        }
                        Err(err) => {
                            ctx.dns.count(Handled::Failed);
                            tracing::debug!(pod = %pod.key, name = ?answer::question_name(&query), error = format!("{err:#}"), "DNS query not answered by the pod's resolver");
                        }
                    }
                });
            }
        }
    }
}

/// Sends `query` to the server the pod addressed, from the pod's namespace,
/// and returns its answer (which must carry the query's ID).
async fn forward_udp(ctx: &ProxyContext, pod: &PodHandle, query: &[u8]) -> Result<Vec<u8>> {
    let resolver = ctx
        .dns
        .resolver(pod.netns_cookie)
        .context("no DNS server recorded for the pod")?;
    let socket = pod.netns.udp_socket(resolver.is_ipv6())?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .with_context(|| format!("{resolver} did not answer in {FORWARD_TIMEOUT:?}"))??;
        // Anything else is not the answer to this query: wait on.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Serves a captured TCP connection of `pod` to `dst`:53: each query is
/// answered here or sent on to `dst` over one connection from the pod's
/// namespace, made at the first query that needs it. Ends when the client
/// closes (or sends something that is not DNS); an error is the reason.
pub async fn serve_tcp(
    ctx: &ProxyContext,
    pod: &PodHandle,
    mut downstream: TcpStream,
    dst: SocketAddr,
) -> Result<()> {
    let mut upstream: Option<TcpStream> = None;
    while let Some(query) = read_message(&mut downstream).await? {
        let reply = match answer::decide(&query, &ctx.snapshot().service_names) {
            Decision::Answer(reply) => {
                ctx.dns.count(Handled::Local);
                reply
            }
            Decision::Drop => bail!("not a DNS message"),
            Decision::Forward => {
                let connection = match &mut upstream {
                    Some(connection) => connection,
                    None => upstream.insert(ctx.dial.from_pod(pod, dst).await?),
                };
                let forwarded = tokio::time::timeout(FORWARD_TIMEOUT, async {
                    write_message(connection, &query).await?;
                    read_message(connection).await
                })
                .await;
                match forwarded {
                    Ok(Ok(Some(reply))) => {
                        ctx.dns.count(Handled::Forwarded);
                        reply
                    }
                    Ok(Ok(None)) => {
                        ctx.dns.count(Handled::Failed);
                        bail!("{dst} closed the connection")
                    }
                    Ok(Err(err)) => {
                        ctx.dns.count(Handled::Failed);
                        return Err(err.context(format!("forwarding to {dst}")));
                    }
                    Err(_) => {
                        ctx.dns.count(Handled::Failed);
                        bail!("{dst} did not answer in {FORWARD_TIMEOUT:?}")
                    }
                }
            }
        };
        write_message(&mut downstream, &reply).await?;
    }
    Ok(())
}

/// One length-prefixed message; None at a clean end of stream.
async fn read_message(stream: &mut TcpStream) -> Result<Option<Vec<u8>>> {
    let mut length = [0u8; 2];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_message(stream: &mut TcpStream, message: &[u8]) -> Result<()> {
    let length = u16::try_from(message.len()).context("a DNS message over 64 KiB")?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await?;
    Ok(())
}
