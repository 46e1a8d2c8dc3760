//! Hostile HTTP/2 clients against the L7 relay, over real sockets with raw
//! frames: rapid reset, CONTINUATION, PING and SETTINGS floods. Each must end
//! in a bounded time with the connection closed (GOAWAY or EOF) or still
//! answering, with few or no requests reaching the upstream, while another
//! client is served as usual.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::L7Options;
use super::tests::{BOUND, raw_exchange, spawn_h1_upstream, spawn_relay, statuses};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: `GET /allowed`, scheme http, authority `a` (static table indices
/// and one literal).
fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 0x08];
    block.extend_from_slice(b"/allowed");
    block.extend_from_slice(&[0x41, 0x01, b'a']);
    block
}

/// What the server did with the connection.
#[derive(Debug, Default)]
struct Ending {
    /// The GOAWAY error code, if one came.
    goaway: Option<u32>,
    /// Streams that got a response HEADERS frame.
    answered: usize,
    closed: bool,
}

/// Reads frames until EOF, an error, or `wait` without data.
async fn read_ending(stream: &mut tokio::net::tcp::OwnedReadHalf, wait: Duration) -> Ending {
    let mut ending = Ending::default();
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Err(_) => return ending,
            Ok(Ok(0)) | Ok(Err(_)) => {
                ending.closed = true;
                return ending;
            }
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
        }
        while buffer.len() >= 9 {
            let len = (usize::from(buffer[0]) << 16)
                | (usize::from(buffer[1]) << 8)
                | usize::from(buffer[2]);
            if buffer.len() < 9 + len {
                break;
            }
            match buffer[3] {
                GOAWAY if len >= 8 => {
                    ending.goaway = Some(u32::from_be_bytes(buffer[13..17].try_into().unwrap()));
                }
                HEADERS => ending.answered += 1,
                _ => {}
            }
            buffer.drain(..9 + len);
        }
    }
}

/// Sends `preface + body` while reading; returns how the server ended the
/// connection and how long it took.
async fn flood(addr: std::net::SocketAddr, body: Vec<u8>) -> (Ending, Duration) {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        let mut all = PREFACE.to_vec();
        all.extend(frame(SETTINGS, 0, 0, &[]));
        all.extend(body);
        for chunk in all.chunks(64 * 1024) {
            // The server may close first: that is an acceptable answer.
            if writer.write_all(chunk).await.is_err() {
                return;
            }
        }
        // Keep the write side open: the server decides when it ends.
        tokio::time::sleep(BOUND).await;
    });
    let ending = tokio::time::timeout(BOUND, read_ending(&mut reader, Duration::from_secs(1)))
        .await
        .unwrap_or_default();
    writing.abort();
    (ending, started.elapsed())
}

/// Another client, on its own connection, is served while a flood goes on.
async fn other_client_is_served(relay: std::net::SocketAddr) {
    let raw = raw_exchange(
        relay,
        b"GET /allowed HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&raw), [200], "{}", String::from_utf8_lossy(&raw));
}

#[tokio::test]
async fn rapid_reset_is_cut_off() {
    let upstream = spawn_h1_upstream().await;
    let relay = spawn_relay(upstream.addr, L7Options::default()).await;
    let mut body = Vec::new();
    let streams = 20_000u32;
    for i in 0..streams {
        let id = 2 * i + 1;
        body.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block()));
        body.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let flooding = tokio::spawn(flood(relay.addr, body));
    other_client_is_served(relay.addr).await;
    let (ending, took) = flooding.await.unwrap();
    assert!(took < BOUND, "{took:?}");
    let forwarded = upstream.seen().len();
    eprintln!(
        "rapid reset: {ending:?} in {took:?}, {forwarded} of {streams} requests reached the upstream"
    );
    assert!(
        ending.closed || ending.goaway.is_some(),
        "the connection must be ended: {ending:?}"
    );
    assert!(
        forwarded < streams as usize / 2,
        "{forwarded} of {streams} reset requests were forwarded"
    );
}

#[tokio::test]
async fn continuation_flood_is_cut_off() {
    let upstream = spawn_h1_upstream().await;
    let relay = spawn_relay(upstream.addr, L7Options::default()).await;
    // A header block that never ends: 64 MiB of CONTINUATION frames, each a
    // literal header of 16 KiB.
    let mut literal = vec![0x40, 0x01, b'x', 0x7f];
    let value_len: usize = 16 * 1024 - 8;
    // HPACK integer (7-bit prefix, already 127) continuation bytes.
    let mut rest = value_len - 127;
    while rest >= 128 {
        literal.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    literal.push(rest as u8);
    literal.extend(std::iter::repeat_n(b'v', value_len));
    let mut body = frame(HEADERS, 0, 1, &get_block());
    for _ in 0..4096 {
        body.extend(frame(CONTINUATION, 0, 1, &literal));
    }
    let flooding = tokio::spawn(flood(relay.addr, body));
    other_client_is_served(relay.addr).await;
    let (ending, took) = flooding.await.unwrap();
    eprintln!("CONTINUATION flood: {ending:?} in {took:?}");
    assert!(took < BOUND, "{took:?}");
    assert!(ending.closed || ending.goaway.is_some(), "{ending:?}");
    // Only the other client's request reached the upstream.
    let seen: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(seen, ["/allowed"]);
}

#[tokio::test]
async fn ping_and_settings_floods_end_or_stay_answering() {
    let upstream = spawn_h1_upstream().await;
    let relay = spawn_relay(upstream.addr, L7Options::default()).await;
    for (what, kind) in [("PING", PING), ("SETTINGS", SETTINGS)] {
        let mut body = Vec::new();
        for i in 0..100_000u64 {
            let payload = if kind == PING {
                i.to_be_bytes().to_vec()
            } else {
                Vec::new()
            };
            body.extend(frame(kind, 0, 0, &payload));
        }
        // Then a real request: answered if the connection survived.
        body.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block()));
        let flooding = tokio::spawn(flood(relay.addr, body));
        other_client_is_served(relay.addr).await;
        let (ending, took) = flooding.await.unwrap();
        eprintln!("{what} flood: {ending:?} in {took:?}");
        assert!(took < BOUND, "{what}: {took:?}");
        assert!(
            ending.closed || ending.goaway.is_some() || ending.answered == 1,
            "{what}: neither ended nor answering: {ending:?}"
        );
    }
}
