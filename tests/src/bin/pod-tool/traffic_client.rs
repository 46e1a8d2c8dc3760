//! The clients of mesh-testbed's traffic helpers, each proving one property
//! of a TCP connection against `traffic server`. On success each prints one
//! `result <subcommand> ...` line; on failure main prints `FAIL: <reason>`
//! on stderr and exits 1.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::common::{
    CONNECT_TIMEOUT, Conn, IO_TIMEOUT, SeededStream, Sha256, addr, current_thread, dial,
    first_diff, preview, raise_nofile, read_all, read_line,
};
use crate::traffic_server::BANNER;

fn connect(host: IpAddr, port: u16) -> Result<Conn> {
    dial(addr(host, port), CONNECT_TIMEOUT, IO_TIMEOUT, "")
}

/// `SINK`, then `n` bytes of the seeded stream; the server's count and
/// SHA-256 must equal the client's.
pub fn upload(host: IpAddr, port: u16, n: u64, seed: u64) -> Result<()> {
    let mut s = connect(host, port)?;
    s.write_all(format!("SINK {n}\n").as_bytes())?;
    let mut h = Sha256::new();
    let mut stream = SeededStream::new(n, seed);
    while let Some(chunk) = stream.next_chunk() {
        s.write_all(chunk)?;
        h.update(chunk);
    }
    s.stream().shutdown(Shutdown::Write)?;
    let raw = read_all(&mut s, 1 << 20)?;
    let reply = String::from_utf8_lossy(&raw);
    let words: Vec<&str> = reply.split_whitespace().collect();
    let [count, digest] = words[..] else {
        bail!("bad SINK reply {}", preview(&raw));
    };
    if count != n.to_string() {
        bail!("server received {count} bytes, client sent {n}");
    }
    let ours = h.hex();
    if digest != ours {
        bail!("server sha256 {digest} != client sha256 {ours} ({n} bytes)");
    }
    println!("result upload {n} {digest}");
    Ok(())
}

/// `SOURCE <n> <seed>`; what arrives is compared with the generator run
/// here (with `verify_seed` instead, to test this verifier), byte for byte.
pub fn download(
    host: IpAddr,
    port: u16,
    n: u64,
    seed: u64,
    verify_seed: Option<u64>,
) -> Result<()> {
    let mut s = connect(host, port)?;
    s.write_all(format!("SOURCE {n} {seed}\n").as_bytes())?;
    let mut expected = SeededStream::new(n, verify_seed.unwrap_or(seed));
    let (mut want_h, mut got_h) = (Sha256::new(), Sha256::new());
    // The generator's current chunk, and how much of it was matched.
    let mut pending: Vec<u8> = Vec::new();
    let mut matched = 0;
    let mut got: u64 = 0;
    let mut buf = vec![0; 1 << 20];
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        let data = &buf[..k];
        got_h.update(data);
        let mut off = 0;
        while off < k {
            if matched == pending.len() {
                let Some(chunk) = expected.next_chunk() else {
                    bail!("server sent more than the {n} bytes asked for");
                };
                want_h.update(chunk);
                pending.clear();
                pending.extend_from_slice(chunk);
                matched = 0;
            }
            let m = (pending.len() - matched).min(k - off);
            let (ours, theirs) = (&pending[matched..matched + m], &data[off..off + m]);
            if ours != theirs {
                let i = first_diff(theirs, ours);
                bail!(
                    "byte {} of the download differs from the generator",
                    got + (off + i) as u64
                );
            }
            matched += m;
            off += m;
        }
        got += k as u64;
    }
    if got != n {
        bail!("downloaded {got} bytes, expected {n} (early EOF)");
    }
    let (got_h, want_h) = (got_h.hex(), want_h.hex());
    if got_h != want_h {
        bail!("sha256 {got_h} != expected {want_h}");
    }
    println!("result download {got} {got_h}");
    Ok(())
}

