//! Gateway API `HTTPRoute`s on a Service (GAMMA), applied by the client's
//! agent: a header match sends every matching request to v2, the rest are
//! split 90/10 by weight, a path no rule matches is answered 404 by the
//! agent, HTTP/1.1 and HTTP/2 clients alike; a route file that cannot be
//! served as written is refused with its file, line and field while the
//! routes in force keep serving.
//!
//! The mesh: client `a` on n1; `c` (v1) and `d` (v2) on n2, reached through
//! the mTLS tunnel. Services (n1's services.yaml): `reviews` over c and d,
//! `reviews-v1` over c, `reviews-v2` over d. The client is `http-load`,
//! which tallies answers by the backend's `x-served-by` header.

use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{
    NodeAgent,
    backend::HttpBackend,
    load::load,
    mesh::{TestCa, node_issuers, start_mesh},
};
use mesh_testbed::{
    Pod, Topology, e2e_enabled,
    otlp::{OtlpReceiver, OtlpTransport},
    wait_until,
};

const PORT: u16 = 8080;
const REVIEWS: &str = "10.96.0.50";
const REVIEWS_V1: &str = "10.96.0.51";
const REVIEWS_V2: &str = "10.96.0.52";
const STRICT: &str = "10.96.0.53";

fn endpoint(pod: &Pod) -> String {
    format!(
        "      - {{name: {}, address: {}, node: {}}}\n",
        pod.name(),
        pod.ipv4(),
        pod.node_name()
    )
}

/// One service of services.yaml in namespace default: `ports` as written
/// there, over `pods`.
fn service_entry(name: &str, vip: &str, ports: &str, pods: &[&Pod]) -> String {
    let endpoints: String = pods.iter().map(|pod| endpoint(pod)).collect();
    format!(
        "  - name: {name}
    namespace: default
    vips: [{vip}]
    ports: [{ports}]
    locality: none
    endpoints:
{endpoints}"
    )
}

/// [`service_entry`] on port 80 to the pods' HTTP port.
fn service(name: &str, vip: &str, pod: &Pod) -> String {
    service_entry(
        name,
        vip,
        &format!("{{port: 80, targetPort: {PORT}, protocol: http}}"),
        &[pod],
    )
}

