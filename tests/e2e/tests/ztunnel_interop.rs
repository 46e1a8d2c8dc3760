//! Interop with the real ztunnel (Istio ambient's node proxy): the binary
//! from `../shared/peer/` (or `ZTUNNEL_BIN`), built from istio/ztunnel's
//! source, runs in pod `z` of node n2 in dedicated mode, with its `FAKE_CA`
//! minting from its test root; the agent on n1 enrols pod `a` and mints from
//! the same root. Both directions, IPv4 and IPv6: HBONE over mutual TLS,
//! each side sees the other's SPIFFE identity, each side's policy is
//! enforced, and a peer with the wrong identity is refused.
//!
//! ztunnel does not capture by itself: its client is `curl` through the
//! SOCKS5 listener ztunnel offers for that (`UNSTABLE_ENABLE_SOCKS5`), not
//! netfilter; the agent's client is captured by the agent's programs as any
//! pod's.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_agent::proxy::{connections::Direction, outcome::Outcome};
use mesh_e2e::{NodeAgent, pods_yaml};
use mesh_testbed::{Pod, Process, Topology, e2e_enabled, runs_or_skips, wait_until};

const ECHO_PORT: u16 = 7000;
/// ztunnel's policy denies this port of z.
const ZTUNNEL_DENIED_PORT: u16 = 8080;
/// An HTTP server in a: /private is denied by a's L7 policy.
const HTTP_PORT: u16 = 9080;
/// a's L4 policy denies this port.
const AGENT_DENIED_PORT: u16 = 9001;
const SOCKS5: &str = "127.0.0.1:15080";

const A_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: a-admits-z
  namespace: default
spec:
  selector:
    matchLabels:
      app: a
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/z"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: a-denies
  namespace: default
spec:
  selector:
    matchLabels:
      app: a
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9001"]
  - to:
    - operation:
        ports: ["9080"]
        paths: ["/private"]
"#;

/// `../shared/peer`, beside the project.
fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peer")
}

/// The ztunnel binary: `ZTUNNEL_BIN`, else `../shared/peer/ztunnel`.
fn ztunnel_binary() -> Option<PathBuf> {
    let path = std::env::var_os("ZTUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| peer_dir().join("ztunnel"));
    path.is_file().then_some(path)
}

/// Whether to run: the e2e prerequisites and the binary. With `CI=true` a
/// missing binary fails the test (CI never skips quietly).
fn enabled(test: &str) -> Option<PathBuf> {
    let binary = ztunnel_binary();
    let ready = binary.as_ref().map(|_| ()).ok_or_else(|| {
        format!(
            "no ztunnel binary at {} (or ZTUNNEL_BIN)",
            peer_dir().join("ztunnel").display()
        )
    });
    (e2e_enabled(test) && runs_or_skips(test, "the peer is missing", ready))
        .then(|| binary.expect("checked"))
}

/// ztunnel's local XDS file: the two workloads and its policy.
fn local_xds(a: &Pod, z: &Pod) -> String {
    let workload = |pod: &Pod, node: &str| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{v4}\", \"{v6}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            name = pod.name(),
            v4 = pod.ipv4(),
            v6 = pod.ipv6(),
        )
    };
    format!(
        "workloads:\n{}{}services: []\npolicies:\n- {{name: deny-{ZTUNNEL_DENIED_PORT}, namespace: default, scope: Namespace, action: Deny, dryRun: false, rules: [[[{{destinationPorts: [{ZTUNNEL_DENIED_PORT}]}}]]]}}\n",
        workload(a, "n1"),
        workload(z, "n2"),
    )
}

