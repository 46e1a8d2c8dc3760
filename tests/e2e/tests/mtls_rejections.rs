//! Every refusal of the tunnel, each with a real TLS client (rustls, in
//! `pod-tool tls-probe`) or our own HBONE client, each counted and none
//! affecting other connections.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_agent::{
    identity::{IdentityManager, IdentitySource, SpiffeId},
    tunnel::{PoolKey, TunnelClient, TunnelTarget},
};
use mesh_e2e::{
    NodeAgent,
    mesh::{NodeIssuer, TestCa, pod_identity, workloads_yaml},
    pods_yaml, traffic_servers,
};
use mesh_testbed::{
    Pod, Topology, e2e_enabled,
    traffic::{ConnectOutcome, bulk_upload, connect_result},
};

const PORT: u16 = 7100;
const TUNNEL: u16 = 15008;

/// What is tried, how (client mode), with which certificate, and the reason the
/// agent must count.
type Case<'a> = (
    &'a str,
    &'a str,
    Option<(std::path::PathBuf, std::path::PathBuf)>,
    &'a str,
);

/// A real TLS client (`pod-tool tls-probe`: rustls, ALPN h2, any server
/// certificate accepted) in `from`: `OPEN <n>` if the peer answered HTTP/2
/// after the handshake, else `REFUSED <why>`.
fn tls_client(from: &Pod, mode: &str, to: IpAddr, cert: Option<(&Path, &Path)>) -> String {
    let (host, port) = (to.to_string(), TUNNEL.to_string());
    let mut args = vec!["tls-probe", mode, &host, &port];
    let paths = cert.map(|(c, k)| (c.display().to_string(), k.display().to_string()));
    if let Some((c, k)) = &paths {
        args.extend(["--cert", c, "--key", k]);
    }
    let out = from.run_tool(&args, Duration::from_secs(20)).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_tunnel_refuses_bad_peers_and_counts_each_refusal() {
    if !e2e_enabled("the_tunnel_refuses_bad_peers_and_counts_each_refusal") {
        return;
    }
    let topo = Topology::builder("mtls_refusals")
        .node("n1", &["a", "outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, outsider, c) = (topo.pod("a"), topo.pod("outsider"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let other_ca = TestCa::new(&topo, "other").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let n1 = topo.node("n1");
    let n2 = topo.node("n2");
    let issuer1 = NodeIssuer::new(&topo, n1, &ca.ca, &[&ca.ca]).unwrap();
    let issuer2 = NodeIssuer::new(&topo, n2, &ca.ca, &[&ca.ca]).unwrap();
    // n1 is told c's identity wrongly: a's traffic to c must be refused by n1.
    let agent1 = NodeAgent::start_with(
        &topo,
        n1,
        &pods_yaml(&[a]),
        &issuer1.node_yaml("1h"),
        &[(
            "workloads.yaml",
            workloads_yaml(&[c], Some(("c", "impostor"))),
        )],
    )
    .unwrap();
    let agent2 = NodeAgent::start_with(
        &topo,
        n2,
        &pods_yaml(&[c]),
        &issuer2.node_yaml("1h"),
        &[("workloads.yaml", workloads_yaml(&[a], None))],
    )
    .unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    let tester = SpiffeId::new("cluster.local", "default", "tester").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let valid = ca.issue_valid_files(&tester).unwrap();
    let expired = ca.issue_files(&tester, now - 2 * hour, now - hour).unwrap();
    let not_yet = ca.issue_files(&tester, now + hour, now + 2 * hour).unwrap();
    let foreign = other_ca.issue_valid_files(&tester).unwrap();
    let other_domain = ca
        .issue_valid_files(&SpiffeId::new("elsewhere.org", "default", "tester").unwrap())
        .unwrap();
    let pair = |p: &(std::path::PathBuf, std::path::PathBuf)| (p.0.clone(), p.1.clone());
    // A chain of 300 copies of a valid certificate (~200 KB): more than a
    // TLS handshake message may carry.
    let huge_chain = {
        let pem = std::fs::read_to_string(&valid.0).unwrap();
        let path = topo.tmp_dir().join("huge-chain.crt");
        std::fs::write(&path, pem.repeat(300)).unwrap();
        (path, valid.1.clone())
    };

    // The positive control: a valid certificate of the trust domain is served.
    let (vc, vk) = pair(&valid);
    let control = tls_client(outsider, "tls13", c_ip, Some((&vc, &vk)));
    assert!(
        control.starts_with("OPEN"),
        "a valid client was refused: {control}\n{}",
        agent2.log()
    );

    let cases: Vec<Case> = vec![
        ("plaintext", "plain", None, "not_tls"),
        ("TLS 1.2", "tls12", Some(pair(&valid)), "protocol_version"),
        (
            "no client certificate",
            "tls13",
            None,
            "no_client_certificate",
        ),
        (
            "a certificate from another CA",
            "tls13",
            Some(pair(&foreign)),
            "unknown_issuer",
        ),
        (
            "an expired certificate",
            "tls13",
            Some(pair(&expired)),
            "expired",
        ),
        (
            "a not yet valid certificate",
            "tls13",
            Some(pair(&not_yet)),
            "not_yet_valid",
        ),
        (
            "another trust domain",
            "tls13",
            Some(pair(&other_domain)),
            "wrong_trust_domain",
        ),
        ("64 KiB of random bytes", "garbage", None, "not_tls"),
        (
            "a 200 KB certificate chain",
            "tls13",
            Some(pair(&huge_chain)),
            "too_large",
        ),
    ];
    let counted = |reason: &str| {
        agent2
            .status()
            .map(|s| s.tunnel_rejections.get(reason).copied().unwrap_or(0))
    };
    for (what, mode, cert, reason) in &cases {
        let before = counted(reason).unwrap();
        let result = tls_client(
            outsider,
            mode,
            c_ip,
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        );
        assert!(
            result.starts_with("REFUSED"),
            "{what}: the tunnel must refuse, got {result:?}"
        );
        mesh_testbed::wait_until(
            &format!("{what} to be counted as {reason}"),
            Duration::from_secs(5),
            || Ok(counted(reason)? == before + 1),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}; counted: {:?}; log:\n{}",
                agent2.status().unwrap().tunnel_rejections,
                agent2.log()
            )
        });
    }

    // A CONNECT to an address that is not a pod of n2, with a valid identity.
    let authority: SocketAddr = "10.2.0.99:80".parse().unwrap();
    let err = connect_through_tunnel(
        outsider,
        &ca,
        &tester,
        &pod_identity(c),
        SocketAddr::new(c_ip, TUNNEL),
        authority,
    )
    .expect_err("CONNECT to a non-pod address must fail");
    assert!(err.contains("403"), "{err}");
    assert!(
        agent2
            .status()
            .unwrap()
            .tunnel_rejections
            .get("connect_not_a_local_pod")
            .copied()
            .unwrap_or(0)
            >= 1
    );

    // The wrong SPIFFE ID for the destination: n1 expects sa/impostor, c's
    // agent proves sa/c. n1 refuses before any byte of a's flows.
    let outcome = connect_result(a, c_ip, PORT).unwrap();
    let echoed = mesh_testbed::traffic::half_close(a, c_ip, PORT);
    assert!(
        echoed.is_err(),
        "a's connection through a peer with the wrong identity must fail ({outcome:?})"
    );
    mesh_testbed::wait_until(
        "wrong identity counted on n1",
        Duration::from_secs(5),
        || {
            Ok(agent1
                .status()?
                .tunnel_rejections
                .get("wrong_identity")
                .copied()
                .unwrap_or(0)
                >= 1)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}; n1 counted {:?}",
            agent1.status().unwrap().tunnel_rejections
        )
    });

    // None of this affected anything else: valid traffic into c still flows.
    bulk_upload(outsider, c_ip, PORT, 1 << 20).unwrap();
    let (vc, vk) = pair(&valid);
    assert!(tls_client(outsider, "tls13", c_ip, Some((&vc, &vk))).starts_with("OPEN"));
    let _ = ConnectOutcome::Connected;
}

