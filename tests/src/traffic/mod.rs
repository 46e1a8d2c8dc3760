//! Real traffic: servers and clients (`pod-tool`, see [`crate::tool`]) run
//! inside pods.
//!
//! Two generations live here:
//! - [`start_echo_server`] and [`echo_round_trips`]: a minimal echo check;
//! - [`TrafficServer`] and the client helpers ([`bulk_upload`],
//!   [`half_close`], [`concurrent_echo`], [`connect_result`], ...): each
//!   proves one property of a TCP connection (bytes intact in both
//!   directions, half-close, server-first protocols, resets both ways,
//!   addresses seen by both ends, many concurrent connections, many small
//!   writes, how a connect fails). They are meant to give the same results on
//!   a direct connection and on one captured and proxied by the mesh agent.
//!
//! Server and clients are `pod-tool traffic <command>` (`pod-tool traffic
//! upload 10.1.0.3 7100 67108864 ...`). Clients print `result ...` on
//! success, and `FAIL: <reason>` on stderr (exit status 1) on failure; the
//! errors of the helpers name the helper, the client pod and the target,
//! and include the client's command, exit status, stdout and stderr.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::{Pod, Process, wait_until};

#[cfg(test)]
mod tests;

/// How long [`TrafficServer::start`] waits for `ready`.
const SERVER_START_DEADLINE: Duration = Duration::from_secs(15);
/// Deadline of the quick client helpers (one connection, little data).
const QUICK_DEADLINE: Duration = Duration::from_secs(30);
/// Connect timeout of [`connect_result`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes sent before `shutdown(SHUT_WR)` by [`half_close`].
const HALF_CLOSE_BYTES: u64 = 100_000;
/// Size of the big bulk variant, [`bulk_big_both_ways`].
pub const BIG_BULK_BYTES: u64 = 300 << 20;

/// A long-running multi-purpose TCP server (one `pod-tool traffic server`
/// process) in a pod.
///
/// It listens on `0.0.0.0` and `::` (`IPV6_V6ONLY`, so two sockets) on two
/// ports, with a backlog of 4096, `RLIMIT_NOFILE` raised to its hard limit
/// and a thread per connection on plain blocking sockets (thousands of
/// concurrent connections work):
///
/// - [`port`](Self::port), the command port: the client starts each
///   connection with one line, `ECHO`, `SINK`, `SOURCE <n> <seed>`,
///   `HALFCLOSE`, `RESET`, `PEER`, `EXPECTRESET <tag>` or `STATS` (see the
///   client helpers, which speak this protocol);
/// - [`banner_port`](Self::banner_port) (`port + 1`), server-first: on
///   accept the server writes a banner line before reading anything, then
///   echoes until EOF.
///
/// It keeps only counters ([`TrafficServer::stats`]); stdout gets `ready`,
/// one line per `EXPECTRESET` connection, and one per error. Killed on drop
/// (and with its topology).
#[derive(Debug)]
pub struct TrafficServer {
    process: Process,
    pod: String,
    netns: PathBuf,
    port: u16,
    banner_port: u16,
}

/// Counters of a [`TrafficServer`] since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted (both ports, both families; the `STATS`
    /// connection that asked included).
    pub connections: u64,
    /// Connections open now (the asking one included).
    pub active: u64,
    /// Most connections open at the same time.
    pub max_active: u64,
    /// `EXPECTRESET` connections that ended with ECONNRESET.
    pub resets_observed: u64,
    /// `EXPECTRESET` connections that ended with a clean EOF instead.
    pub eofs_observed: u64,
    /// Connections that failed on the server side (unknown command, a
    /// reset where none was expected, ...); see the server's stdout.
    pub errors: u64,
}

/// How a TCP connect ended, as seen by the client ([`connect_result`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// `connect()` succeeded.
    Connected,
    /// ECONNREFUSED: an RST answered the SYN (nothing listening).
    Refused,
    /// EPERM or EACCES: refused locally (e.g. by a cgroup/bpf hook).
    PermissionDenied,
    /// ECONNRESET during the connect.
    Reset,
    /// No answer within [`CONNECT_TIMEOUT`].
    TimedOut,
    /// EHOSTUNREACH or ENETUNREACH.
    Unreachable,
}

