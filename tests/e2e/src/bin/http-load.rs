//! `http-load`: the HTTP load client of the end-to-end tests. The tests spawn it
//! in a pod (netns + cgroup) and read one JSON summary from its stdout.
//!
//! It drives hyper's low-level client connections rather than a pooled client so
//! the number of TCP connections is exactly `--connections` (plus counted
//! re-dials), which is what balancing and failover tests need to reason about.
//! With `--rate` it runs open loop and measures latency from each request's
//! scheduled time, so a stalled server shows up as latency instead of silently
//! slowing the client down (no coordinated omission).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    error::Error as StdError,
    io,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Uri,
    body::Bytes,
    client::conn::{http1, http2},
    header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue},
    http::response::Parts,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{
    net::TcpStream,
    task::AbortHandle,
    time::{Instant, sleep_until, timeout_at},
};

/// Sends HTTP requests over a fixed number of connections and prints one JSON
/// summary on stdout.
#[derive(Parser, Debug)]
#[command(name = "http-load")]
struct Args {
    /// `http://<ip>:<port>/<path>`; the host must be an IP literal (`[v6]` too).
    #[arg(long)]
    url: String,
    /// Total requests to send.
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Client TCP connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests in flight at once (default: --connections). HTTP/1.1 caps it at
    /// --connections; with --http2 the workers share the connections.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Open loop at this many requests/s (all workers together); latency is then
    /// measured from each request's scheduled time.
    #[arg(long)]
    rate: Option<f64>,
    /// HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    http2: bool,
    #[arg(long, default_value = "GET")]
    method: String,
    /// `name:value`, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Send a body of this many bytes.
    #[arg(long)]
    body_bytes: Option<usize>,
    /// Responses are counted by the value of this response header (`-` if missing).
    #[arg(long, default_value = "x-served-by")]
    tally_header: String,
    /// Per-request deadline (connect included).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// What every request is made of, checked once up front.
struct Plan {
    addr: SocketAddr,
    /// Origin-form for HTTP/1.1 (with a Host header); absolute for HTTP/2, which
    /// takes `:scheme` and `:authority` from it.
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    tally_header: HeaderName,
    timeout: Duration,
    http2: bool,
    total: u64,
    rate: Option<f64>,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan, String> {
        let url: Uri = args.url.parse().map_err(|e| format!("--url: {e}"))?;
        if url.scheme_str() != Some("http") {
            return Err("--url: only http:// is supported".into());
        }
        let authority = url.authority().ok_or("--url: no host")?.clone();
        let host = authority.host();
        let ip: IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("--url: host `{host}` is not an IP literal"))?;
        let addr = SocketAddr::new(ip, authority.port_u16().unwrap_or(80));
        let path = url
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| "/".parse().expect("`/` is a path"));
        let uri = if args.http2 {
            Uri::builder()
                .scheme("http")
                .authority(authority.clone())
                .path_and_query(path)
                .build()
        } else {
            Uri::builder().path_and_query(path).build()
        }
        .map_err(|e| format!("--url: {e}"))?;