/// A client TLS config as `local` towards `peer`, with a certificate minted
/// from `ca` for `lifetime` (and never renewed).
fn client_tls(
    ca: &TestCa,
    local: &SpiffeId,
    peer: &SpiffeId,
    lifetime: Duration,
) -> Arc<rustls::ClientConfig> {
    let issuer_dir = ca.dir.join(format!("tester-issuer-{}", lifetime.as_secs()));
    std::fs::create_dir_all(&issuer_dir).unwrap();
    std::fs::write(issuer_dir.join("ca.crt"), &ca.ca.cert_pem).unwrap();
    std::fs::write(issuer_dir.join("ca.key"), &ca.ca.key_pem).unwrap();
    let manager = Arc::new(
        IdentityManager::new(
            "cluster.local",
            IdentitySource::Issuer {
                cert: issuer_dir.join("ca.crt"),
                key: issuer_dir.join("ca.key"),
                trust_bundle: None,
                lifetime,
                renew_at: 1.0,
            },
        )
        .unwrap(),
    );
    manager.ensure(std::slice::from_ref(local)).unwrap();
    manager.client_config(local, peer).unwrap()
}

/// Opens one HBONE stream with our own tunnel client, from `from`'s namespace,
/// as `local` (certificate minted from `ca`), expecting the server to be `peer`.
fn connect_through_tunnel(
    from: &Pod,
    ca: &TestCa,
    local: &SpiffeId,
    peer: &SpiffeId,
    gateway: SocketAddr,
    authority: SocketAddr,
) -> Result<(), String> {
    let tls = client_tls(ca, local, peer, Duration::from_secs(3600));
    let (local, peer) = (local.to_string(), peer.to_string());
    from.in_netns(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = TunnelClient::new(Duration::from_secs(5));
            let target = TunnelTarget {
                gateway,
                authority,
                forwarded_for: None,
                pool_key: PoolKey::new(local, peer, gateway),
                local_cert_expiry: None,
            };
            let name = rustls_pki_types::ServerName::IpAddress(gateway.ip().into());
            client
                .connect(&target, tls, name, || {
                    tokio::net::TcpStream::connect(gateway)
                })
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
    })
}

