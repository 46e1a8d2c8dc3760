//! Certificates by signing request (issue 26): node agents ask the mesh's
//! signer (`mesh-agent ca`) for their pods' certificates over gRPC with TLS,
//! and no node holds the signing key. The Kubernetes API the signer asks
//! (TokenReview, pods) is a MODEL (mesh_testbed::kube_api), hence
//! `model_api` in the names; the signer, agents, TLS, kernel and traffic are
//! real.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use mesh_agent::identity::{SpiffeId, ca::Ca};
use mesh_e2e::{
    NodeAgent,
    echo::{assert_every_request_succeeded, start_requests},
    mesh::pod_identity,
    signer::{ADMIN_PORT, CA_PORT, REPLICA_ADMIN_PORT, REPLICA_CA_PORT, SignerBed, node_token},
    traffic_servers, two_nodes,
};
use mesh_testbed::{e2e_enabled, traffic::bulk_upload, wait_until};

const PORT: u16 = 7200;

fn serials(agent: &NodeAgent) -> BTreeMap<String, (String, String)> {
    agent
        .status()
        .unwrap()
        .certificates
        .into_iter()
        .map(|c| (c.identity, (c.serial, c.source)))
        .collect()
}

fn wait_renewed(agent: &NodeAgent, before: &BTreeMap<String, (String, String)>, what: &str) {
    wait_until(what, Duration::from_secs(20), || {
        let now = serials(agent);
        Ok(!now.is_empty()
            && now
                .iter()
                .all(|(id, serial)| before.get(id).is_none_or(|b| b.0 != serial.0)))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log()));
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn agents_get_certificates_only_for_their_own_nodes_pods_from_the_signer_model_api() {
    if !e2e_enabled(
        "agents_get_certificates_only_for_their_own_nodes_pods_from_the_signer_model_api",
    ) {
        return;
    }
    let topo = two_nodes("csr-ca");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let root = Ca::new_root("mesh root").unwrap();
    let bed = SignerBed::start(&topo, &root, &[&root]).unwrap();
    // Ready means a valid certificate for every local identity.
    let agents = bed.start_agents(&[&root], "1h", "").unwrap();
    for (agent, pods) in agents.iter().zip([vec![a, b], vec![c]]) {
        let held = serials(agent);
        for pod in pods {
            let id = pod_identity(pod).to_string();
            assert_eq!(
                held.get(&id).map(|h| h.1.as_str()),
                Some("requested"),
                "{id} on {}: {held:?}",
                agent.status().unwrap().node
            );
        }
        assert_eq!(held.len(), agent.status().unwrap().pods.len());
    }
    let _servers = traffic_servers(&[a, c], PORT);
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, 1 << 20).unwrap();
    bulk_upload(c, IpAddr::V6(a.ipv6()), PORT, 1 << 20).unwrap();
    let signed_before = bed.requests("signed");
    assert!(signed_before >= 3, "signed: {signed_before}\n{}", bed.log());

    // What a compromised node could try, from inside n1.
    let n1 = topo.node("n1");
    let n1_token = node_token(n1);
    let n2_token = node_token(topo.node("n2"));
    let id = |account: &str| SpiffeId::new("cluster.local", "default", account).unwrap();
    let refused = |token: &str, who: SpiffeId, why: &str| {
        let err = bed
            .ask_from(n1, token, &who)
            .expect_err(&format!("{why}: must be refused"));
        assert!(
            format!("{err:#}").contains("Unauthenticated"),
            "{why}: {err:#}"
        );
    };
    // A pod of the other node.
    refused(&n1_token, pod_identity(c), "n1 asking for n2's pod");
    // A service account with no pod anywhere.
    refused(&n1_token, id("ghost"), "n1 asking for an unknown account");
    // Another node's token (n2's agent has no pod `a`).
    refused(&n2_token, pod_identity(a), "n2's token asking for n1's pod");
    // A token the API server does not know.
    refused("forged", pod_identity(a), "an unknown token");
    // A workload's own token, for another audience.
    bed.api.accept_token(
        "token-of-pod-a",
        ("default", "a"),
        ("a", &bed.api.uid_of("Pod", "default", "a").unwrap()),
        &["https://kubernetes.default.svc"],
    );
    refused(
        "token-of-pod-a",
        pod_identity(a),
        "a token for the API server",
    );
    // The control: the same probe with the right token is signed.
    let chain = bed.ask_from(n1, &n1_token, &pod_identity(b)).unwrap();
    assert_eq!(chain.len(), 2, "leaf and roots");
    assert_eq!(chain[1].trim(), root.cert_pem.trim());

    assert_eq!(bed.requests("no_pod_on_node"), 3, "{}", bed.log());
    assert_eq!(bed.requests("not_authenticated"), 2, "{}", bed.log());
    assert_eq!(bed.requests("signed"), signed_before + 1);

    // Refusals took nothing from the legitimate pods.
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, 1 << 20).unwrap();
    for agent in &agents {
        let status = agent.status().unwrap();
        assert!(status.ready, "{:?}", status.not_ready_reason);
        assert!(
            status.tunnel_rejections.is_empty(),
            "{:?}",
            status.tunnel_rejections
        );
        let ca = status.certificate_authority.expect("the CA's view");
        assert_eq!(ca.consecutive_failures, 0);
    }

    // No node holds the signing key: not in any file the agents have (their
    // config directories, the token, the CA root), not in their node.yaml.
    let key = bed.issuer_key().unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(key_body.len() > 40);
    let mut node_files = Vec::new();
    for agent in &agents {
        files_under(agent.config_dir(), &mut node_files);
        let node_yaml = std::fs::read_to_string(agent.config_dir().join("node.yaml")).unwrap();
        assert!(!node_yaml.contains("issuer"), "{node_yaml}");
    }
    assert!(node_files.len() >= 2 * 4, "{node_files:?}");
    for file in &node_files {
        let text: String = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .collect();
        assert!(
            !text.contains(&key_body),
            "{} holds the signing key",
            file.display()
        );
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a private key",
            file.display()
        );
    }
}