        let method: Method = args.method.parse().map_err(|e| format!("--method: {e}"))?;
        let mut headers = HeaderMap::new();
        for h in &args.headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("--header `{h}`: expected name:value"))?;
            let name: HeaderName = name
                .trim()
                .parse()
                .map_err(|e| format!("--header `{h}`: {e}"))?;
            let value: HeaderValue = value
                .trim()
                .parse()
                .map_err(|e| format!("--header `{h}`: {e}"))?;
            headers.append(name, value);
        }
        if !args.http2 && !headers.contains_key(HOST) {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
            headers.insert(HOST, host);
        }
        let tally_header: HeaderName = args
            .tally_header
            .parse()
            .map_err(|e| format!("--tally-header: {e}"))?;

        if args.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if args.concurrency == Some(0) {
            return Err("--concurrency must be at least 1".into());
        }
        if let Some(rate) = args.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err("--rate must be a positive number".into());
        }
        if args.timeout_ms == 0 {
            return Err("--timeout-ms must be at least 1".into());
        }
        Ok(Plan {
            addr,
            uri,
            method,
            headers,
            body: Bytes::from(vec![b'x'; args.body_bytes.unwrap_or(0)]),
            tally_header,
            timeout: Duration::from_millis(args.timeout_ms),
            http2: args.http2,
            total: args.requests,
            rate: args.rate,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A failed request: `kind` is what the summary counts, `detail` a sample message.
struct Failure {
    kind: String,
    detail: String,
}

impl Failure {
    fn new(kind: &str, detail: String) -> Failure {
        Failure {
            kind: kind.to_string(),
            detail,
        }
    }

    fn timeout(plan: &Plan) -> Failure {
        Failure::new("timeout", format!("no answer within {:?}", plan.timeout))
    }

    /// `closed` when the peer went away (reset, EOF mid-message, connection gone
    /// before the request was written), `other: <message>` for the rest.
    fn classify(err: &hyper::Error) -> Failure {
        let detail = chain(err);
        let mut closed = err.is_canceled() || err.is_incomplete_message() || err.is_closed();
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                closed |= matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::NotConnected
                );
            }
            source = e.source();
        }
        if closed {
            Failure::new("closed", detail)
        } else {
            Failure {
                kind: format!("other: {detail}"),
                detail,
            }
        }
    }
}

/// `err: source: source...`, skipping a source whose text its parent already shows.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Successful and re-done TCP connects, for the summary.
#[derive(Default)]
struct Dials {
    dials: AtomicU64,
    reconnects: AtomicU64,
}

impl Dials {
    /// A slot got a new connection; a re-dial if it had one before.
    fn record(&self, dialled_before: &mut bool) {
        self.dials.fetch_add(1, Ordering::Relaxed);
        if std::mem::replace(dialled_before, true) {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One TCP connect, bounded by the request's deadline. A connect that does not
/// finish in time is still a `connect` failure: no connection was ever made.
async fn connect(plan: &Plan, deadline: Instant) -> Result<TcpStream, Failure> {
    match timeout_at(deadline, TcpStream::connect(plan.addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(Failure::new(
            "connect",
            format!("connect {}: {e}", plan.addr),
        )),
        Err(_) => Err(Failure::new(
            "connect",
            format!(
                "connect {}: not established within {:?}",
                plan.addr, plan.timeout
            ),
        )),
    }
}

/// Sends the request on `send` and reads the whole response body.
async fn exchange<F>(send: F) -> Result<Parts, hyper::Error>
where
    F: Future<Output = Result<hyper::Response<hyper::body::Incoming>, hyper::Error>>,
{
    let (parts, body) = send.await?.into_parts();
    body.collect().await?;
    Ok(parts)
}

/// An HTTP/1.1 connection: one request at a time, owned by one worker at a time.
struct H1Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    task: AbortHandle,
}

impl Drop for H1Conn {
    /// A discarded connection may be mid-request (timeout): close it for real.
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct H1Slot {
    conn: Option<H1Conn>,
    dialled: bool,
}

async fn h1_request(plan: &Plan, slot: &mut H1Slot, dials: &Dials) -> Result<Parts, Failure> {
    let deadline = Instant::now() + plan.timeout;
    // A kept-alive connection the server closed while idle is re-dialled before
    // sending: nothing was lost, so it is not an error.
    if let Some(conn) = slot.conn.as_mut() {
        match timeout_at(deadline, conn.sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => slot.conn = None,
            Err(_) => {
                slot.conn = None;
                return Err(Failure::timeout(plan));
            }
        }
    }
    let conn = match slot.conn.as_mut() {
        Some(conn) => conn,
        None => {
            let tcp = connect(plan, deadline).await?;
            let (sender, connection) = http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| Failure::new("connect", format!("handshake: {}", chain(&e))))?;
            let task = tokio::spawn(connection).abort_handle();
            dials.record(&mut slot.dialled);
            slot.conn.insert(H1Conn { sender, task })
        }
    };
    let result = timeout_at(deadline, exchange(conn.sender.send_request(plan.request()))).await;
    match result {
        Ok(Ok(parts)) => {
            let closing = parts.headers.get_all(CONNECTION).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
            });
            if closing {
                slot.conn = None;
            }
            Ok(parts)
        }
        Ok(Err(e)) => {
            slot.conn = None;
            Err(Failure::classify(&e))
        }
        Err(_) => {
            slot.conn = None;
            Err(Failure::timeout(plan))
        }
    }
}

/// An HTTP/2 connection shared by several workers; dialled under the lock so
/// concurrent workers never open extra connections.
#[derive(Default)]
struct H2Slot {
    state: tokio::sync::Mutex<H2State>,
}

#[derive(Default)]
struct H2State {
    sender: Option<http2::SendRequest<Full<Bytes>>>,
    dialled: bool,
}

async fn h2_request(plan: &Plan, slot: &H2Slot, dials: &Dials) -> Result<Parts, Failure> {
    let deadline = Instant::now() + plan.timeout;
    let mut sender = {
        // Waiting here means waiting for another worker's connect.
        let mut state = timeout_at(deadline, slot.state.lock()).await.map_err(|_| {
            Failure::new(
                "connect",
                format!(
                    "connect {}: not established within {:?}",
                    plan.addr, plan.timeout
                ),
            )
        })?;
        if state.sender.as_ref().is_some_and(|s| s.is_closed()) {
            state.sender = None;
        }
        match &state.sender {
            Some(sender) => sender.clone(),
            None => {
                let tcp = connect(plan, deadline).await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| Failure::new("connect", format!("handshake: {}", chain(&e))))?;
                // Ends by itself when the connection does; streams of other
                // workers may still use it, so it is never aborted.
                tokio::spawn(connection);
                dials.record(&mut state.dialled);
                state.sender.insert(sender).clone()
            }
        }
    };
    let send = async {
        sender.ready().await?;
        exchange(sender.send_request(plan.request())).await
    };
    match timeout_at(deadline, send).await {
        Ok(Ok(parts)) => Ok(parts),
        Ok(Err(e)) => Err(Failure::classify(&e)),
        Err(_) => Err(Failure::timeout(plan)),
    }
}