/// Peers that open the tunnel port and stall the handshake can hold at most
/// `limits.pendingHandshakes` of them; beyond it a connection is reset at
/// once and counted, and once they go the mesh's own traffic flows.
#[test]
fn stalled_handshakes_beyond_the_limit_are_reset_at_once() {
    if !e2e_enabled("stalled_handshakes_beyond_the_limit_are_reset_at_once") {
        return;
    }
    let topo = Topology::builder("mtls_pending")
        .node("n1", &["a", "outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, outsider, c) = (topo.pod("a"), topo.pod("outsider"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let agents = mesh_e2e::mesh::start_mesh_with(
        &topo,
        &mesh_e2e::mesh::node_issuers(&topo, &ca).unwrap(),
        "1h",
        // The stalled handshakes must outlive the probing below on a busy
        // machine: a long handshake timeout, so "reset at once" is told
        // from "held until the timeout" by a margin no load can close.
        "limits: {pendingHandshakes: 2}\ntunnel: {handshakeTimeout: 300s}\n",
    )
    .unwrap();
    let agent2 = &agents[1];
    let c_ip = c.ipv4();
    // Two connections that never say anything hold the two handshakes.
    let mut holder = outsider
        .spawn_tool(&[
            "hold",
            &c_ip.to_string(),
            &TUNNEL.to_string(),
            "--count",
            "2",
            "--then-secs",
            "120",
        ])
        .unwrap();
    mesh_testbed::wait_until("the stalled handshakes", Duration::from_secs(10), || {
        Ok(holder.stdout_so_far().contains("opened"))
    })
    .unwrap();
    // The client's connect returns before the agent accepts: a probe sent
    // before the agent admitted both could take a slot and leave a holder
    // refused instead. Probe once the agent holds both.
    mesh_testbed::wait_until("the agent to hold both", Duration::from_secs(20), || {
        Ok(agent2.metric_sum("mesh_tunnel_pending_handshakes", &[]) == 2)
    })
    .unwrap();
    // A third one is refused: its first read ends within 10 s: closed or
    // reset, with the seconds it took; or `held`.
    let (c_ip_s, tunnel_s) = (c_ip.to_string(), TUNNEL.to_string());
    let third = ["first-read", &c_ip_s, &tunnel_s, "--timeout-secs", "10"];
    let refused = [("limit", "pending_handshakes")];
    let out = outsider.run_tool(&third, Duration::from_secs(30)).unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        said.starts_with("reset") || said.starts_with("closed"),
        "a third handshake refused: {said}"
    );
    let seconds: f64 = said.split_whitespace().nth(1).unwrap().parse().unwrap();
    // At once: long before the 300 s handshake timeout would end it.
    assert!(seconds < 10.0, "refused at once: {said}");
    // The two held are untouched.
    assert_eq!(agent2.metric_sum("mesh_tunnel_pending_handshakes", &[]), 2);
    assert!(agent2.metric_sum("mesh_limit_refusals_total", &refused) >= 1);

    // The stalled ones go: the mesh's own connection through the tunnel works.
    holder.kill();
    mesh_testbed::wait_until(
        "a to reach c through the tunnel",
        Duration::from_secs(15),
        || Ok(bulk_upload(a, IpAddr::V4(c_ip), PORT, 64 * 1024).is_ok()),
    )
    .unwrap();
}

