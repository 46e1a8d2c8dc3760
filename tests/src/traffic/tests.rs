//! The traffic helpers on direct connections (no agent): pod `a` to pod `b`
//! (same node) and to pod `c` (across nodes), over IPv4 and IPv6.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::{Topology, e2e_enabled};

const PORT: u16 = 7100;
/// Nothing listens here.
const CLOSED_PORT: u16 = 7199;
const BULK_BYTES: u64 = 64 << 20;

/// n1: a, b; n2: c — with a traffic server in b and in c.
fn two_nodes(test: &str) -> (Topology, TrafficServer, TrafficServer) {
    let topo = Topology::builder(test)
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let b = TrafficServer::start(topo.pod("b"), PORT).unwrap();
    let c = TrafficServer::start(topo.pod("c"), PORT).unwrap();
    (topo, b, c)
}

/// (label, server pod name, target address) for a→b and a→c, v4 and v6.
fn targets(topo: &Topology) -> Vec<(String, &'static str, IpAddr)> {
    let mut out = Vec::new();
    for (pod, path) in [("b", "same node"), ("c", "across nodes")] {
        let p = topo.pod(pod);
        for ip in [IpAddr::from(p.ipv4()), IpAddr::from(p.ipv6())] {
            let fam = if ip.is_ipv4() { "v4" } else { "v6" };
            out.push((format!("a->{pod} ({path}, {fam})"), pod, ip));
        }
    }
    out
}

fn timed<T>(label: &str, f: impl FnOnce() -> Result<T>) -> T {
    let start = Instant::now();
    let out = f().unwrap_or_else(|e| panic!("{label}: {e:#}"));
    eprintln!("{label}: ok in {:?}", start.elapsed());
    out
}

#[test]
fn traffic_bulk_both_directions_v4_v6_same_and_cross_node() {
    if !e2e_enabled("traffic_bulk_both_directions_v4_v6_same_and_cross_node") {
        return;
    }
    let (topo, _b, _c) = two_nodes("traffic_bulk");
    let a = topo.pod("a");
    for (i, (label, _, ip)) in targets(&topo).into_iter().enumerate() {
        timed(&format!("{label}: upload {BULK_BYTES}"), || {
            bulk_upload(a, ip, PORT, BULK_BYTES)
        });
        timed(&format!("{label}: download {BULK_BYTES}"), || {
            bulk_download(a, ip, PORT, BULK_BYTES, i as u64)
        });
    }
}

#[test]
fn traffic_stream_semantics_v4_v6_same_and_cross_node() {
    if !e2e_enabled("traffic_stream_semantics_v4_v6_same_and_cross_node") {
        return;
    }
    let (topo, b, c) = two_nodes("traffic_semantics");
    let a = topo.pod("a");
    for (label, pod, ip) in targets(&topo) {
        let server = if pod == "b" { &b } else { &c };
        let client_ip: IpAddr = if ip.is_ipv4() {
            a.ipv4().into()
        } else {
            a.ipv6().into()
        };
        timed(&format!("{label}: half_close"), || half_close(a, ip, PORT));
        timed(&format!("{label}: server_first"), || {
            server_first(a, ip, server.banner_port())
        });
        timed(&format!("{label}: expect_reset"), || {
            expect_reset(a, ip, PORT)
        });
        timed(&format!("{label}: client_reset"), || {
            let tag = client_reset(a, ip, PORT)?;
            server.wait_for_client_reset(&tag, Duration::from_secs(10))
        });
        timed(&format!("{label}: many_small_writes"), || {
            many_small_writes(a, ip, PORT, 10_000)
        });
        let seen = timed(&format!("{label}: peer_seen_by_server"), || {
            peer_seen_by_server(a, ip, PORT)
        });
        assert_eq!(
            seen.ip(),
            client_ip,
            "{label}: source IP seen by the server"
        );
        assert_ne!(seen.port(), 0, "{label}");
        let dialled = SocketAddr::new(ip, PORT);
        let peer = timed(&format!("{label}: getpeername_after_connect"), || {
            getpeername_after_connect(a, ip, PORT)
        });
        assert_eq!(peer, dialled, "{label}: getpeername");
        let open = timed(&format!("{label}: connect_result (open)"), || {
            connect_result(a, ip, PORT)
        });
        assert_eq!(open, ConnectOutcome::Connected, "{label}");
        let closed = timed(&format!("{label}: connect_result (closed)"), || {
            connect_result(a, ip, CLOSED_PORT)
        });
        assert_eq!(closed, ConnectOutcome::Refused, "{label}");
    }
    for (name, server) in [("b", &b), ("c", &c)] {
        let stats = server.stats().unwrap();
        assert_eq!(stats.resets_observed, 2, "server in {name}: {stats:?}");
        assert_eq!(stats.eofs_observed, 0, "server in {name}: {stats:?}");
        assert_eq!(
            stats.errors,
            0,
            "server in {name}: {stats:?}\n{}",
            server.process().output_report()
        );
    }
}

