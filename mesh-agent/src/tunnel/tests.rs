//! End-to-end tests: real TCP on loopback, real TLS 1.3 with client
//! certificates, real HTTP/2.

use parking_lot::Mutex;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;

/// Generous bound for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits for a condition that has no event to await (e.g. a gauge).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------- PKI

struct Pki {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>),
    client: (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test mesh CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |sa: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![
                SanType::URI(
                    format!("spiffe://cluster.local/ns/default/sa/{sa}")
                        .try_into()
                        .unwrap(),
                ),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
            (cert, PrivatePkcs8KeyDer::from(key.serialize_der()))
        };
        Self {
            server: leaf("server"),
            client: leaf("client"),
            ca,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        roots
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
                .build()
                .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.server.0.clone()],
                PrivateKeyDer::Pkcs8(self.server.1.clone_key()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    fn client_config(&self, with_cert: bool) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots());
        let mut config = if with_cert {
            builder
                .with_client_auth_cert(
                    vec![self.client.0.clone()],
                    PrivateKeyDer::Pkcs8(self.client.1.clone_key()),
                )
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

// ---------------------------------------------------------------- servers

/// An HBONE listener running `serve_connection` per accepted connection.
struct Hbone {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// (connection index, how `serve_connection` ended)
    ended: mpsc::UnboundedReceiver<(usize, Result<(), ServeError>)>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Hbone {
    async fn start<O, Fut>(
        tls: Arc<rustls::ServerConfig>,
        handshake_timeout: Duration,
        open: O,
    ) -> Self
    where
        O: Fn(ConnectRequest) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<TcpStream, Rejection>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, ended) = mpsc::unbounded_channel();
        let (acc, cs) = (accepted.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let idx = acc.fetch_add(1, Ordering::SeqCst);
                let (tls, open, tx) = (tls.clone(), open.clone(), tx.clone());
                // The tests' handlers hand out TCP upstreams.
                let open = move |req| {
                    let upstream = open(req);
                    async move { upstream.await.map(Upstream::Tcp) }
                };
                let task = tokio::spawn(async move {
                    let res = serve_connection(tcp, tls, handshake_timeout, open).await;
                    let _ = tx.send((idx, res));
                });
                cs.lock().push(task);
            }
        });
        Self {
            addr,
            accepted,
            ended,
            conns,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn next_end(&mut self) -> (usize, Result<(), ServeError>) {
        within("a served connection to end", self.ended.recv())
            .await
            .expect("accept loop gone")
    }

    /// Kills the server side of connection `idx` (drops its socket).
    fn kill(&self, idx: usize) {
        self.conns.lock()[idx].abort();
    }
}

/// `open` that records each request and connects to `upstream`.
#[derive(Clone)]
struct Opener {
    upstream: SocketAddr,
    seen: Arc<Mutex<Vec<ConnectRequest>>>,
}

impl Opener {
    fn new(upstream: SocketAddr) -> Self {
        Self {
            upstream,
            seen: Arc::default(),
        }
    }

    fn open(&self) -> impl Fn(ConnectRequest) -> OpenFut + Clone + Send + Sync + 'static {
        let this = self.clone();
        move |req| {
            this.seen.lock().push(req.clone());
            let upstream = this.upstream;
            Box::pin(async move {
                if req.authority.port() == 403 {
                    return Err(Rejection::Forbidden("port 403 is denied".into()));
                }
                TcpStream::connect(upstream)
                    .await
                    .map_err(|e| Rejection::UpstreamUnavailable(e.to_string()))
            })
        }
    }

    fn seen(&self) -> Vec<ConnectRequest> {
        self.seen.lock().clone()
    }
}

type OpenFut = std::pin::Pin<Box<dyn Future<Output = Result<TcpStream, Rejection>> + Send>>;

/// Upstream that echoes every connection, half-closing after its peer did.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn target(
    gateway: SocketAddr,
    authority: &str,
    client: Option<&str>,
    dst_id: &str,
) -> TunnelTarget {
    TunnelTarget {
        gateway,
        authority: authority.parse().unwrap(),
        forwarded_for: client.map(|c| c.parse().unwrap()),
        pool_key: PoolKey::new(
            "spiffe://cluster.local/ns/default/sa/client",
            dst_id,
            gateway,
        ),
        local_cert_expiry: None,
    }
}

