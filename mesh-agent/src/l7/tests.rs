//! Tests of the L7 relay over real sockets on 127.0.0.1, with real hyper
//! clients and servers (and raw bytes where the shape of the bytes matters).

use parking_lot::Mutex;
use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::http::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::detect::{Classification, classify};
use super::*;

/// Generous bound on anything that should happen promptly: only reached when
/// a test fails.
pub(super) const BOUND: Duration = Duration::from_secs(10);

/// Denies `/admin` and everything below it.
struct DenyAdmin;

impl Authorizer for DenyAdmin {
    fn authorize(&self, request: &RequestInfo<'_>) -> Verdict {
        if request.path == "/admin" || request.path.starts_with("/admin/") {
            Verdict::Deny {
                reason: "admin is off limits".to_owned(),
            }
        } else {
            Verdict::Allow
        }
    }
}

/// A small normaliser in the spirit of the agent's: decodes percent-encoded
/// unreserved characters, rejects encoded `/` and `\`, merges slashes and
/// resolves dot segments.
fn test_normalize(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("truncated escape")?;
            let value = u8::from_str_radix(hex, 16).map_err(|_| "bad escape")?;
            if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                decoded.push(char::from(value));
            } else if value == b'/' || value == b'\\' {
                return Err("encoded slash".to_owned());
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            decoded.push(char::from(bytes[i]));
            i += 1;
        }
    }
    if !decoded.starts_with('/') {
        return Err("not an absolute path".to_owned());
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut path = format!("/{}", segments.join("/"));
    let directory = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if directory && path != "/" {
        path.push('/');
    }
    Ok(path)
}

#[test]
fn test_normalizer_works() {
    assert_eq!(test_normalize("//admin").unwrap(), "/admin");
    assert_eq!(test_normalize("/a/../admin").unwrap(), "/admin");
    assert_eq!(test_normalize("/%61dmin").unwrap(), "/admin");
    assert_eq!(test_normalize("/./admin").unwrap(), "/admin");
    assert_eq!(test_normalize("/x/%2e%2e/admin").unwrap(), "/admin");
    assert_eq!(test_normalize("/a/b/").unwrap(), "/a/b/");
    assert_eq!(test_normalize("/a%20b").unwrap(), "/a%20b");
    assert!(test_normalize("/admin%2Fx").is_err());
    assert!(test_normalize("/admin%2fx").is_err());
    assert!(test_normalize("/a%5Cb").is_err());
}

#[test]
fn classify_first_bytes() {
    use Classification::*;
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Http(Protocol::Http1));
    assert_eq!(classify(b"M-SEARCH "), Http(Protocol::Http1));
    assert_eq!(classify(b"G"), NeedMore);
    assert_eq!(classify(b"GET"), NeedMore);
    assert_eq!(classify(detect::H2_PREFACE), Http(Protocol::Http2));
    assert_eq!(classify(b"PRI "), NeedMore);
    assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), NeedMore);
    assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Http(Protocol::Http1));
    assert_eq!(classify(b"\x16\x03\x01\x02\x00\x01"), NotHttp);
    assert_eq!(classify(b" GET /"), NotHttp);
    assert_eq!(classify(b"GE\0T /"), NotHttp);
    assert_eq!(classify(b"GET\r\n"), NotHttp);
    assert_eq!(classify(&[b'A'; 40]), NotHttp);
    assert_eq!(classify(&[b'A'; 20]), NeedMore);
}

// ---------------------------------------------------------------------------
// Upstream applications.

/// A request as the upstream application saw it.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    method: String,
    pub(super) target: String,
    headers: HeaderMap,
}

pub(super) struct UpstreamApp {
    pub(super) addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl UpstreamApp {
    pub(super) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|seen| seen.target).collect()
    }
}

