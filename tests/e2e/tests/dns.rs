//! DNS through the mesh: an enrolled pod's queries go to the agent's DNS
//! proxy (UDP by the kernel programs' sendmsg/connect/recvmsg hooks, TCP
//! with all TCP), mesh service names are answered there, everything else
//! reaches the pod's resolver through the agent. Real dnsmasq as the
//! resolver (in a pod of the test bed, never one outside the machine), real
//! dig and glibc's getent as clients, and a musl-style unconnected socket.

use std::{net::IpAddr, path::Path, time::Duration};

use mesh_e2e::{NodeAgent, pods_yaml};
use mesh_testbed::{
    Pod, Topology,
    dnsmasq::Dnsmasq,
    e2e_enabled, runs_or_skips,
    wire::{WireCapture, WireReport},
};
use nix::sys::signal::Signal;

const WEB_V4: &str = "10.96.0.10";
const WEB_V6: &str = "fd00:96::10";
const OTHER_V4: &str = "192.0.2.10";
const OTHER_V6: &str = "2001:db8::10";
const SERVICES: &str = "services:\n  - name: web\n    namespace: default\n    vips: [10.96.0.10, \"fd00:96::10\"]\n    ports: [{port: 80}]\n";
const DEADLINE: Duration = Duration::from_secs(20);

/// The programs this test runs.
fn tools_present() -> Result<(), String> {
    let missing: Vec<&str> = [
        "/usr/sbin/dnsmasq",
        "/usr/bin/dig",
        "/usr/bin/unshare",
        "/usr/bin/getent",
    ]
    .into_iter()
    .filter(|path| !Path::new(path).exists())
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not installed: {}", missing.join(", ")))
    }
}

/// dnsmasq in `pod` on `port`, answering `other.example` (and NXDOMAIN in
/// `cluster.local`), logging every query it gets.
fn dnsmasq(pod: &Pod, port: u16) -> Dnsmasq {
    let big: Vec<String> = (101..=140)
        .map(|i| format!("--host-record=big.example,192.0.2.{i}"))
        .collect();
    let other_v4 = format!("--address=/other.example/{OTHER_V4}");
    let other_v6 = format!("--address=/other.example/{OTHER_V6}");
    let mut options = vec![
        other_v4.as_str(),
        other_v6.as_str(),
        // Authoritative for the cluster's domain, as CoreDNS is: a name it
        // does not know is NXDOMAIN (so glibc tries the next search
        // domain), not REFUSED.
        "--local=/cluster.local/",
    ];
    // More A records than fit in 512 bytes: truncated over UDP without
    // EDNS, whole over TCP.
    options.extend(big.iter().map(String::as_str));
    Dnsmasq::start(pod, port, true, &options).unwrap()
}

/// `dig +short` in `pod`: the addresses answered.
fn dig(pod: &Pod, server: IpAddr, args: &[&str]) -> Vec<String> {
    let server = format!("@{server}");
    let mut all = vec![server.as_str(), "+short", "+tries=1", "+time=5"];
    all.extend_from_slice(args);
    let out = pod.run("dig", &all, DEADLINE).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `getent <database> <name>` with a resolv.conf naming `server` and the
/// pod's Kubernetes search path, in a mount namespace of its own (glibc's
/// resolver: connected UDP, A and AAAA over one socket).
fn getent(pod: &Pod, resolv_conf: &Path, database: &str, name: &str) -> String {
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec getent {database} {name}",
        resolv_conf.display()
    );
    let out = pod
        .run("unshare", &["--mount", "sh", "-c", &script], DEADLINE)
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// pod-tool's `dns-query`: `(address the answer came from, answers)`.
fn dns_query(pod: &Pod, server: IpAddr, name: &str, options: &[&str]) -> (String, String) {
    let server = server.to_string();
    let mut args = vec!["dns-query", server.as_str(), name];
    args.extend_from_slice(options);
    let out = pod.run_tool(&args, DEADLINE).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"from"), "{text}");
    (
        words[1].to_string(),
        words.last().copied().unwrap_or_default().to_string(),
    )
}