async fn connect(
    client: &TunnelClient,
    target: &TunnelTarget,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<TunnelStream> {
    let gateway = target.gateway;
    client
        .connect(target, tls.clone(), server_name(), move || {
            TcpStream::connect(gateway)
        })
        .await
}

async fn read_to_end(r: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    within("EOF", r.read_to_end(&mut out)).await.unwrap();
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------- 1. one stream

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_carries_bytes_and_half_closes_both_ways() {
    let pki = Pki::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opener = Opener::new(upstream.local_addr().unwrap());
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let tls = pki.client_config(true);

    let cases = [
        ("10.1.2.3:8080", "192.0.2.7"),
        ("[2001:db8::5]:443", "2001:db8::1"),
    ];
    for (i, (authority, forwarded)) in cases.into_iter().enumerate() {
        let t = target(server.addr, authority, Some(forwarded), "dst");

        // Upstream speaks and half-closes first; the client still sends after
        // reading EOF.
        let mut stream = connect(&client, &t, &tls).await.unwrap();
        let (mut up, _) = within("upstream accept", upstream.accept()).await.unwrap();
        let greeting = pattern(300_000, 1);
        up.write_all(&greeting).await.unwrap();
        up.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut stream).await, greeting);
        let request = pattern(1_000_000, 2);
        stream.write_all(&request).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut up).await, request);

        // Client sends and half-closes first; upstream answers after EOF.
        let mut stream = connect(&client, &t, &tls).await.unwrap();
        let (mut up, _) = within("upstream accept", upstream.accept()).await.unwrap();
        let request = pattern(700_000, 3);
        stream.write_all(&request).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut up).await, request);
        let reply = pattern(500_000, 4);
        up.write_all(&reply).await.unwrap();
        up.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut stream).await, reply);

        let seen = opener.seen();
        assert_eq!(seen.len(), 2 * (i + 1));
        for req in &seen[2 * i..] {
            assert_eq!(req.authority, authority.parse::<SocketAddr>().unwrap());
            assert_eq!(req.forwarded_for, Some(forwarded.parse().unwrap()));
            assert_eq!(req.peer_certificates.to_vec(), vec![pki.client.0.clone()]);
            assert_eq!(req.peer_addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
    }
    // All four streams shared one connection.
    assert_eq!(server.accepted(), 1);

    // No Forwarded header when there is no client address.
    let t = target(server.addr, "10.9.9.9:9", None, "dst");
    let _stream = connect(&client, &t, &tls).await.unwrap();
    assert_eq!(opener.seen().last().unwrap().forwarded_for, None);
}

