//! Tests of the relay on real loopback connections:
//! client <-> (downstream | relay | upstream) <-> server.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::*;

/// Upper bound for any single test step; hitting it fails the test.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1024 * 1024;

async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Which application of the test setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// Listeners standing for the agent's capture point and the real destination.
struct Rig {
    capture: TcpListener,
    destination: TcpListener,
    /// The application whose receive path is made as small as possible.
    squeezed: Option<Role>,
}

/// One proxied connection: the two applications and the relay between them.
struct Proxied {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<RelayStats>,
}

/// A tiny buffer size (the kernel doubles it and applies its minimum).
const TINY_BUFFER: u32 = 4096;

impl Rig {
    async fn new() -> Rig {
        Rig::with_squeezed(None).await
    }

    async fn with_squeezed(squeezed: Option<Role>) -> Rig {
        let capture = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let destination = TcpSocket::new_v4().unwrap();
        if squeezed == Some(Role::Server) {
            destination.set_recv_buffer_size(TINY_BUFFER).unwrap();
        }
        destination.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let destination = destination.listen(1024).unwrap();
        Rig {
            capture,
            destination,
            squeezed,
        }
    }

    /// Returns (client, downstream, upstream, server), all connected.
    async fn connect_sockets(&self) -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let client = self.client_socket();
        let client = client.connect(address(&self.capture)).await.unwrap();
        let (downstream, _) = self.capture.accept().await.unwrap();
        let upstream = TcpStream::connect(address(&self.destination))
            .await
            .unwrap();
        let (server, _) = self.destination.accept().await.unwrap();
        match self.squeezed {
            Some(Role::Client) => set_tiny_send_buffer(&downstream),
            Some(Role::Server) => set_tiny_send_buffer(&upstream),
            None => {}
        }
        (client, downstream, upstream, server)
    }

    fn client_socket(&self) -> TcpSocket {
        let socket = TcpSocket::new_v4().unwrap();
        if self.squeezed == Some(Role::Client) {
            socket.set_recv_buffer_size(TINY_BUFFER).unwrap();
        }
        socket
    }

    async fn connect(&self) -> Proxied {
        self.connect_with(relay).await
    }

    async fn connect_with<F>(&self, start: impl FnOnce(TcpStream, TcpStream) -> F) -> Proxied
    where
        F: Future<Output = RelayStats> + Send + 'static,
    {
        let (client, downstream, upstream, server) = self.connect_sockets().await;
        let relay = tokio::spawn(start(downstream, upstream));
        Proxied {
            client,
            server,
            relay,
        }
    }
}

fn address(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap()
}

fn set_tiny_send_buffer(stream: &TcpStream) {
    setsockopt(stream, sockopt::SndBuf, &(TINY_BUFFER as usize)).unwrap();
}

impl Proxied {
    async fn stats(self) -> RelayStats {
        within("relay to end", self.relay).await.unwrap()
    }
}

fn reset_by_closing(stream: TcpStream) {
    stream.set_zero_linger().unwrap();
    drop(stream);
}

fn is_reset(result: &io::Result<impl Sized>) -> bool {
    matches!(result, Err(error) if error.kind() == io::ErrorKind::ConnectionReset)
}

fn is_reset_or_broken_pipe(result: &io::Result<impl Sized>) -> bool {
    matches!(result, Err(error) if matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    ))
}

/// Reads until EOF or an error, returning what was read and how it ended.
async fn read_until_end(stream: &mut (impl AsyncRead + Unpin)) -> (Vec<u8>, io::Result<()>) {
    let mut received = Vec::new();
    let end = stream.read_to_end(&mut received).await.map(drop);
    (received, end)
}

// ---------------------------------------------------------------------------
// Deterministic byte streams and an order-sensitive hash (FNV-1a, 64 bit).

/// An endless pseudo-random byte stream (xorshift64*), reproducible by seed.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest {
    length: u64,
    hash: u64,
}