/// `HALFCLOSE`, `n` bytes, `shutdown(SHUT_WR)`; then exactly `got <n>
/// bytes\n` and EOF must come back.
pub fn halfclose(host: IpAddr, port: u16, n: u64) -> Result<()> {
    let mut s = connect(host, port)?;
    s.write_all(b"HALFCLOSE\n")?;
    let mut stream = SeededStream::new(n, n);
    while let Some(chunk) = stream.next_chunk() {
        s.write_all(chunk)?;
    }
    s.stream().shutdown(Shutdown::Write)?;
    let reply = read_all(&mut s, 1 << 20)?;
    let want = format!("got {n} bytes\n");
    if reply != want.as_bytes() {
        bail!(
            "after shutdown(SHUT_WR) expected {}, got {}",
            preview(want.as_bytes()),
            preview(&reply)
        );
    }
    println!("result halfclose {n}");
    Ok(())
}

/// [`banner`] `times` times; with more than one, the latencies to the
/// banner.
pub fn banners(host: IpAddr, port: u16, times: u32) -> Result<()> {
    let mut latencies = Vec::with_capacity(times as usize);
    for i in 0..times.max(1) {
        let latency = banner(host, port).with_context(|| format!("connection {}", i + 1))?;
        latencies.push(latency.as_micros() as u64);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "latency_us p50 {} p99 {} max {}",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
    Ok(())
}

/// Connects and, sending nothing, must read the banner within 5 s; then one
/// echo and a clean close. Returns the time from connecting to the banner.
pub fn banner(host: IpAddr, port: u16) -> Result<Duration> {
    let started = std::time::Instant::now();
    let mut s = connect(host, port)?;
    s.set_timeout(Duration::from_secs(5));
    let line = match read_line(&mut s, 4096) {
        Ok(line) => line,
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            bail!("no banner within 5 s of connecting (client sent nothing)")
        }
        Err(e) => return Err(e.into()),
    };
    let latency = started.elapsed();
    if line != BANNER {
        bail!("banner {}, expected {}", preview(&line), preview(BANNER));
    }
    s.write_all(b"ping\n")?;
    let pong = read_line(&mut s, 4096)?;
    if pong != b"ping\n" {
        bail!(
            "after banner, echo {}, expected {}",
            preview(&pong),
            preview(b"ping\n")
        );
    }
    s.stream().shutdown(Shutdown::Write)?;
    let rest = read_all(&mut s, 1 << 20)?;
    if !rest.is_empty() {
        bail!("unexpected data before EOF: {}", preview(&rest));
    }
    println!("result banner");
    Ok(latency)
}

/// `RESET`: the read must fail with ECONNRESET within 10 s.
pub fn expect_reset(host: IpAddr, port: u16) -> Result<()> {
    let mut s = connect(host, port)?;
    s.set_timeout(Duration::from_secs(10));
    s.write_all(b"RESET\n")?;
    let mut buf = vec![0; 65536];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            println!("result expect-reset");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            bail!("neither data, EOF nor reset within 10 s")
        }
        Err(e) => Err(e.into()),
        Ok(0) => bail!("clean EOF (FIN) instead of a reset"),
        Ok(k) => bail!("got data {} instead of a reset", preview(&buf[..k])),
    }
}

/// `EXPECTRESET <tag>`, waits for `armed`, sends 1000 bytes and closes with
/// `SO_LINGER` 0: an RST.
pub fn client_reset(host: IpAddr, port: u16, tag: &str) -> Result<()> {
    let mut s = connect(host, port)?;
    s.write_all(format!("EXPECTRESET {tag}\n").as_bytes())?;
    let armed = read_line(&mut s, 4096)?;
    if armed != b"armed\n" {
        bail!("expected {}, got {}", preview(b"armed\n"), preview(&armed));
    }
    s.write_all(&[b'x'; 1000])?;
    socket2::SockRef::from(s.stream()).set_linger(Some(Duration::ZERO))?;
    drop(s);
    println!("result client-reset {tag}");
    Ok(())
}

/// The client's address as the server saw it (`PEER`), and the local one.
pub fn peer(host: IpAddr, port: u16) -> Result<()> {
    let mut s = connect(host, port)?;
    let local = s.stream().local_addr()?;
    s.write_all(b"PEER\n")?;
    let raw = read_all(&mut s, 1 << 20)?;
    let reply = String::from_utf8_lossy(&raw);
    let words: Vec<&str> = reply.split_whitespace().collect();
    let [ip, port] = words[..] else {
        bail!("bad PEER reply {}", preview(&raw));
    };
    println!(
        "result peer {ip} {port} local {} {}",
        local.ip(),
        local.port()
    );
    Ok(())
}