/// An HTTP/1.1 application: records every request; `POST` echoes the body
/// (streaming), anything else answers `ok <target>`.
pub(super) async fn spawn_h1_upstream() -> UpstreamApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (seen_, connections_) = (Arc::clone(&seen), Arc::clone(&connections));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            connections_.fetch_add(1, Ordering::SeqCst);
            let seen = Arc::clone(&seen_);
            let service = service_fn(move |request: Request<Incoming>| {
                let seen = Arc::clone(&seen);
                async move {
                    let target = request.uri().to_string();
                    seen.lock().push(Seen {
                        method: request.method().to_string(),
                        target: target.clone(),
                        headers: request.headers().clone(),
                    });
                    let body = if request.method() == hyper::Method::POST {
                        Either::Left(request.into_body())
                    } else {
                        Either::Right(Full::new(Bytes::from(format!("ok {target}"))))
                    };
                    Ok::<_, Infallible>(Response::new(body))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    UpstreamApp {
        addr,
        seen,
        connections,
    }
}

/// An h2c application in the style of gRPC: reads the whole request (body
/// and trailers), answers `ok <path>` with header `x-saw-trailer` (the value
/// of the request trailer `x-req-trailer`) and the trailer `grpc-status: 0`.
async fn spawn_h2_upstream() -> UpstreamApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (seen_, connections_) = (Arc::clone(&seen), Arc::clone(&connections));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            connections_.fetch_add(1, Ordering::SeqCst);
            let seen = Arc::clone(&seen_);
            let service = service_fn(move |request: Request<Incoming>| {
                let seen = Arc::clone(&seen);
                async move {
                    let path = request.uri().path().to_owned();
                    seen.lock().push(Seen {
                        method: request.method().to_string(),
                        target: path.clone(),
                        headers: request.headers().clone(),
                    });
                    let collected = request.into_body().collect().await?;
                    let saw = collected
                        .trailers()
                        .and_then(|trailers| trailers.get("x-req-trailer"))
                        .map_or_else(|| HeaderValue::from_static("none"), HeaderValue::clone);
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let body = Full::new(Bytes::from(format!("ok {path}")))
                        .with_trailers(std::future::ready(Some(Ok(trailers))));
                    let mut response = Response::new(body);
                    response.headers_mut().insert("x-saw-trailer", saw);
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    UpstreamApp {
        addr,
        seen,
        connections,
    }
}

// ---------------------------------------------------------------------------
// The relay under test.

pub(super) struct RelayHandle {
    pub(super) addr: SocketAddr,
    /// One outcome of [`serve`] per downstream connection.
    results: mpsc::UnboundedReceiver<Result<L7Stats, L7Error>>,
    /// How often `connect` was called.
    connects: Arc<AtomicUsize>,
}

impl RelayHandle {
    /// The outcome of the next downstream connection to finish.
    async fn next_result(&mut self) -> Result<L7Stats, L7Error> {
        tokio::time::timeout(BOUND, self.results.recv())
            .await
            .expect("relay connection did not finish")
            .expect("relay gone")
    }
}

/// Accepts connections and serves each with [`serve`] towards `upstream`.
pub(super) async fn spawn_relay(upstream: SocketAddr, options: L7Options) -> RelayHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, results) = mpsc::unbounded_channel();
    let connects = Arc::new(AtomicUsize::new(0));
    let connects_ = Arc::clone(&connects);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let connects = Arc::clone(&connects_);
            let options = options.clone();
            tokio::spawn(async move {
                let connect = move || {
                    connects.fetch_add(1, Ordering::SeqCst);
                    TcpStream::connect(upstream)
                };
                let result = serve(
                    stream,
                    connect,
                    Arc::new(DenyAdmin),
                    test_normalize,
                    options,
                )
                .await;
                let _ = tx.send(result);
            });
        }
    });
    RelayHandle {
        addr,
        results,
        connects,
    }
}

async fn h1_client(addr: SocketAddr) -> client1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = client1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn h1_get(
    sender: &mut client1::SendRequest<Full<Bytes>>,
    target: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let request = Request::get(target)
        .header("host", "app.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await.expect("connection still usable");
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// Writes `bytes` on a new connection and reads until the relay closes it.
pub(super) async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut response))
        .await
        .expect("relay did not close the connection")
        .unwrap();
    response
}

/// Status codes of the HTTP/1.1 responses in `raw`.
pub(super) fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// HTTP/1.1