impl Digest {
    fn new() -> Digest {
        Digest {
            length: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.length += bytes.len() as u64;
    }
}

/// Writes `length` bytes of the pattern `seed` in uneven chunks, then
/// shuts down writing; returns the digest of what was sent.
async fn send_pattern(mut writer: impl AsyncWrite + Unpin, seed: u64, length: u64) -> Digest {
    let mut pattern = Pattern(seed);
    let mut digest = Digest::new();
    let mut buffer = vec![0u8; 100_003];
    while digest.length < length {
        let chunk = buffer.len().min((length - digest.length) as usize);
        pattern.fill(&mut buffer[..chunk]);
        writer.write_all(&buffer[..chunk]).await.unwrap();
        digest.update(&buffer[..chunk]);
    }
    writer.shutdown().await.unwrap();
    digest
}

async fn receive_digest(mut reader: impl AsyncRead + Unpin) -> Digest {
    let mut digest = Digest::new();
    let mut buffer = vec![0u8; 77_777];
    loop {
        let read = reader.read(&mut buffer).await.unwrap();
        if read == 0 {
            return digest;
        }
        digest.update(&buffer[..read]);
    }
}

/// Sends a pattern and receives the peer's stream at the same time.
async fn exchange(stream: TcpStream, seed: u64, length: u64) -> (Digest, Digest) {
    let (reader, writer) = stream.into_split();
    tokio::join!(send_pattern(writer, seed, length), receive_digest(reader))
}

// ---------------------------------------------------------------------------
// 1. Bytes intact.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_both_ways_concurrently_is_intact() {
    let length = 64 * MIB;
    let proxied = Rig::new().await.connect().await;
    let client = tokio::spawn(exchange(proxied.client, 1, length));
    let server = tokio::spawn(exchange(proxied.server, 2, length));
    let (client_sent, client_received) = within("client", client).await.unwrap();
    let (server_sent, server_received) = within("server", server).await.unwrap();

    assert_eq!(client_sent.length, length);
    assert_eq!(server_received, client_sent);
    assert_eq!(client_received, server_sent);
    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(
        stats,
        RelayStats {
            downstream_to_upstream: length,
            upstream_to_downstream: length,
            outcome: RelayOutcome::Closed,
        }
    );
}

/// Writes `count` numbered records, one small write each, then shuts down.
async fn write_numbered_records(mut writer: impl AsyncWrite + Unpin, count: u32) {
    for number in 0..count {
        let record = record(number);
        writer
            .write_all(&record[..record_length(number)])
            .await
            .unwrap();
    }
    writer.shutdown().await.unwrap();
}

fn record(number: u32) -> [u8; 8] {
    let mut record = [number as u8; 8];
    record[..4].copy_from_slice(&number.to_be_bytes());
    record
}

/// Records are 5 to 8 bytes long so that writes do not line up.
fn record_length(number: u32) -> usize {
    5 + (number % 4) as usize
}

fn expected_records(count: u32) -> Vec<u8> {
    (0..count)
        .flat_map(|number| record(number)[..record_length(number)].to_vec())
        .collect()
}

async fn write_and_read_records(stream: TcpStream, count: u32) -> Vec<u8> {
    let (mut reader, writer) = stream.into_split();
    let (_, (received, end)) = tokio::join!(
        write_numbered_records(writer, count),
        read_until_end(&mut reader)
    );
    end.unwrap();
    received
}

#[tokio::test]
async fn many_small_writes_keep_their_order() {
    let count = 20_000;
    let proxied = Rig::new().await.connect().await;
    proxied.client.set_nodelay(true).unwrap();
    proxied.server.set_nodelay(true).unwrap();
    let (client_received, server_received) = within("both record streams", async {
        tokio::join!(
            write_and_read_records(proxied.client, count),
            write_and_read_records(proxied.server, count)
        )
    })
    .await;

    let expected = expected_records(count);
    assert!(server_received == expected, "client→server records differ");
    assert!(client_received == expected, "server→client records differ");
    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.downstream_to_upstream, expected.len() as u64);
    assert_eq!(stats.upstream_to_downstream, expected.len() as u64);
    assert_eq!(stats.outcome, RelayOutcome::Closed);
}

// ---------------------------------------------------------------------------
// 2. Half-close, and 6. who speaks first.