fn services_yaml(c: &Pod, d: &Pod) -> String {
    let service = |name: &str, vip: &str, endpoints: String| {
        format!(
            "  - name: {name}
    namespace: default
    vips: [{vip}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    endpoints:
{endpoints}"
        )
    };
    format!(
        "services:\n{}{}{}{}",
        service("reviews", REVIEWS, endpoint(c) + &endpoint(d)),
        service("reviews-v1", REVIEWS_V1, endpoint(c)),
        service("reviews-v2", REVIEWS_V2, endpoint(d)),
        service("strict", STRICT, endpoint(c)),
    )
}

/// As `kubectl get httproute -o yaml` would print them (defaults spelled
/// out, server fields and a status).
const ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  creationTimestamp: "2026-12-01T10:00:00Z"
  generation: 1
  name: reviews
  namespace: default
  resourceVersion: "4711"
  uid: 6f1c2d3e-0000-4000-8000-000000000001
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 80
  rules:
  - matches:
    - headers:
      - name: x-canary
        type: Exact
        value: always
      path:
        type: PathPrefix
        value: /
    backendRefs:
    - group: ""
      kind: Service
      name: reviews-v2
      port: 80
      weight: 1
  - backendRefs:
    - name: reviews-v1
      port: 80
      weight: 90
    - name: reviews-v2
      port: 80
      weight: 10
status:
  parents: []
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: strict
  namespace: default
spec:
  parentRefs:
  - {group: "", kind: Service, name: strict}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      method: GET
    backendRefs:
    - {name: strict, port: 80}
"#;

/// Writes a file of the client node's configuration and waits until it is
/// applied.
fn apply(agent: &NodeAgent, file: &str, yaml: &str) {
    let generation = agent.status().unwrap().config_generation;
    agent.write_file(file, yaml).unwrap();
    agent.wait_generation_after(generation).unwrap();
}

#[test]
fn http_routes_match_headers_split_by_weight_and_answer_404_when_nothing_matches() {
    if !e2e_enabled("http_routes_match_headers_split_by_weight_and_answer_404_when_nothing_matches")
    {
        return;
    }
    let topo = Topology::builder("routes")
        .node("n1", &["a"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, c, d) = (topo.pod("a"), topo.pod("c"), topo.pod("d"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let _v1 = HttpBackend::start(c, PORT, "v1").unwrap();
    let _v2 = HttpBackend::start(d, PORT, "v2").unwrap();
    let client_agent = &agents[0];
    apply(client_agent, "services.yaml", &services_yaml(c, d));
    let reviews = format!("http://{REVIEWS}/reviews/1");

    // Without a route, reviews spreads over both (the test can see a route
    // take effect).
    let before = load(a, &reviews, &["--requests", "200", "--connections", "2"]);
    assert!(before.all_ok(), "{before}");
    assert!(
        before.served_by("v1") > 0 && before.served_by("v2") > 0,
        "{before}"
    );

    apply(client_agent, "routes/reviews.yaml", ROUTES);
    // /config_dump says each route is accepted by its Service.
    let (status, dump) = client_agent.get("/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let routes = dump["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{dump:#}");
    for route in routes {
        assert_eq!(route["parents"][0]["accepted"], true, "{route:#}");
        assert_eq!(
            route["unresolvedBackends"],
            serde_json::json!([]),
            "{route:#}"
        );
    }

    // The header match: every request goes to v2, HTTP/1.1 and HTTP/2.
    for protocol in [&[][..], &["--http2"][..]] {
        let mut args = vec![
            "--requests",
            "300",
            "--connections",
            "2",
            "--header",
            "x-canary:always",
        ];
        args.extend_from_slice(protocol);
        let canary = load(a, &reviews, &args);
        assert!(canary.all_ok(), "{protocol:?}: {canary}");
        assert_eq!(canary.served_by("v2"), 300, "{protocol:?}: {canary}");
    }
    // Another value of the header is not the match.
    let other = load(
        a,
        &reviews,
        &["--requests", "100", "--header", "x-canary:sometimes"],
    );
    assert!(other.all_ok(), "{other}");

    // The rest: 90/10 over 2,000 requests, within four standard deviations
    // of 200 (σ = √(2000 · 0.1 · 0.9) ≈ 13.4).
    let split = load(a, &reviews, &["--requests", "2000", "--connections", "4"]);
    assert!(split.all_ok(), "{split}");
    let v2 = split.served_by("v2");
    assert_eq!(split.served_by("v1") + v2, 2000, "{split}");
    assert!((200 - 54..=200 + 54).contains(&v2), "v2 got {v2}: {split}");

    // strict: GET /api... only; anything else is answered 404 by the agent
    // (the backend never sees it).
    let strict = format!("http://{STRICT}");
    let api = load(a, &format!("{strict}/api/x"), &["--requests", "20"]);
    assert_eq!(api.status(200), 20, "{api}");
    let elsewhere = load(a, &format!("{strict}/other"), &["--requests", "20"]);
    assert_eq!(elsewhere.status(404), 20, "{elsewhere}");
    assert_eq!(elsewhere.served_by("v1"), 0, "{elsewhere}");
    let post = load(
        a,
        &format!("{strict}/api/x"),
        &["--requests", "20", "--method", "POST"],
    );
    assert_eq!(post.status(404), 20, "{post}");

    // A route file this agent cannot serve as written (session persistence):
    // refused with file, line and field; the routes in force keep serving.
    let bad = ROUTES.replace(
        "  - backendRefs:\n    - name: reviews-v1",
        "  - sessionPersistence: {sessionName: s}\n    backendRefs:\n    - name: reviews-v1",
    );
    assert_ne!(bad, ROUTES);
    client_agent
        .write_file("routes/reviews.yaml", &bad)
        .unwrap();
    let mut error = String::new();
    wait_until(
        "the bad route file refused",
        Duration::from_secs(10),
        || {
            error = client_agent.status()?.last_reload_error.unwrap_or_default();
            Ok(!error.is_empty())
        },
    )
    .unwrap();
    assert!(error.contains("routes/reviews.yaml:"), "{error}");
    assert!(
        error.contains("spec.rules[1].sessionPersistence") && error.contains("not supported yet"),
        "{error}"
    );
    let still = load(
        a,
        &reviews,
        &["--requests", "100", "--header", "x-canary:always"],
    );
    assert_eq!(still.served_by("v2"), 100, "{still}");
}

const EDIT: &str = "10.96.0.54";
const SLOW: &str = "10.96.0.55";

/// Filters and timeouts of route rules: a redirect answered by the agent,
/// a URL rewrite with header changes the backend sees, a response header
/// the client sees, and a request timeout shorter than the backend.
const FILTER_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edit, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: edit}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: api.internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: edit}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-routed, value: "yes"}]
    backendRefs: [{name: edit, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: slow, port: 80}]
"#;

#[test]
fn route_filters_redirect_rewrite_change_headers_and_time_out() {
    if !e2e_enabled("route_filters_redirect_rewrite_change_headers_and_time_out") {
        return;
    }
    let topo = Topology::builder("routefilt")
        .node("n1", &["a"])
        .node("n2", &["c", "e"])
        .build()
        .unwrap();
    let (a, c, e) = (topo.pod("a"), topo.pod("c"), topo.pod("e"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let edit_backend = HttpBackend::start(c, PORT, "edit").unwrap();
    let slow_backend = HttpBackend::start(e, PORT, "slow").unwrap();
    slow_backend.set_delay(Duration::from_secs(3));
    let client_agent = &agents[0];
    let services = format!(
        "services:\n{}{}",
        service("edit", EDIT, c),
        service("slow", SLOW, e)
    );
    apply(client_agent, "services.yaml", &services);
    apply(client_agent, "routes/edit.yaml", FILTER_ROUTES);

    // The redirect: answered by the agent with the new Location, the
    // backend never sees it.
    let redirected = load(
        a,
        &format!("http://{EDIT}/old/page?q=1"),
        &["--requests", "10", "--tally-header", "location"],
    );
    assert_eq!(redirected.status(301), 10, "{redirected}");
    assert_eq!(
        redirected.served_by(&format!("http://{EDIT}/new/page?q=1")),
        10,
        "{redirected}"
    );

    // The rewrite and header changes, over HTTP/1.1 and HTTP/2: the backend
    // sees the new path, host and headers; the client the added header.
    for protocol in [&[][..], &["--http2"][..]] {
        let mut args = vec![
            "--requests",
            "10",
            "--header",
            "x-drop:please",
            "--tally-header",
            "x-routed",
        ];
        args.extend_from_slice(protocol);
        let rewritten = load(a, &format!("http://{EDIT}/api/items?x=1"), &args);
        assert!(rewritten.all_ok(), "{protocol:?}: {rewritten}");
        assert_eq!(rewritten.served_by("yes"), 10, "{protocol:?}: {rewritten}");
    }
    let seen = edit_backend.seen_requests();
    assert!(
        seen.iter()
            .all(|r| !r.path.starts_with("/old") && !r.path.starts_with("/new")),
        "the redirect reached the backend: {seen:#?}"
    );
    let rewritten: Vec<_> = seen.iter().filter(|r| r.path == "/v2/items?x=1").collect();
    assert_eq!(rewritten.len(), 20, "{seen:#?}");
    for request in rewritten {
        assert_eq!(
            request.host.as_deref(),
            Some("api.internal"),
            "{request:#?}"
        );
        assert_eq!(request.header("x-route"), ["edit"], "{request:#?}");
        assert!(request.header("x-drop").is_empty(), "{request:#?}");
    }

    // The route's request timeout (300 ms) is shorter than the backend's 3 s:
    // 504 from the agent.
    let timed_out = load(
        a,
        &format!("http://{EDIT}/slow/report"),
        &[
            "--requests",
            "3",
            "--connections",
            "3",
            "--timeout-ms",
            "20000",
        ],
    );
    assert_eq!(timed_out.status(504), 3, "{timed_out}");
    // Sent to the slow Service itself (no route there), its own 15 s
    // request timeout applies: answered, slowly.
    let direct = load(
        a,
        &format!("http://{SLOW}/slow/report"),
        &["--requests", "1"],
    );
    assert_eq!(direct.status(200), 1, "{direct}");
}

const WEB: &str = "10.96.0.60";
const MIRROR: &str = "10.96.0.61";

const MIRROR_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: mirror, port: 80}
        fraction: {numerator: 1, denominator: 2}
    backendRefs: [{name: web, port: 80}]
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: mirror, port: 80}
    backendRefs: [{name: web, port: 80}]
"#;

/// `mesh_route_mirrored_requests_total` of the mirror service for `result`.
fn mirrored(agent: &NodeAgent, result: &str) -> u64 {
    agent.metric_sum(
        "mesh_route_mirrored_requests_total",
        &[("service", "default/mirror:80"), ("result", result)],
    )
}

#[test]
fn a_mirror_gets_a_copy_of_each_request_and_never_the_clients_answer() {
    if !e2e_enabled("a_mirror_gets_a_copy_of_each_request_and_never_the_clients_answer") {
        return;
    }
    let topo = Topology::builder("mirror")
        .node("n1", &["a"])
        .node("n2", &["c", "e"])
        .build()
        .unwrap();
    let (a, c, e) = (topo.pod("a"), topo.pod("c"), topo.pod("e"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let _primary = HttpBackend::start(c, PORT, "web").unwrap();
    let mirror = HttpBackend::start(e, PORT, "mirror").unwrap();
    let client_agent = &agents[0];
    let services = format!(
        "services:\n{}{}",
        service("web", WEB, c),
        service("mirror", MIRROR, e)
    );
    apply(client_agent, "services.yaml", &services);
    apply(client_agent, "routes/web.yaml", MIRROR_ROUTES);
    let url = format!("http://{WEB}/items");

    // Every request copied: bodiless, with a body, and with a body too
    // long to copy; the client sees only the primary's answers.
    let gets = load(a, &url, &["--requests", "50", "--connections", "2"]);
    let posts = load(
        a,
        &url,
        &[
            "--requests",
            "20",
            "--method",
            "POST",
            "--body-bytes",
            "1000",
        ],
    );
    let large = load(
        a,
        &url,
        &[
            "--requests",
            "5",
            "--method",
            "POST",
            "--body-bytes",
            "100000",
        ],
    );
    for (what, run, n) in [
        ("GET", &gets, 50),
        ("POST", &posts, 20),
        ("large", &large, 5),
    ] {
        assert!(run.all_ok(), "{what}: {run}");
        assert_eq!(run.served_by("web"), n, "{what}: {run}");
    }
    wait_until("70 copies sent, 5 too large", Duration::from_secs(20), || {
        Ok(mirrored(client_agent, "sent") == 70 && mirrored(client_agent, "body_too_large") == 5)
    })
    .unwrap();
    let copies = mirror.seen_requests();
    assert_eq!(copies.len(), 70, "{copies:#?}");
    for copy in &copies {
        assert_eq!(
            copy.host.as_deref(),
            Some(format!("{WEB}-shadow").as_str()),
            "{copy:#?}"
        );
        let want = if copy.method == "POST" { 1000 } else { 0 };
        assert_eq!(copy.body_len, want, "{copy:#?}");
    }

    // Half of /half: 400 requests, 200 copies expected, within four
    // standard deviations (σ = 10).
    let half = load(
        a,
        &format!("http://{WEB}/half/x"),
        &["--requests", "400", "--connections", "2"],
    );
    assert_eq!(half.served_by("web"), 400, "{half}");
    let mut halves = 0;
    wait_until("the sampled copies sent", Duration::from_secs(20), || {
        let before = halves;
        halves = mirror
            .seen_requests()
            .iter()
            .filter(|r| r.path == "/half/x")
            .count();
        // Settled: no new copy since the last look, and every copy counted.
        Ok(halves == before && mirrored(client_agent, "sent") == 70 + halves as u64)
    })
    .unwrap();
    assert!((160..=240).contains(&halves), "{halves} of 400 copied");

    // A slow mirror (10 s): the client's requests do not wait for it (a
    // 5 s client timeout would fail every one that did).
    mirror.set_delay(Duration::from_secs(10));
    let slow = load(a, &url, &["--requests", "20", "--timeout-ms", "5000"]);
    assert!(slow.all_ok(), "{slow}");
    assert_eq!(slow.served_by("web"), 20, "{slow}");

    // A mirror that is down: the same, and the failures are counted.
    mirror.set_delay(Duration::ZERO);
    mirror.refuse();
    let down = load(a, &url, &["--requests", "20"]);
    assert!(down.all_ok(), "{down}");
    assert_eq!(down.served_by("web"), 20, "{down}");
    wait_until("the failed copies counted", Duration::from_secs(20), || {
        Ok(mirrored(client_agent, "failed") >= 20)
    })
    .unwrap();
}

const RATINGS: &str = "10.96.0.80";

/// Istio's fault injection, as a VirtualService on the Service ratings.
const FAULTS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: ratings}}]
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 100ms, percentage: {value: 100}}}
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
"#;