// ---------------------------------------------------------------- 2. pooling

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_share_a_connection_per_key_and_idle_connections_close() {
    const IDLE: Duration = Duration::from_millis(300);
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let mut server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(IDLE);
    let tls = pki.client_config(true);

    // 20 concurrent connects on one key: one TCP/TLS connection.
    let t = target(server.addr, "10.0.0.1:80", Some("10.0.0.2"), "dst-a");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, t, tls) = (client.clone(), t.clone(), tls.clone());
            tokio::spawn(async move { connect(&client, &t, &tls).await.unwrap() })
        })
        .collect();
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(within("connect", task).await.unwrap());
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("stream {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0; msg.len()];
        within("echo", s.read_exact(&mut buf)).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    assert_eq!(server.accepted(), 1);
    assert_eq!(client.pooled_connections(), 1);

    // Another key: another connection.
    let t2 = target(server.addr, "10.0.0.1:80", Some("10.0.0.2"), "dst-b");
    let mut other = connect(&client, &t2, &tls).await.unwrap();
    other.write_all(b"x").await.unwrap();
    assert_eq!(server.accepted(), 2);
    assert_eq!(client.pooled_connections(), 2);

    // An open stream keeps its connection past the idle timeout. (A sleep
    // is the only way to show something does not happen.)
    drop(streams);
    tokio::time::sleep(IDLE * 3).await;
    assert_eq!(client.pooled_connections(), 1, "idle key a not closed");
    let mut buf = [0u8; 1];
    other.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"x");
    let (idx, res) = server.next_end().await;
    assert_eq!(idx, 0, "connection of key a ended first");
    assert!(res.is_ok(), "{res:?}");

    drop(other);
    wait_until("pool to drain", || client.pooled_connections() == 0).await;
    let (idx, res) = server.next_end().await;
    assert_eq!(idx, 1);
    assert!(res.is_ok(), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_limit_opens_another_connection() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::with_config(TunnelClientConfig {
        max_streams_per_connection: 3,
        ..TunnelClientConfig::default()
    });
    let tls = pki.client_config(true);
    let t = target(server.addr, "10.0.0.1:80", None, "dst");
    let mut streams = Vec::new();
    for _ in 0..7 {
        streams.push(connect(&client, &t, &tls).await.unwrap());
    }
    assert_eq!(server.accepted(), 3);
    assert_eq!(client.pooled_connections(), 3);
    // A freed slot is reused.
    streams.truncate(6);
    streams.push(connect(&client, &t, &tls).await.unwrap());
    assert_eq!(server.accepted(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_takes_no_new_stream_once_its_certificate_expired() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let tls = pki.client_config(true);
    let mut t = target(server.addr, "10.0.0.1:80", None, "dst");
    // Pooled connections stop taking streams EXPIRY_MARGIN before expiry.
    let expiry =
        std::time::SystemTime::now() + super::client::EXPIRY_MARGIN + Duration::from_millis(500);
    t.local_cert_expiry = Some(expiry);
    let mut first = connect(&client, &t, &tls).await.unwrap();
    let _second = connect(&client, &t, &tls).await.unwrap();
    assert_eq!(
        server.accepted(),
        1,
        "shared while the certificate is valid"
    );

    // Past the expiry: a new connection (whose handshake would then fail if
    // nothing renewed the certificate); the open stream carries on.
    wait_until("the connection's end of use", || {
        std::time::SystemTime::now() > expiry - super::client::EXPIRY_MARGIN
    })
    .await;
    t.local_cert_expiry = None;
    let _third = connect(&client, &t, &tls).await.unwrap();
    assert_eq!(server.accepted(), 2, "a new connection after the expiry");
    first.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    within("echo", first.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
}

// ---------------------------------------------------------------- 3. throughput

#[test]
fn checksum_ignores_read_boundaries_but_not_content() {
    let data = pattern(1001, 5);
    let mut whole = Checksum::default();
    whole.update(&data);
    let mut split = Checksum::default();
    for part in data.chunks(7) {
        split.update(part);
    }
    let whole = whole.finish();
    assert_eq!(whole, split.finish());
    let mut changed = data.clone();
    changed[500] ^= 1;
    let mut other = Checksum::default();
    other.update(&changed);
    assert_ne!(whole, other.finish());
}

/// Order-sensitive 64-bit checksum that does not depend on how the bytes
/// were split into reads.
#[derive(Default)]
struct Checksum {
    h: u64,
    word: [u8; 8],
    filled: usize,
}

impl Checksum {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (8 - self.filled).min(data.len());
            self.word[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == 8 {
                self.h = (self.h ^ u64::from_le_bytes(self.word)).wrapping_mul(0x100_0000_01b3);
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> u64 {
        let tail = self.filled;
        self.update(&[0u8; 8][..(8 - tail) % 8]);
        self.h ^ tail as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_256_mib_one_stream() {
    const TOTAL: usize = 256 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let pki = Pki::new();
    // Upstream: checksums what it receives and echoes it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opener = Opener::new(listener.local_addr().unwrap());
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        let (mut h, mut n) = (Checksum::default(), 0usize);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
            w.write_all(&buf[..k]).await.unwrap();
        }
        w.shutdown().await.unwrap();
        (h.finish(), n)
    });
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let stream = connect(
        &client,
        &target(server.addr, "10.0.0.1:5001", None, "dst"),
        &pki.client_config(true),
    )
    .await
    .unwrap();

    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut h = Checksum::default();
        let mut chunk = pattern(CHUNK, 7);
        for i in 0..TOTAL / CHUNK {
            chunk[0] = i as u8;
            chunk[CHUNK - 1] = (i >> 8) as u8;
            h.update(&chunk);
            wr.write_all(&chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        h.finish()
    });
    let reader = tokio::spawn(async move {
        let (mut h, mut n) = (Checksum::default(), 0usize);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let k = rd.read(&mut buf).await.unwrap();
            if k == 0 {
                break (h.finish(), n);
            }
            h.update(&buf[..k]);
            n += k;
        }
    });
    let limit = Duration::from_secs(300);
    let sent = tokio::time::timeout(limit, writer).await.unwrap().unwrap();
    let (received, received_len) = tokio::time::timeout(limit, reader).await.unwrap().unwrap();
    let (upstream_sum, upstream_len) = tokio::time::timeout(limit, upstream)
        .await
        .unwrap()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(upstream_len, TOTAL);
    assert_eq!(received_len, TOTAL);
    assert_eq!(upstream_sum, sent, "client -> upstream corrupted");
    assert_eq!(received, sent, "upstream -> client corrupted");
    println!(
        "HBONE throughput: 256 MiB each way in {secs:.2}s = {:.0} MiB/s per direction",
        256.0 / secs
    );
}

// ---------------------------------------------------------------- 4. rejections

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forbidden_stream_gets_403_and_connection_stays_usable() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let tls = pki.client_config(true);

    let denied = target(server.addr, "10.0.0.1:403", None, "dst");
    let err = connect(&client, &denied, &tls).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("403"), "{msg}");

    let allowed = target(server.addr, "10.0.0.1:80", None, "dst");
    let mut s = connect(&client, &allowed, &tls).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"ping");
    assert_eq!(server.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_connect_failure_gets_503() {
    let pki = Pki::new();
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let opener = Opener::new(closed);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let t = target(server.addr, "10.0.0.1:80", None, "dst");
    let err = connect(&client, &t, &pki.client_config(true))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("503"), "{err:#}");
}

/// Sends one request with a plain hyper client over mTLS.
async fn raw_request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    req: Request<Empty<Bytes>>,
) -> StatusCode {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    within("response", sender.send_request(req))
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_authority_and_non_connect_get_400_without_upstream() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let tls = pki.client_config(true);

    let host_name = Request::builder()
        .method(Method::CONNECT)
        .uri("example.com:80")
        .body(Empty::new())
        .unwrap();
    assert_eq!(
        raw_request(server.addr, tls.clone(), host_name).await,
        StatusCode::BAD_REQUEST
    );
    let get = Request::builder()
        .method(Method::GET)
        .uri("http://10.0.0.1:80/")
        .body(Empty::new())
        .unwrap();
    assert_eq!(
        raw_request(server.addr, tls, get).await,
        StatusCode::BAD_REQUEST
    );
    assert!(opener.seen().is_empty(), "open was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_and_certless_clients_fail_the_handshake() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    // A long handshake timeout: failures must come from the bytes, not it.
    let mut server =
        Hbone::start(pki.server_config(), Duration::from_secs(60), opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));

    // A healthy stream that must survive the bad neighbours.
    let mut good = connect(
        &client,
        &target(server.addr, "10.0.0.1:80", None, "dst"),
        &pki.client_config(true),
    )
    .await
    .unwrap();

    let started = Instant::now();
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (idx, res) = server.next_end().await;
    assert_eq!(idx, 1);
    let err = res.unwrap_err();
    assert!(matches!(err, ServeError::Handshake(_)), "{err:?}");
    assert!(err.tls_error().is_some(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "plaintext took {:?}",
        started.elapsed()
    );

    // No client certificate: both ends fail.
    let certless = TunnelClient::new(Duration::from_secs(60));
    let err = connect(
        &certless,
        &target(server.addr, "10.0.0.1:80", None, "dst"),
        &pki.client_config(false),
    )
    .await
    .unwrap_err();
    println!("client without certificate: {err:#}");
    assert!(
        format!("{err:#}").contains("CertificateRequired"),
        "{err:#}"
    );
    let (idx, res) = server.next_end().await;
    assert_eq!(idx, 2);
    let err = res.unwrap_err();
    assert!(
        matches!(
            err.tls_error(),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err:?}"
    );
    assert_eq!(certless.pooled_connections(), 0);

    good.write_all(b"still here").await.unwrap();
    good.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut good).await, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_client_hits_the_handshake_timeout() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let mut server = Hbone::start(
        pki.server_config(),
        Duration::from_millis(200),
        opener.open(),
    )
    .await;
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let (_, res) = server.next_end().await;
    assert!(matches!(res, Err(ServeError::HandshakeTimeout)), "{res:?}");
}