/// Starts ztunnel in `z` and waits until it is ready.
fn start_ztunnel(topo: &Topology, binary: &Path, a: &Pod, z: &Pod) -> Process {
    let dir = topo.tmp_dir().join("ztunnel");
    std::fs::create_dir_all(&dir).unwrap();
    let xds = dir.join("local-xds.yaml");
    std::fs::write(&xds, local_xds(a, z)).unwrap();
    let mut cmd = Command::new(binary);
    cmd.arg("proxy")
        .current_dir(&dir)
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &xds)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "default/z/z")
        .env("NODE_NAME", "n2")
        .env("PACKET_MARK", "1337")
        .env("ENABLE_ORIG_SRC", "false")
        .env("UNSTABLE_ENABLE_SOCKS5", "true")
        .env("RUST_LOG", "info");
    let mut ztunnel = z.spawn_with(cmd).unwrap();
    let ready = wait_until("ztunnel to be ready", Duration::from_secs(30), || {
        if let Some(status) = ztunnel.try_status()? {
            anyhow::bail!("ztunnel exited with {status}");
        }
        Ok(z.run(
            "curl",
            &["-sf", "http://127.0.0.1:15021/healthz/ready"],
            Duration::from_secs(5),
        )
        .is_ok())
    });
    if let Err(e) = ready {
        panic!("{e:#}\n{}", ztunnel.output_report());
    }
    ztunnel
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `curl` in z through ztunnel's SOCKS5 listener: (HTTP status, body); status
/// 0 when no HTTP answer came (the connection was refused or reset).
fn curl_through_ztunnel(z: &Pod, ip: IpAddr, port: u16, path: &str) -> (u16, String) {
    let url = format!("http://{}:{port}{path}", url_host(ip));
    let out = z
        .spawn(
            "curl",
            &[
                "-s",
                "--max-time",
                "10",
                "--socks5",
                SOCKS5,
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )
        .unwrap()
        .wait_with_deadline(Duration::from_secs(15))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// a's agent's count of tunnel streams refused for `reason`.
fn rejections(agent: &NodeAgent, reason: &str) -> u64 {
    agent
        .status()
        .unwrap()
        .tunnel_rejections
        .get(reason)
        .copied()
        .unwrap_or(0)
}

#[test]
fn the_agent_and_a_real_ztunnel_interoperate_both_ways_with_identities_and_policies() {
    let test = "the_agent_and_a_real_ztunnel_interoperate_both_ways_with_identities_and_policies";
    let Some(ztunnel_bin) = enabled(test) else {
        return;
    };
    let topo = Topology::builder("ztunnel_interop")
        .node("n1", &["a"])
        .node("n2", &["z"])
        .build()
        .unwrap();
    let (a, z) = (topo.pod("a"), topo.pod("z"));
    let peer = peer_dir();
    let node_yaml = format!(
        "identity:\n  issuer:\n    cert: {}\n    key: {}\n    lifetime: 1h\n",
        peer.join("test-root-cert.pem").display(),
        peer.join("test-root-key.pem").display()
    );
    let workloads = |sa: &str| {
        format!(
            "workloads:\n  - name: z\n    namespace: default\n    serviceAccount: {sa}\n    node: n2\n    ipv4: {}\n    ipv6: \"{}\"\n",
            z.ipv4(),
            z.ipv6()
        )
    };
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        &node_yaml,
        &[
            ("workloads.yaml", workloads("z")),
            ("policies/a.yaml", A_POLICIES.to_string()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut ztunnel = start_ztunnel(&topo, &ztunnel_bin, a, z);

    let _z_servers: Vec<Process> = [ECHO_PORT, ZTUNNEL_DENIED_PORT]
        .iter()
        .map(|port| {
            z.spawn_tool(&["peer-echo-server", &port.to_string()])
                .unwrap()
        })
        .collect();
    let _a_servers = [
        a.spawn_tool(&["http-server", &format!("0.0.0.0:{HTTP_PORT}")])
            .unwrap(),
        // (IPv6 only: pod-tool's servers bind one family each.)
        a.spawn_tool(&["http-server", &format!("[::]:{HTTP_PORT}")])
            .unwrap(),
        a.spawn_tool(&["peer-echo-server", &AGENT_DENIED_PORT.to_string()])
            .unwrap(),
    ];
    let a_identity = "spiffe://cluster.local/ns/default/sa/a";
    let z_identity = "spiffe://cluster.local/ns/default/sa/z";

    for (family, a_ip, z_ip) in [
        ("IPv4", IpAddr::V4(a.ipv4()), IpAddr::V4(z.ipv4())),
        ("IPv6", IpAddr::V6(a.ipv6()), IpAddr::V6(z.ipv6())),
    ] {
        // The agent's client to ztunnel's server.
        let send = |port: u16| {
            a.run_tool(
                &["send", &z_ip.to_string(), &port.to_string(), "hello"],
                Duration::from_secs(10),
            )
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let mut answer = String::new();
        wait_until(
            &format!("{family}: a -> z through ztunnel"),
            Duration::from_secs(15),
            || {
                answer = send(ECHO_PORT)?;
                Ok(true)
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nagent log: {}\nztunnel: {}",
                agent.log(),
                ztunnel.output_report()
            )
        });
        assert!(answer.ends_with("|hello"), "{family}: {answer}");
        let record = agent
            .wait_for_connection(&format!("{family}: a -> z recorded"), |r| {
                r.direction == Direction::Outbound
                    && r.original_dst.ip() == z_ip
                    && r.original_dst.port() == ECHO_PORT
            })
            .unwrap();
        assert_eq!(record.security, "mutual_tls", "{record:?}");
        assert_eq!(
            record.peer_identity.as_deref(),
            Some(z_identity),
            "{record:?}"
        );
        // ztunnel saw a's identity (its access log).
        wait_until(
            &format!("{family}: ztunnel to log a's identity"),
            Duration::from_secs(10),
            || {
                let log = format!("{}{}", ztunnel.stdout_so_far(), ztunnel.stderr_so_far());
                Ok(log.contains(a_identity))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ztunnel.output_report()));
        // ztunnel's policy: its L4 deny holds, and the agent counts it as
        // the peer's denial.
        let denied_before = rejections(&agent, "denied_by_peer");
        assert!(
            send(ZTUNNEL_DENIED_PORT).is_err(),
            "{family}: ztunnel's policy denies port {ZTUNNEL_DENIED_PORT}"
        );
        assert!(
            rejections(&agent, "denied_by_peer") > denied_before,
            "{family}: ztunnel's 401 counted as denied_by_peer: {:?}",
            agent.status().unwrap().tunnel_rejections
        );

        // ztunnel's client to the agent's server: L7 allow and deny, L4 deny.
        // (a's server may still be starting: the first answers can be 502.)
        let mut last = (0, String::new());
        let served = wait_until(
            &format!("{family}: z -> a through ztunnel"),
            Duration::from_secs(15),
            || {
                last = curl_through_ztunnel(z, a_ip, HTTP_PORT, "/public");
                Ok(last.0 == 200)
            },
        );
        if let Err(e) = served {
            panic!(
                "{e:#}: last answer {last:?}\nagent log: {}\nztunnel: {}",
                agent.log(),
                ztunnel.output_report()
            );
        }
        assert_eq!(last.1, "ok GET /public", "{family}");
        let inbound = agent
            .wait_for_connection(&format!("{family}: z -> a recorded"), |r| {
                r.direction == Direction::Inbound && r.original_dst.ip() == a_ip
            })
            .unwrap();
        assert_eq!(inbound.security, "mutual_tls", "{inbound:?}");
        assert_eq!(
            inbound.source_identity.as_deref(),
            Some(z_identity),
            "{inbound:?}"
        );
        let (status, body) = curl_through_ztunnel(z, a_ip, HTTP_PORT, "/private");
        assert_eq!(status, 403, "{family}: a's L7 deny: {body}");
        let (status, _) = curl_through_ztunnel(z, a_ip, AGENT_DENIED_PORT, "/");
        assert_eq!(status, 0, "{family}: a's L4 deny refuses the connection");
        let denied = agent
            .wait_for_connection(
                &format!("{family}: z -> a:{AGENT_DENIED_PORT} denied"),
                |r| {
                    r.original_dst.ip() == a_ip
                        && r.original_dst.port() == AGENT_DENIED_PORT
                        && matches!(r.outcome, Outcome::Denied { .. })
                },
            )
            .unwrap();
        assert_eq!(denied.source_identity.as_deref(), Some(z_identity));
    }

    // A peer with the wrong identity: the agent expects z to be another
    // service account, and refuses ztunnel's certificate.
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file("workloads.yaml", &workloads("impostor"))
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    let refused = a.run_tool(
        &["send", &z.ipv4().to_string(), &ECHO_PORT.to_string(), "x"],
        Duration::from_secs(10),
    );
    assert!(
        refused.is_err(),
        "a connection to a peer that is not who the workload says must be refused"
    );
    let status = agent.status().unwrap();
    assert!(
        status
            .tunnel_rejections
            .iter()
            .any(|(reason, n)| *n > 0 && reason.contains("identity")),
        "the refusal is counted as an identity mismatch: {:?}",
        status.tunnel_rejections
    );
    ztunnel.kill();
}