#[test]
fn a_virtual_service_injects_aborts_and_delays() {
    if !e2e_enabled("a_virtual_service_injects_aborts_and_delays") {
        return;
    }
    let topo = Topology::builder("faults")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let backend = HttpBackend::start(c, PORT, "ratings").unwrap();
    let client_agent = &agents[0];
    let services = format!(
        "services:
  - name: ratings
    namespace: default
    vips: [{RATINGS}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    endpoints:
{}",
        endpoint(c)
    );
    apply(client_agent, "services.yaml", &services);
    apply(client_agent, "routes/ratings.yaml", FAULTS);
    let url = format!("http://{RATINGS}/ratings/1");

    // 50% aborted with 503 by the agent: 400 requests, 200 expected,
    // within four standard deviations (σ = 10); the backend sees the rest.
    let aborts = load(
        a,
        &url,
        &[
            "--requests",
            "400",
            "--connections",
            "4",
            "--header",
            "x-fault:abort",
        ],
    );
    let (aborted, served) = (aborts.status(503), aborts.status(200));
    assert_eq!(aborted + served, 400, "{aborts}");
    assert!(
        (160..=240).contains(&aborted),
        "{aborted} of 400 aborted: {aborts}"
    );
    assert_eq!(
        backend.served(),
        served,
        "the backend saw an aborted request"
    );
    wait_until(
        "the aborts counted with flag FI",
        Duration::from_secs(10),
        || {
            Ok(
                client_agent.metric_sum("istio_requests_total", &[("response_flags", "FI")])
                    == aborted,
            )
        },
    )
    .unwrap();

    // A 100 ms delay on every request: its p50 is at least 100 ms, and
    // about 100 ms above the same requests' without it.
    let args = ["--requests", "50", "--connections", "1"];
    let plain = load(a, &url, &args);
    let mut delayed_args = args.to_vec();
    delayed_args.extend(["--header", "x-fault:delay"]);
    let delayed = load(a, &url, &delayed_args);
    assert!(plain.all_ok() && delayed.all_ok(), "{plain} / {delayed}");
    let (p50_plain, p50_delayed) = (
        plain.json["latency_us"]["p50"].as_u64().unwrap(),
        delayed.json["latency_us"]["p50"].as_u64().unwrap(),
    );
    eprintln!("p50 without the delay {p50_plain} µs, with it {p50_delayed} µs");
    assert!(p50_delayed >= 100_000, "{delayed}");
    assert!(p50_delayed >= p50_plain + 90_000, "{plain} / {delayed}");
    // Each delayed answer is counted with flag DI.
    wait_until(
        "the delayed requests counted with flag DI",
        Duration::from_secs(10),
        || Ok(client_agent.metric_sum("istio_requests_total", &[("response_flags", "DI")]) == 50),
    )
    .unwrap();
}

const HTTPBIN: &str = "10.96.0.90";

/// Istio's circuit breaker: one connection, one request waiting for it.
const CIRCUIT_BREAKER: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"#;

#[test]
fn a_destination_rules_connection_pool_overflows_with_503_uo_at_once() {
    if !e2e_enabled("a_destination_rules_connection_pool_overflows_with_503_uo_at_once") {
        return;
    }
    let topo = Topology::builder("breaker")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let backend = HttpBackend::start(c, PORT, "httpbin").unwrap();
    backend.set_delay(Duration::from_secs(3));
    let client_agent = &agents[0];
    let services = format!(
        "services:
  - name: httpbin
    namespace: default
    vips: [{HTTPBIN}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    endpoints:
{}",
        endpoint(c)
    );
    apply(client_agent, "services.yaml", &services);
    apply(client_agent, "routes/httpbin.yaml", CIRCUIT_BREAKER);

    // Ten at once to a backend that takes 3 s: two in the pool (one on the
    // connection, one waiting), eight answered 503 UO at once.
    let burst = load(
        a,
        &format!("http://{HTTPBIN}/delay"),
        &[
            "--requests",
            "10",
            "--connections",
            "10",
            "--timeout-ms",
            "20000",
        ],
    );
    assert_eq!(burst.status(200), 2, "{burst}");
    assert_eq!(burst.status(503), 8, "{burst}");
    // At once: the overflows did not wait for the backend's 3 s.
    let overflow_p99 = burst.endpoint_p99_us("-");
    assert!(
        overflow_p99 < 2_000_000,
        "503s took {overflow_p99} µs: {burst}"
    );
    assert!(
        backend.max_in_flight() <= 2,
        "the backend had {} at once",
        backend.max_in_flight()
    );
    assert_eq!(backend.served(), 2);
    let overflows = [("service", "default/httpbin:80")];
    wait_until("the overflows counted", Duration::from_secs(10), || {
        Ok(
            client_agent.metric_sum("mesh_service_overflows_total", &overflows) == 8
                && client_agent.metric_sum("istio_requests_total", &[("response_flags", "UO")])
                    == 8,
        )
    })
    .unwrap();
}

const COLLECTOR: &str = "10.96.0.100";
const COLLECTOR_BLUE: &str = "10.96.0.101";

/// A GRPCRoute on the Service collector: the blue tenant's Export calls go
/// to collector-blue.
const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: collector, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: collector, port: 4317}]
  rules:
  - matches:
    - method: {service: opentelemetry.proto.collector.trace.v1.TraceService, method: Export}
      headers: [{name: x-tenant, value: blue}]
    backendRefs: [{name: collector-blue, port: 4317}]
  - backendRefs: [{name: collector, port: 4317}]
