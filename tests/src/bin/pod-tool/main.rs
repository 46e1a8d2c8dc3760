//! `pod-tool`: the servers and clients the test bed runs inside pods (and
//! nodes), so that tests need nothing but what cargo builds. The test bed
//! finds it next to the test executables (`mesh_testbed::tool`).
//!
//! - `traffic server|upload|download|...`: the traffic server and the
//!   clients behind mesh-testbed's `traffic` helpers, each proving one
//!   property of a TCP connection;
//! - `echo`, `chat`, `hold`, `first-read`: clients of an echo (the traffic
//!   server's `ECHO`, or a plain one), short, long-lived or many at once;
//! - `echo-server`, `peer-echo-server`, `send`: plain echo servers and a
//!   one-shot client;
//! - `line-echo-server`, `line-echo`: a line echo over TCP or TLS;
//! - `tls-probe`: a TLS client for a server's refusals;
//! - `http-server`, `http-client`: HTTP/1.1 keep-alive (the server also
//!   HTTP/2 with prior knowledge);
//! - `load`: the steady load of `cargo xtask soak`;
//! - `ws-server`, `ws-client`: WebSocket; `h2-tunnel-server`,
//!   `h2-tunnel-client`: extended CONNECT over HTTP/2 (RFC 8441).
//!
//! Clients print what they saw on stdout. On failure they print `FAIL:
//! <reason>` on stderr and exit 1.