#[test]
fn traffic_concurrent_echo_2000_connections() {
    if !e2e_enabled("traffic_concurrent_echo_2000_connections") {
        return;
    }
    let topo = Topology::builder("traffic_concurrent")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let server = TrafficServer::start(topo.pod("c"), PORT).unwrap();
    let c_ip = topo.pod("c").ipv4();
    timed(
        "a->c (across nodes, v4): concurrent_echo 2000 x 1 KiB",
        || concurrent_echo(topo.pod("a"), c_ip, PORT, 2000, 1024),
    );
    let stats = server.stats().unwrap();
    assert!(
        stats.max_active >= 2000,
        "server never had 2000 connections open at once: {stats:?}"
    );
    assert_eq!(
        stats.errors,
        0,
        "{stats:?}\n{}",
        server.process().output_report()
    );
}

/// The helpers must be able to fail, with messages that say where and why.
#[test]
fn traffic_helpers_fail_readably() {
    if !e2e_enabled("traffic_helpers_fail_readably") {
        return;
    }
    let topo = Topology::builder("traffic_fail")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let server = TrafficServer::start(b, PORT).unwrap();
    let ip = b.ipv4();
    let banner = server.banner_port();

    let check = |what: &str, err: anyhow::Error, needles: &[&str]| {
        let msg = format!("{err:#}");
        eprintln!("{what} fails as expected:\n{msg}\n");
        for needle in needles {
            assert!(msg.contains(needle), "{what}: {needle:?} not in {msg}");
        }
        assert!(
            msg.contains("pod `a`"),
            "{what}: client pod not named: {msg}"
        );
    };
    // The banner server echoes `RESET\n` instead of resetting.
    let err = expect_reset(a, ip, banner).unwrap_err();
    check(
        "expect_reset",
        err,
        &["expect_reset", "instead of a reset", "expect-reset"],
    );
    // The command port waits for the client to speak first.
    let err = server_first(a, ip, PORT).unwrap_err();
    check("server_first", err, &["server_first", "no banner"]);
    // The banner server answers with its banner, not a byte count.
    let err = half_close(a, ip, banner).unwrap_err();
    check("half_close", err, &["half_close", "got 100000 bytes"]);
    let err = bulk_upload(a, ip, CLOSED_PORT, 1 << 20).unwrap_err();
    check(
        "bulk_upload",
        err,
        &["bulk_upload", "Connection refused", "7199"],
    );
    let err = bulk_download(a, b.ipv6(), CLOSED_PORT, 1 << 20, 1).unwrap_err();
    check(
        "bulk_download",
        err,
        &["bulk_download", "Connection refused"],
    );

    // The verifier of downloads notices data that is not what it expects.
    let err = run_client(
        a,
        "corrupt download",
        ip.into(),
        PORT,
        &["download", "1000000", "1", "2"],
        QUICK_DEADLINE,
    )
    .unwrap_err();
    check(
        "download verifier",
        err,
        &["byte 0 of the download differs"],
    );
    // So does the SINK check (the banner server answers with no hash).
    let err = bulk_upload(a, ip, banner, 1000).unwrap_err();
    check("upload verifier", err, &["bad SINK reply"]);

    let err = server
        .wait_for_client_reset("no-such-connection", Duration::from_millis(100))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no-such-connection") && msg.contains("pod `b`"),
        "{msg}"
    );
}

/// No root needed: the parsers, and that the tool is there and knows every
/// traffic command the helpers use.
#[test]
fn traffic_parsers_and_tool() {
    let stats = parse_stats(
        r#"{"connections": 5, "active": 1, "max_active": 3, "resets_observed": 2, "eofs_observed": 0, "errors": 1}"#,
    )
    .unwrap();
    assert_eq!(
        stats,
        ServerStats {
            connections: 5,
            active: 1,
            max_active: 3,
            resets_observed: 2,
            eofs_observed: 0,
            errors: 1,
        }
    );
    assert!(parse_stats(r#"{"connections": 5}"#).is_err());
    let words = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        parse_addr(&words("fd00:1::3 7100 local fd00:1::2 4000")).unwrap(),
        "[fd00:1::3]:7100".parse().unwrap()
    );
    assert!(parse_addr(&words("10.1.0.3")).is_err());
    assert!(parse_addr(&words("10.1.0.300 1")).is_err());

    let out = crate::tool::command(&["traffic", "--help"])
        .unwrap()
        .output()
        .expect("pod-tool runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for command in [
        "server",
        "upload",
        "download",
        "halfclose",
        "banner",
        "expect-reset",
        "client-reset",
        "peer",
        "getpeername",
        "concurrent",
        "small-writes",
        "connect",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "no `traffic {command}` in\n{help}"
        );
    }
}
