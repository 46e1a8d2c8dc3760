//! Certificates change under traffic: a CA rotation, and short-lived
//! certificates renewed before they expire; no request fails.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_e2e::{
    NodeAgent,
    echo::{assert_every_request_succeeded, start_requests},
    mesh::{TestCa, node_issuers, pod_identity, start_mesh, start_mesh_with},
    traffic_servers, two_nodes,
};
use mesh_testbed::{e2e_enabled, traffic::bulk_upload, wait_until};

const PORT: u16 = 7100;

fn serials(agent: &NodeAgent) -> BTreeMap<String, String> {
    agent
        .status()
        .unwrap()
        .certificates
        .into_iter()
        .map(|c| (c.identity, c.serial))
        .collect()
}

#[test]
fn rotating_the_ca_under_traffic_fails_no_request() {
    if !e2e_enabled("rotating_the_ca_under_traffic_fails_no_request") {
        return;
    }
    let topo = two_nodes("rotation");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let old = TestCa::new(&topo, "old").unwrap();
    let new = TestCa::new(&topo, "new").unwrap();
    let issuers = node_issuers(&topo, &old).unwrap();
    // A tiny idle timeout: the pooled tunnel connection closes between two
    // requests, so every request makes a new mutual-TLS handshake, at every
    // stage of the rotation.
    let agents = start_mesh_with(&topo, &issuers, "1h", "tunnel:\n  idleTimeout: 5ms\n").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let requests = start_requests(a, IpAddr::V4(c.ipv4()), PORT, 12);

    let wait_roots = |roots: usize| {
        for agent in &agents {
            wait_until(
                &format!("{roots} roots in the bundle"),
                Duration::from_secs(5),
                || Ok(agent.status()?.trust_roots == roots),
            )
            .unwrap();
        }
    };
    // 1. Trust both roots everywhere.
    for issuer in &issuers {
        issuer.set_bundle(&[&old.ca, &new.ca]).unwrap();
    }
    wait_roots(2);
    // 2. Issue from the new CA everywhere: every workload certificate is replaced.
    let before: Vec<_> = agents.iter().map(serials).collect();
    for issuer in &issuers {
        issuer.set_issuer(&new.ca).unwrap();
    }
    for (agent, before) in agents.iter().zip(&before) {
        wait_until(
            "certificates re-issued by the new CA",
            Duration::from_secs(5),
            || {
                let now = serials(agent);
                Ok(!now.is_empty()
                    && now
                        .iter()
                        .all(|(id, serial)| before.get(id) != Some(serial)))
            },
        )
        .unwrap();
    }
    // 3. Trust only the new root.
    for issuer in &issuers {
        issuer.set_bundle(&[&new.ca]).unwrap();
    }
    wait_roots(1);

    let ok = assert_every_request_succeeded(requests, "during the rotation");
    // After the rotation a brand-new tunnel connection (new handshake, new
    // certificates, new-root-only bundles) works.
    bulk_upload(a, IpAddr::V6(c.ipv6()), PORT, 1 << 20).unwrap();
    let rejections = agents[1].status().unwrap().tunnel_rejections;
    assert!(
        rejections.is_empty(),
        "no handshake may be refused: {rejections:?}"
    );
    eprintln!("rotation: ok {ok} failed 0");
}

#[test]
fn short_lived_certificates_are_renewed_before_they_expire() {
    if !e2e_enabled("short_lived_certificates_are_renewed_before_they_expire") {
        return;
    }
    let topo = two_nodes("renewal");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "4s").unwrap();
    let _servers = traffic_servers(&[c], PORT);
    let c_id = pod_identity(c).to_string();

    let first = agents[1]
        .status()
        .unwrap()
        .certificates
        .into_iter()
        .find(|x| x.identity == c_id)
        .unwrap();
    assert!(
        first.not_after - first.not_before <= 4 + 60,
        "lifetime of seconds (+ backdating): {first:?}"
    );
    let mut renewed = None;
    wait_until(
        "c's certificate to be renewed",
        Duration::from_secs(10),
        || {
            let now = agents[1]
                .status()?
                .certificates
                .into_iter()
                .find(|x| x.identity == c_id);
            renewed = now.filter(|x| x.serial != first.serial);
            Ok(renewed.is_some())
        },
    )
    .unwrap();
    let seen_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let renewed = renewed.unwrap();
    assert!(
        seen_at <= first.not_after,
        "renewed at {seen_at}, after the old one expired at {}",
        first.not_after
    );
    assert!(
        renewed.not_after > first.not_after,
        "{renewed:?} vs {first:?}"
    );
    // Traffic across nodes still works on the renewed certificates.
    bulk_upload(a, IpAddr::V4(c.ipv4()), PORT, 1 << 20).unwrap();
}