#[test]
fn restarting_the_signer_under_traffic_fails_no_request_model_api() {
    if !e2e_enabled("restarting_the_signer_under_traffic_fails_no_request_model_api") {
        return;
    }
    let topo = two_nodes("csr-restart");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let root = Ca::new_root("mesh root").unwrap();
    let mut bed = SignerBed::start(&topo, &root, &[&root]).unwrap();
    // Renewed every 3 s: the agents ask while the signer is away and after.
    // A tiny idle timeout: every request is a new mutual-TLS handshake.
    let agents = bed
        .start_agents(&[&root], "6s", "tunnel:\n  idleTimeout: 5ms\n")
        .unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let requests = start_requests(a, IpAddr::V4(c.ipv4()), PORT, 14);
    std::thread::sleep(Duration::from_secs(1));
    bed.stop_signer().unwrap();
    // Away for long enough that renewals fail and back off.
    let away = Instant::now();
    wait_until("a renewal to fail", Duration::from_secs(10), || {
        Ok(agents.iter().any(|agent| {
            agent.status().is_ok_and(|s| {
                s.certificate_authority
                    .is_some_and(|ca| ca.consecutive_failures > 0)
            })
        }))
    })
    .unwrap();
    eprintln!("signer away {:?}", away.elapsed());
    let before: Vec<_> = agents.iter().map(serials).collect();
    bed.start_signer().unwrap();
    for (agent, before) in agents.iter().zip(&before) {
        wait_renewed(
            agent,
            before,
            "certificates renewed by the restarted signer",
        );
        let ca = agent.status().unwrap().certificate_authority.unwrap();
        assert_eq!(ca.consecutive_failures, 0, "{ca:?}");
    }
    let ok = assert_every_request_succeeded(requests, "across the signer's restart");
    eprintln!("signer restart: {ok} requests, 0 failed");
}

#[test]
fn with_the_signer_away_certificates_serve_until_they_expire_then_readiness_says_so_model_api() {
    if !e2e_enabled(
        "with_the_signer_away_certificates_serve_until_they_expire_then_readiness_says_so_model_api",
    ) {
        return;
    }
    let topo = two_nodes("csr-away");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let root = Ca::new_root("mesh root").unwrap();
    let mut bed = SignerBed::start(&topo, &root, &[&root]).unwrap();
    let mut agents = bed.start_agents(&[&root], "16s", "").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    bed.stop_signer().unwrap();
    // Past the renewal point (8 s): the renewal fails, the certificates
    // still serve (8 s more), readiness and /status say how long is left.
    let n1 = &agents[0];
    wait_until("a failed renewal on n1", Duration::from_secs(15), || {
        Ok(n1
            .status()?
            .certificate_authority
            .is_some_and(|ca| ca.consecutive_failures > 0))
    })
    .unwrap();
    let status = n1.status().unwrap();
    let ca = status.certificate_authority.clone().unwrap();
    assert!(status.ready, "{:?}", status.not_ready_reason);
    let left = ca.seconds_left.expect("seconds left");
    assert!(left <= 8, "{ca:?}");
    let (code, body) = n1.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("the certificates held expire in"), "{body}");
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, 1 << 16).unwrap();
    assert!(
        ca.last_error
            .as_deref()
            .is_some_and(|e| e.contains("Unavailable")
                || e.contains("unavailable")
                || e.contains("transport")
                || e.contains("connect")),
        "{ca:?}"
    );
    // Then they expire: not ready, naming the identity and the CA.
    wait_until(
        "n1 not ready once its certificates expired",
        Duration::from_secs(20),
        || {
            let (code, _) = n1.get("/readyz")?;
            Ok(code == 503)
        },
    )
    .unwrap();
    let (_, body) = n1.get("/readyz").unwrap();
    assert!(
        body.contains("no valid certificate for spiffe://cluster.local/ns/default/sa/a")
            && body.contains("the CA at https://"),
        "{body}"
    );
    assert!(n1.metric_sum("mesh_certificate_requests_total", &[("result", "failed")]) > 0);
    // The signer back: certificates again, ready again, traffic flows.
    bed.start_signer().unwrap();
    for agent in &mut agents {
        agent.wait_ready(Duration::from_secs(30)).unwrap();
    }
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, 1 << 20).unwrap();
}