#[tokio::test]
async fn h1_keep_alive_allows_and_denies_per_request() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let mut client = h1_client(relay.addr).await;

    let (status, _, body) = h1_get(&mut client, "/allowed").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok /allowed");

    let (status, headers, body) = h1_get(&mut client, "/admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(headers["content-type"], "text/plain");
    assert!(!headers.contains_key("connection"), "{headers:?}");

    // Same connection, still usable.
    let (status, _, body) = h1_get(&mut client, "/allowed?x=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok /allowed?x=1");

    drop(client);
    let stats = relay.next_result().await.unwrap();
    assert_eq!(
        stats,
        L7Stats {
            requests: 3,
            denied: 1,
            bad_requests: 0,
            upgrades: 0,
        }
    );
    assert_eq!(upstream.targets(), ["/allowed", "/allowed?x=1"]);
    assert!(
        upstream
            .seen()
            .iter()
            .all(|seen| seen.method == "GET" && seen.headers["host"] == "app.example")
    );
    assert_eq!(relay.connects.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h1_denied_first_request_never_connects_upstream() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let mut client = h1_client(relay.addr).await;
    for _ in 0..2 {
        let (status, _, body) = h1_get(&mut client, "/admin/users").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, "RBAC: access denied");
    }
    drop(client);
    let stats = relay.next_result().await.unwrap();
    assert_eq!((stats.requests, stats.denied), (2, 2));
    assert_eq!(relay.connects.load(Ordering::SeqCst), 0);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn h1_connection_close_is_honoured() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    // Two requests pipelined; the first asks to close: only it is answered.
    let raw = raw_exchange(
        relay.addr,
        b"GET /one HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n\
          GET /two HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [200], "{}", String::from_utf8_lossy(&raw));
    assert_eq!(relay.next_result().await.unwrap().requests, 1);
    assert_eq!(upstream.targets(), ["/one"]);

    // Also when the close comes with a denied request.
    let raw = raw_exchange(
        relay.addr,
        b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [403]);
    assert!(raw.ends_with(b"\r\n\r\nRBAC: access denied"));
}

#[tokio::test]
async fn h1_large_body_streams_both_ways() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let mut client = h1_client(relay.addr).await;
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let request = Request::post("/upload")
        .header("host", "app.example")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed body differs");
    drop(client);
    assert_eq!(relay.next_result().await.unwrap().requests, 1);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["content-length"], "4194304");
}

#[tokio::test]
async fn h1_path_bypass_attempts_are_normalised() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let cases: [(&str, u16); 9] = [
        ("/admin", 403),
        ("//admin", 403),
        ("/a/../admin", 403),
        ("/%61dmin", 403),
        ("/./admin", 403),
        ("/x/%2e%2e/admin", 403),
        ("/admin%2Fx", 400),
        ("/admin%2fx", 400),
        ("/public/../%61llowed?q=%2F", 200),
    ];
    for (target, expected) in cases {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let raw = raw_exchange(relay.addr, request.as_bytes()).await;
        assert_eq!(statuses(&raw), [expected], "{target}");
        let stats = relay.next_result().await.unwrap();
        assert_eq!(stats.denied, u64::from(expected == 403), "{target}");
        assert_eq!(stats.bad_requests, u64::from(expected == 400), "{target}");
    }
    // Only the allowed one was forwarded, with the normalised path and the
    // original query.
    assert_eq!(upstream.targets(), ["/allowed?q=%2F"]);
}

#[tokio::test]
async fn h1_smuggling_shapes() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;

    // Rejected outright by hyper's parser: nothing reaches the relay.
    let rejected: [&[u8]; 4] = [
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for request in rejected {
        let raw = raw_exchange(relay.addr, request).await;
        assert_eq!(
            statuses(&raw),
            [400],
            "{}",
            String::from_utf8_lossy(request)
        );
        let result = relay.next_result().await;
        assert!(
            matches!(&result, Err(L7Error::Connection { stats, .. }) if stats.requests == 0),
            "{result:?}"
        );
    }
    assert!(upstream.seen().is_empty());

    // Content-Length with Transfer-Encoding: chunked (either order), with a
    // request smuggled behind the chunked body. hyper frames the body by the
    // chunked coding, drops Content-Length and closes the connection after
    // the response (RFC 9112 §6.3): the smuggled request never exists.
    let smuggling: [&[u8]; 2] = [
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
          Content-Length: 30\r\n\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for request in smuggling {
        let raw = raw_exchange(relay.addr, request).await;
        // One answer only, then the connection is closed.
        assert_eq!(statuses(&raw).len(), 1, "{}", String::from_utf8_lossy(&raw));
        let stats = relay.next_result().await.unwrap();
        assert_eq!(stats.requests, 1);
    }
    let seen = upstream.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/upload", "/upload"]
    );
    for seen in seen {
        assert!(!seen.headers.contains_key("content-length"), "{seen:?}");
        assert_eq!(seen.headers["transfer-encoding"], "chunked");
    }
}