mod common;
mod dns;
mod echo;
mod grpc;
mod http;
mod load;
mod tls;
mod traffic_client;
mod traffic_server;
mod websocket;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pod-tool",
    about = "Servers and clients of the test bed, run in pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The traffic server and its clients (mesh_testbed::traffic).
    #[command(subcommand)]
    Traffic(Traffic),
    /// Connections one after the other, each an exchange with an echo.
    Echo(echo::EchoArgs),
    /// One connection exchanging a message with an echo every few ms.
    Chat(echo::ChatArgs),
    /// Many connections opened and held (and checked again on a signal file).
    Hold(echo::HoldArgs),
    /// How the first read of a connection that sends nothing ends.
    FirstRead {
        host: IpAddr,
        port: u16,
        #[arg(long, default_value_t = 3.0)]
        timeout_secs: f64,
    },
    /// Echoes every connection until EOF (IPv4 and IPv6).
    EchoServer { port: u16 },
    /// A real gRPC client: OTLP trace `Export` calls to `url`.
    GrpcExport {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Answers each connection, once it half-closed, with `<peer ip>|<data>`.
    PeerEchoServer { port: u16 },
    /// Sends a message, half-closes, prints the answer as it is.
    Send {
        host: IpAddr,
        port: u16,
        message: String,
    },
    /// Answers each connection's first line (over TLS with a certificate).
    LineEchoServer {
        port: u16,
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Sends padding, a marker and `\n`; checks the line echo; prints `ok <bytes>`.
    LineEcho {
        host: IpAddr,
        port: u16,
        marker: String,
        pad: usize,
        #[arg(long)]
        tls: bool,
    },
    /// A TLS client (ALPN h2) against a server's checks: `OPEN ...` or `REFUSED ...`.
    TlsProbe {
        mode: tls::ProbeMode,
        host: IpAddr,
        port: u16,
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// An HTTP/1.1 keep-alive server (and HTTP/2 with prior knowledge).
    HttpServer(http::ServerArgs),
    /// HTTP/1.1 requests over keep-alive connections.
    HttpClient(http::ClientArgs),
    /// The soak's steady load: `http` GETs over keep-alive connections or
    /// `tcp` echo exchanges, counted (`progress`/`total` lines, `done`).
    Load {
        kind: load::Kind,
        host: IpAddr,
        port: u16,
        seconds: f64,
        threads: usize,
    },
    /// A WebSocket echo server (RFC 6455, tungstenite).
    WsServer { port: u16 },
    /// One DNS query over UDP (connected, or `--unconnected` as musl's
    /// resolver); prints where the answer came from and its addresses.
    DnsQuery {
        server: IpAddr,
        name: String,
        #[arg(long)]
        aaaa: bool,
        #[arg(long)]
        unconnected: bool,
    },
    /// A WebSocket client: connects to `url`, sends `--messages` text and
    /// binary messages, checks each echo, closes; prints `ok <messages>`.
    WsClient {
        url: String,
        #[arg(long, default_value_t = 10)]
        messages: u32,
    },
    /// An HTTP/2 server that takes extended CONNECT (RFC 8441) and echoes
    /// the tunnel's bytes.
    H2TunnelServer { port: u16 },
    /// An extended CONNECT (`:protocol websocket`) over HTTP/2, then
    /// `--messages` echoed messages; prints `ok <messages>`.
    H2TunnelClient {
        host: IpAddr,
        port: u16,
        path: String,
        #[arg(long, default_value_t = 10)]
        messages: u32,
    },
}

/// The traffic server's protocol (see `traffic_server`) and its clients;
/// each client prints `result <command> ...` on success.
#[derive(Subcommand)]
enum Traffic {
    /// The server: commands on `port`, server-first banner on `banner_port`.
    Server {
        port: u16,
        banner_port: u16,
        /// SO_MARK on the listeners (as an application with its own
        /// routing marks: its replies follow its mark, not the SYN's).
        #[arg(long)]
        mark: Option<u32>,
    },
    /// `SINK`: n seeded bytes up; count and SHA-256 must match.
    Upload {
        host: IpAddr,
        port: u16,
        bytes: u64,
        seed: u64,
    },
    /// `SOURCE`: n seeded bytes down, compared byte for byte (with
    /// `verify_seed`: against another stream, to test the verifier).
    Download {
        host: IpAddr,
        port: u16,
        bytes: u64,
        seed: u64,
        verify_seed: Option<u64>,
    },
    /// `HALFCLOSE`: n bytes, `shutdown(SHUT_WR)`, then `got <n> bytes`.
    Halfclose { host: IpAddr, port: u16, bytes: u64 },
    /// The banner port speaks first; then one echo and a clean close. With
    /// `--times`, that many connections, and the time from connecting to the
    /// whole banner printed as `latency_us p50 <us> p99 <us> max <us>`.
    Banner {
        host: IpAddr,
        port: u16,
        #[arg(long, default_value_t = 1)]
        times: u32,
    },
    /// `RESET`: the server's RST must reach the client.
    ExpectReset { host: IpAddr, port: u16 },
    /// `EXPECTRESET <tag>`: the client closes with an RST.
    ClientReset {
        host: IpAddr,
        port: u16,
        tag: String,
    },
    /// `PEER`: the client's address as the server saw it.
    Peer { host: IpAddr, port: u16 },
    /// getpeername() right after connecting.
    Getpeername { host: IpAddr, port: u16 },
    /// n connections open at once, each with its own echo.
    Concurrent {
        host: IpAddr,
        port: u16,
        connections: usize,
        bytes_each: usize,
    },
    /// Many tiny writes with TCP_NODELAY, echoed in order.
    SmallWrites {
        host: IpAddr,
        port: u16,
        writes: u32,
    },
    /// How a connect() ends within the timeout.
    Connect {
        host: IpAddr,
        port: u16,
        timeout_secs: f64,
    },
}

/// Fails the process: `FAIL: <msg>` on stderr, exit status 1, at once (also
/// from another thread).
pub fn fail(msg: &str) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    eprintln!("FAIL: {msg}");
    std::process::exit(1)
}

fn run(command: Command) -> anyhow::Result<()> {
    use traffic_client as tc;
    let pair = |c: Option<PathBuf>, k: Option<PathBuf>| c.zip(k);
    match command {
        Command::Traffic(t) => match t {
            Traffic::Server {
                port,
                banner_port,
                mark,
            } => traffic_server::run(port, banner_port, mark),
            Traffic::Upload {
                host,
                port,
                bytes,
                seed,
            } => tc::upload(host, port, bytes, seed),
            Traffic::Download {
                host,
                port,
                bytes,
                seed,
                verify_seed,
            } => tc::download(host, port, bytes, seed, verify_seed),
            Traffic::Halfclose { host, port, bytes } => tc::halfclose(host, port, bytes),
            Traffic::Banner { host, port, times } => tc::banners(host, port, times),
            Traffic::ExpectReset { host, port } => tc::expect_reset(host, port),
            Traffic::ClientReset { host, port, tag } => tc::client_reset(host, port, &tag),
            Traffic::Peer { host, port } => tc::peer(host, port),
            Traffic::Getpeername { host, port } => tc::getpeername(host, port),
            Traffic::Concurrent {
                host,
                port,
                connections,
                bytes_each,
            } => tc::concurrent(host, port, connections, bytes_each),
            Traffic::SmallWrites { host, port, writes } => tc::small_writes(host, port, writes),
            Traffic::Connect {
                host,
                port,
                timeout_secs,
            } => tc::connect_outcome(host, port, Duration::from_secs_f64(timeout_secs)),
        },
        Command::Echo(args) => echo::echo(&args),
        Command::Chat(args) => echo::chat(&args),
        Command::Hold(args) => echo::hold(&args),
        Command::FirstRead {
            host,
            port,
            timeout_secs,
        } => echo::first_read(host, port, Duration::from_secs_f64(timeout_secs)),
        Command::EchoServer { port } => echo::echo_server(port),
        Command::GrpcExport {
            url,
            count,
            headers,
        } => grpc::export(&url, count, &headers),
        Command::PeerEchoServer { port } => echo::peer_echo_server(port),
        Command::Send {
            host,
            port,
            message,
        } => echo::send(host, port, &message),
        Command::LineEchoServer { port, cert, key } => {
            let tls = pair(cert, key);
            tls::line_echo_server(port, tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
        }
        Command::LineEcho {
            host,
            port,
            marker,
            pad,
            tls,
        } => tls::line_echo(host, port, &marker, pad, tls),
        Command::TlsProbe {
            mode,
            host,
            port,
            cert,
            key,
        } => {
            let cert = pair(cert, key);
            tls::tls_probe(
                mode,
                host,
                port,
                cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
        }
        Command::HttpServer(args) => http::server(args),
        Command::HttpClient(args) => http::client(args),
        Command::Load {
            kind,
            host,
            port,
            seconds,
            threads,
        } => load::load(kind, host, port, seconds, threads),
        Command::WsServer { port } => websocket::server(port),
        Command::DnsQuery {
            server,
            name,
            aaaa,
            unconnected,
        } => dns::query(server, &name, aaaa, unconnected),
        Command::WsClient { url, messages } => websocket::client(&url, messages),
        Command::H2TunnelServer { port } => websocket::h2_tunnel_server(port),
        Command::H2TunnelClient {
            host,
            port,
            path,
            messages,
        } => websocket::h2_tunnel_client(host, port, &path, messages),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}
