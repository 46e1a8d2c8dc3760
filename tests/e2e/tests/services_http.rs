//! Services on HTTP ports: every request is balanced on its own (one client
//! connection spreads over all endpoints), slow endpoints are avoided, failing
//! ones ejected with retries hiding the failures, canaries get their share,
//! local endpoints are preferred, endpoints change under traffic without a
//! failed request, and routes time out with 504.
//!
//! The mesh: client `a` and endpoint `b` on n1; endpoints `c`, `d` on n2 and
//! `e` on n3. Every node runs an agent (remote endpoints are reached through
//! the mTLS tunnel); the client's agent balances. The client is `http-load`, a
//! hyper client that makes real requests over a fixed number of connections
//! and reports per endpoint (by the `x-served-by` answer header).

use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{
    NodeAgent,
    backend::HttpBackend,
    load::{Load, load},
    mesh::{TestCa, node_issuers, start_mesh},
};
use mesh_testbed::{Pod, Topology, e2e_enabled, wait_until};

const PORT: u16 = 8080;
const WEB: &str = "10.96.0.30";
const LOCAL: &str = "10.96.0.31";
const CANARY: &str = "10.96.0.32";
const EMPTY: &str = "10.96.0.33";
const WEB_H2: &str = "10.96.0.34";
const PINNED: &str = "10.96.0.35";
const OUTAGE: &str = "10.96.0.36";
const WEB_V6: &str = "fd00:96::30";

fn endpoint(pod: &Pod, labels: &str) -> String {
    format!(
        "      - {{name: {}, address: {}, node: {}, labels: {{{labels}}}}}\n",
        pod.name(),
        pod.ipv4(),
        pod.node_name()
    )
}