#[tokio::test]
async fn h1_obs_fold_and_bad_chunks_never_reach_the_upstream_whole() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    // A header folded onto a second line (obs-fold, RFC 9112 §5.2): rejected.
    let raw = raw_exchange(
        relay.addr,
        b"GET /allowed HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [400], "{}", String::from_utf8_lossy(&raw));
    assert!(relay.next_result().await.is_err());
    // Too many header fields: refused before anything is forwarded.
    let mut many = b"GET /allowed HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..500 {
        many.extend(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    let raw = raw_exchange(relay.addr, &many).await;
    let answered = statuses(&raw);
    assert!(
        answered == [431] || answered == [400],
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(relay.next_result().await.is_err());
    assert!(upstream.seen().is_empty());
    // A chunk size that is not hex, after a valid head: the body is cut off
    // there, the client gets no success, and the connection ends.
    let raw = raw_exchange(
        relay.addr,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        !statuses(&raw).contains(&200),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let _ = relay.next_result().await;
}

#[tokio::test]
async fn h1_slow_headers_are_cut_off() {
    let upstream = spawn_h1_upstream().await;
    let options = L7Options {
        header_read_timeout: Duration::from_secs(1),
        ..L7Options::default()
    };
    let mut relay = spawn_relay(upstream.addr, options).await;
    let stream = TcpStream::connect(relay.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let request = b"GET /allowed HTTP/1.1\r\nHost: a\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    // The client under test: one byte every 300 ms (30 s for the whole head).
    let slowloris = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(300));
        for byte in request {
            interval.tick().await;
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    });
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, reader.read_to_end(&mut rest)).await;
    let elapsed = started.elapsed();
    assert!(read.is_ok(), "connection still open after {elapsed:?}");
    // Detection needs 4 bytes (~1 s), then the 1 s header timeout.
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    match relay.next_result().await {
        Err(L7Error::HeadTimeout(_, stats)) => assert_eq!(stats.requests, 0),
        other => panic!("{other:?}"),
    }
    slowloris.abort();
    assert!(upstream.seen().is_empty());
    assert_eq!(relay.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn h1_oversized_headers_get_431() {
    let upstream = spawn_h1_upstream().await;
    let options = L7Options {
        max_header_bytes: 16 * 1024,
        ..L7Options::default()
    };
    let mut relay = spawn_relay(upstream.addr, options).await;
    let request = format!(
        "GET /allowed HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let raw = raw_exchange(relay.addr, request.as_bytes()).await;
    assert_eq!(statuses(&raw), [431]);
    assert!(relay.next_result().await.is_err());
    assert!(upstream.seen().is_empty());
}

/// An HTTP/1.1 server that switches every request to an echo of bytes.
async fn spawn_upgrading_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if stream.write_all(reply).await.is_err() {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h1_upgrades_switch_and_relay_bytes_both_ways() {
    let upstream = spawn_upgrading_upstream().await;
    let mut relay = spawn_relay(upstream, L7Options::default()).await;
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(BOUND, stream.read_exact(&mut byte))
            .await
            .expect("no answer")
            .unwrap();
        head.push(byte[0]);
    }
    assert_eq!(statuses(&head), [101], "{}", String::from_utf8_lossy(&head));
    // Switched: bytes, not HTTP, both ways.
    for message in [&b"not http at all\n"[..], b"\x81\x05hello"] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(BOUND, stream.read_exact(&mut echoed))
            .await
            .expect("no echo")
            .unwrap();
        assert_eq!(echoed, message);
    }
    drop(stream);
    let stats = relay.next_result().await.unwrap();
    assert_eq!((stats.requests, stats.upgrades), (1, 1));
}

#[tokio::test]
async fn h1_denied_upgrades_get_403_and_connect_501_but_h2c_offers_ignored() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let raw = raw_exchange(
        relay.addr,
        b"GET /admin/chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        statuses(&raw),
        [403, 200],
        "{}",
        String::from_utf8_lossy(&raw)
    );
    relay.next_result().await.unwrap();

    let raw = raw_exchange(
        relay.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [501]);
    relay.next_result().await.unwrap();

    let raw = raw_exchange(
        relay.addr,
        b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [200], "{}", String::from_utf8_lossy(&raw));
    relay.next_result().await.unwrap();

    let seen = upstream.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/after", "/h2c"]
    );
    let h2c = &seen[1].headers;
    assert!(!h2c.contains_key("upgrade") && !h2c.contains_key("http2-settings"));
    assert_eq!(h2c["connection"], "close");
}

#[tokio::test]
async fn h1_ambiguous_host_is_rejected() {
    let upstream = spawn_h1_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let bad: [&[u8]; 2] = [
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        b"GET http://a/x HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    ];
    for request in bad {
        let raw = raw_exchange(relay.addr, request).await;
        assert_eq!(statuses(&raw), [400]);
        assert_eq!(relay.next_result().await.unwrap().bad_requests, 1);
    }
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn h1_unreachable_upstream_gives_502_and_close() {
    // A port nobody listens on: bind, note it, close.
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let mut relay = spawn_relay(addr, L7Options::default()).await;
    let raw = raw_exchange(relay.addr, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(statuses(&raw), [502]);
    let stats = relay.next_result().await.unwrap();
    assert_eq!(stats.requests, 1);
    assert_eq!(relay.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h1_downstream_closes_when_upstream_closes() {
    // An application that answers one request and closes its connection
    // without saying so (no `Connection: close`), like an idle timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.unwrap() == 0 {
                return;
            }
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
    });
    let mut relay = spawn_relay(upstream, L7Options::default()).await;
    // Keep-alive request: the relay must close the connection rather than
    // keep it open on a dead upstream.
    let raw = raw_exchange(relay.addr, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(statuses(&raw), [200]);
    assert!(raw.ends_with(b"\r\n\r\nok"));
    assert_eq!(relay.next_result().await.unwrap().requests, 1);
}

// ---------------------------------------------------------------------------
// HTTP/2

type TrailerBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

fn body_with_trailer(data: String, trailer: &str) -> TrailerBody {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-req-trailer", HeaderValue::from_str(trailer).unwrap());
    Full::new(Bytes::from(data)).with_trailers(std::future::ready(Some(Ok(trailers))))
}

#[tokio::test]
async fn h2_concurrent_streams_with_trailers() {
    let upstream = spawn_h2_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let stream = TcpStream::connect(relay.addr).await.unwrap();
    let (sender, connection) = client2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);

    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut sender: client2::SendRequest<TrailerBody> = sender.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 3 == 0 {
                format!("/admin/{i}")
            } else {
                format!("/svc.Echo/{i}")
            };
            let request = Request::post(format!("http://app.example{path}"))
                .header("content-type", "application/grpc")
                .body(body_with_trailer(format!("hello {i}"), &format!("t{i}")))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            (i, path, parts, trailers, collected.to_bytes())
        }));
    }
    drop(sender);
    let mut denied = 0;
    for task in tasks {
        let (i, path, parts, trailers, body) = tokio::time::timeout(BOUND, task)
            .await
            .expect("stream did not complete")
            .unwrap();
        if i % 3 == 0 {
            denied += 1;
            assert_eq!(parts.status, StatusCode::FORBIDDEN, "{path}");
            assert_eq!(body, "RBAC: access denied");
            assert_eq!(parts.headers["content-type"], "text/plain");
        } else {
            assert_eq!(parts.status, StatusCode::OK, "{path}");
            assert_eq!(body, format!("ok {path}"));
            assert_eq!(parts.headers["x-saw-trailer"], format!("t{i}").as_str());
            let trailers = trailers.expect("response trailers relayed");
            assert_eq!(trailers["grpc-status"], "0");
        }
    }
    assert_eq!(denied, 7);
    let stats = relay.next_result().await.unwrap();
    assert_eq!(
        stats,
        L7Stats {
            requests: 20,
            denied: 7,
            bad_requests: 0,
            upgrades: 0,
        }
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 13);
    assert!(seen.iter().all(|s| s.target.starts_with("/svc.Echo/")));
    assert_eq!(relay.connects.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h2_path_is_normalised_and_bad_paths_rejected() {
    let upstream = spawn_h2_upstream().await;
    let mut relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let stream = TcpStream::connect(relay.addr).await.unwrap();
    let (mut sender, connection) = client2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for (path, expected) in [
        ("/x/../%61dmin", StatusCode::FORBIDDEN),
        ("/admin%2Fx", StatusCode::BAD_REQUEST),
        ("//ok/./y", StatusCode::OK),
    ] {
        let request = Request::get(format!("http://app.example{path}"))
            .body(body_with_trailer(String::new(), "x"))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), expected, "{path}");
    }
    drop(sender);
    let stats = relay.next_result().await.unwrap();
    assert_eq!(
        (stats.requests, stats.denied, stats.bad_requests),
        (3, 1, 1)
    );
    assert_eq!(upstream.targets(), ["/ok/y"]);
}

