//! `http-load`: the HTTP load client of the end-to-end tests. The tests spawn it
//! in a pod (netns + cgroup) and read one JSON summary from its stdout.
//!
//! It drives hyper's low-level client connections rather than a pooled client so
//! the number of TCP connections is exactly `--connections` (plus counted
//! re-dials), which is what balancing and failover tests need to reason about.
//! With `--rate` it runs open loop and measures latency from each request's
//! scheduled time, so a stalled server shows up as latency instead of silently
//! slowing the client down (no coordinated omission). The schedule is kept by a
//! thread of its own with a fine-grained sleep: tokio's timers tick in whole
//! milliseconds, which at 1000 req/s would add up to a millisecond of timer
//! lateness to every latency.
//!
//! With `--new-connection-per-request` every request has a TCP connection of its
//! own (connect, one request, the whole response, close): connection churn.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    error::Error as StdError,
    io::{self, Write},
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
    sync::Semaphore,
    task::AbortHandle,
    time::{Instant, timeout_at},
};

/// Sends HTTP requests over a fixed number of connections and prints one JSON
/// summary on stdout.
#[derive(Parser, Debug)]
#[command(name = "http-load")]
struct Args {
    /// `http://<ip>:<port>/<path>`; the host must be an IP literal (`[v6]` too).
    #[arg(long)]
    url: String,
    /// Total requests to send (ignored with --duration-ms).
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Run for this long instead: closed loop, no request starts after it; with
    /// --rate, the requests are rate × duration.
    #[arg(long)]
    duration_ms: Option<u64>,
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
    /// Every request on a new TCP connection: connect, one request, the whole
    /// response, close (HTTP/1.1 sends `connection: close`). --connections is
    /// then unused: --concurrency connections are open at most. Latency
    /// includes the connect.
    #[arg(long)]
    new_connection_per_request: bool,
    #[arg(long, default_value = "GET")]
    method: String,
    /// `name:value`, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// `name:prefix:n`: each request gets header `name: <prefix><k>`, k
    /// cycling through 0..n (keys for consistent hashing).
    #[arg(long)]
    header_cycle: Option<String>,
    /// Send a body of this many bytes.
    #[arg(long)]
    body_bytes: Option<usize>,
    /// Responses are counted by the value of this response header (`-` if missing).
    #[arg(long, default_value = "x-served-by")]
    tally_header: String,
    /// Per-request deadline (connect included).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Connect through this SOCKS5 proxy (a proxy's client side that does not
    /// capture by itself, as ztunnel's in the benchmark).
    #[arg(long)]
    socks5: Option<SocketAddr>,
}