#[tokio::test]
async fn client_half_close_then_server_responds() {
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let response = b"HTTP/1.0 200 OK\r\n\r\nhello";
    let mut proxied = Rig::new().await.connect().await;

    proxied.client.write_all(request).await.unwrap();
    proxied.client.shutdown().await.unwrap();
    let (received, end) = within("server to read EOF", read_until_end(&mut proxied.server)).await;
    end.unwrap();
    assert_eq!(received, request);

    proxied.server.write_all(response).await.unwrap();
    drop(proxied.server);
    let (received, end) = within("client to read EOF", read_until_end(&mut proxied.client)).await;
    end.unwrap();
    assert_eq!(received, response);

    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(
        stats,
        RelayStats {
            downstream_to_upstream: request.len() as u64,
            upstream_to_downstream: response.len() as u64,
            outcome: RelayOutcome::Closed,
        }
    );
}

#[tokio::test]
async fn server_banner_half_close_then_client_keeps_sending() {
    let banner = b"220 ready, and done talking\r\n";
    let mut proxied = Rig::new().await.connect().await;

    proxied.server.write_all(banner).await.unwrap();
    proxied.server.shutdown().await.unwrap();
    let (received, end) = within("client to read EOF", read_until_end(&mut proxied.client)).await;
    end.unwrap();
    assert_eq!(received, banner);

    // The other direction still works, several rounds of writes after the EOF.
    let mut sent = Vec::new();
    for line in 0..100 {
        let message = format!("line {line} after the server's FIN\n");
        proxied.client.write_all(message.as_bytes()).await.unwrap();
        sent.extend_from_slice(message.as_bytes());
        let mut echo = vec![0; message.len()];
        within("server to read", proxied.server.read_exact(&mut echo))
            .await
            .unwrap();
        assert_eq!(echo, message.as_bytes());
    }
    proxied.client.shutdown().await.unwrap();
    let (rest, end) = within("server to read EOF", read_until_end(&mut proxied.server)).await;
    end.unwrap();
    assert!(rest.is_empty());

    let stats = proxied.stats().await;
    assert_eq!(stats.downstream_to_upstream, sent.len() as u64);
    assert_eq!(stats.upstream_to_downstream, banner.len() as u64);
    assert_eq!(stats.outcome, RelayOutcome::Closed);
}

/// A ping-pong of `turns` messages in which `first` speaks first.
async fn conversation(first: Role, turns: usize) {
    let mut proxied = Rig::new().await.connect().await;
    for turn in 0..turns {
        let speaker_is_client = (turn % 2 == 0) == (first == Role::Client);
        let (speaker, listener) = if speaker_is_client {
            (&mut proxied.client, &mut proxied.server)
        } else {
            (&mut proxied.server, &mut proxied.client)
        };
        let message = format!("turn {turn}: {}", "x".repeat(turn * 37));
        speaker.write_all(message.as_bytes()).await.unwrap();
        let mut heard = vec![0; message.len()];
        within("the other side to hear", listener.read_exact(&mut heard))
            .await
            .unwrap();
        assert_eq!(heard, message.as_bytes());
    }
    drop(proxied.client);
    drop(proxied.server);
    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.outcome, RelayOutcome::Closed);
}

#[tokio::test]
async fn server_speaks_first() {
    conversation(Role::Server, 20).await;
}

#[tokio::test]
async fn client_speaks_first() {
    conversation(Role::Client, 20).await;
}

// ---------------------------------------------------------------------------
// 3. and 5. Resets.

#[tokio::test]
async fn client_reset_resets_server() {
    let mut proxied = Rig::new().await.connect().await;
    proxied.client.write_all(b"half a request").await.unwrap();
    let mut received = [0; 14];
    within("server to read", proxied.server.read_exact(&mut received))
        .await
        .unwrap();

    reset_by_closing(proxied.client);
    let (_, end) = within("server to see the end", read_until_end(&mut proxied.server)).await;
    assert!(is_reset(&end), "server saw {end:?} instead of a reset");

    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.outcome, RelayOutcome::DownstreamReset);
    assert_eq!(stats.downstream_to_upstream, 14);
}