/// `services.yaml` for the client's node: the services under test over `web`
/// (the endpoints of the main service).
fn services_yaml(topo: &Topology, web: &[&str]) -> String {
    let (b, c, d, e) = (topo.pod("b"), topo.pod("c"), topo.pod("d"), topo.pod("e"));
    let web_endpoints: String = web
        .iter()
        .map(|name| endpoint(topo.pod(name), ""))
        .collect();
    format!(
        "services:
  - name: web
    namespace: default
    vips: [{WEB}, \"{WEB_V6}\"]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    requestTimeout: 10s
    routes:
      - {{pathPrefix: /quick/, timeout: 300ms}}
    outlierDetection: {{consecutiveFailures: 3, baseEjectionTime: 2s}}
    endpoints:
{web_endpoints}  - name: web-h2
    namespace: default
    vips: [{WEB_H2}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http2}}]
    locality: none
    endpoints:
{}{}{}  - name: local
    namespace: default
    vips: [{LOCAL}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: preferNode
    endpoints:
{}{}{}  - name: canary
    namespace: default
    vips: [{CANARY}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    subsets:
      - {{name: stable, weight: 95, labels: {{version: v1}}}}
      - {{name: canary, weight: 5, labels: {{version: v2}}}}
    endpoints:
{}{}{}  - name: outage
    namespace: default
    vips: [{OUTAGE}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    retries: {{attempts: 2, budgetPercent: 20, minPerSecond: 1}}
    outlierDetection: {{maxEjectionPercent: 0}}
    endpoints:
{web_endpoints}  - name: empty
    namespace: default
    vips: [{EMPTY}]
    ports: [{{port: 80, protocol: http}}]
",
        endpoint(c, ""),
        endpoint(d, ""),
        endpoint(e, ""),
        endpoint(b, ""),
        endpoint(c, ""),
        endpoint(e, ""),
        endpoint(c, "version: v1"),
        endpoint(d, "version: v1"),
        endpoint(e, "version: v2"),
    )
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(agent: &NodeAgent, series: &str) -> Option<f64> {
    let (status, text) = agent.get("/metrics").unwrap();
    assert_eq!(status, 200);
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
}

/// The agent's balancer metrics, for failure messages.
fn service_metrics(agent: &NodeAgent) -> String {
    let (_, text) = agent.get("/metrics").unwrap();
    text.lines()
        .filter(|l| l.starts_with("mesh_service"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many times an endpoint of `service` was ejected. What the phases
/// assert: the gauge `mesh_service_endpoint_ejected` says "now", and an
/// ejection of `baseEjectionTime: 2s` can end before a phase does on a
/// busy machine.
fn ejections(agent: &NodeAgent, service: &str) -> f64 {
    metric(
        agent,
        &format!(r#"mesh_service_ejections_total{{service="default/{service}:80"}}"#),
    )
    .unwrap_or(0.0)
}

/// Whether `endpoint` of the service web is ejected now.
fn ejected(agent: &NodeAgent, endpoint: &str) -> bool {
    metric(
        agent,
        &format!(
            r#"mesh_service_endpoint_ejected{{endpoint="{endpoint}",service="default/web:80"}}"#
        ),
    ) == Some(1.0)
}

/// Writes the client node's services.yaml and waits until it is applied.
fn apply_services(agent: &NodeAgent, yaml: &str) {
    let generation = agent.status().unwrap().config_generation;
    agent.write_file("services.yaml", yaml).unwrap();
    agent.wait_generation_after(generation).unwrap();
}

/// An HTTP backend named after its pod in each of b, c, d and e.
fn start_backends(topo: &Topology) -> BTreeMap<&'static str, HttpBackend> {
    ["b", "c", "d", "e"]
        .into_iter()
        .map(|name| {
            (
                name,
                HttpBackend::start(topo.pod(name), PORT, name).unwrap(),
            )
        })
        .collect()
}

struct Mesh {
    topo: Topology,
}

fn mesh(name: &str) -> Mesh {
    let topo = Topology::builder(name)
        .node("n1", &["a", "b"])
        .node("n2", &["c", "d"])
        .node("n3", &["e"])
        .build()
        .unwrap();
    Mesh { topo }
}

#[test]
fn http_requests_are_balanced_per_request_around_slow_and_failing_endpoints() {
    if !e2e_enabled("http_requests_are_balanced_per_request_around_slow_and_failing_endpoints") {
        return;
    }
    let Mesh { topo } = mesh("svc-http");
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let backends = start_backends(&topo);
    let client_agent = &agents[0];
    apply_services(client_agent, &services_yaml(&topo, &["c", "d", "e"]));
    let a = topo.pod("a");
    let web = format!("http://{WEB}/");

    // Even spread: 1,500 requests, one after the other, on ONE client
    // connection, over three equal endpoints on two other nodes.
    let spread = load(a, &web, &["--requests", "1500", "--connections", "1"]);
    eprintln!("even spread: {spread}");
    assert!(spread.all_ok(), "{spread}");
    assert_eq!(spread.json["connections"], 1);
    // Every endpoint serves. Not "a third each": on a busy machine their
    // latencies differ and the balancer rightly follows them (c/d/e =
    // 568/708/224 was seen); the exact shares are the balancer's unit
    // tests' (`http_equal_endpoints_share_evenly_one_request_at_a_time`).
    for name in ["c", "d", "e"] {
        assert!(
            spread.served_by(name) >= 15,
            "{name} served {} of 1500 requests (under 1%): {spread}",
            spread.served_by(name)
        );
    }
    // The client's agent reports every request as the source, Istio-style.
    let source = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("response_code", "200"),
    ];
    assert_eq!(
        client_agent.metric_sum("istio_requests_total", &source),
        1500
    );
    assert_eq!(
        client_agent.metric_sum("istio_request_duration_milliseconds_count", &source),
        1500
    );

    // The same over HTTP/2 to an http2 port: 8 requests in flight on one
    // client connection, multiplexed to every endpoint.
    let h2 = load(
        a,
        &format!("http://{WEB_H2}/"),
        &[
            "--requests",
            "600",
            "--connections",
            "1",
            "--concurrency",
            "8",
            "--http2",
        ],
    );
    eprintln!("HTTP/2: {h2}");
    assert!(h2.all_ok(), "{h2}");
    for name in ["c", "d", "e"] {
        assert!(h2.served_by(name) >= 100, "{name}: {h2}");
    }

    // One endpoint refusing connections (its pooled ones reset too): the
    // connect failures are retried on the others, and it is ejected.
    backends["e"].refuse();
    let ejections_before = ejections(client_agent, "web-h2");
    let refused = load(
        a,
        &format!("http://{WEB_H2}/"),
        &[
            "--requests",
            "600",
            "--connections",
            "1",
            "--concurrency",
            "4",
            "--http2",
        ],
    );
    eprintln!("e refusing connections: {refused}");
    assert!(refused.all_ok(), "the client saw failures: {refused}");
    assert!(
        ejections(client_agent, "web-h2") > ejections_before,
        "e was not ejected: {}",
        service_metrics(client_agent)
    );
    backends["e"].resume();

    // One endpoint failing (503 on every request): ejected after three
    // failures; the client sees no failure, thanks to retries within budget.
    backends["e"].set_status(503);
    let ejections_before = ejections(client_agent, "web");
    let failing = load(a, &web, &["--requests", "1500", "--connections", "1"]);
    eprintln!("e failing: {failing}");
    assert!(failing.all_ok(), "the client saw failures: {failing}");
    assert_eq!(failing.served_by("e"), 0, "{failing}");
    assert!(
        ejections(client_agent, "web") > ejections_before,
        "e was not ejected: {}",
        service_metrics(client_agent)
    );
    let served_503 = backends["e"].served_with(503);
    let retries = metric(
        client_agent,
        r#"mesh_service_retries_total{result="allowed",service="default/web:80"}"#,
    )
    .unwrap_or(0.0);
    eprintln!("e answered {served_503} requests with 503; retries granted: {retries}");
    assert!(retries >= 3.0, "the failures were not retried");
    // The budget: 20% of the requests plus 10/s over the 10 s window.
    assert!(retries <= 0.2 * 5600.0 + 100.0, "retries {retries}");
    assert!(
        (served_503 as f64) < 1500.0 * 0.05,
        "an ejected endpoint kept getting requests: {served_503}"
    );

    // Recovered: re-admitted after its ejection time, and gets traffic again.
    backends["e"].set_status(200);
    let before = backends["e"].served();
    wait_until(
        "e to be re-admitted and served again",
        Duration::from_secs(30),
        || {
            let round = load(a, &web, &["--requests", "100", "--connections", "1"]);
            assert!(round.all_ok(), "{round}");
            Ok(backends["e"].served() > before + 10 && !ejected(client_agent, "e"))
        },
    )
    .unwrap();

    // One endpoint slow (+100 ms): its share drops far below a third and the
    // client's p99 stays near the healthy endpoints' latency.
    backends["e"].set_delay(Duration::from_millis(100));
    let slow = load(
        a,
        &web,
        &[
            "--requests",
            "2000",
            "--connections",
            "4",
            "--concurrency",
            "4",
        ],
    );
    eprintln!("e slow: {slow}");
    assert!(slow.all_ok(), "{slow}");
    let slow_share = slow.served_by("e") as f64 / 2000.0;
    let healthy_p99 = slow.endpoint_p99_us("c").max(slow.endpoint_p99_us("d"));
    eprintln!(
        "slow endpoint share {slow_share:.4}; client p99 {} us; healthy endpoints' p99 {healthy_p99} us",
        slow.p99_us()
    );
    assert!(
        slow_share < 0.05,
        "the slow endpoint got {slow_share:.3}: {slow}"
    );
    assert!(
        slow.p99_us() < 100_000 && slow.p99_us() <= healthy_p99 * 2 + 5_000,
        "client p99 {} us against healthy p99 {healthy_p99} us: {slow}",
        slow.p99_us()
    );
    backends["e"].set_delay(Duration::ZERO);

    // A 95/5 split by version label, over 2,000 requests: the canary (e) gets
    // 5% (100), within four standard deviations (~10 each).
    let canary = load(
        a,
        &format!("http://{CANARY}/"),
        &["--requests", "2000", "--connections", "2"],
    );
    eprintln!("95/5: {canary}");
    assert!(canary.all_ok(), "{canary}");
    let to_canary = canary.served_by("e");
    assert!(
        (60..=140).contains(&to_canary),
        "canary got {to_canary}: {canary}"
    );

    // Locality: with a healthy endpoint on the client's node, it gets it all.
    let local = load(a, &format!("http://{LOCAL}/"), &["--requests", "300"]);
    eprintln!("preferNode: {local}");
    assert!(local.all_ok(), "{local}");
    assert_eq!(local.served_by("b"), 300, "{local}");

    // No endpoint at all: 503 at once, counted.
    let none = load(a, &format!("http://{EMPTY}/"), &["--requests", "5"]);
    assert_eq!(none.status(503), 5, "{none}");
    assert_eq!(
        metric(
            client_agent,
            r#"mesh_service_no_endpoint_total{service="default/empty:80"}"#
        ),
        Some(5.0)
    );

    // Every endpoint failing: retries stay within the budget (20% of the
    // requests plus 1/s over 10 s), so they never multiply the outage.
    for backend in backends.values() {
        backend.set_status(503);
    }
    let before: u64 = backends.values().map(HttpBackend::served).sum();
    let outage = load(a, &format!("http://{OUTAGE}/"), &["--requests", "300"]);
    let reached: u64 = backends.values().map(HttpBackend::served).sum::<u64>() - before;
    let allowed = metric(
        client_agent,
        r#"mesh_service_retries_total{result="allowed",service="default/outage:80"}"#,
    )
    .unwrap_or(0.0);
    let refused = metric(
        client_agent,
        r#"mesh_service_retries_total{result="budget_exhausted",service="default/outage:80"}"#,
    )
    .unwrap_or(0.0);
    eprintln!(
        "outage: {outage}; the endpoints saw {reached} requests; retries allowed {allowed}, refused by the budget {refused}"
    );
    assert_eq!(outage.status(503), 300, "{outage}");
    assert!(allowed <= 0.2 * 300.0 + 10.0 + 1.0, "retries {allowed}");
    assert!(refused > 0.0, "the budget never refused a retry");
    assert_eq!(
        reached,
        300 + allowed as u64,
        "every attempt is a request or a granted retry"
    );
    for backend in backends.values() {
        backend.set_status(200);
    }

    // The service's IPv6 address is balanced the same way.
    let v6 = load(a, &format!("http://[{WEB_V6}]/"), &["--requests", "60"]);
    assert!(v6.all_ok(), "{v6}");
    assert!(v6.served_by("c") + v6.served_by("d") > 0, "{v6}");

    // A route's timeout: /quick/ has 300 ms; every endpoint now takes 1 s.
    for backend in backends.values() {
        backend.set_delay(Duration::from_secs(1));
    }
    let quick = load(
        a,
        &format!("http://{WEB}/quick/report"),
        &["--requests", "3", "--connections", "1"],
    );
    eprintln!("route timeout: {quick}");
    assert_eq!(quick.status(504), 3, "{quick}");
    assert!(quick.p99_us() < 900_000, "{quick}");
    // Other paths have the service's 10 s and succeed.
    let patient = load(a, &web, &["--requests", "2", "--connections", "1"]);
    assert!(patient.all_ok(), "{patient}");
    assert!(
        metric(
            client_agent,
            r#"mesh_service_request_timeouts_total{service="default/web:80"}"#
        ) >= Some(3.0)
    );
    drop(backends);
    drop(agents);
}

#[test]
fn http_endpoints_change_under_traffic_without_a_failed_request() {
    if !e2e_enabled("http_endpoints_change_under_traffic_without_a_failed_request") {
        return;
    }
    let Mesh { topo } = mesh("svc-http-chg");
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let backends = start_backends(&topo);
    for backend in backends.values() {
        // Requests take a while, so some are in flight at every change.
        backend.set_delay(Duration::from_millis(20));
    }
    let client_agent = &agents[0];
    let apply = |web: &[&str]| apply_services(client_agent, &services_yaml(&topo, web));
    apply(&["c", "d", "e"]);

    // 100 requests/s for 6 s over one HTTP/2 connection (8 in flight at most)
    // while the endpoints change: d leaves; c leaves and d comes back.
    let a = topo.pod("a");
    let url = format!("http://{WEB}/");
    let mut client = a
        .spawn(
            env!("CARGO_BIN_EXE_http-load"),
            &[
                "--url",
                &url,
                "--requests",
                "600",
                "--rate",
                "100",
                "--connections",
                "2",
                "--concurrency",
                "8",
                "--http2",
            ],
        )
        .unwrap();
    wait_until("traffic to flow", Duration::from_secs(10), || {
        Ok(backends["d"].served() > 20)
    })
    .unwrap();
    apply(&["c", "e"]);
    let d_after_removal = backends["d"].served();
    let e_then = backends["e"].served();
    wait_until("traffic on the new set", Duration::from_secs(10), || {
        Ok(backends["e"].served() > e_then + 30)
    })
    .unwrap();
    let d_while_removed = backends["d"].served() - d_after_removal;
    assert!(
        d_while_removed <= 8,
        "d served {d_while_removed} after its removal"
    );
    apply(&["d", "e"]);
    let c_after_removal = backends["c"].served();
    let out = client.wait_with_deadline(Duration::from_secs(60)).unwrap();
    let result = Load {
        json: serde_json::from_slice(&out.stdout).unwrap(),
    };
    eprintln!("endpoints changing under traffic: {result}");
    assert!(result.all_ok(), "{result}");
    // A removed endpoint gets no new requests: at most the ones that were in
    // flight when the change applied (8).
    assert!(
        backends["c"].served() <= c_after_removal + 8,
        "c served {} after its removal",
        backends["c"].served() - c_after_removal
    );
    assert!(
        backends["d"].served() > d_after_removal + 8,
        "d got no requests after coming back"
    );

    // An endpoint's service account in services.yaml is the identity its
    // tunnel peer must prove: a wrong one fails the handshake (503, nothing
    // sent in plaintext); the right one works.
    let e = topo.pod("e");
    let pinned = |sa: &str| {
        format!(
            "services:\n  - name: pinned\n    namespace: default\n    vips: [{PINNED}]\n    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]\n    retries: {{attempts: 0}}\n    endpoints:\n      - {{name: e, address: {}, node: n3, serviceAccount: {sa}}}\n",
            e.ipv4()
        )
    };
    let served_before = backends["e"].served();
    apply_services(client_agent, &pinned("not-e"));
    let url = format!("http://{PINNED}/");
    let wrong = load(a, &url, &["--requests", "3"]);
    eprintln!("endpoint with the wrong service account: {wrong}");
    assert_eq!(wrong.status(503), 3, "{wrong}");
    assert_eq!(backends["e"].served(), served_before, "a request reached e");
    apply_services(client_agent, &pinned("e"));
    let right = load(a, &url, &["--requests", "3"]);
    assert!(right.all_ok(), "{right}");
    assert_eq!(right.served_by("e"), 3, "{right}");
    drop(backends);
    drop(agents);
}