"#;

#[test]
fn a_grpc_route_sends_a_real_grpc_clients_calls_by_method_and_header() {
    if !e2e_enabled("a_grpc_route_sends_a_real_grpc_clients_calls_by_method_and_header") {
        return;
    }
    let topo = Topology::builder("grpcroute")
        .node("n1", &["a"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, c, d) = (topo.pod("a"), topo.pod("c"), topo.pod("d"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let listen: std::net::SocketAddr = "0.0.0.0:4317".parse().unwrap();
    let default = OtlpReceiver::start(Some(&c.netns_path()), listen, OtlpTransport::Grpc).unwrap();
    let blue = OtlpReceiver::start(Some(&d.netns_path()), listen, OtlpTransport::Grpc).unwrap();
    let client_agent = &agents[0];
    let service = |name: &str, vip: &str, pod: &Pod| {
        service_entry(name, vip, "{port: 4317, protocol: grpc}", &[pod])
    };
    let services = format!(
        "services:\n{}{}",
        service("collector", COLLECTOR, c),
        service("collector-blue", COLLECTOR_BLUE, d)
    );
    apply(client_agent, "services.yaml", &services);
    apply(client_agent, "routes/collector.yaml", GRPC_ROUTE);
    let url = format!("http://{COLLECTOR}:4317");
    let export = |extra: &[&str]| {
        let mut args = vec!["grpc-export", url.as_str(), "--count", "20"];
        args.extend_from_slice(extra);
        let out = a.run_tool(&args, Duration::from_secs(60)).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 20");
    };
    export(&["--header", "x-tenant:blue"]);
    assert_eq!((default.span_count(), blue.span_count()), (0, 20));
    export(&["--header", "x-tenant:green"]);
    export(&[]);
    assert_eq!((default.span_count(), blue.span_count()), (40, 20));
}

const HASHED: &str = "10.96.0.110";

#[test]
fn a_consistent_hash_keeps_each_key_on_one_endpoint_and_moves_a_third_when_one_leaves() {
    if !e2e_enabled(
        "a_consistent_hash_keeps_each_key_on_one_endpoint_and_moves_a_third_when_one_leaves",
    ) {
        return;
    }
    let topo = Topology::builder("hashing")
        .node("n1", &["a"])
        .node("n2", &["c", "d", "e"])
        .build()
        .unwrap();
    let a = topo.pod("a");
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let backends: Vec<(&str, HttpBackend)> = ["c", "d", "e"]
        .into_iter()
        .map(|name| {
            (
                name,
                HttpBackend::start(topo.pod(name), PORT, name).unwrap(),
            )
        })
        .collect();
    let client_agent = &agents[0];
    let services = |names: &[&str]| {
        let endpoints: String = names.iter().map(|n| endpoint(topo.pod(n))).collect();
        format!(
            "services:
  - name: users
    namespace: default
    vips: [{HASHED}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    endpoints:
{endpoints}"
        )
    };
    apply(client_agent, "services.yaml", &services(&["c", "d", "e"]));
    apply(
        client_agent,
        "routes/users.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: users, namespace: default}
spec:
  host: users
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
",
    );
    // Which backend got each key (of `header`), from the requests each saw
    // since `from`.
    let owners_by = |header: &str, from: &[usize]| {
        let mut owners: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for ((name, backend), skip) in backends.iter().zip(from) {
            for seen in backend.seen_requests().iter().skip(*skip) {
                let key = seen.header(header)[0].to_string();
                let names = owners.entry(key).or_default();
                if !names.contains(name) {
                    names.push(name);
                }
            }
        }
        owners
    };
    let owners = |from: &[usize]| owners_by("x-user", from);
    let counts = || -> Vec<usize> {
        backends
            .iter()
            .map(|(_, b)| b.seen_requests().len())
            .collect()
    };
    let args = [
        "--requests",
        "1000",
        "--connections",
        "4",
        "--header-cycle",
        "x-user:user-:100",
    ];
    let url = format!("http://{HASHED}/");
    let first = load(a, &url, &args);
    assert!(first.all_ok(), "{first}");
    let before = owners(&[0, 0, 0]);
    assert_eq!(before.len(), 100);
    for (key, names) in &before {
        assert_eq!(names.len(), 1, "{key} went to {names:?}");
    }
    // e leaves: only e's keys move.
    let seen = counts();
    apply(client_agent, "services.yaml", &services(&["c", "d"]));
    let second = load(a, &url, &args);
    assert!(second.all_ok(), "{second}");
    let after = owners(&seen);
    let mut moved = 0;
    for (key, names) in &after {
        assert_eq!(names.len(), 1, "{key} went to {names:?}");
        let was = before[key][0];
        if was == "e" {
            moved += 1;
        } else {
            assert_eq!(names[0], was, "{key} moved from {was} though {was} stayed");
        }
    }
    // About a third of the keys were on e (σ ≈ 4.7 of 100).
    assert!((14..=52).contains(&moved), "{moved} of 100 keys moved");
    eprintln!("{moved} of 100 keys moved when e left");

    // By cookie (Istio's httpCookie with a ttl): a client without one is
    // given one (Max-Age the ttl) and, sending it back, stays on one
    // endpoint; each cookie's requests go to one endpoint.
    apply(
        client_agent,
        "routes/users.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: users, namespace: default}
spec:
  host: users
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 60s}
",
    );
    let given = load(
        a,
        &url,
        &["--requests", "1", "--tally-header", "set-cookie"],
    );
    assert!(given.all_ok(), "{given}");
    let set_cookie = given.json["tally"]
        .as_object()
        .and_then(|tally| tally.keys().next().cloned())
        .unwrap_or_default();
    assert!(
        set_cookie.starts_with("session=")
            && set_cookie.contains("Max-Age=60")
            && set_cookie.contains("Path=/"),
        "{given}"
    );
    let cookie = format!("cookie:{}", set_cookie.split(';').next().unwrap());
    let back = load(
        a,
        &url,
        &[
            "--requests",
            "50",
            "--connections",
            "2",
            "--header",
            &cookie,
            "--tally-header",
            "set-cookie",
        ],
    );
    assert!(back.all_ok(), "{back}");
    assert_eq!(
        back.served_by("-"),
        50,
        "no new cookie for a client with one: {back}"
    );
    let sticky = load(
        a,
        &url,
        &[
            "--requests",
            "50",
            "--connections",
            "2",
            "--header",
            &cookie,
        ],
    );
    assert!(sticky.all_ok(), "{sticky}");
    assert!(
        ["c", "d"].iter().any(|n| sticky.served_by(n) == 50),
        "{sticky}"
    );
    let seen = counts();
    let many = load(
        a,
        &url,
        &[
            "--requests",
            "600",
            "--connections",
            "4",
            "--header-cycle",
            "cookie:session=k-:60",
        ],
    );
    assert!(many.all_ok(), "{many}");
    let by_cookie = owners_by("cookie", &seen);
    assert_eq!(by_cookie.len(), 60);
    for (key, names) in &by_cookie {
        assert_eq!(names.len(), 1, "{key} went to {names:?}");
    }
}

const FLAKY: &str = "10.96.0.120";

#[test]
fn a_routes_retry_sends_a_post_with_its_body_again_on_a_listed_code() {
    if !e2e_enabled("a_routes_retry_sends_a_post_with_its_body_again_on_a_listed_code") {
        return;
    }
    let topo = Topology::builder("retries")
        .node("n1", &["a"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, c, d) = (topo.pod("a"), topo.pod("c"), topo.pod("d"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let failing = HttpBackend::start(c, PORT, "c").unwrap();
    let working = HttpBackend::start(d, PORT, "d").unwrap();
    failing.set_status(503);
    let client_agent = &agents[0];
    let services = format!(
        "services:
  - name: flaky
    namespace: default
    vips: [{FLAKY}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    outlierDetection: {{maxEjectionPercent: 0}}
    # The retry budget is not what this test is about.
    retries: {{budgetPercent: 100, minPerSecond: 1000}}
    endpoints:
{}{}",
        endpoint(c),
        endpoint(d)
    );
    apply(client_agent, "services.yaml", &services);
    let url = format!("http://{FLAKY}/orders");
    let posts = [
        "--requests",
        "100",
        "--connections",
        "2",
        "--method",
        "POST",
        "--body-bytes",
        "1000",
    ];
    // Without a route, a POST is not idempotent: c's 503s reach the client.
    let plain = load(a, &url, &posts);
    assert!(plain.status(503) > 0, "{plain}");
    apply(
        client_agent,
        "routes/flaky.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: flaky}]
  rules:
  - retry: {codes: [503], attempts: 2, backoff: 10ms}
    backendRefs: [{name: flaky, port: 80}]
",
    );
    let (c_before, d_before) = (failing.seen_requests().len(), working.seen_requests().len());
    let retried = load(a, &url, &posts);
    assert_eq!(retried.status(200), 100, "{retried}");
    // c was tried (and failed) for some; every POST d saw, retried or not,
    // had its whole body.
    let c_seen = &failing.seen_requests()[c_before..];
    let d_seen = &working.seen_requests()[d_before..];
    eprintln!("c was tried {} times, d {}", c_seen.len(), d_seen.len());
    assert!(!c_seen.is_empty(), "the failing endpoint was never tried");
    assert_eq!(d_seen.len(), 100);
    assert!(
        c_seen.iter().chain(d_seen).all(|r| r.body_len == 1000),
        "a body was not sent whole"
    );
}

const BOOKINFO_REVIEWS: &str = "10.96.0.130";

/// Istio's Bookinfo shape: DestinationRule subsets by the `version` label
/// (v2 balanced round robin), a VirtualService sending `end-user: jason`
/// to v2 and the rest to v1.
const SUBSETS: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#;

#[test]
fn a_virtual_service_routes_to_destination_rule_subsets_by_label() {
    if !e2e_enabled("a_virtual_service_routes_to_destination_rule_subsets_by_label") {
        return;
    }
    let topo = Topology::builder("subsets")
        .node("n1", &["a"])
        .node("n2", &["c", "d", "e"])
        .build()
        .unwrap();
    let a = topo.pod("a");
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    let _backends: Vec<HttpBackend> = ["c", "d", "e"]
        .iter()
        .map(|name| HttpBackend::start(topo.pod(name), PORT, name).unwrap())
        .collect();
    let labelled = |name: &str, version: &str| {
        let pod = topo.pod(name);
        format!(
            "      - {{name: {name}, address: {}, node: {}, labels: {{version: {version}}}}}\n",
            pod.ipv4(),
            pod.node_name()
        )
    };
    let client_agent = &agents[0];
    apply(
        client_agent,
        "services.yaml",
        &format!(
            "services:
  - name: reviews
    namespace: default
    vips: [{BOOKINFO_REVIEWS}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    locality: none
    endpoints:
{}{}{}",
            labelled("c", "v1"),
            labelled("d", "v2"),
            labelled("e", "v2")
        ),
    );
    let url = format!("http://{BOOKINFO_REVIEWS}/reviews/1");
    // Without the resources, reviews spreads over all three.
    let before = load(a, &url, &["--requests", "300", "--connections", "2"]);
    assert!(before.all_ok(), "{before}");
    assert!(
        ["c", "d", "e"].iter().all(|e| before.served_by(e) > 0),
        "{before}"
    );

    apply(client_agent, "routes/reviews.yaml", SUBSETS);
    let (_, dump) = client_agent.get("/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let route = &dump["routes"][0];
    assert_eq!(route["parents"][0]["accepted"], true, "{dump:#}");
    assert_eq!(
        route["unresolvedBackends"],
        serde_json::json!([]),
        "{dump:#}"
    );

    // jason: subset v2 only (d and e), round robin: exactly half each.
    let jason = load(
        a,
        &url,
        &[
            "--requests",
            "200",
            "--connections",
            "2",
            "--header",
            "end-user:jason",
        ],
    );
    eprintln!("jason: {jason}");
    assert!(jason.all_ok(), "{jason}");
    assert_eq!(jason.served_by("c"), 0, "{jason}");
    assert_eq!(
        (jason.served_by("d"), jason.served_by("e")),
        (100, 100),
        "{jason}"
    );
    // Everyone else: subset v1, which is c alone.
    let others = load(a, &url, &["--requests", "200", "--connections", "2"]);
    assert!(others.all_ok(), "{others}");
    assert_eq!(others.served_by("c"), 200, "{others}");
}