enum Transport {
    /// Idle connections, first in first out so that with fewer workers than
    /// connections every connection still takes its turn.
    Http1(Mutex<VecDeque<H1Slot>>),
    /// Request `i` goes to connection `i % K`.
    Http2(Vec<H2Slot>),
}

enum Outcome {
    Answer {
        status: u16,
        tally: String,
        latency_us: u64,
    },
    Failed(Failure),
}

struct Shared {
    plan: Plan,
    transport: Transport,
    connections: usize,
    dials: Dials,
    next: AtomicU64,
    start: Instant,
}

async fn worker(shared: Arc<Shared>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.plan.total {
            return outcomes;
        }
        let began = match shared.plan.rate {
            Some(rate) => {
                let at = shared.start + Duration::from_secs_f64(i as f64 / rate);
                sleep_until(at).await;
                at
            }
            None => Instant::now(),
        };
        let result = match &shared.transport {
            Transport::Http1(idle) => {
                let mut slot = idle
                    .lock()
                    .expect("idle connections")
                    .pop_front()
                    .expect("HTTP/1.1 workers never outnumber connections");
                let result = h1_request(&shared.plan, &mut slot, &shared.dials).await;
                idle.lock().expect("idle connections").push_back(slot);
                result
            }
            Transport::Http2(slots) => {
                let slot = &slots[(i % slots.len() as u64) as usize];
                h2_request(&shared.plan, slot, &shared.dials).await
            }
        };
        let latency_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        outcomes.push(match result {
            Ok(parts) => Outcome::Answer {
                status: parts.status.as_u16(),
                tally: parts
                    .headers
                    .get(&shared.plan.tally_header)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_else(|| "-".to_string()),
                latency_us,
            },
            Err(failure) => Outcome::Failed(failure),
        });
    }
}