#[tokio::test]
async fn h2_downstream_goes_away_when_upstream_goes_away() {
    // An h2 application that shuts its connection down after one request.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, mut served) = mpsc::unbounded_channel();
        let service = service_fn(move |_request: Request<Incoming>| {
            let _ = tx.send(());
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = served.recv() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    });
    let mut relay = spawn_relay(upstream, L7Options::default()).await;
    let stream = TcpStream::connect(relay.addr).await.unwrap();
    let (mut sender, connection) = client2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get("http://app.example/a")
        .body(body_with_trailer(String::new(), "x"))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The client still holds the connection open; the relay ends it.
    tokio::time::timeout(BOUND, connection)
        .await
        .expect("relay kept the downstream connection open")
        .unwrap()
        .unwrap();
    assert_eq!(relay.next_result().await.unwrap().requests, 1);
    drop(sender);
}

// ---------------------------------------------------------------------------
// Not HTTP

/// Serves one accepted connection with [`serve`] while a client sends
/// `first`; the upstream must never be connected.
async fn not_http_case(first: &[u8]) -> (Vec<u8>, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (server_side, _) = listener.accept().await.unwrap();
    client.write_all(first).await.unwrap();
    let connected = Arc::new(AtomicUsize::new(0));
    let connected_ = Arc::clone(&connected);
    let connect = move || {
        connected_.fetch_add(1, Ordering::SeqCst);
        TcpStream::connect(addr)
    };
    let result = serve(
        server_side,
        connect,
        Arc::new(DenyAdmin),
        test_normalize,
        L7Options::default(),
    )
    .await;
    assert_eq!(connected.load(Ordering::SeqCst), 0);
    let Err(L7Error::NotHttp(not_http)) = result else {
        panic!("expected NotHttp, got {result:?}");
    };
    assert_eq!(not_http.reason, NotHttpReason::NotAMethod);
    let (peeked, stream) = not_http.into_parts::<TcpStream>().unwrap();
    (peeked, stream, client)
}

