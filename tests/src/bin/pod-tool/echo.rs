//! Echo servers, and clients of an echo: the traffic server's (`ECHO\n`
//! first, then every byte back) or a plain one (`--plain`).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    Conn, addr, current_thread, dial, listen, listen_v4_v6, preview, raise_nofile,
};

/// Connect and I/O timeout of these clients.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `echo`: connections one after the other, each one exchange.
#[derive(Args, Debug)]
pub struct EchoArgs {
    host: IpAddr,
    port: u16,
    /// The payload: this line and `\n`; `{i}` becomes the connection's number.
    #[arg(long, default_value = "ping", conflicts_with = "bytes")]
    line: String,
    /// The payload: this many `x`.
    #[arg(long)]
    bytes: Option<usize>,
    /// The server is a plain echo: no `ECHO` line first.
    #[arg(long)]
    plain: bool,
    /// Half-close after sending and read the echo up to EOF (else read as
    /// many bytes as were sent, then close).
    #[arg(long)]
    shutdown: bool,
    /// Connections to make.
    #[arg(long, default_value_t = 1, conflicts_with = "for_secs")]
    times: u64,
    /// Make connections for this long instead.
    #[arg(long)]
    for_secs: Option<f64>,
    /// Pause after each connection.
    #[arg(long, default_value_t = 0)]
    every_ms: u64,
    /// Count failures instead of stopping at the first: prints `started`
    /// after the first success, `FAILED <n> <kind>: <why>` for each failure
    /// (kind: `refused`, `reset`, `timeout`, `eof`, `garbled` or `error`)
    /// and `ok <n> failed <m>` at the end, and exits 0.
    #[arg(long)]
    tally: bool,
}

/// One exchange on a new connection.
fn exchange(args: &EchoArgs, i: u64) -> Result<()> {
    let payload = match args.bytes {
        Some(n) => vec![b'x'; n],
        None => format!("{}\n", args.line.replace("{i}", &i.to_string())).into_bytes(),
    };
    let mut s = dial(addr(args.host, args.port), TIMEOUT, TIMEOUT, "")?;
    let mut out = if args.plain {
        Vec::new()
    } else {
        b"ECHO\n".to_vec()
    };
    out.extend_from_slice(&payload);
    s.write_all(&out)?;
    let mut got = Vec::new();
    let mut buf = vec![0; 65536];
    if args.shutdown {
        s.stream().shutdown(Shutdown::Write)?;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
        }
    } else {
        while got.len() < payload.len() {
            let k = s.read(&mut buf[..payload.len() - got.len()])?;
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
        }
    }
    if got.is_empty() {
        bail!("EOF instead of the echo of {}", preview(&payload));
    }
    if got != payload {
        bail!("echo {} of {}", preview(&got), preview(&payload));
    }
    Ok(())
}

/// How an exchange failed, in a word: `refused`, `reset`, `timeout`, `eof`
/// (closed before any byte of the echo), `garbled` or `error`.
fn failure_kind(e: &anyhow::Error) -> &'static str {
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    match io.map(std::io::Error::kind) {
        Some(ErrorKind::ConnectionRefused) => "refused",
        Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => "reset",
        Some(ErrorKind::TimedOut) => "timeout",
        Some(_) => "error",
        None if e.to_string().starts_with("EOF") => "eof",
        None => "garbled",
    }
}

pub fn echo(args: &EchoArgs) -> Result<()> {
    let end = args
        .for_secs
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let (mut ok, mut failed) = (0u64, 0u64);
    for i in 0.. {
        let more = match end {
            Some(end) => Instant::now() < end,
            None => i < args.times,
        };
        if !more {
            break;
        }
        match exchange(args, i) {
            Ok(()) => {
                ok += 1;
                if args.tally && ok == 1 {
                    println!("started");
                }
            }
            Err(e) if args.tally => {
                failed += 1;
                println!("FAILED {i} {}: {e:#}", failure_kind(&e));
            }
            Err(e) => return Err(e.context(format!("connection {i}"))),
        }
        std::thread::sleep(Duration::from_millis(args.every_ms));
    }
    if args.tally {
        println!("ok {ok} failed {failed}");
    } else {
        println!("result echo {ok}");
    }
    Ok(())
}

/// `chat`: one long-lived connection exchanging a line at a time.
#[derive(Args, Debug)]
pub struct ChatArgs {
    host: IpAddr,
    port: u16,
    /// Exchanges to make.
    #[arg(long, conflicts_with = "for_secs")]
    times: Option<u64>,
    /// Exchange for this long instead.
    #[arg(long)]
    for_secs: Option<f64>,
    /// Pause between exchanges.
    #[arg(long)]
    every_ms: u64,
    /// Each exchange is this many bytes (default: `line <n>\n`).
    #[arg(long)]
    bytes: Option<usize>,
    /// At the end, half-close and expect EOF with nothing before it.
    #[arg(long)]
    shutdown: bool,
}