// ---------------------------------------------------------------- 5. resets

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_reset_ends_the_stream_abortively() {
    let pki = Pki::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opener = Opener::new(upstream.local_addr().unwrap());
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let mut stream = connect(
        &client,
        &target(server.addr, "10.0.0.1:80", None, "dst"),
        &pki.client_config(true),
    )
    .await
    .unwrap();
    let (up, _) = within("upstream accept", upstream.accept()).await.unwrap();
    up.set_zero_linger().unwrap();
    drop(up); // RST

    // The agent resets the stream with CONNECT_ERROR: the read fails, so the
    // client's agent can reset its own TCP connection in turn.
    let mut buf = [0u8; 16];
    let err = match within("read to fail", stream.read(&mut buf)).await {
        Err(e) => e,
        Ok(n) => panic!("read {n} bytes (0 = EOF) from a reset upstream, not an error"),
    };
    let reason = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CONNECT_ERROR), "{err:?}");
    let write_failed = within("writes to fail", async {
        loop {
            if let Err(e) = stream.write_all(b"more").await {
                break e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    println!("write after upstream RST: {write_failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_stream_ends_upstream_with_eof_then_reset() {
    let pki = Pki::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opener = Opener::new(upstream.local_addr().unwrap());
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let mut stream = connect(
        &client,
        &target(server.addr, "10.0.0.1:80", None, "dst"),
        &pki.client_config(true),
    )
    .await
    .unwrap();
    let (mut up, _) = within("upstream accept", upstream.accept()).await.unwrap();

    // Mid-transfer: part of the data arrived, then the client goes away.
    stream.write_all(&pattern(100_000, 9)).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = within("first bytes", up.read(&mut buf)).await.unwrap();
    assert!(n > 0);
    drop(stream);

    // The drop resets the stream (CANCEL), which the agent reads as EOF:
    // the upstream first reads EOF (after the data already in flight) ...
    let end = within("upstream EOF", async {
        loop {
            match up.read(&mut buf).await {
                Ok(0) => break None,
                Ok(_) => continue,
                Err(e) => break Some(e),
            }
        }
    })
    .await;
    assert!(end.is_none(), "expected EOF, got {end:?}");
    // ... and is reset as soon as it sends anything back.
    let err = within("upstream writes to fail", async {
        loop {
            if let Err(e) = up.write_all(&buf).await {
                break e;
            }
        }
    })
    .await;
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_stream_resets_the_upstream() {
    let pki = Pki::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opener = Opener::new(upstream.local_addr().unwrap());
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let mut stream = connect(
        &client,
        &target(server.addr, "10.0.0.1:80", None, "dst"),
        &pki.client_config(true),
    )
    .await
    .unwrap();
    let (mut up, _) = within("upstream accept", upstream.accept()).await.unwrap();
    stream.write_all(b"partial").await.unwrap();
    let mut buf = [0u8; 64];
    let n = within("first bytes", up.read(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"partial");

    // The client's TCP connection was reset: CONNECT_ERROR, then the
    // upstream is reset too (no EOF first).
    stream.abort();
    let end = within("upstream to end", up.read(&mut buf)).await;
    match end {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}"),
        Ok(n) => panic!("upstream read {n} bytes (0 = EOF) after an abort, not a reset"),
    }
}

// ---------------------------------------------------------------- 6. dead connection

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_pooled_connection_is_replaced() {
    let pki = Pki::new();
    let opener = Opener::new(echo_upstream().await);
    let server = Hbone::start(pki.server_config(), DEADLINE, opener.open()).await;
    let client = TunnelClient::new(Duration::from_secs(60));
    let tls = pki.client_config(true);
    let t = target(server.addr, "10.0.0.1:80", None, "dst");

    for round in 0..3 {
        let mut s = connect(&client, &t, &tls).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut s).await, b"hi");
        drop(s);
        assert_eq!(server.accepted(), round + 1);
        assert_eq!(client.pooled_connections(), 1);
        // Kill the server side and connect again at once: the client either
        // already saw the connection die or fails on it and redials.
        server.kill(round);
    }
    let mut s = connect(&client, &t, &tls).await.unwrap();
    s.write_all(b"bye").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"bye");
    assert_eq!(server.accepted(), 4);

    // Without a new connect, the driver notices the death by itself.
    drop(s);
    server.kill(3);
    wait_until("dead connection to leave the pool", || {
        client.pooled_connections() == 0
    })
    .await;
}

#[test]
fn public_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    fn send_unpin<T: Send + Unpin + tokio::io::AsyncRead + tokio::io::AsyncWrite>() {}
    fn send_future<T: Future + Send>(_: T) {}
    send_sync::<TunnelClient>();
    send_unpin::<TunnelStream>();
    send_sync::<ServeError>();
    let pki = Pki::new();
    let client = TunnelClient::new(Duration::from_secs(1));
    let t = target("127.0.0.1:1".parse().unwrap(), "10.0.0.1:80", None, "dst");
    let gateway = t.gateway;
    // Never polled: only the type matters.
    send_future(
        client.connect(&t, pki.client_config(true), server_name(), move || {
            TcpStream::connect(gateway)
        }),
    );
}