#[test]
fn dns_of_enrolled_pods_goes_through_the_agent_which_answers_mesh_names() {
    const NAME: &str = "dns_of_enrolled_pods_goes_through_the_agent_which_answers_mesh_names";
    if !e2e_enabled(NAME)
        || !runs_or_skips(
            NAME,
            "DNS tools missing (`cargo xtask test` installs dnsmasq-base and bind9-dnsutils)",
            tools_present(),
        )
    {
        return;
    }
    // The resolver on the other node: every query that reaches it crosses
    // the wire between the nodes, where it is captured.
    let topo = Topology::builder("dns")
        .node("n1", &["a"])
        .node("n2", &["resolver"])
        .build()
        .unwrap();
    let (a, resolver) = (topo.pod("a"), topo.pod("resolver"));
    let server = dnsmasq(resolver, 53);
    let other_udp = dnsmasq(resolver, 5353);
    let mut agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "",
        &[("services.yaml", SERVICES.to_string())],
    )
    .unwrap();
    let (r4, r6) = (IpAddr::V4(resolver.ipv4()), IpAddr::V6(resolver.ipv6()));
    let wire = WireCapture::start(&topo).unwrap();

    // dig: UDP and TCP, to the resolver's IPv4 and IPv6 address.
    for server_ip in [r4, r6] {
        for transport in ["+notcp", "+tcp"] {
            let mesh = "web.default.svc.cluster.local";
            assert_eq!(dig(a, server_ip, &[transport, mesh, "A"]), [WEB_V4]);
            assert_eq!(dig(a, server_ip, &[transport, mesh, "AAAA"]), [WEB_V6]);
            assert_eq!(
                dig(a, server_ip, &[transport, "other.example", "A"]),
                [OTHER_V4]
            );
            assert_eq!(
                dig(a, server_ip, &[transport, "other.example", "AAAA"]),
                [OTHER_V6]
            );
        }
    }

    // A truncated answer (40 A records, no EDNS: over 512 bytes) reaches
    // dig as it came, dig asks again over TCP, and gets all of them.
    let before_tcp = server.queries_seen().len();
    let big = dig(a, r4, &["+noedns", "+ignore", "big.example", "A"]);
    assert!(!big.is_empty() && big.len() < 40, "truncated: {big:?}");
    let big = dig(a, r4, &["+noedns", "big.example", "A"]);
    assert_eq!(big.len(), 40, "after the fallback to TCP: {big:?}");
    // Three queries: truncated (kept by +ignore), truncated again, then TCP.
    assert_eq!(server.queries_seen().len(), before_tcp + 3);

    // glibc, with the search path a Kubernetes pod gets: the short forms.
    let resolv_conf = topo.tmp_dir().join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        format!(
            "nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
            resolver.ipv4()
        ),
    )
    .unwrap();
    for name in ["web", "web.default", "web.default.svc.cluster.local"] {
        let out = getent(a, &resolv_conf, "ahostsv4", name);
        assert!(out.starts_with(&format!("{WEB_V4} ")), "{name}: {out}");
        let out = getent(a, &resolv_conf, "ahostsv6", name);
        assert!(out.starts_with(&format!("{WEB_V6} ")), "{name}: {out}");
    }
    let out = getent(a, &resolv_conf, "ahostsv4", "other.example");
    assert!(out.starts_with(&format!("{OTHER_V4} ")), "{out}");

    // musl-style: sendto/recvfrom on an unconnected socket; the answer is
    // shown to come from the server addressed, as from a connected one.
    for options in [&["--unconnected"][..], &[]] {
        let (from, answers) = dns_query(a, r4, "web.default.svc.cluster.local.", options);
        assert_eq!(from, format!("{r4}:53"), "{options:?}");
        assert_eq!(answers, WEB_V4, "{options:?}");
        let (from, answers) = dns_query(a, r6, "other.example.", &[options, &["--aaaa"]].concat());
        assert_eq!(from, format!("[{r6}]:53"), "{options:?}");
        assert_eq!(answers, OTHER_V6, "{options:?}");
    }

    // No query for a mesh name reached the resolver, and every query it got
    // came through the agent (none went around it): in dnsmasq's log and on
    // the wire.
    let report = wire.finish().unwrap();
    let udp_queries = dns_on_the_wire(&report);
    let seen = server.queries_seen();
    assert!(
        seen.iter()
            .all(|q| !q.contains("] web.default.svc.cluster.local from")),
        "{seen:#?}"
    );
    let forwarded = agent.metric_sum("mesh_dns_queries_total", &[("answer", "forwarded")]);
    let failed = agent.metric_sum("mesh_dns_queries_total", &[("answer", "failed")]);
    let local = agent.metric_sum("mesh_dns_queries_total", &[("answer", "local")]);
    assert!(!seen.is_empty());
    assert!(
        seen.len() as u64 <= forwarded + failed,
        "the resolver got {} queries, the agent forwarded {forwarded} (+{failed} failed): {seen:#?}",
        seen.len()
    );
    assert!(local >= 16, "answered by the agent: {local}");
    assert!(udp_queries > 0, "{}", report.summary());
    assert!(
        udp_queries <= forwarded + failed,
        "{udp_queries} DNS datagrams to port 53 on the wire, {forwarded} (+{failed}) forwarded by the agent"
    );

    // Other UDP is not captured: port 5353 is reached directly, uncounted.
    assert_eq!(
        dig(a, r4, &["-p", "5353", "other.example", "A"]),
        [OTHER_V4]
    );
    assert_eq!(other_udp.queries_seen().len(), 1);
    let counted = |agent: &NodeAgent| {
        ["local", "forwarded", "failed"]
            .iter()
            .map(|answer| agent.metric_sum("mesh_dns_queries_total", &[("answer", answer)]))
            .sum::<u64>()
    };
    assert_eq!(counted(&agent), local + forwarded + failed);

    // The agent stopped (capture kept, the default): DNS is refused at
    // once, as TCP is; nothing reaches the resolver around it.
    let before = server.queries_seen().len();
    agent.stop(Signal::SIGTERM).unwrap();
    let wire = WireCapture::start(&topo).unwrap();
    let refused = a
        .spawn(
            "dig",
            &[
                &format!("@{r4}"),
                "+tries=1",
                "+time=2",
                "other.example",
                "A",
            ],
        )
        .unwrap()
        .wait_with_deadline(DEADLINE)
        .unwrap();
    assert!(
        !refused.status.success() || !String::from_utf8_lossy(&refused.stdout).contains(OTHER_V4),
        "dig got an answer with the agent away: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    let musl = a
        .run_tool(
            &[
                "dns-query",
                &r4.to_string(),
                "other.example.",
                "--unconnected",
            ],
            DEADLINE,
        )
        .unwrap_err();
    assert!(
        format!("{musl:#}").contains("Operation not permitted"),
        "{musl:#}"
    );
    assert_eq!(server.queries_seen().len(), before);
    let report = wire.finish().unwrap();
    assert_eq!(dns_on_the_wire(&report), 0, "{}", report.summary());
}

/// DNS queries to port 53 on the wire between the nodes: UDP datagrams
/// counted; none (nor any TCP payload) may carry the mesh name, which only
/// the agent answers. The capture must be complete for "none" to mean it.
fn dns_on_the_wire(report: &WireReport) -> u64 {
    assert!(report.complete(), "{}", report.summary());
    // web.default.svc.cluster.local. as DNS labels, to the root (glibc also
    // asks for longer names that start the same, from the search path).
    let mesh_name = b"\x03web\x07default\x03svc\x07cluster\x05local\x00";
    let to_dns: Vec<_> = report
        .datagrams
        .iter()
        .filter(|d| d.dst.port() == 53)
        .collect();
    for datagram in &to_dns {
        assert!(
            !datagram
                .payload
                .windows(mesh_name.len())
                .any(|w| w == mesh_name),
            "a query for the mesh name left the node: {datagram:?}"
        );
    }
    assert!(
        !report.contains(mesh_name),
        "a mesh name over TCP on the wire"
    );
    to_dns.len() as u64
}
