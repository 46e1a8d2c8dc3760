//! `load`: the steady load of `cargo xtask soak`, from `threads` clients for
//! `seconds`: `http` (GET /api/items over keep-alive connections, each
//! answer must be 200; a failed connection is replaced) or `tcp` (a new
//! connection per line, echoed back whole). Prints the first failures,
//! `progress <kind> <sent> <ok> <failed>` every 10 s, then `total ...` and
//! `done`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::ValueEnum;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::runtime;
use crate::http::Client;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    Http,
    Tcp,
}

/// What the clients counted (failures shown: the first 20).
#[derive(Default)]
struct Counts {
    sent: u64,
    ok: u64,
    failed: u64,
    shown: u32,
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn count(counts: &std::sync::Mutex<Counts>, outcome: Result<()>) {
    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
    c.sent += 1;
    match outcome {
        Ok(()) => c.ok += 1,
        Err(e) => {
            c.failed += 1;
            if c.shown < 20 {
                c.shown += 1;
                println!("failure: {e:#}");
            }
        }
    }
}

async fn http_client(host: IpAddr, port: u16, end: Instant, counts: Arc<std::sync::Mutex<Counts>>) {
    let client = Client {
        host,
        port,
        method: Method::GET,
        timeout: TIMEOUT,
    };
    let mut sender = None;
    while Instant::now() < end {
        let outcome = async {
            let s = match &mut sender {
                Some(s) => s,
                None => sender.insert(client.connect().await?),
            };
            let (status, body) = client.request(s, "/api/items").await?;
            if status != 200 {
                bail!(
                    "status {status} {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(80)])
                );
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            sender = None;
        }
        count(&counts, outcome);
        tokio::time::sleep(Duration::from_millis(10)).await; // the load's pace
    }
}

async fn tcp_client(host: IpAddr, port: u16, end: Instant, counts: Arc<std::sync::Mutex<Counts>>) {
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let line = format!("soak {n}\n");
        let outcome = tokio::time::timeout(TIMEOUT, async {
            let mut s = tokio::net::TcpStream::connect((host, port)).await?;
            s.write_all(line.as_bytes()).await?;
            let mut got = vec![0u8; line.len()];
            s.read_exact(&mut got).await?;
            if got != line.as_bytes() {
                bail!("echo {:?}", String::from_utf8_lossy(&got));
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no echo within {TIMEOUT:?}")));
        count(&counts, outcome);
        tokio::time::sleep(Duration::from_millis(20)).await; // the load's pace
    }
}

pub fn load(kind: Kind, host: IpAddr, port: u16, seconds: f64, threads: usize) -> Result<()> {
    let counts = Arc::new(std::sync::Mutex::new(Counts::default()));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let label = match kind {
        Kind::Http => "http",
        Kind::Tcp => "tcp",
    };
    let line = |what: &str, c: &Counts| println!("{what} {label} {} {} {}", c.sent, c.ok, c.failed);
    runtime(2)?.block_on(async {
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..threads.max(1) {
            let counts = counts.clone();
            match kind {
                Kind::Http => clients.spawn(http_client(host, port, end, counts)),
                Kind::Tcp => clients.spawn(tcp_client(host, port, end, counts)),
            };
        }
        let mut progress = tokio::time::interval(Duration::from_secs(10));
        progress.tick().await;
        loop {
            tokio::select! {
                joined = clients.join_next() => if joined.is_none() { break },
                _ = progress.tick() => line("progress", &counts.lock().unwrap_or_else(|e| e.into_inner())),
            }
        }
    });
    line("total", &counts.lock().unwrap_or_else(|e| e.into_inner()));
    println!("done");
    Ok(())
}