/// `getpeername()` and `getsockname()` right after connecting.
pub fn getpeername(host: IpAddr, port: u16) -> Result<()> {
    let s = connect(host, port)?;
    let (peer, local) = (s.stream().peer_addr()?, s.stream().local_addr()?);
    drop(s);
    println!(
        "result getpeername {} {} local {} {}",
        peer.ip(),
        peer.port(),
        local.ip(),
        local.port()
    );
    Ok(())
}

/// Fails unless some connection made progress within [`IO_TIMEOUT`].
async fn watchdog(progress: Arc<AtomicU64>, left: Arc<AtomicUsize>, n: usize, what: &'static str) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let last = Duration::from_millis(progress.load(Ordering::Relaxed));
        if start.elapsed().saturating_sub(last) > IO_TIMEOUT {
            crate::fail(&format!(
                "stalled for {IO_TIMEOUT:?} with {} of {n} {what}",
                left.load(Ordering::Relaxed)
            ));
        }
    }
}

/// `n` connections open at once, each carrying its own `ECHO` of `each`
/// distinct bytes while all stay open; then each half-closes and must see
/// EOF.
pub fn concurrent(host: IpAddr, port: u16, n: usize, each: usize) -> Result<()> {
    let hard = raise_nofile()?;
    if n as u64 + 64 > hard {
        bail!("{n} connections need more than the RLIMIT_NOFILE hard limit {hard}");
    }
    let target = addr(host, port);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = dial(
            target,
            CONNECT_TIMEOUT,
            IO_TIMEOUT,
            &format!("connection {i} of {n}: "),
        )?;
        conns.push(s.into_stream());
    }
    println!("all {n} connected");
    current_thread()?.block_on(async move {
        let start = Instant::now();
        let progress = Arc::new(AtomicU64::new(0));
        let made_progress = {
            let progress = progress.clone();
            move || progress.store(start.elapsed().as_millis() as u64, Ordering::Relaxed)
        };
        let mut streams = Vec::with_capacity(n);
        for s in conns {
            streams.push(tokio::net::TcpStream::from_std(s)?);
        }

        // Every echo comes back while all n connections are open.
        let left = Arc::new(AtomicUsize::new(n));
        let dog = tokio::spawn(watchdog(
            progress.clone(),
            left.clone(),
            n,
            "echoes incomplete",
        ));
        let mut tasks = JoinSet::new();
        for (i, s) in streams.into_iter().enumerate() {
            let (left, made_progress) = (left.clone(), made_progress.clone());
            tasks.spawn(async move {
                let mut want = format!("conn {i};").into_bytes();
                let mut stream = SeededStream::new(each as u64, i as u64);
                while let Some(chunk) = stream.next_chunk() {
                    want.extend_from_slice(chunk);
                }
                want.truncate(each);
                let mut out = b"ECHO\n".to_vec();
                out.extend_from_slice(&want);
                let (mut r, mut w) = s.into_split();
                let write = async {
                    for piece in out.chunks(65536) {
                        w.write_all(piece).await?;
                        made_progress();
                    }
                    io::Result::Ok(())
                };
                let read = async {
                    let mut got = Vec::with_capacity(each);
                    let mut buf = vec![0; 65536];
                    while got.len() < each {
                        let k = r.read(&mut buf).await.map_err(|e| {
                            format!("connection {i}: recv after {} bytes: {e}", got.len())
                        })?;
                        if k == 0 {
                            return Err(format!(
                                "connection {i}: EOF after {} of {each} bytes",
                                got.len()
                            ));
                        }
                        made_progress();
                        got.extend_from_slice(&buf[..k]);
                    }
                    if got.len() > each {
                        return Err(format!(
                            "connection {i}: {} bytes echoed, sent {each}",
                            got.len()
                        ));
                    }
                    if got != want {
                        return Err(format!(
                            "connection {i}: echo differs at byte {}",
                            first_diff(&got, &want)
                        ));
                    }
                    Ok(())
                };
                let (written, read) = tokio::join!(write, read);
                written.map_err(|e| format!("connection {i}: send: {e}"))?;
                read?;
                left.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, String>((i, r.reunite(w).map_err(|e| e.to_string())?))
            });
        }
        let mut streams: Vec<Option<tokio::net::TcpStream>> = (0..n).map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            let (i, s) = done?.map_err(anyhow::Error::msg)?;
            streams[i] = Some(s);
        }
        dog.abort();

        // Now each is still connected, half-closes, and must see EOF.
        let left = Arc::new(AtomicUsize::new(n));
        let dog = tokio::spawn(watchdog(
            progress.clone(),
            left.clone(),
            n,
            "connections got no EOF",
        ));
        made_progress();
        let mut tasks = JoinSet::new();
        for (i, s) in streams.into_iter().enumerate() {
            let mut s = s.context("a connection went missing")?;
            s.peer_addr().map_err(|e| {
                anyhow::anyhow!("connection {i}: no longer connected after its echo: {e}")
            })?;
            s.shutdown()
                .await
                .with_context(|| format!("connection {i}: shutdown(SHUT_WR)"))?;
            let (left, made_progress) = (left.clone(), made_progress.clone());
            tasks.spawn(async move {
                let mut buf = vec![0; 65536];
                let k = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("connection {i}: recv waiting for EOF: {e}"))?;
                if k > 0 {
                    return Err(format!(
                        "connection {i}: unexpected data {} before EOF",
                        preview(&buf[..k])
                    ));
                }
                made_progress();
                left.fetch_sub(1, Ordering::Relaxed);
                Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done?.map_err(anyhow::Error::msg)?;
        }
        dog.abort();
        println!("result concurrent {n} {each}");
        Ok(())
    })
}

