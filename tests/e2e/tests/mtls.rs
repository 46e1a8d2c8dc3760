//! Traffic between pods on different nodes leaves the node only inside mutual
//! TLS (HBONE on port 15008), each side proving the identity of the pod it
//! speaks for. Real TLS, real HTTP/2, real kernel capture, a real wire capture.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::{
    mesh::{TestCa, node_issuers, pod_identity, start_mesh},
    traffic_servers, two_nodes,
};
use mesh_testbed::{
    Pod, e2e_enabled,
    traffic::{bulk_download, bulk_upload, peer_seen_by_server},
    wire::WireCapture,
};

const PORT: u16 = 7100;
const MIB: u64 = 1 << 20;

/// Sends `marker` to the traffic server's echo, half-closes, and checks it
/// comes back, then EOF.
fn echo_marker(client: &Pod, ip: IpAddr, marker: &str) {
    client
        .run_tool(
            &[
                "echo",
                &ip.to_string(),
                &PORT.to_string(),
                "--line",
                marker,
                "--shutdown",
            ],
            Duration::from_secs(20),
        )
        .unwrap();
}

#[test]
fn cross_node_traffic_leaves_the_node_only_as_tls_on_the_tunnel_port() {
    if !e2e_enabled("cross_node_traffic_leaves_the_node_only_as_tls_on_the_tunnel_port") {
        return;
    }
    let topo = two_nodes("mtls_wire");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _servers = traffic_servers(&[a, b, c], PORT);

    let capture = WireCapture::start(&topo).unwrap();
    let marker = "plaintext-that-must-never-be-on-the-wire-7f3a";
    for ip in [IpAddr::V4(c.ipv4()), IpAddr::V6(c.ipv6())] {
        echo_marker(a, ip, marker);
        bulk_upload(a, ip, PORT, 8 * MIB).unwrap();
        bulk_download(a, ip, PORT, 8 * MIB, 7).unwrap();
    }
    // And the other way round, and within node n1 (which never leaves it).
    echo_marker(c, IpAddr::V4(a.ipv4()), marker);
    echo_marker(a, IpAddr::V4(b.ipv4()), marker);
    let report = capture.finish().unwrap();

    assert!(report.complete(), "the capture lost frames: {report:?}");
    assert!(
        !report.contains(marker.as_bytes()),
        "application plaintext crossed the wire: {report:?}"
    );
    assert_eq!(
        report.ports_with_payload(),
        BTreeSet::from([mesh_common::TUNNEL_PORT]),
        "{report:?}"
    );
    report.all_tls_on_port(mesh_common::TUNNEL_PORT).unwrap();
    assert!(report.payload_bytes_on_port(mesh_common::TUNNEL_PORT) > 32 * MIB);

    // Both agents say what happened, with the identities proven in TLS.
    let (a_id, c_id) = (pod_identity(a).to_string(), pod_identity(c).to_string());
    let out = agents[0]
        .wait_for_connection("a -> c through the tunnel", |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == IpAddr::V4(c.ipv4())
        })
        .unwrap();
    assert_eq!(out.security, "mutual_tls", "{out:?}");
    assert_eq!(out.upstream, "tunnel:default/c");
    assert_eq!(out.peer_identity.as_deref(), Some(c_id.as_str()));
    let inbound = agents[1]
        .wait_for_connection("a -> c arriving through the tunnel", |r| {
            r.direction == Direction::Inbound && r.original_dst.ip() == IpAddr::V4(c.ipv4())
        })
        .unwrap();
    assert_eq!(inbound.security, "mutual_tls", "{inbound:?}");
    assert_eq!(
        inbound.source_identity.as_deref(),
        Some(a_id.as_str()),
        "{inbound:?}"
    );
    assert_eq!(
        inbound.client.ip(),
        IpAddr::V4(a.ipv4()),
        "Forwarded carried a's address: {inbound:?}"
    );
    // Same node: no TLS, but the source identity is kept.
    let local = agents[0]
        .wait_for_connection("a -> b on the node", |r| {
            r.original_dst.ip() == IpAddr::V4(b.ipv4())
        })
        .unwrap();
    assert_eq!(
        (local.security.as_str(), local.source_identity.as_deref()),
        ("none", Some(a_id.as_str()))
    );

    // Many streams, few connections: one pooled TLS connection per gateway
    // (c's IPv4 and IPv6 address) from n1.
    let status = agents[0].status().unwrap();
    assert!(
        (1..=2).contains(&status.tunnel_pooled_connections),
        "pooled: {}",
        status.tunnel_pooled_connections
    );
    // Through the tunnel, c's server sees a's own address (the Forwarded
    // header's, delivered from it), over IPv4 and IPv6.
    assert_eq!(
        peer_seen_by_server(a, c.ipv4(), PORT).unwrap().ip(),
        IpAddr::V4(a.ipv4())
    );
    assert_eq!(
        peer_seen_by_server(a, c.ipv6(), PORT).unwrap().ip(),
        IpAddr::V6(a.ipv6())
    );
}