/// Nearest-rank percentiles of `sorted` (microseconds); zeros when empty.
fn percentiles(sorted: &[u64], full: bool) -> Value {
    let n = sorted.len() as u64;
    // `q` in parts per million.
    let at = |q: u64| -> u64 {
        if n == 0 {
            return 0;
        }
        let rank = (n * q).div_ceil(1_000_000).max(1);
        sorted[(rank - 1) as usize]
    };
    let max = sorted.last().copied().unwrap_or(0);
    if !full {
        return json!({"count": n, "p50": at(500_000), "p99": at(990_000), "max": max});
    }
    let mean = if n == 0 {
        0
    } else {
        sorted.iter().map(|&v| u128::from(v)).sum::<u128>() / u128::from(n)
    };
    json!({
        "count": n,
        "p50": at(500_000),
        "p90": at(900_000),
        "p99": at(990_000),
        "p999": at(999_000),
        "max": max,
        "mean": mean as u64,
    })
}

fn summary(
    shared: &Shared,
    outcomes: Vec<Outcome>,
    concurrency: usize,
    elapsed: Duration,
) -> Value {
    const SAMPLES: usize = 5;
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut error_kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: BTreeSet<String> = BTreeSet::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut tally_latencies: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Answer {
                status,
                tally: by,
                latency_us,
            } => {
                if (200..300).contains(&status) {
                    ok += 1;
                }
                *statuses.entry(status.to_string()).or_default() += 1;
                *tally.entry(by.clone()).or_default() += 1;
                latencies.push(latency_us);
                tally_latencies.entry(by).or_default().push(latency_us);
            }
            Outcome::Failed(failure) => {
                errors += 1;
                *error_kinds.entry(failure.kind).or_default() += 1;
                if samples.len() < SAMPLES {
                    samples.insert(failure.detail);
                }
            }
        }
    }
    latencies.sort_unstable();
    let tally_latency: BTreeMap<String, Value> = tally_latencies
        .into_iter()
        .map(|(by, mut l)| {
            l.sort_unstable();
            (by, percentiles(&l, false))
        })
        .collect();
    json!({
        "requests": shared.plan.total,
        "ok": ok,
        "errors": errors,
        "error_kinds": error_kinds,
        "error_samples": samples,
        "statuses": statuses,
        "tally": tally,
        "latency_us": percentiles(&latencies, true),
        "tally_latency_us": tally_latency,
        "connections": shared.connections,
        "concurrency": concurrency,
        "http2": shared.plan.http2,
        "rate": shared.plan.rate,
        "dials": shared.dials.dials.load(Ordering::Relaxed),
        "reconnects": shared.dials.reconnects.load(Ordering::Relaxed),
        "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match Plan::from_args(&args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("http-load: {e}");
            return ExitCode::from(2);
        }
    };
    let mut concurrency = args.concurrency.unwrap_or(args.connections);
    if !plan.http2 && concurrency > args.connections {
        eprintln!(
            "http-load: HTTP/1.1 carries one request per connection: concurrency {concurrency} capped at {}",
            args.connections
        );
        concurrency = args.connections;
    }
    let transport = if plan.http2 {
        Transport::Http2((0..args.connections).map(|_| H2Slot::default()).collect())
    } else {
        Transport::Http1(Mutex::new(
            (0..args.connections).map(|_| H1Slot::default()).collect(),
        ))
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("http-load: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let summary = runtime.block_on(async move {
        let shared = Arc::new(Shared {
            plan,
            transport,
            connections: args.connections,
            dials: Dials::default(),
            next: AtomicU64::new(0),
            start: Instant::now(),
        });
        let workers: Vec<_> = (0..concurrency)
            .map(|_| tokio::spawn(worker(shared.clone())))
            .collect();
        let mut outcomes = Vec::new();
        for w in workers {
            match w.await {
                Ok(mut o) => outcomes.append(&mut o),
                Err(e) => eprintln!("http-load: a worker failed: {e}"),
            }
        }
        let elapsed = shared.start.elapsed();
        summary(&shared, outcomes, concurrency, elapsed)
    });
    // Connection tasks may still be winding down; they do not matter any more.
    runtime.shutdown_background();
    println!("{summary}");
    ExitCode::SUCCESS
}