#[test]
fn rotating_the_root_with_two_roots_in_the_bundle_fails_no_request_model_api() {
    if !e2e_enabled("rotating_the_root_with_two_roots_in_the_bundle_fails_no_request_model_api") {
        return;
    }
    let topo = two_nodes("csr-rotate");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let old = Ca::new_root("old root").unwrap();
    let new = Ca::new_root("new root").unwrap();
    let bed = SignerBed::start(&topo, &old, &[&old]).unwrap();
    let agents = bed
        .start_agents(&[&old], "6s", "tunnel:\n  idleTimeout: 5ms\n")
        .unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let requests = start_requests(a, IpAddr::V4(c.ipv4()), PORT, 25);
    let wait_roots = |roots: usize| {
        for agent in &agents {
            wait_until(
                &format!("{roots} roots in the bundle"),
                Duration::from_secs(15),
                || Ok(agent.status()?.trust_roots == roots),
            )
            .unwrap();
        }
    };
    // 1. Send both roots: every agent trusts both at its next renewal.
    bed.set_bundle(&[&old, &new]).unwrap();
    wait_roots(2);
    // 2. Sign with the new root's key: every certificate is replaced.
    let before: Vec<_> = agents.iter().map(serials).collect();
    bed.set_issuer(&new).unwrap();
    for (agent, before) in agents.iter().zip(&before) {
        wait_renewed(agent, before, "certificates signed by the new root");
    }
    // 3. Send only the new root.
    bed.set_bundle(&[&new]).unwrap();
    wait_roots(1);
    let ok = assert_every_request_succeeded(requests, "during the root rotation");
    for agent in &agents {
        let rejections = agent.status().unwrap().tunnel_rejections;
        assert!(rejections.is_empty(), "{rejections:?}");
    }
    eprintln!("root rotation: {ok} requests, 0 failed");
}

#[test]
fn two_signer_replicas_sign_for_one_mesh_model_api() {
    if !e2e_enabled("two_signer_replicas_sign_for_one_mesh_model_api") {
        return;
    }
    let topo = two_nodes("csr-replicas");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let root = Ca::new_root("mesh root").unwrap();
    let mut bed = SignerBed::start(&topo, &root, &[&root]).unwrap();
    bed.start_replica().unwrap();
    // n1 asks one replica, n2 the other; nothing is shared between them but
    // the issuer's files and the API.
    let agents = bed
        .start_agents_asking(&[&root], "6s", "tunnel:\n  idleTimeout: 5ms\n", |node| {
            if node.name() == "n1" {
                CA_PORT
            } else {
                REPLICA_CA_PORT
            }
        })
        .unwrap();
    let _servers = traffic_servers(&[a, c], PORT);
    let requests = start_requests(a, IpAddr::V4(c.ipv4()), PORT, 8);
    // Renewals from both replicas while the requests run.
    let before: Vec<_> = agents.iter().map(serials).collect();
    for (agent, before) in agents.iter().zip(&before) {
        wait_renewed(agent, before, "certificates renewed by each replica");
    }
    assert_every_request_succeeded(requests, "with two replicas signing");
    bulk_upload(c, IpAddr::V6(a.ipv6()), PORT, 1 << 20).unwrap();
    for port in [ADMIN_PORT, REPLICA_ADMIN_PORT] {
        let signed = bed.requests_at(port, "signed");
        assert!(
            signed >= 2,
            "the replica with admin port {port} signed {signed}"
        );
    }
}