/// With `TCP_NODELAY`, `writes` separate writes (`0;1;2;...`) over `ECHO`,
/// read back concurrently and compared in order.
pub fn small_writes(host: IpAddr, port: u16, writes: u32) -> Result<()> {
    let mut s = connect(host, port)?;
    s.stream().set_nodelay(true)?;
    s.write_all(b"ECHO\n")?;
    let pieces: Vec<String> = (0..writes).map(|i| format!("{i};")).collect();
    let want: Vec<u8> = pieces.concat().into_bytes();
    let mut reader = s.try_clone()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0; 65536];
        let err = loop {
            match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) => break Some(e),
            }
        };
        let _ = tx.send((got, err));
    });
    for p in &pieces {
        s.write_all(p.as_bytes())?;
    }
    s.stream().shutdown(Shutdown::Write)?;
    let (got, err) = rx
        .recv_timeout(IO_TIMEOUT + Duration::from_secs(1))
        .map_err(|_| anyhow::anyhow!("no EOF within {IO_TIMEOUT:?} of {} bytes", want.len()))?;
    if let Some(e) = err {
        bail!(
            "recv failed after {} of {} bytes: {e}",
            got.len(),
            want.len()
        );
    }
    if got != want {
        let i = first_diff(&got, &want);
        let around = |b: &[u8]| preview(&b[i.min(b.len())..(i + 40).min(b.len())]);
        bail!(
            "echo of {writes} writes differs at byte {i} (got {} bytes, want {}): {} vs {}",
            got.len(),
            want.len(),
            around(&got),
            around(&want)
        );
    }
    println!("result small-writes {writes} {}", want.len());
    Ok(())
}

/// How a plain `connect()` ends within `timeout`: `connected`, `refused`,
/// `permission-denied`, `reset`, `timed-out` or `unreachable`.
pub fn connect_outcome(host: IpAddr, port: u16, timeout: Duration) -> Result<()> {
    let target: SocketAddr = addr(host, port);
    let outcome = match TcpStream::connect_timeout(&target, timeout) {
        Ok(_) => "connected",
        Err(e) => match (e.raw_os_error(), e.kind()) {
            (Some(libc::ECONNREFUSED), _) => "refused",
            (Some(libc::EPERM | libc::EACCES), _) => "permission-denied",
            (Some(libc::ECONNRESET), _) => "reset",
            (Some(libc::ETIMEDOUT), _) | (_, ErrorKind::TimedOut) => "timed-out",
            (Some(libc::EHOSTUNREACH | libc::ENETUNREACH), _) => "unreachable",
            _ => bail!("connect to {target}: {e}"),
        },
    };
    println!("result connect {outcome}");
    Ok(())
}