impl TrafficServer {
    /// Starts the server in `pod` with the command protocol on `port` and the
    /// server-first banner on `port + 1`, and waits until all four sockets
    /// listen (the server prints `ready`).
    pub fn start(pod: &Pod, port: u16) -> Result<TrafficServer> {
        Self::start_with(pod, port, &[])
    }

    /// [`TrafficServer::start`] with its listeners marked `mark` (SO_MARK),
    /// as an application with routing of its own.
    pub fn start_marked(pod: &Pod, port: u16, mark: u32) -> Result<TrafficServer> {
        Self::start_with(pod, port, &["--mark", &mark.to_string()])
    }

    fn start_with(pod: &Pod, port: u16, options: &[&str]) -> Result<TrafficServer> {
        let banner_port = port
            .checked_add(1)
            .context("TrafficServer needs port + 1 for its banner port")?;
        let (p, b) = (port.to_string(), banner_port.to_string());
        let mut process = pod
            .spawn_tool(&[&["traffic", "server", &p, &b][..], options].concat())
            .with_context(|| format!("starting the traffic server in pod `{}`", pod.name()))?;
        let ready = format!("ready {port} {banner_port}");
        let started = wait_until(
            &format!(
                "traffic server in pod `{}` to listen on ports {port} and {banner_port}",
                pod.name()
            ),
            SERVER_START_DEADLINE,
            || {
                if let Some(status) = process.try_status()? {
                    bail!("it exited ({status})");
                }
                Ok(process.stdout_so_far().lines().any(|l| l == ready))
            },
        );
        if let Err(e) = started {
            let report = process.output_report();
            return Err(e.context(format!("`{}`\n{report}", process.command())));
        }
        Ok(TrafficServer {
            process,
            pod: pod.name().to_string(),
            netns: pod.netns_path(),
            port,
            banner_port,
        })
    }

    /// The command port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server-first port (`port + 1`).
    pub fn banner_port(&self) -> u16 {
        self.banner_port
    }

