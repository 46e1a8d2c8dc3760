//! Local rate limits on the destination's side (`HTTPLocalRateLimitPolicy`,
//! docs/traffic.md): c's agent admits requests to c at the rate the policy
//! sets and answers the rest 429 with `Retry-After` and the rate-limit
//! headers; per client identity, with an override for one client; per
//! route (the requests of one HTTPRoute only).
//!
//! The mesh: clients `a` and `b` on n1, `c` on n2 behind the Service web
//! (both agents know it; n1's balances, n2's limits). The clients are
//! `http-load` at a fixed rate, open loop.

use std::time::Duration;

use mesh_e2e::{
    NodeAgent,
    backend::HttpBackend,
    load::{Load, load},
    mesh::{TestCa, node_issuers, start_mesh},
};
use mesh_testbed::{Topology, e2e_enabled, wait_until};

const PORT: u16 = 8080;
const WEB: &str = "10.96.0.70";

fn apply(agent: &NodeAgent, file: &str, yaml: &str) {
    let generation = agent.status().unwrap().config_generation;
    agent.write_file(file, yaml).unwrap();
    agent.wait_generation_after(generation).unwrap();
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: web-limit, namespace: default}}
spec:
  targetRef: {{group: \"\", kind: Service, name: web}}
{spec}"
    )
}

/// Requests admitted (200) per second beyond the first second's burst
/// (a bucket starts full: one second of its rate).
fn admitted_per_second(run: &Load, burst: u64) -> f64 {
    let admitted = run.status(200);
    let seconds = run.json["elapsed_ms"].as_f64().unwrap() / 1000.0;
    admitted.saturating_sub(burst) as f64 / seconds
}

/// `mesh_authorization_decisions_total` of the rate limit on `agent`.
fn limited(agent: &NodeAgent) -> u64 {
    agent.metric_sum(
        "mesh_authorization_decisions_total",
        &[("decision", "rate_limited")],
    )
}

#[test]
fn a_rate_limit_admits_its_rate_and_answers_the_rest_429() {
    if !e2e_enabled("a_rate_limit_admits_its_rate_and_answers_the_rest_429") {
        return;
    }
    let topo = Topology::builder("ratelimit")
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let backend = HttpBackend::start(c, PORT, "c").unwrap();
    let services = format!(
        "services:
  - name: web
    namespace: default
    vips: [{WEB}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    selector: {{app: c}}
    locality: none
    endpoints:
      - {{name: c, address: {}, node: {}}}
",
        c.ipv4(),
        c.node_name()
    );
    for agent in &agents {
        apply(agent, "services.yaml", &services);
    }
    let server_agent = &agents[1];
    let url = format!("http://{WEB}/");

    // 10/s for all clients together, 100/s offered for 5 s.
    apply(
        server_agent,
        "policies/limit.yaml",
        &policy("  total: {requestsPerSecond: 10}\n"),
    );
    let run = load(
        a,
        &url,
        &[
            "--rate",
            "100",
            "--duration-ms",
            "5000",
            "--connections",
            "4",
            "--tally-header",
            "ratelimit-limit",
        ],
    );
    let refused = run.status(429);
    assert_eq!(run.status(200) + refused, run.requests(), "{run}");
    let rate = admitted_per_second(&run, 10);
    eprintln!("total 10/s: {rate:.2}/s admitted beyond the burst: {run}");
    assert!((9.0..=11.0).contains(&rate), "{rate:.1}/s admitted: {run}");
    // Every 429 says its limit (and Retry-After, checked below).
    assert_eq!(run.served_by("10"), refused, "{run}");
    wait_until("the refusals counted", Duration::from_secs(10), || {
        Ok(limited(server_agent) == refused)
    })
    .unwrap();
    assert_eq!(
        backend.served(),
        run.status(200),
        "the backend saw only the admitted"
    );
    let retry = load(
        a,
        &url,
        &["--requests", "20", "--tally-header", "retry-after"],
    );
    assert!(retry.status(429) > 0, "{retry}");
    assert_eq!(retry.served_by("1"), retry.status(429), "{retry}");

    // 5/s per client identity, 20/s for b: each its own bucket, at once.
    apply(
        server_agent,
        "policies/limit.yaml",
        &policy(
            "  identity: {requestsPerSecond: 5}
  overrides:
  - requestsPerSecond: 20
    clientRefs: [{kind: ServiceAccount, namespace: default, name: b}]
",
        ),
    );
    let offered = [
        "--rate",
        "50",
        "--duration-ms",
        "4000",
        "--connections",
        "2",
    ];
    let (from_a, from_b) = std::thread::scope(|s| {
        let from_b = s.spawn(|| load(b, &url, &offered));
        let from_a = load(a, &url, &offered);
        (from_a, from_b.join().unwrap())
    });
    let (rate_a, rate_b) = (
        admitted_per_second(&from_a, 5),
        admitted_per_second(&from_b, 20),
    );
    eprintln!("identity 5/s: a {rate_a:.2}/s; override 20/s: b {rate_b:.2}/s");
    assert!((4.0..=6.0).contains(&rate_a), "a: {rate_a:.1}/s: {from_a}");
    assert!(
        (18.0..=22.0).contains(&rate_b),
        "b: {rate_b:.1}/s: {from_b}"
    );

    // Per route: 10/s for the requests of the HTTPRoute `api` (/api...),
    // known to c's agent; the other paths are not limited. 50/s offered to
    // each at once for 4 s.
    apply(
        server_agent,
        "routes/api.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80}]
",
    );
    apply(
        server_agent,
        "policies/limit.yaml",
        "apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: api-limit, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: api}
  total: {requestsPerSecond: 10}
",
    );
    let (api, other) = std::thread::scope(|s| {
        let other = s.spawn(|| load(b, &format!("http://{WEB}/other"), &offered));
        let api = load(a, &format!("http://{WEB}/api/items"), &offered);
        (api, other.join().unwrap())
    });
    let rate_api = admitted_per_second(&api, 10);
    eprintln!("route 10/s: /api {rate_api:.2}/s; /other: {other}");
    assert!(
        (9.0..=11.0).contains(&rate_api),
        "/api: {rate_api:.1}/s: {api}"
    );
    assert_eq!(api.status(200) + api.status(429), api.requests(), "{api}");
    assert!(other.all_ok(), "/other is not the route's: {other}");
}