#[tokio::test]
async fn server_reset_resets_client() {
    let mut proxied = Rig::new().await.connect().await;
    proxied.server.write_all(b"half a response").await.unwrap();
    let mut received = [0; 15];
    within("client to read", proxied.client.read_exact(&mut received))
        .await
        .unwrap();

    reset_by_closing(proxied.server);
    let (_, end) = within("client to see the end", read_until_end(&mut proxied.client)).await;
    assert!(is_reset(&end), "client saw {end:?} instead of a reset");

    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.outcome, RelayOutcome::UpstreamReset);
    assert_eq!(stats.upstream_to_downstream, 15);
}

/// The client half-closes, then resets while the relay only waits on the
/// server: the relay must notice anyway, without help from the server.
#[tokio::test]
async fn reset_after_half_close_is_noticed_while_the_other_side_is_silent() {
    let mut proxied = Rig::new().await.connect().await;
    proxied.client.write_all(b"request").await.unwrap();
    proxied.client.shutdown().await.unwrap();
    let (received, end) = within("server to read EOF", read_until_end(&mut proxied.server)).await;
    end.unwrap();
    assert_eq!(received, b"request");

    reset_by_closing(proxied.client);
    // The server stays silent: only the relay can notice the reset.
    let stats = within("relay to notice the reset", proxied.relay)
        .await
        .unwrap();
    assert_eq!(stats.outcome, RelayOutcome::DownstreamReset);

    // The server already read EOF, so it learns of the reset when it writes.
    let written = proxied.server.write_all(b"late response").await;
    assert!(
        is_reset_or_broken_pipe(&written),
        "server write gave {written:?}"
    );
}

/// Floods from `flooder` towards `victim`, whose receive path is tiny and who
/// never reads, so that the relay ends up blocked writing to the victim; then
/// the victim resets. Returns the relay's stats and what the flooder saw.
async fn reset_while_relay_is_blocked_writing_to(victim: Role) -> (RelayStats, io::Result<()>) {
    let proxied = Rig::with_squeezed(Some(victim)).await.connect().await;
    let (flooder, victim_stream) = match victim {
        Role::Server => (proxied.client, proxied.server),
        Role::Client => (proxied.server, proxied.client),
    };
    let progress = Arc::new(Progress::default());
    let flood = tokio::spawn(flood(flooder, progress.clone()));

    // Much more than the victim side can hold (its receive buffer, the
    // relay's send buffer towards it and the relay's own buffer).
    let stuck_beyond = 4 * BUFFER_SIZE as u64;
    within(
        "the flood to get past the victim's buffers",
        progress.reach(stuck_beyond),
    )
    .await;
    reset_by_closing(victim_stream);

    let flood_end = within("the flooder to fail", flood).await.unwrap();
    let stats = within("relay", proxied.relay).await.unwrap();
    (stats, flood_end)
}

#[derive(Default)]
struct Progress {
    written: AtomicU64,
    changed: Notify,
}

impl Progress {
    fn add(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    async fn reach(&self, bytes: u64) {
        loop {
            let changed = self.changed.notified();
            if self.written.load(Ordering::SeqCst) >= bytes {
                return;
            }
            changed.await;
        }
    }
}

/// Writes until a write fails; reads nothing.
async fn flood(mut stream: TcpStream, progress: Arc<Progress>) -> io::Result<()> {
    let chunk = vec![0x5a; 16 * 1024];
    loop {
        stream.write_all(&chunk).await?;
        progress.add(chunk.len());
    }
}

#[tokio::test]
async fn server_reset_while_relay_is_blocked_writing_to_it() {
    let (stats, flood_end) = reset_while_relay_is_blocked_writing_to(Role::Server).await;
    assert_eq!(stats.outcome, RelayOutcome::UpstreamReset);
    assert!(
        is_reset_or_broken_pipe(&flood_end),
        "client flood ended with {flood_end:?}"
    );
}

#[tokio::test]
async fn client_reset_while_relay_is_blocked_writing_to_it() {
    let (stats, flood_end) = reset_while_relay_is_blocked_writing_to(Role::Client).await;
    assert_eq!(stats.outcome, RelayOutcome::DownstreamReset);
    assert!(
        is_reset_or_broken_pipe(&flood_end),
        "server flood ended with {flood_end:?}"
    );
}

// ---------------------------------------------------------------------------
// Idle timeout.

#[tokio::test]
async fn idle_timeout_resets_both_sides() {
    let idle_timeout = Duration::from_millis(300);
    let rig = Rig::new().await;
    let mut proxied = rig
        .connect_with(move |down, up| relay_with_idle_timeout(down, up, idle_timeout))
        .await;
    proxied.client.write_all(b"ping").await.unwrap();
    let mut received = [0; 4];
    within("server to read", proxied.server.read_exact(&mut received))
        .await
        .unwrap();

    let started_waiting = Instant::now();
    let (_, client_end) =
        within("client to see the end", read_until_end(&mut proxied.client)).await;
    let (_, server_end) =
        within("server to see the end", read_until_end(&mut proxied.server)).await;
    assert!(is_reset(&client_end), "client saw {client_end:?}");
    assert!(is_reset(&server_end), "server saw {server_end:?}");
    assert!(started_waiting.elapsed() >= idle_timeout / 2);
    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.outcome, RelayOutcome::IdleTimeout);
}