/// What every request is made of, checked once up front.
struct Plan {
    addr: SocketAddr,
    /// The SOCKS5 proxy to connect through, if any.
    socks5: Option<SocketAddr>,
    /// Origin-form for HTTP/1.1 (with a Host header); absolute for HTTP/2, which
    /// takes `:scheme` and `:authority` from it.
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    tally_header: HeaderName,
    /// `--header-cycle`: the header, the value's prefix, how many values.
    cycle: Option<(HeaderName, String, u64)>,
    /// Requests made so far (for `cycle`).
    issued: std::sync::atomic::AtomicU64,
    timeout: Duration,
    http2: bool,
    /// Each request on a connection of its own.
    fresh: bool,
    /// Requests to attempt at most; `u64::MAX` when a closed loop runs for
    /// `duration`.
    total: u64,
    rate: Option<f64>,
    duration: Option<Duration>,
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
        // A client that will not reuse a connection says so (RFC 9112 9.6); the
        // server then closes it too, right after its answer.
        if args.new_connection_per_request && !args.http2 && !headers.contains_key(CONNECTION) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let tally_header: HeaderName = args
            .tally_header
            .parse()
            .map_err(|e| format!("--tally-header: {e}"))?;
        let cycle = match &args.header_cycle {
            None => None,
            Some(spec) => {
                let mut parts = spec.splitn(3, ':');
                let (Some(name), Some(prefix), Some(n)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!("--header-cycle {spec:?}: expected name:prefix:n"));
                };
                let name: HeaderName = name
                    .parse()
                    .map_err(|e| format!("--header-cycle {spec:?}: {e}"))?;
                let n: u64 = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--header-cycle {spec:?}: n must be a positive number")
                })?;
                Some((name, prefix.to_string(), n))
            }
        };

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
        if args.duration_ms == Some(0) {
            return Err("--duration-ms must be at least 1".into());
        }
        let duration = args.duration_ms.map(Duration::from_millis);
        let total = match (duration, args.rate) {
            (None, _) => args.requests,
            (Some(duration), Some(rate)) => (rate * duration.as_secs_f64()).round() as u64,
            (Some(_), None) => u64::MAX,
        };
        Ok(Plan {
            addr,
            socks5: args.socks5,
            uri,
            method,
            headers,
            body: Bytes::from(vec![b'x'; args.body_bytes.unwrap_or(0)]),
            tally_header,
            cycle,
            issued: Default::default(),
            timeout: Duration::from_millis(args.timeout_ms),
            http2: args.http2,
            fresh: args.new_connection_per_request,
            total,
            rate: args.rate,
            duration,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        if let Some((name, prefix, n)) = &self.cycle {
            let k = self
                .issued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % n;
            if let Ok(value) = HeaderValue::from_str(&format!("{prefix}{k}")) {
                req.headers_mut().insert(name.clone(), value);
            }
        }
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
    let dial = async {
        match plan.socks5 {
            None => TcpStream::connect(plan.addr).await,
            Some(proxy) => tokio_socks::tcp::Socks5Stream::connect(proxy, plan.addr)
                .await
                .map(tokio_socks::tcp::Socks5Stream::into_inner)
                .map_err(std::io::Error::other),
        }
    };
    match timeout_at(deadline, dial).await {
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

/// One request on a connection of its own: connect, send, read the whole
/// response, close. The connection is driven by this task, so it is closed when
/// this returns.
async fn fresh_request(plan: &Plan, dials: &Dials) -> Result<Parts, Failure> {
    let deadline = Instant::now() + plan.timeout;
    let tcp = connect(plan, deadline).await?;
    let io = TokioIo::new(tcp);
    let failed = |e: hyper::Error| Failure::new("connect", format!("handshake: {}", chain(&e)));
    let result = if plan.http2 {
        let handshake = http2::Builder::new(TokioExecutor::new()).handshake(io);
        let (mut sender, connection) = timeout_at(deadline, handshake)
            .await
            .map_err(|_| Failure::timeout(plan))?
            .map_err(failed)?;
        dials.dials.fetch_add(1, Ordering::Relaxed);
        let response = sender.send_request(plan.request());
        // The only request: the connection winds down once it is answered.
        drop(sender);
        timeout_at(deadline, drive(exchange(response), connection)).await
    } else {
        let (mut sender, connection) = http1::handshake(io).await.map_err(failed)?;
        dials.dials.fetch_add(1, Ordering::Relaxed);
        let response = sender.send_request(plan.request());
        drop(sender);
        timeout_at(deadline, drive(exchange(response), connection)).await
    };
    match result {
        Ok(Ok(parts)) => Ok(parts),
        Ok(Err(e)) => Err(Failure::classify(&e)),
        Err(_) => Err(Failure::timeout(plan)),
    }
}

/// Polls `exchange` and the `connection` carrying it until the exchange is
/// done. The connection may finish first (the server closed after its answer)
/// while the answer is still to be picked up, so it is not what ends this.
async fn drive<X, C>(exchange: X, connection: C) -> Result<Parts, hyper::Error>
where
    X: Future<Output = Result<Parts, hyper::Error>>,
    C: Future,
{
    tokio::pin!(exchange, connection);
    let mut connection_done = false;
    loop {
        tokio::select! {
            biased;
            result = &mut exchange => return result,
            _ = &mut connection, if !connection_done => connection_done = true,
        }
    }
}

enum Transport {
    /// Idle connections, first in first out so that with fewer workers than
    /// connections every connection still takes its turn.
    Http1(Mutex<VecDeque<H1Slot>>),
    /// Request `i` goes to connection `i % K`.
    Http2(Vec<H2Slot>),
    /// A new connection per request.
    Fresh,
}

enum Outcome {
    Answer {
        status: u16,
        /// The tally header's value, shared by all answers with that value.
        tally: Arc<str>,
        latency_us: u64,
    },
    Failed(Failure),
}

struct Shared {
    plan: Plan,
    transport: Transport,
    connections: usize,
    dials: Dials,
    /// The next request's index; past `plan.total` once the run is over.
    next: AtomicU64,
    start: Instant,
    /// With `--rate`: one permit per request that is due, from [`pace`].
    due: Option<Arc<Semaphore>>,
}

/// When request `i` is due after the start at `rate` requests/s.
fn scheduled(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// The open loop's clock, on a thread of its own: releases a permit on `due`
/// as each of the `total` requests falls due, then one per worker so each sees
/// the end. Behind schedule (a busy machine), it releases every overdue
/// request at once: their latency is counted from when they were due.
fn pace(start: std::time::Instant, rate: f64, total: u64, workers: usize, due: &Semaphore) {
    // Sleeps end within microseconds of their deadline instead of the default
    // 50 us slack.
    let _ = nix::sys::prctl::set_timerslack(1);
    let mut next = 0;
    while next < total {
        let now = std::time::Instant::now();
        let at = start + scheduled(next, rate);
        if at > now {
            std::thread::sleep(at - now);
            continue;
        }
        let mut ready = 0;
        while next < total && start + scheduled(next, rate) <= now {
            ready += 1;
            next += 1;
        }
        due.add_permits(ready);
    }
    due.add_permits(workers);
}

async fn worker(shared: Arc<Shared>) -> Vec<Outcome> {
    let end = shared.plan.duration.map(|d| shared.start + d);
    // Tally values seen so far, so that answers share one copy of each.
    let mut tallies: HashMap<Box<[u8]>, Arc<str>> = HashMap::new();
    let mut outcomes = Vec::new();
    loop {
        match &shared.due {
            Some(due) => match due.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return outcomes,
            },
            None => {
                if end.is_some_and(|end| Instant::now() >= end) {
                    return outcomes;
                }
            }
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.plan.total {
            return outcomes;
        }
        let began = match shared.plan.rate {
            // Due now or a moment ago: a permit is released once it is.
            Some(rate) => shared.start + scheduled(i, rate),
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
            Transport::Fresh => fresh_request(&shared.plan, &shared.dials).await,
        };
        let latency_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        outcomes.push(match result {
            Ok(parts) => {
                let value = parts
                    .headers
                    .get(&shared.plan.tally_header)
                    .map_or(&b"-"[..], |v| v.as_bytes());
                let tally = match tallies.get(value) {
                    Some(tally) => tally.clone(),
                    None => {
                        let tally: Arc<str> = String::from_utf8_lossy(value).into();
                        tallies.insert(value.into(), tally.clone());
                        tally
                    }
                };
                Outcome::Answer {
                    status: parts.status.as_u16(),
                    tally,
                    latency_us,
                }
            }
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
                *tally.entry(by.to_string()).or_default() += 1;
                latencies.push(latency_us);
                tally_latencies
                    .entry(by.to_string())
                    .or_default()
                    .push(latency_us);
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
    // Every answer, whatever its status, per second of the run.
    let rps = if elapsed.is_zero() {
        0.0
    } else {
        (latencies.len() as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0
    };
    let tally_latency: BTreeMap<String, Value> = tally_latencies
        .into_iter()
        .map(|(by, mut l)| {
            l.sort_unstable();
            (by, percentiles(&l, false))
        })
        .collect();
    // Requests that were started: all of them unless a duration cut the run.
    let requests = shared.next.load(Ordering::Relaxed).min(shared.plan.total);
    json!({
        "requests": requests,
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
        "rps": rps,
        "duration_ms": shared.plan.duration.map(|d| d.as_millis() as u64),
        "new_connection_per_request": shared.plan.fresh,
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
    if !plan.http2 && !plan.fresh && concurrency > args.connections {
        eprintln!(
            "http-load: HTTP/1.1 carries one request per connection: concurrency {concurrency} capped at {}",
            args.connections
        );
        concurrency = args.connections;
    }
    // Fresh connections: at most one per worker is open at a time.
    let connections = if plan.fresh {
        concurrency
    } else {
        args.connections
    };
    let transport = if plan.fresh {
        Transport::Fresh
    } else if plan.http2 {
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
        let start = Instant::now();
        let due = plan.rate.map(|_| Arc::new(Semaphore::new(0)));
        if let (Some(rate), Some(due)) = (plan.rate, &due) {
            let (total, due) = (plan.total, due.clone());
            let spawned = std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pace(start.into_std(), rate, total, concurrency, &due));
            if let Err(e) = spawned {
                eprintln!("http-load: starting the pacer thread: {e}");
                return None;
            }
        }
        let shared = Arc::new(Shared {
            plan,
            transport,
            connections,
            dials: Dials::default(),
            next: AtomicU64::new(0),
            start,
            due,
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
        Some(summary(&shared, outcomes, concurrency, elapsed))
    });
    // Connection tasks may still be winding down; they do not matter any more.
    runtime.shutdown_background();
    let Some(summary) = summary else {
        return ExitCode::FAILURE;
    };
    // Not `println!`: a reader that went away must not make this panic.
    let mut stdout = io::stdout().lock();
    match writeln!(stdout, "{summary}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
