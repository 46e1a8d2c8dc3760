//! `traffic server <port> <banner_port>`: the multi-purpose server of
//! mesh-testbed's traffic helpers (`TrafficServer`).
//!
//! It listens on `0.0.0.0` and `::` (`IPV6_V6ONLY`) on both ports, backlog
//! 4096, RLIMIT_NOFILE raised to its hard limit, a thread per connection
//! with plain blocking sockets (so that what a blocking reader gets from the
//! kernel, such as the `EAGAIN` of a sockmap, is what it sees). On the
//! command port a connection starts with one line: `ECHO`, `SINK`, `SOURCE
//! <n> <seed>`, `HALFCLOSE`, `RESET`, `PEER`, `EXPECTRESET <tag>` or
//! `STATS`; on the banner port the server writes [`BANNER`] first, then
//! echoes. stdout gets `ready <port> <banner_port>`, one line per
//! `EXPECTRESET` connection (`reset-observed <tag> <bytes>` or `eof-observed
//! <tag> <bytes>`) and one per error (`error <command> from <peer>: <why>`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::common::{SeededStream, Sha256, listen, preview, raise_nofile};

/// What the banner port says first.
pub const BANNER: &[u8] = b"BANNER mesh-testbed server-first\n";
/// Longest command line.
const COMMAND_LIMIT: usize = 4096;
/// Stack of a connection's thread: thousands of connections at once.
const THREAD_STACK: usize = 256 * 1024;
/// Read buffer of an echo or a drain (thousands of connections at once).
const BUFFER: usize = 16 * 1024;

#[derive(Default, Clone, Copy)]
struct Stats {
    connections: u64,
    active: u64,
    max_active: u64,
    resets_observed: u64,
    eofs_observed: u64,
    errors: u64,
}

#[derive(Default)]
struct Counters(Mutex<Stats>);

impl Counters {
    fn update(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s);
        s.max_active = s.max_active.max(s.active);
    }

    fn snapshot(&self) -> Stats {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One line on stdout (`println!` writes a line at once).
fn log(line: &str) {
    println!("{line}");
}

pub fn run(port: u16, banner_port: u16, mark: Option<u32>) -> Result<()> {
    raise_nofile()?;
    let counters = Arc::new(Counters::default());
    let mut listeners = Vec::new();
    for (p, banner) in [(port, false), (banner_port, true)] {
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let listener = listen(SocketAddr::new(ip, p), false)?;
            if let Some(mark) = mark {
                socket2::SockRef::from(&listener).set_mark(mark)?;
            }
            listeners.push((listener, banner));
        }
    }
    let mut accepting = Vec::new();
    for (listener, banner) in listeners {
        let counters = counters.clone();
        accepting.push(std::thread::spawn(move || {
            accept_loop(&listener, banner, &counters)
        }));
    }
    log(&format!("ready {port} {banner_port}"));
    for thread in accepting {
        let _ = thread.join();
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, banner: bool, counters: &Arc<Counters>) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                counters.update(|s| {
                    s.connections += 1;
                    s.active += 1;
                });
                let c = counters.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(THREAD_STACK)
                    .spawn(move || handle(stream, peer, banner, &c));
                if let Err(e) = spawned {
                    counters.update(|s| {
                        s.active -= 1;
                        s.errors += 1;
                    });
                    log(&format!("error thread: {e}"));
                }
            }
            Err(e) => {
                counters.update(|s| s.errors += 1);
                log(&format!("error accept: {e}"));
                // Back off (EMFILE...), not synchronisation.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn handle(mut stream: TcpStream, peer: SocketAddr, banner: bool, counters: &Counters) {
    let mut op = if banner { "BANNER" } else { "?" }.to_string();
    if let Err(e) = serve(&mut stream, peer, banner, counters, &mut op) {
        counters.update(|s| s.errors += 1);
        log(&format!("error {op} from {peer}: {e:#}"));
    }
    counters.update(|s| s.active -= 1);
    // Dropping the stream closes it (with an RST after `RESET`).
}

