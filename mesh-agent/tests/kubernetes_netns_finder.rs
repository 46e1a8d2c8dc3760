//! Finding a pod's network namespace by its IP, on real namespaces (the
//! test bed's pods): the one holding the IP is found; when two hold it (a
//! stale namespace), the finder names both and does not guess. Needs root.

use std::net::IpAddr;

use mesh_agent::kubernetes::netns::NetnsFinder;
use mesh_testbed::{Topology, e2e_enabled};

#[test]
fn the_namespace_holding_the_ip_is_found_and_two_holding_it_are_not_guessed_between() {
    if !e2e_enabled(
        "the_namespace_holding_the_ip_is_found_and_two_holding_it_are_not_guessed_between",
    ) {
        return;
    }
    // Two test beds: their first pods both have 10.1.0.2.
    let first = Topology::builder("netns_finder_1")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let second = Topology::builder("netns_finder_2")
        .node("n1", &["a"])
        .build()
        .unwrap();
    let (a, b, a2) = (first.pod("a"), first.pod("b"), second.pod("a"));
    assert_eq!(a.ipv4(), a2.ipv4());
    // A directory of our own, as the runtime's /var/run/netns would be.
    let dir = tempfile::tempdir().unwrap();
    let link = |name: &str, target: std::path::PathBuf| {
        std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
    };
    link("cni-a", a.netns_path());
    link("cni-b", b.netns_path());
    let mut finder = NetnsFinder::new(dir.path());

    let by_ip = |ip: std::net::Ipv4Addr| vec![IpAddr::V4(ip)];
    assert_eq!(
        finder.find(&by_ip(b.ipv4())).unwrap(),
        Some(dir.path().join("cni-b"))
    );
    assert_eq!(
        finder.find(&[IpAddr::V6(a.ipv6())]).unwrap(),
        Some(dir.path().join("cni-a")),
        "found by its IPv6 address too"
    );
    assert_eq!(
        finder.find(&by_ip("10.1.0.99".parse().unwrap())).unwrap(),
        None
    );

    // A second namespace holding a's IP appears: not guessed between.
    link("cni-stale", a2.netns_path());
    let err = finder.find(&by_ip(a.ipv4())).unwrap_err();
    assert!(
        err.contains("2 network namespaces") && err.contains("cni-a") && err.contains("cni-stale"),
        "{err}"
    );
    // Once the stale one is gone, the pod's is found again.
    std::fs::remove_file(dir.path().join("cni-stale")).unwrap();
    assert_eq!(
        finder.find(&by_ip(a.ipv4())).unwrap(),
        Some(dir.path().join("cni-a"))
    );
}