/// A connection that keeps moving bytes lives well past the idle timeout.
/// Paced writes (one every 50 ms for 3 s, against a 1 s timeout), not a
/// bulk transfer: on a busy machine a bulk transfer can stall longer than a
/// short timeout, while a 1 s gap between paced writes means the relay is
/// broken, not the machine busy.
#[tokio::test]
async fn idle_timeout_does_not_cut_a_busy_connection() {
    let idle_timeout = Duration::from_secs(1);
    let rig = Rig::new().await;
    let proxied = rig
        .connect_with(move |down, up| relay_with_idle_timeout(down, up, idle_timeout))
        .await;
    let (mut client, mut server) = (proxied.client, proxied.server);
    let started = Instant::now();
    let writes = 60u64;
    let sender = tokio::spawn(async move {
        for i in 0..writes {
            client.write_all(&[i as u8]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.shutdown().await.unwrap();
        client
    });
    let received = within("server", async {
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        all
    })
    .await;
    assert_eq!(
        received.len() as u64,
        writes,
        "the relay cut the connection"
    );
    assert!(
        started.elapsed() >= idle_timeout * 2,
        "not busy for long enough"
    );
    server.shutdown().await.unwrap();
    drop(within("client", sender).await.unwrap());
    let stats = within("relay", proxied.relay).await.unwrap();
    assert_eq!(stats.outcome, RelayOutcome::Closed);
    assert_eq!(stats.downstream_to_upstream, writes);
}

// ---------------------------------------------------------------------------
// 7. Many relays at once.

fn raise_open_file_limit_to_hard_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// Echoes everything back, then closes once the peer has half-closed.
async fn echo(stream: TcpStream) {
    let (mut reader, mut writer) = stream.into_split();
    tokio::io::copy(&mut reader, &mut writer).await.unwrap();
    writer.shutdown().await.unwrap();
}

/// Sends a message of a few KB specific to `index` and checks the echo.
async fn echo_round_trip(stream: TcpStream, index: usize) -> RelayStats {
    let message: Vec<u8> = format!("connection {index};").repeat(200).into_bytes();
    let (mut reader, mut writer) = stream.into_split();
    let (_, (echoed, end)) = tokio::join!(
        async {
            writer.write_all(&message).await.unwrap();
            writer.shutdown().await.unwrap();
        },
        read_until_end(&mut reader)
    );
    end.unwrap();
    assert!(echoed == message, "connection {index}: echo differs");
    RelayStats {
        downstream_to_upstream: message.len() as u64,
        upstream_to_downstream: message.len() as u64,
        outcome: RelayOutcome::Closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_relays_all_complete() {
    const CONNECTIONS: usize = 1000;
    raise_open_file_limit_to_hard_limit();
    let rig = Rig::new().await;
    let mut connections = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let proxied = rig.connect().await;
        tokio::spawn(echo(proxied.server));
        connections.push((proxied.client, proxied.relay));
    }
    let checks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(index, (client, relay))| {
            tokio::spawn(async move {
                let expected = echo_round_trip(client, index).await;
                assert_eq!(relay.await.unwrap(), expected, "connection {index}");
            })
        })
        .collect();
    within("all connections", async {
        for check in checks {
            check.await.unwrap();
        }
    })
    .await;
}