#[tokio::test]
async fn not_http_gives_bytes_and_stream_back() {
    // A TLS ClientHello prefix and random binary.
    let client_hello: &'static [u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xf8, 0x01, 0x00, 0x00, 0xf4, 0x03, 0x03, 0x5b, 0x9c, 0x11, 0xa2,
        0x00, 0x00, 0x00, 0x02, 0x13, 0x01,
    ];
    let binary: &'static [u8] = &[0x00, 0xff, 0x13, 0x37, 0x42, 0x99, 0x01, 0x02, 0x03];
    let almost: &'static [u8] = b"GET\x00/ HTTP/1.1\r\n";
    for first in [client_hello, binary, almost] {
        let (peeked, mut stream, mut client) = not_http_case(first).await;
        assert!(!peeked.is_empty() && first.starts_with(&peeked));
        // The rest of the bytes, and what follows, are still in the stream.
        client.write_all(b"-more").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, stream.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let mut all = peeked;
        all.extend_from_slice(&rest);
        assert_eq!(all, [first, b"-more"].concat());
        // And the stream is writable towards the client.
        stream.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }
}

#[tokio::test]
async fn not_http_into_prefixed_replays_and_checks_type() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (server_side, _) = listener.accept().await.unwrap();
    client.write_all(b"\x16\x03\x01hello").await.unwrap();
    client.shutdown().await.unwrap();
    let result = serve(
        server_side,
        move || TcpStream::connect(addr),
        Arc::new(DenyAdmin),
        test_normalize,
        L7Options::default(),
    )
    .await;
    let Err(L7Error::NotHttp(not_http)) = result else {
        panic!("{result:?}");
    };
    assert_eq!(not_http.reason, NotHttpReason::NotAMethod);
    // The wrong type leaves the error intact.
    let not_http = not_http.into_parts::<String>().unwrap_err();
    let mut replay = not_http.into_prefixed::<TcpStream>().unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(BOUND, replay.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all, b"\x16\x03\x01hello");
}