/// Sends `ECHO`, then exchanges a message every `every_ms`, each checked;
/// prints `connected` after the first one and `ok <n>` at the end. Fails
/// (`broken after <n>: ...`) as soon as one does not come back intact.
pub fn chat(args: &ChatArgs) -> Result<()> {
    let mut s = dial(addr(args.host, args.port), TIMEOUT, TIMEOUT, "")?;
    s.write_all(b"ECHO\n")?;
    let end = args
        .for_secs
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut i = 0u64;
    loop {
        let more = match (end, args.times) {
            (Some(end), _) => Instant::now() < end,
            (None, Some(times)) => i < times,
            (None, None) => true,
        };
        if !more {
            break;
        }
        let msg = match args.bytes {
            Some(n) => vec![b'a' + (i % 26) as u8; n],
            None => format!("line {i}\n").into_bytes(),
        };
        let exchanged = s.write_all(&msg).and_then(|()| {
            let mut got = vec![0; msg.len()];
            s.read_exact(&mut got).map(|()| got)
        });
        match exchanged {
            Ok(got) if got == msg => {}
            Ok(got) => bail!("broken after {i}: got {}", preview(&got)),
            Err(e) => bail!("broken after {i}: {e}"),
        }
        if i == 0 {
            println!("connected");
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(args.every_ms));
    }
    if args.shutdown {
        s.stream().shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .with_context(|| format!("after {i} exchanges, waiting for EOF"))?;
        if !rest.is_empty() {
            bail!("after {i} exchanges, data before EOF: {}", preview(&rest));
        }
    }
    println!("ok {i}");
    Ok(())
}

/// `hold`: many connections opened one after the other and held.
#[derive(Args, Debug)]
pub struct HoldArgs {
    host: IpAddr,
    port: u16,
    /// Connections to open.
    #[arg(long)]
    count: usize,
    /// Send `ECHO\n` on each (to the traffic server).
    #[arg(long)]
    echo: bool,
    /// Check each with an exchange (`ping\n`) when it opens.
    #[arg(long, requires = "echo")]
    probe: bool,
    /// Count connections that fail to open (printing those that took over
    /// 3 s) instead of failing.
    #[arg(long)]
    tolerate_failures: bool,
    /// Connect timeout, and I/O timeout of the exchanges.
    #[arg(long, default_value_t = 5.0)]
    timeout_secs: f64,
    /// Once this file exists, check the connections again.
    #[arg(long)]
    go: Option<PathBuf>,
    /// How long to wait for `--go` at most (then check anyway).
    #[arg(long, default_value_t = 60.0)]
    go_timeout_secs: f64,
    /// Check only every n-th connection.
    #[arg(long, default_value_t = 1)]
    recheck_every: usize,
    /// After the check, close every connection.
    #[arg(long)]
    close: bool,
    /// Then stay (and hold what is open) this long before exiting.
    #[arg(long, default_value_t = 0.0)]
    then_secs: f64,
}

/// Writes `line` and reads it back.
fn line_exchange(s: &mut Conn, line: &[u8]) -> Result<()> {
    s.write_all(line)?;
    let mut got = vec![0; line.len()];
    let mut n = 0;
    while n < got.len() {
        let k = s.read(&mut got[n..])?;
        if k == 0 {
            bail!("closed after {n} bytes of the echo");
        }
        n += k;
    }
    if got != line {
        bail!("echoed {}", preview(&got));
    }
    Ok(())
}

