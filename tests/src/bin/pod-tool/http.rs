//! HTTP/1.1 (hyper): a keep-alive server, and a keep-alive client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::common::{current_thread, listen, runtime};

/// `http-server`: HTTP/1.1 with keep-alive, a task per connection.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Where to listen, e.g. `0.0.0.0:8080`.
    listen: SocketAddr,
    /// Answer every request with 200 and this body (default: `ok <method>
    /// <path>`, the path as the request line had it, query included).
    #[arg(long, conflicts_with = "files")]
    body: Option<String>,
    /// Serve the files of this directory instead (404 for a missing one).
    #[arg(long)]
    files: Option<PathBuf>,
}

/// What the server answers to `req`.
async fn answer(
    req: Request<Incoming>,
    args: Arc<ServerArgs>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_string());
    // The body is read (and dropped) before answering, so that the
    // connection stays usable.
    let _ = req.into_body().collect().await;
    let (status, body) = match (&args.body, &args.files) {
        (Some(body), _) => (StatusCode::OK, Bytes::from(body.clone())),
        (None, Some(dir)) => match file_in(dir, &path).and_then(|f| std::fs::read(f).ok()) {
            Some(data) => (StatusCode::OK, Bytes::from(data)),
            None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        },
        (None, None) => (StatusCode::OK, Bytes::from(format!("ok {method} {path}"))),
    };
    // HEAD: the length, no body (hyper's HTTP/2 server would send it).
    let length = body.len();
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// The file `path` names under `dir`, if it has no `..` or other tricks.
fn file_in(dir: &Path, path: &str) -> Option<PathBuf> {
    let path = Path::new(path.split('?').next()?.trim_start_matches('/'));
    path.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| dir.join(path))
}

/// Serves until killed; prints `ready` once listening.
pub fn server(args: ServerArgs) -> Result<()> {
    let args = Arc::new(args);
    runtime(2)?.block_on(async move {
        let listener = listen(args.listen, false)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("ready");
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let args = args.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, args.clone()));
                // HTTP/1.1, or HTTP/2 when the client starts with its preface.
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            });
        }
    })
}

/// `http-client`: requests over keep-alive connections.
#[derive(Args, Debug)]
pub struct ClientArgs {
    host: IpAddr,
    port: u16,
    /// Request paths, used in turn; `{i}` becomes the request's number.
    #[arg(required = true)]
    paths: Vec<String>,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Requests to make (default: one per path).
    #[arg(long)]
    count: Option<usize>,
    /// Spread them over this many connections used at the same time
    /// (request i on connection i mod n).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Connect and request timeout.
    #[arg(long, default_value_t = 10.0)]
    timeout_secs: f64,
    /// Instead: on one connection, a request (to the first path) every
    /// `--every-ms` for this long, counting outcomes.
    #[arg(long)]
    for_secs: Option<f64>,
    #[arg(long, default_value_t = 5)]
    every_ms: u64,
    /// Wait this long between the requests of a connection (a keep-alive
    /// connection left idle, then used again).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

pub(crate) type Sender = SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 client of one server (also the soak's `load`).
pub(crate) struct Client {
    pub(crate) host: IpAddr,
    pub(crate) port: u16,
    pub(crate) method: Method,
    pub(crate) timeout: Duration,
}

impl Client {
    pub(crate) async fn connect(&self) -> Result<Sender> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect((self.host, self.port)))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connect to {}", SocketAddr::new(self.host, self.port)))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request on `sender`'s connection: status and body. A connection
    /// that closed since its last response is an error here.
    pub(crate) async fn request(&self, sender: &mut Sender, path: &str) -> Result<(u16, Bytes)> {
        // As Python's http.client: the port only when it is not 80.
        let host = match (self.host, self.port) {
            (IpAddr::V4(ip), 80) => ip.to_string(),
            (IpAddr::V6(ip), 80) => format!("[{ip}]"),
            (ip, port) => SocketAddr::new(ip, port).to_string(),
        };
        let req = Request::builder()
            .method(self.method.clone())
            .uri(path)
            .header(HOST, host)
            .body(Empty::new())?;
        let exchange = async {
            sender
                .ready()
                .await
                .context("the connection is no longer usable")?;
            let response = sender.send_request(req).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .with_context(|| format!("no answer within {:?}", self.timeout))?
            .with_context(|| format!("{} {path}", self.method))
    }
}

/// Prints `<status> <body>` per request (body trimmed, newlines as spaces),
/// or with `--for-secs`: `started` after the first response, `ERROR <why>`
/// per failure (then a new connection), and `result <200s> <403s> <others>
/// <status changes> <errors>` at the end.
pub fn client(args: ClientArgs) -> Result<()> {
    let client = Arc::new(Client {
        host: args.host,
        port: args.port,
        method: args.method.parse().context("--method")?,
        timeout: Duration::from_secs_f64(args.timeout_secs),
    });
    current_thread()?.block_on(async move {
        if let Some(secs) = args.for_secs {
            return poll(&client, &args.paths[0], secs, args.every_ms).await;
        }
        let count = args.count.unwrap_or(args.paths.len());
        let conns = args.connections.max(1);
        let pause = Duration::from_millis(args.pause_ms);
        let paths = Arc::new(args.paths);
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..conns.min(count) {
            let (client, paths) = (client.clone(), paths.clone());
            tasks.spawn(async move {
                let mut sender = client.connect().await?;
                for i in (k..count).step_by(conns) {
                    if i >= conns {
                        tokio::time::sleep(pause).await;
                    }
                    let path = paths[i % paths.len()].replace("{i}", &i.to_string());
                    let (status, body) = client.request(&mut sender, &path).await?;
                    let body = String::from_utf8_lossy(&body).trim().replace('\n', " ");
                    println!("{status} {body}");
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    })
}

async fn poll(client: &Client, path: &str, secs: f64, every_ms: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut counts: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut changes, mut errors, mut last) = (0u64, 0u64, None);
    let mut sender = None;
    while Instant::now() < end {
        let outcome = async {
            let s = match &mut sender {
                Some(s) => s,
                None => sender.insert(client.connect().await?),
            };
            client.request(s, path).await
        }
        .await;
        match outcome {
            Ok((status, _)) => {
                *counts.entry(status).or_default() += 1;
                if last.is_some_and(|l| l != status) {
                    changes += 1;
                }
                last = Some(status);
                if counts.values().sum::<u64>() == 1 {
                    println!("started");
                }
            }
            Err(e) => {
                errors += 1;
                println!("ERROR {e:#}");
                sender = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
    let count = |code| counts.get(&code).copied().unwrap_or(0);
    let other: u64 = counts
        .iter()
        .filter(|(code, _)| !matches!(code, 200 | 403))
        .map(|(_, n)| n)
        .sum();
    println!(
        "result {} {} {other} {changes} {errors}",
        count(200),
        count(403)
    );
    if counts.is_empty() && errors == 0 {
        bail!("no request was made in {secs} s");
    }
    Ok(())
}