#[tokio::test]
async fn detection_times_out_for_silent_clients() {
    let options = L7Options {
        detect_timeout: Duration::from_millis(200),
        ..L7Options::default()
    };
    // Silent (server-first protocol), and a stalled possible method.
    for first in [&b""[..], b"GE"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        client.write_all(first).await.unwrap();
        let result = tokio::time::timeout(
            BOUND,
            serve(
                server_side,
                move || TcpStream::connect(addr),
                Arc::new(DenyAdmin),
                test_normalize,
                options.clone(),
            ),
        )
        .await
        .unwrap();
        let Err(L7Error::NotHttp(not_http)) = result else {
            panic!("{result:?}");
        };
        assert_eq!(not_http.reason, NotHttpReason::Timeout);
        assert_eq!(not_http.peeked(), first);
    }
}

#[tokio::test]
async fn closed_without_bytes_is_ok() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).await.unwrap();
    let (server_side, _) = listener.accept().await.unwrap();
    drop(client);
    let result = serve(
        server_side,
        move || TcpStream::connect(addr),
        Arc::new(DenyAdmin),
        test_normalize,
        L7Options::default(),
    )
    .await;
    assert_eq!(result.unwrap(), L7Stats::default());
}

// ---------------------------------------------------------------------------
// What the access log is told

/// Answers every request 403 as if the policies of the endpoint it picked
/// had denied it.
struct DenyingForward;

impl Forward for DenyingForward {
    fn forward(
        &self,
        _request: Request<Incoming>,
        _downstream: Protocol,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<ResponseBody>> + Send + '_>>
    {
        Box::pin(async {
            let mut response = local_response(StatusCode::FORBIDDEN, DENIED_BODY, false);
            response
                .extensions_mut()
                .insert(DeniedBy("ns/endpoint-policy rule[0]".into()));
            response
        })
    }
}

#[derive(Default)]
struct Outcomes(Mutex<Vec<(u16, Option<String>)>>);

impl RequestMetrics for Outcomes {
    fn record(&self, outcome: &RequestOutcome<'_>, _span: Option<crate::spans::RequestSpan>) {
        self.0
            .lock()
            .push((outcome.status, outcome.denied_by.map(str::to_owned)));
    }
}

#[tokio::test]
async fn a_deny_decided_by_the_forwarder_names_its_policy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let options = L7Options {
        request_metrics: Some(RequestMetricsHandle(outcomes.clone())),
        ..L7Options::default()
    };
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve_with(
            stream,
            Arc::new(DenyingForward),
            Arc::new(AllowAll),
            test_normalize,
            options,
        )
        .await
    });
    let raw = raw_exchange(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [403]);
    let _ = tokio::time::timeout(BOUND, server).await.unwrap();
    assert_eq!(
        *outcomes.0.lock(),
        [(403, Some("ns/endpoint-policy rule[0]".to_string()))]
    );
}
