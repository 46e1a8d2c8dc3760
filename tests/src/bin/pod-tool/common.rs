//! What the subcommands share: dialling, listening, the descriptor limit,
//! reading lines, the seeded byte stream and how bytes are shown in messages.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// Connect timeout of the traffic clients.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of the traffic clients once connected.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunk size of the seeded stream (and of uploads).
pub const CHUNK: usize = 1 << 18;
/// Connections waiting to be accepted (the kernel caps it at somaxconn).
pub const BACKLOG: i32 = 4096;

/// A connected TCP socket with the timeout semantics of a Python socket that
/// has a timeout: non-blocking underneath, every read and write waits for
/// readiness with `poll()` for at most the timeout (then `TimedOut`), and an
/// `EAGAIN` is waited out, never returned. (A blocking socket with
/// `SO_RCVTIMEO` would return the `EAGAIN` a sockmap can give a blocking
/// reader; the traffic server's plain blocking sockets show that on purpose.)
pub struct Conn {
    stream: TcpStream,
    timeout: Duration,
}

impl Conn {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        Ok(Conn { stream, timeout })
    }

    /// The socket (for addresses, options, shutdown).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Another handle on the same socket, with the same timeout.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            stream: self.stream.try_clone()?,
            timeout: self.timeout,
        })
    }

    /// Runs `op` until it does not fail with `WouldBlock`, waiting for
    /// `events` in between, until the timeout has passed.
    fn retry<T>(
        &mut self,
        events: i16,
        mut op: impl FnMut(&mut TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match op(&mut self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            match unsafe { libc::poll(&mut fd, 1, ms) } {
                0 => return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => {}
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(libc::POLLIN, |s| s.read(buf))
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(libc::POLLOUT, |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `addr` within `connect_timeout`; reads and writes then wait
/// at most `io_timeout` each (see [`Conn`]). The error names the address
/// (and `what`, if any).
pub fn dial(
    addr: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
    what: &str,
) -> Result<Conn> {
    let s = TcpStream::connect_timeout(&addr, connect_timeout)
        .with_context(|| format!("{what}connect to {addr}"))?;
    Ok(Conn::new(s, io_timeout)?)
}

/// A listening socket on `addr` (IPv6 sockets `IPV6_V6ONLY` unless
/// `dual_stack`), `SO_REUSEADDR`, backlog [`BACKLOG`].
pub fn listen(addr: SocketAddr, dual_stack: bool) -> Result<std::net::TcpListener> {
    let bind = || -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(!dual_stack)?;
        }
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok(s.into())
    };
    bind().with_context(|| format!("listening on {addr}"))
}

/// `0.0.0.0:port` and `[::]:port` (IPv6 only), for the tokio servers.
pub fn listen_v4_v6(port: u16) -> Result<Vec<tokio::net::TcpListener>> {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
    .into_iter()
    .map(|addr| {
        let l = listen(addr, false)?;
        l.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(l)?)
    })
    .collect()
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the hard limit.
pub fn raise_nofile() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", io::Error::last_os_error());
        }
        if limit.rlim_cur != limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                bail!("setrlimit: {}", io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_max)
}

/// A multi-threaded tokio runtime of `threads` workers.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// A single-threaded tokio runtime.
pub fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Reads until EOF, failing once more than `limit` bytes arrived.
pub fn read_all(s: &mut impl Read, limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0; 65536];
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..k]);
        if out.len() > limit {
            bail!("reply longer than {limit} bytes: {}", preview(&out));
        }
    }
}

/// Reads one line (up to and with `\n`), a byte at a time so that nothing
/// after it is consumed. EOF before the end of the line is an error.
pub fn read_line(s: &mut impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut byte = [0u8];
    while out.last() != Some(&b'\n') {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF before end of line; got {}", preview(&out)),
            ));
        }
        out.push(byte[0]);
        if out.len() > limit {
            return Err(io::Error::other(format!(
                "line longer than {limit} bytes: {}",
                preview(&out)
            )));
        }
    }
    Ok(out)
}

/// The start of `b` as an escaped byte string, for messages.
pub fn preview(b: &[u8]) -> String {
    const LIMIT: usize = 120;
    let shown: String = b
        .iter()
        .take(LIMIT)
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect();
    if b.len() <= LIMIT {
        format!("b\"{shown}\"")
    } else {
        format!("b\"{shown}\"... ({} bytes)", b.len())
    }
}

/// Index of the first byte where `a` and `b` differ (or the shorter length).
pub fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// `ip:port`, with brackets for IPv6.
pub fn addr(host: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(host, port)
}

/// `n` deterministic pseudo-random bytes from `seed`, handed out in chunks of
/// [`CHUNK`] bytes (the last one shorter). Client and server run the same
/// generator, so neither has to hold the data.
pub struct SeededStream {
    state: u64,
    left: u64,
    chunk: Vec<u8>,
}

impl SeededStream {
    pub fn new(n: u64, seed: u64) -> SeededStream {
        SeededStream {
            state: seed,
            left: n,
            chunk: vec![0; CHUNK],
        }
    }

    /// The next chunk, or `None` once all `n` bytes were handed out.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let k = self.left.min(CHUNK as u64) as usize;
        for word in self.chunk.chunks_mut(8) {
            // splitmix64
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes());
        }
        self.left -= k as u64;
        Some(&self.chunk[..k])
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running SHA-256.
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest in lowercase hex.
    pub fn hex(self) -> String {
        hex(self.0.finish().as_ref())
    }
}