/// TLS 1.3 has no renegotiation (TLS 1.2, which has, is refused above); its
/// post-handshake counterpart is KeyUpdate. A client with a valid
/// certificate that floods KeyUpdate requests (openssl s_client's `K`) must
/// not hurt the agent: it stays up, its memory bounded, and a good client is
/// served meanwhile.
#[test]
fn a_key_update_flood_does_no_harm() {
    if !e2e_enabled("a_key_update_flood_does_no_harm") {
        return;
    }
    let topo = Topology::builder("keyupdate")
        .node("n1", &["a", "outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, outsider, c) = (topo.pod("a"), topo.pod("outsider"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let issuers = mesh_e2e::mesh::node_issuers(&topo, &ca).unwrap();
    let agents = mesh_e2e::mesh::start_mesh(&topo, &issuers, "1h").unwrap();
    let server_agent = &agents[1];
    let c_ip = IpAddr::V4(c.ipv4());
    let tester = SpiffeId::new("cluster.local", "default", "tester").unwrap();
    let (cert, key) = ca.issue_valid_files(&tester).unwrap();
    let rss = || {
        let pid = server_agent.pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let script = format!(
        "yes K | head -n 20000 | timeout 30 openssl s_client -connect {c_ip}:{TUNNEL} -tls1_3 -alpn h2 -cert {} -key {} -no_ign_eof 2>&1 | tail -n 5; echo exit=$?",
        cert.display(),
        key.display()
    );
    let mut flood = outsider.spawn("sh", &["-c", &script]).unwrap();
    // Meanwhile a good client is served.
    for _ in 0..5 {
        bulk_upload(a, c_ip, PORT, 1 << 20).unwrap();
    }
    let out = flood
        .wait_with_deadline(Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("the flood did not end: {e:#}"));
    let printed = String::from_utf8_lossy(&out.stdout);
    eprintln!("openssl: {printed}");
    let after = rss();
    assert!(
        after < before + 50 * 1024,
        "the agent's RSS went from {before} to {after} KiB"
    );
    assert!(server_agent.status().unwrap().ready);
    bulk_upload(a, c_ip, PORT, 1 << 20).unwrap();
}

/// TLS checks the client's certificate at the handshake only. A client that
/// keeps its connection open past its certificate's expiry (our own clients
/// dial again; a hostile one need not) gets no new stream on it: 401,
/// counted as `expired`.
#[test]
fn no_new_stream_on_a_connection_whose_client_certificate_expired() {
    if !e2e_enabled("no_new_stream_on_a_connection_whose_client_certificate_expired") {
        return;
    }
    let topo = Topology::builder("oldconn")
        .node("n1", &["outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (outsider, c) = (topo.pod("outsider"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let issuer = NodeIssuer::new(&topo, topo.node("n2"), &ca.ca, &[&ca.ca]).unwrap();
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n2"),
        &pods_yaml(&[c]),
        &issuer.node_yaml("1h"),
        &[("workloads.yaml", workloads_yaml(&[], None))],
    )
    .unwrap();
    let tester = SpiffeId::new("cluster.local", "default", "tester").unwrap();
    // A certificate of 3 seconds, never renewed.
    let tls = client_tls(&ca, &tester, &pod_identity(c), Duration::from_secs(3));
    let gateway = SocketAddr::new(IpAddr::V4(c.ipv4()), TUNNEL);
    let authority = SocketAddr::new(IpAddr::V4(c.ipv4()), PORT);
    let pool_key = PoolKey::new(tester.to_string(), pod_identity(c).to_string(), gateway);
    let expired_before = agent
        .status()
        .unwrap()
        .tunnel_rejections
        .get("expired")
        .copied()
        .unwrap_or(0);
    let (first, second) = outsider.in_netns(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = TunnelClient::new(Duration::from_secs(60));
            // No expiry given: this client keeps using its pooled connection.
            let target = TunnelTarget {
                gateway,
                authority,
                forwarded_for: None,
                pool_key,
                local_cert_expiry: None,
            };
            let name = rustls_pki_types::ServerName::IpAddress(gateway.ip().into());
            let open = || {
                client.connect(&target, tls.clone(), name.clone(), || {
                    tokio::net::TcpStream::connect(gateway)
                })
            };
            let first = open().await.map_err(|e| format!("{e:#}"));
            tokio::time::sleep(Duration::from_secs(4)).await;
            let second = open().await.map(|_| ()).map_err(|e| format!("{e:#}"));
            (first.map(drop), second)
        })
    });
    first.expect("the first stream, while the certificate is valid");
    let err = second.expect_err("a new stream past the certificate's expiry must be refused");
    assert!(err.contains("401"), "{err}");
    let expired_after = agent
        .status()
        .unwrap()
        .tunnel_rejections
        .get("expired")
        .copied()
        .unwrap_or(0);
    assert_eq!(expired_after, expired_before + 1);
}