/// Opens the connections and prints `opened ok=<n> failed=<m> slow=<k>`;
/// with `--go`, waits for the file, checks (every n-th of) them again with
/// `still there <i>\n`, closes them with `--close`, and prints `rechecked
/// ok=<n> bad=<m>`. Then holds them `--then-secs`.
pub fn hold(args: &HoldArgs) -> Result<()> {
    let hard = raise_nofile()?;
    if args.count as u64 + 64 > hard {
        bail!(
            "{} connections need more than the RLIMIT_NOFILE hard limit {hard}",
            args.count
        );
    }
    let target = addr(args.host, args.port);
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let (mut kept, mut failed, mut slow) = (Vec::new(), 0, 0);
    for i in 0..args.count {
        let started = Instant::now();
        let opened = (|| -> Result<Conn> {
            let mut s = dial(target, timeout, timeout, "")?;
            if args.echo {
                s.write_all(b"ECHO\n")?;
            }
            if args.probe {
                line_exchange(&mut s, b"ping\n")?;
            }
            Ok(s)
        })();
        match opened {
            Ok(s) => kept.push((i, s)),
            Err(e) if args.tolerate_failures => {
                failed += 1;
                let took = started.elapsed();
                if took > Duration::from_secs(3) {
                    slow += 1;
                    println!("slow failure {i} after {:.1} s: {e:#}", took.as_secs_f64());
                }
            }
            Err(e) => return Err(e.context(format!("connection {i} of {}", args.count))),
        }
    }
    println!("opened ok={} failed={failed} slow={slow}", kept.len());
    if let Some(go) = &args.go {
        let deadline = Instant::now() + Duration::from_secs_f64(args.go_timeout_secs);
        while !go.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (mut ok, mut bad) = (0, 0);
        for (i, s) in kept.iter_mut().step_by(args.recheck_every.max(1)) {
            match line_exchange(s, format!("still there {i}\n").as_bytes()) {
                Ok(()) => ok += 1,
                Err(e) if args.tolerate_failures => {
                    bad += 1;
                    println!("connection {i} broken: {e:#}");
                }
                Err(e) => return Err(e.context(format!("connection {i} on the recheck"))),
            }
        }
        if args.close {
            kept.clear();
        }
        println!("rechecked ok={ok} bad={bad}");
    }
    std::thread::sleep(Duration::from_secs_f64(args.then_secs));
    Ok(())
}

/// `first-read`: how the first read of a connection that sends nothing ends
/// within `timeout`: `closed <s>`, `answered <s>`, `reset <s>` (the seconds
/// it took) or `held`. A reset that comes before `connect` returns (a
/// loaded machine can run the agent's accept-and-reset first) is `reset`.
pub fn first_read(host: IpAddr, port: u16, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let took = || format!("{:.3}", started.elapsed().as_secs_f64());
    let mut s = match std::net::TcpStream::connect_timeout(&addr(host, port), TIMEOUT) {
        Ok(s) => Conn::new(s, timeout)?,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            println!("reset {}", took());
            return Ok(());
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("connect to {host}:{port}"))),
    };
    let mut byte = [0u8];
    match s.read(&mut byte) {
        Ok(0) => println!("closed {}", took()),
        Ok(_) => println!("answered {}", took()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => println!("reset {}", took()),
        Err(e) if e.kind() == ErrorKind::TimedOut => println!("held"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `echo-server <port>`: echoes every connection's bytes until EOF, on
/// `0.0.0.0` and `::`, a task per connection on one thread (so ten thousand
/// idle connections cost little); prints `ready`.
pub fn echo_server(port: u16) -> Result<()> {
    raise_nofile()?;
    current_thread()?.block_on(async move {
        let listeners = listen_v4_v6(port)?;
        println!("ready");
        for listener in listeners {
            tokio::spawn(echo_accept_loop(listener));
        }
        // The accept loops never end: serve until killed.
        std::future::pending::<()>().await;
        Ok(())
    })
}

async fn echo_accept_loop(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut c, _)) = listener.accept().await else {
            // Back off (EMFILE...), not synchronisation.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            while let Ok(k @ 1..) = c.read(&mut buf).await {
                if c.write_all(&buf[..k]).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `peer-echo-server <port>`: dual-stack (`[::]`, IPv4 mapped), one
/// connection at a time: reads until EOF and answers `<peer ip>|<data>` (an
/// IPv4 peer as plain IPv4), so a test sees both the bytes and who
/// connected. Prints `ready`.
pub fn peer_echo_server(port: u16) -> Result<()> {
    let listener = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)?;
    println!("ready");
    loop {
        let (mut c, peer) = listener.accept()?;
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let mut data = Vec::new();
        let answered = c.read_to_end(&mut data).and_then(|_| {
            let mut out = format!("{ip}|").into_bytes();
            out.extend_from_slice(&data);
            c.write_all(&out)
        });
        if let Err(e) = answered {
            eprintln!("error with {peer}: {e}");
        }
    }
}

/// `send <host> <port> <message>`: sends the message, half-closes, and
/// writes the whole answer to stdout as it is.
pub fn send(host: IpAddr, port: u16, message: &str) -> Result<()> {
    let mut s = dial(addr(host, port), TIMEOUT, TIMEOUT, "")?;
    s.write_all(message.as_bytes())?;
    s.stream().shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    std::io::stdout().write_all(&answer)?;
    Ok(())
}