    /// The server process (for its output, or to signal it).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Asks the server for its counters, out of band: from a thread of the
    /// test process that joined the server pod's netns (not its cgroup, so
    /// cgroup connect hooks do not apply), to `127.0.0.1:port` over loopback.
    /// Only an sk_lookup program that also steers loopback traffic to this
    /// port would see it.
    pub fn stats(&self) -> Result<ServerStats> {
        let port = self.port;
        let reply = crate::netns::try_in_netns(&self.netns, move || -> Result<String> {
            use std::io::{Read, Write};
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"STATS\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .and_then(|r| r)
        .with_context(|| format!("STATS from the traffic server in pod `{}`", self.pod))?;
        parse_stats(&reply).with_context(|| {
            format!(
                "bad STATS reply {reply:?} from the traffic server in pod `{}`",
                self.pod
            )
        })
    }

    /// Waits until the server has seen the connection `tag` (returned by
    /// [`client_reset`]) end with ECONNRESET. Fails at once if it ended
    /// with a clean EOF instead, and after `deadline` if it has not ended.
    pub fn wait_for_client_reset(&self, tag: &str, deadline: Duration) -> Result<()> {
        let mut clean_eof = false;
        wait_until(
            &format!(
                "traffic server in pod `{}` to see connection {tag} reset",
                self.pod
            ),
            deadline,
            || {
                for line in self.process.stdout_so_far().lines() {
                    let mut words = line.split(' ');
                    let (what, t) = (words.next(), words.next());
                    if t == Some(tag) {
                        match what {
                            Some("reset-observed") => return Ok(true),
                            Some("eof-observed") => {
                                clean_eof = true;
                                return Ok(true);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(false)
            },
        )
        .with_context(|| self.process.output_report())?;
        ensure!(
            !clean_eof,
            "traffic server in pod `{}` saw a clean EOF, not a reset, on connection {tag}\n{}",
            self.pod,
            self.process.output_report()
        );
        Ok(())
    }
}

fn parse_stats(reply: &str) -> Result<ServerStats> {
    let v: serde_json::Value = serde_json::from_str(reply.trim())?;
    let field = |name: &str| -> Result<u64> {
        v.get(name)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no counter `{name}`"))
    };
    Ok(ServerStats {
        connections: field("connections")?,
        active: field("active")?,
        max_active: field("max_active")?,
        resets_observed: field("resets_observed")?,
        eofs_observed: field("eofs_observed")?,
        errors: field("errors")?,
    })
}

/// Runs `pod-tool traffic` in `client` with `args` (a subcommand, then host
/// and port) and returns the words after `result <subcommand>` on its
/// stdout. Errors name `what`, the pod and the target.
fn run_client(
    client: &Pod,
    what: &str,
    host: IpAddr,
    port: u16,
    args: &[&str],
    deadline: Duration,
) -> Result<Vec<String>> {
    let (host_s, port_s) = (host.to_string(), port.to_string());
    let mut argv = vec!["traffic", args[0], host_s.as_str(), port_s.as_str()];
    argv.extend_from_slice(&args[1..]);
    let context = || {
        format!(
            "{what}: client in pod `{}` to {}",
            client.name(),
            SocketAddr::new(host, port)
        )
    };
    let output = client
        .spawn_tool(&argv)
        .and_then(|mut p| p.wait_success(deadline))
        .with_context(context)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let head = format!("result {}", args[0]);
    let words = stdout
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(&head)?;
            (rest.is_empty() || rest.starts_with(' ')).then_some(rest)
        })
        .with_context(|| format!("no `{head}` line in stdout {stdout:?}"))
        .with_context(context)?;
    Ok(words.split_whitespace().map(str::to_string).collect())
}

/// Parses `<ip> <port>` from two words.
fn parse_addr(words: &[String]) -> Result<SocketAddr> {
    match words {
        [ip, port, ..] => Ok(SocketAddr::new(
            ip.parse().with_context(|| format!("bad IP {ip:?}"))?,
            port.parse().with_context(|| format!("bad port {port:?}"))?,
        )),
        _ => bail!("expected `<ip> <port>`, got {words:?}"),
    }
}

/// Deadline for moving `bytes`: 30 s plus 8 MiB/s (far below what the
/// debug-built tool does, to leave room for a proxy and busy CI machines).
pub fn bulk_deadline(bytes: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs_f64(bytes as f64 / f64::from(8u32 << 20))
}

/// Proves client→server bulk data arrives intact and complete: sends
/// `SINK` and then `bytes` of seeded pseudo-random data in 256 KiB chunks,
/// shuts down its write half, and checks that the byte count and SHA-256 the
/// server computed equal the client's. Neither side holds the data in
/// memory, so hundreds of MiB are fine; deadline [`bulk_deadline`].
pub fn bulk_upload(client: &Pod, host: impl Into<IpAddr>, port: u16, bytes: u64) -> Result<()> {
    let (n, seed) = (bytes.to_string(), (bytes ^ 0x5eed).to_string());
    run_client(
        client,
        &format!("bulk_upload of {bytes} bytes"),
        host.into(),
        port,
        &["upload", &n, &seed],
        bulk_deadline(bytes),
    )?;
    Ok(())
}

/// Proves server→client bulk data arrives intact and complete: asks for
/// `SOURCE <bytes> <seed>` and compares what arrives, chunk by chunk, with
/// the same generator run on the client (the error names the first
/// differing byte offset), then checks count, SHA-256 and a clean EOF.
/// Streams, so hundreds of MiB are fine; deadline [`bulk_deadline`].
pub fn bulk_download(
    client: &Pod,
    host: impl Into<IpAddr>,
    port: u16,
    bytes: u64,
    seed: u64,
) -> Result<()> {
    let (n, seed_s) = (bytes.to_string(), seed.to_string());
    run_client(
        client,
        &format!("bulk_download of {bytes} bytes (seed {seed})"),
        host.into(),
        port,
        &["download", &n, &seed_s],
        bulk_deadline(bytes),
    )?;
    Ok(())
}

/// [`bulk_upload`] then [`bulk_download`] of [`BIG_BULK_BYTES`] (300 MiB).
pub fn bulk_big_both_ways(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<()> {
    let host = host.into();
    bulk_upload(client, host, port, BIG_BULK_BYTES)?;
    bulk_download(client, host, port, BIG_BULK_BYTES, 0xb16)
}

/// Proves a half-close from client to server is preserved and the server
/// can still write after it: sends `HALFCLOSE` and 100 000 bytes,
/// `shutdown(SHUT_WR)`, then expects exactly `got 100000 bytes\n` and EOF.
pub fn half_close(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<()> {
    let n = HALF_CLOSE_BYTES.to_string();
    run_client(
        client,
        "half_close",
        host.into(),
        port,
        &["halfclose", &n],
        QUICK_DEADLINE,
    )?;
    Ok(())
}

/// Proves server-first protocols work: connects to `banner_port` (a
/// [`TrafficServer::banner_port`]) and, without sending anything, must read
/// the server's banner line within 5 s; then checks one echo and a clean
/// close.
pub fn server_first(client: &Pod, host: impl Into<IpAddr>, banner_port: u16) -> Result<()> {
    run_client(
        client,
        "server_first",
        host.into(),
        banner_port,
        &["banner"],
        QUICK_DEADLINE,
    )?;
    Ok(())
}

/// Proves a server's reset reaches the client: sends `RESET` (the server
/// closes with `SO_LINGER` 0) and is Ok only if the client's read fails
/// with ECONNRESET; a clean EOF, data or silence (10 s) are errors.
pub fn expect_reset(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<()> {
    run_client(
        client,
        "expect_reset",
        host.into(),
        port,
        &["expect-reset"],
        QUICK_DEADLINE,
    )?;
    Ok(())
}

/// First half of proving a client's reset reaches the server: sends
/// `EXPECTRESET <tag>`, waits for the server's `armed`, sends 1000 bytes and
/// closes with `SO_LINGER` 0 (an RST). Returns the tag; check the server
/// side with [`TrafficServer::wait_for_client_reset`].
pub fn client_reset(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tag = format!(
        "rst-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    run_client(
        client,
        "client_reset",
        host.into(),
        port,
        &["client-reset", &tag],
        QUICK_DEADLINE,
    )?;
    Ok(tag)
}

/// The client's address as the server saw it (`PEER`: the server answers
/// with its `accept()` peer address) — for checking which source IP a
/// connection arrives with.
pub fn peer_seen_by_server(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<SocketAddr> {
    let words = run_client(
        client,
        "peer_seen_by_server",
        host.into(),
        port,
        &["peer"],
        QUICK_DEADLINE,
    )?;
    parse_addr(&words).context("peer_seen_by_server: bad client output")
}

/// The peer address the client's socket reports (`getpeername()`) right
/// after connecting to `host:port` — for proving an application still sees
/// the address it dialled. Any listener will do (nothing is sent).
pub fn getpeername_after_connect(
    client: &Pod,
    host: impl Into<IpAddr>,
    port: u16,
) -> Result<SocketAddr> {
    let words = run_client(
        client,
        "getpeername_after_connect",
        host.into(),
        port,
        &["getpeername"],
        QUICK_DEADLINE,
    )?;
    parse_addr(&words).context("getpeername_after_connect: bad client output")
}

/// Proves `connections` TCP connections can be open at the same time and
/// each carries its own bytes: opens all of them first (RLIMIT_NOFILE
/// raised), then on every one sends `ECHO` and `bytes_each` distinct bytes
/// and checks its echo, all multiplexed in one selector loop while every
/// connection stays open; only then half-closes each and expects EOF.
/// Deadline: 60 s plus 20 ms per connection.
pub fn concurrent_echo(
    client: &Pod,
    host: impl Into<IpAddr>,
    port: u16,
    connections: u32,
    bytes_each: usize,
) -> Result<()> {
    let (n, each) = (connections.to_string(), bytes_each.to_string());
    run_client(
        client,
        &format!("concurrent_echo of {connections} connections x {bytes_each} bytes"),
        host.into(),
        port,
        &["concurrent", &n, &each],
        Duration::from_secs(60) + Duration::from_millis(20) * connections,
    )?;
    Ok(())
}

/// Proves byte order survives many tiny segments: with `TCP_NODELAY`,
/// `writes` separate writes of a few bytes each (`0;1;2;...`) over `ECHO`,
/// read back concurrently and compared in order (the error names the first
/// differing offset). Deadline: 30 s plus 1 ms per write.
pub fn many_small_writes(
    client: &Pod,
    host: impl Into<IpAddr>,
    port: u16,
    writes: u32,
) -> Result<()> {
    let n = writes.to_string();
    run_client(
        client,
        &format!("many_small_writes ({writes} writes)"),
        host.into(),
        port,
        &["small-writes", &n],
        Duration::from_secs(30) + Duration::from_millis(1) * writes,
    )?;
    Ok(())
}

/// How a plain `connect()` to `host:port` from `client` ends, with a
/// [`CONNECT_TIMEOUT`] (3 s) timeout — for fail-closed tests, where a
/// connect must fail, fast, in a given way. Only the connect is observed:
/// the socket is closed right after. Other errors are `Err`.
pub fn connect_result(client: &Pod, host: impl Into<IpAddr>, port: u16) -> Result<ConnectOutcome> {
    let timeout = CONNECT_TIMEOUT.as_secs_f64().to_string();
    let words = run_client(
        client,
        "connect_result",
        host.into(),
        port,
        &["connect", &timeout],
        QUICK_DEADLINE,
    )?;
    Ok(match words.first().map(String::as_str) {
        Some("connected") => ConnectOutcome::Connected,
        Some("refused") => ConnectOutcome::Refused,
        Some("permission-denied") => ConnectOutcome::PermissionDenied,
        Some("reset") => ConnectOutcome::Reset,
        Some("timed-out") => ConnectOutcome::TimedOut,
        Some("unreachable") => ConnectOutcome::Unreachable,
        other => bail!("connect_result: unknown outcome {other:?}"),
    })
}

/// A TCP echo server on `port` (IPv4 and IPv6, all addresses) in `pod`
/// (`pod-tool echo-server`: a task per connection, so thousands of idle
/// connections cost little). Returns once both sockets listen.
pub fn start_echo_server(pod: &Pod, port: u16) -> Result<Process> {
    let mut server = pod.spawn_tool(&["echo-server", &port.to_string()])?;
    wait_until(
        &format!("echo server in pod {} to listen", pod.name()),
        Duration::from_secs(10),
        || {
            if let Some(status) = server.try_status()? {
                bail!("it exited ({status})");
            }
            Ok(server.stdout_so_far().contains("ready"))
        },
    )
    .with_context(|| server.output_report())?;
    Ok(server)
}

/// From `client`, opens `count` TCP connections to `host:port` (a plain echo,
/// as [`start_echo_server`]'s), sends a line on each and checks the echo.
/// Returns after all succeeded; errors name the pod.
pub fn echo_round_trips(client: &Pod, host: &str, port: u16, count: u32) -> Result<()> {
    let (port, times) = (port.to_string(), count.to_string());
    let out = client.run_tool(
        &[
            "echo",
            host,
            &port,
            "--plain",
            "--line",
            "hello {i}",
            "--times",
            &times,
        ],
        Duration::from_secs(30),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains(&format!("result echo {count}")),
        "client in {} printed {stdout:?}",
        client.name()
    );
    Ok(())
}