fn serve(
    c: &mut TcpStream,
    peer: SocketAddr,
    banner: bool,
    counters: &Counters,
    op: &mut String,
) -> Result<()> {
    if banner {
        c.write_all(BANNER)?;
        return echo(c, &[]);
    }
    let Some((cmd, rest)) = read_command(c)? else {
        return Ok(()); // connected and closed without a command
    };
    *op = cmd.first().cloned().unwrap_or_default();
    match op.as_str() {
        "ECHO" => echo(c, &rest),
        "SINK" => {
            let mut h = Sha256::new();
            h.update(&rest);
            let mut n = rest.len() as u64;
            let mut buf = vec![0; 1 << 20];
            loop {
                let k = c.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            c.write_all(format!("{n} {}\n", h.hex()).as_bytes())?;
            Ok(())
        }
        "SOURCE" => {
            let (Some(n), Some(seed)) = (cmd.get(1), cmd.get(2)) else {
                bail!("SOURCE needs <n> <seed>: {cmd:?}");
            };
            let mut stream = SeededStream::new(n.parse()?, seed.parse()?);
            while let Some(chunk) = stream.next_chunk() {
                c.write_all(chunk)?;
            }
            Ok(())
        }
        "HALFCLOSE" => {
            let n = rest.len() as u64 + drain(c)?;
            c.write_all(format!("got {n} bytes\n").as_bytes())?;
            Ok(())
        }
        "RESET" => {
            // Closed by the caller: with linger 0 that sends an RST.
            socket2::SockRef::from(&*c).set_linger(Some(Duration::ZERO))?;
            Ok(())
        }
        "PEER" => {
            c.write_all(format!("{} {}\n", peer.ip(), peer.port()).as_bytes())?;
            Ok(())
        }
        "EXPECTRESET" => {
            let Some(tag) = cmd.get(1) else {
                bail!("EXPECTRESET needs a tag");
            };
            c.write_all(b"armed\n")?;
            let n = rest.len() as u64;
            match drain(c) {
                Ok(k) => {
                    counters.update(|s| s.eofs_observed += 1);
                    log(&format!("eof-observed {tag} {}", n + k));
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    counters.update(|s| s.resets_observed += 1);
                    log(&format!("reset-observed {tag} {n}"));
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
        "STATS" => {
            let s = counters.snapshot();
            let json = serde_json::json!({
                "connections": s.connections,
                "active": s.active,
                "max_active": s.max_active,
                "resets_observed": s.resets_observed,
                "eofs_observed": s.eofs_observed,
                "errors": s.errors,
            });
            c.write_all(format!("{json}\n").as_bytes())?;
            Ok(())
        }
        _ => {
            counters.update(|s| s.errors += 1);
            log(&format!("error unknown command {cmd:?} from {peer}"));
            c.write_all(b"ERR unknown command\n")?;
            Ok(())
        }
    }
}

/// The first line's words and what came after it; `None` on EOF before any
/// byte.
fn read_command(c: &mut TcpStream) -> Result<Option<(Vec<String>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..i]);
            let words = line.split_whitespace().map(str::to_string).collect();
            return Ok(Some((words, buf[i + 1..].to_vec())));
        }
        if buf.len() > COMMAND_LIMIT {
            bail!("command line too long: {}...", preview(&buf[..100]));
        }
        let k = c.read(&mut chunk)?;
        if k == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("EOF inside command line {}", preview(&buf));
        }
        buf.extend_from_slice(&chunk[..k]);
    }
}

/// Writes `rest`, then echoes everything until EOF.
fn echo(c: &mut TcpStream, rest: &[u8]) -> Result<()> {
    if !rest.is_empty() {
        c.write_all(rest)?;
    }
    let mut buf = vec![0; BUFFER];
    loop {
        let k = c.read(&mut buf)?;
        if k == 0 {
            return Ok(());
        }
        c.write_all(&buf[..k])?;
    }
}

/// Reads until EOF; the byte count. A reset is an error.
fn drain(c: &mut TcpStream) -> io::Result<u64> {
    let mut buf = vec![0; BUFFER];
    let mut n = 0;
    loop {
        let k = c.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}
