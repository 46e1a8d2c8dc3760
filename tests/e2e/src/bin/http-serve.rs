//! `http-serve`: a minimal HTTP server for benchmarks. Every request gets a 200
//! with a fixed body, over HTTP/1.1 keep-alive or HTTP/2 prior knowledge (h2c)
//! on the same port. It does as little as possible per request so that it is
//! never what a benchmark measures.
//!
//! Prints `ready <port>` on stdout once listening, then serves until killed.

use std::{
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_e2e::backend::speaks_h2;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Connections waiting to be accepted (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;
/// Streams a client may have open on one HTTP/2 connection: high enough that
/// the client's concurrency, not the server, is the limit.
const MAX_STREAMS: u32 = 65_536;

/// Answers every request with 200 and a fixed body; prints `ready <port>` once
/// listening.
#[derive(Parser, Debug)]
#[command(name = "http-serve")]
struct Args {
    /// Listens on 0.0.0.0:<port> and, when the host has IPv6, [::]:<port>.
    #[arg(long)]
    port: u16,
    /// Size of every response body.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.threads == 0 {
        eprintln!("http-serve: --threads must be at least 1");
        return ExitCode::from(2);
    }
    // One allocation for the life of the process; every response shares it.
    let body = Bytes::from_static(Vec::leak(vec![b'x'; args.body_bytes]));
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("http-serve: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listeners = match listen(args.port) {
            Ok(listeners) => listeners,
            Err(e) => {
                eprintln!("http-serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Whoever waits for `ready` may be gone; serving anyway is harmless.
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "ready {}", args.port).and_then(|()| stdout.flush());
        drop(stdout);
        let accepting: Vec<_> = listeners
            .into_iter()
            .map(|listener| tokio::spawn(accept_loop(listener, body.clone())))
            .collect();
        for task in accepting {
            let _ = task.await;
        }
        ExitCode::SUCCESS
    })
}

/// `0.0.0.0:port`, plus `[::]:port` (IPv6 only) unless the host has no IPv6.
fn listen(port: u16) -> Result<Vec<TcpListener>, String> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut listeners = vec![bind(v4).map_err(|e| format!("binding {v4}: {e}"))?];
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match bind(v6) {
        Ok(listener) => listeners.push(listener),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
            ) => {}
        Err(e) => return Err(format!("binding {v6}: {e}")),
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Its own socket next to the IPv4 one.
        socket.set_only_v6(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, body: Bytes) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(serve_connection(tcp, body.clone()));
            }
            // Out of descriptors or an aborted handshake: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Serves one connection until the client closes it; errors end it silently.
async fn serve_connection(tcp: TcpStream, body: Bytes) {
    // Answers go out as written: no Nagle delay behind the client's delayed ACK.
    let _ = tcp.set_nodelay(true);
    let Some(h2) = speaks_h2(&tcp).await else {
        return;
    };
    let service = service_fn(move |req| answer(req, body.clone()));
    let io = TokioIo::new(tcp);
    if h2 {
        let _ = http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(MAX_STREAMS)
            .serve_connection(io, service)
            .await;
    } else {
        let _ = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service)
            .await;
    }
}

/// Reads (and discards) the whole request body, then answers 200 with `body`.
async fn answer(
    req: Request<Incoming>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let mut incoming = req.into_body();
    while let Some(frame) = incoming.frame().await {
        frame?;
    }
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}
