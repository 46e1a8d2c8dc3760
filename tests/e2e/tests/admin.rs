//! The admin API's `/config_dump`: the configuration in force, with each
//! policy's source file, updated on reload, and never a private key.

use mesh_e2e::{
    NodeAgent,
    mesh::{TestCa, node_issuers, start_mesh},
    pods_yaml,
};
use mesh_testbed::{
    Pod, Topology, e2e_enabled,
    traffic::{ConnectOutcome, connect_result},
};
use serde_json::Value;

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: default}
spec:
  selector: {matchLabels: {app: a}}
  rules:
  - to: [{operation: {methods: [\"GET\"], paths: [\"/api/*\"]}}]
";

fn dump(agent: &NodeAgent) -> Value {
    let (status, body) = agent.get("/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("PRIVATE KEY"),
        "the config dump shows a private key"
    );
    serde_json::from_str(&body).unwrap()
}

#[test]
fn config_dump_shows_the_configuration_in_force_and_follows_reloads() {
    if !e2e_enabled("config_dump_shows_the_configuration_in_force_and_follows_reloads") {
        return;
    }
    let topo = Topology::builder("cfgdump")
        .node("n1", &["a"])
        .build()
        .unwrap();
    let a = topo.pod("a");
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "",
        &[("policies/a.yaml", POLICY.to_string())],
    )
    .unwrap();

    let first = dump(&agent);
    assert_eq!(first["node"]["name"], "n1");
    assert_eq!(first["pods"][0]["name"], "a");
    let policies = first["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1, "{first}");
    assert_eq!(policies[0]["name"], "allow-get");
    assert_eq!(policies[0]["action"], "ALLOW");
    assert_eq!(policies[0]["httpRules"], true);
    assert_eq!(policies[0]["selector"]["app"], "a");
    assert!(
        policies[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("policies/a.yaml"),
        "{first}"
    );

    // A second policy file: the dump follows the reload.
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file(
            "policies/b.yaml",
            &POLICY.replace("allow-get", "allow-get-too"),
        )
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    let second = dump(&agent);
    assert_eq!(second["configGeneration"], generation + 1);
    let names: Vec<&str> = second["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["allow-get", "allow-get-too"], "{second}");

    // A policy that cannot be enforced as written loads alone, as a DENY-all
    // over what it selects, and says why in the dump and the status.
    agent
        .write_file("policies/c.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: default}\nspec: {bogus: 1}\n")
        .unwrap();
    agent
        .wait_generation_after(second["configGeneration"].as_u64().unwrap())
        .unwrap();
    let third = dump(&agent);
    let policies = third["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 3, "{third}");
    let broken = policies.iter().find(|p| p["name"] == "x").unwrap();
    assert_eq!(broken["action"], "DENY", "{broken}");
    let why = broken["unenforceable"].as_str().unwrap();
    assert!(why.contains("c.yaml:4") && why.contains("bogus"), "{why}");
    let status = agent.status().unwrap();
    assert_eq!(status.unenforceable_policies.len(), 1, "{status:?}");
    assert!(status.last_reload_error.is_none(), "{status:?}");
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "mesh_policies_unenforceable 1"),
        "the gauge: {}",
        metrics
            .lines()
            .filter(|l| l.contains("unenforceable"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Invalid YAML is rejected whole: the dump still shows what is in force.
    agent.write_file("policies/c.yaml", "spec: [\n").unwrap();
    mesh_testbed::wait_until(
        "the bad edit to be rejected",
        std::time::Duration::from_secs(5),
        || Ok(agent.status()?.last_reload_error.is_some()),
    )
    .unwrap();
    let fourth = dump(&agent);
    assert_eq!(fourth["configGeneration"], third["configGeneration"]);
    assert_eq!(fourth["policies"].as_array().unwrap().len(), 3);
}

/// Three connections from `client` to `server`'s echo port (7400), each
/// sending `ECHO\n` and 1,000 bytes and reading the 1,000 echoed back: 3,015
/// bytes sent, 3,000 received.
fn echo_three_times(client: &Pod, server: &Pod) {
    client
        .run_tool(
            &[
                "echo",
                &server.ipv4().to_string(),
                "7400",
                "--bytes",
                "1000",
                "--shutdown",
                "--times",
                "3",
            ],
            std::time::Duration::from_secs(30),
        )
        .unwrap();
}

#[test]
fn both_nodes_count_a_cross_node_connection_as_mutual_tls_with_its_bytes() {
    if !e2e_enabled("both_nodes_count_a_cross_node_connection_as_mutual_tls_with_its_bytes") {
        return;
    }
    let topo = Topology::builder("istiotcpx")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = mesh_testbed::traffic::TrafficServer::start(c, 7400).unwrap();
    let ca = TestCa::new(&topo, "root").unwrap();
    let agents = start_mesh(&topo, &node_issuers(&topo, &ca).unwrap(), "1h").unwrap();
    echo_three_times(a, c);
    for (agent, reporter) in [(&agents[0], "source"), (&agents[1], "destination")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "a"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
            ("destination_workload", "c"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/c",
            ),
            ("connection_security_policy", "mutual_tls"),
        ];
        mesh_testbed::wait_until(
            "three closed connections in the metrics",
            std::time::Duration::from_secs(5),
            || Ok(agent.metric_sum("istio_tcp_connections_closed_total", &labels) == 3),
        )
        .unwrap_or_else(|e| panic!("{reporter}: {e:#}: {}", agent.get("/metrics").unwrap().1));
        let sum = |metric| agent.metric_sum(metric, &labels);
        assert_eq!(sum("istio_tcp_connections_opened_total"), 3, "{reporter}");
        assert_eq!(sum("istio_tcp_sent_bytes_total"), 3015, "{reporter}");
        assert_eq!(sum("istio_tcp_received_bytes_total"), 3000, "{reporter}");
        agent
            .scrape_valid_metrics()
            .unwrap_or_else(|e| panic!("{reporter}: {e:#}"));
    }
}

#[test]
fn istio_tcp_metrics_count_connections_and_bytes_exactly() {
    if !e2e_enabled("istio_tcp_metrics_count_connections_and_bytes_exactly") {
        return;
    }
    let topo = Topology::builder("istiotcp")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let _server = mesh_testbed::traffic::TrafficServer::start(b, 7400).unwrap();
    let agent = NodeAgent::start(&topo, topo.node("n1"), &pods_yaml(&[a, b]), "").unwrap();
    echo_three_times(a, b);
    let labels = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "default"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/b",
        ),
        ("connection_security_policy", "none"),
    ];
    // The records are written when each relay ends, just after the client
    // has read its EOF: wait for the third.
    mesh_testbed::wait_until(
        "three closed connections in the metrics",
        std::time::Duration::from_secs(5),
        || Ok(agent.metric_sum("istio_tcp_connections_closed_total", &labels) == 3),
    )
    .unwrap();
    assert_eq!(
        agent.metric_sum("istio_tcp_connections_opened_total", &labels),
        3
    );
    assert_eq!(
        agent.metric_sum("istio_tcp_sent_bytes_total", &labels),
        3015
    );
    assert_eq!(
        agent.metric_sum("istio_tcp_received_bytes_total", &labels),
        3000
    );
    // Nothing else was counted under other labels.
    assert_eq!(
        agent.metric_sum("istio_tcp_connections_opened_total", &[]),
        3
    );

    // One access-log line per connection, with workloads, bytes and outcome.
    let access: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains(" access:") && l.contains("destination_workload=b"))
        .map(str::to_owned)
        .collect();
    assert_eq!(access.len(), 3, "{access:#?}");
    for line in &access {
        for field in [
            "source_workload=a",
            "bytes_sent=1005",
            "bytes_received=1000",
            "outcome=closed",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
    }

    // A denied connection's line names the policy and rule that decided it.
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file(
            "policies/deny.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-b, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  rules:\n  - to: [{operation: {ports: [\"7400\"]}}]\n",
        )
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    // The client is reset (what it sees is the policy tests' concern): it
    // sends `ECHO\nx`, tries to read, and exits 0 whatever happens.
    a.run_tool(
        &[
            "echo",
            &b.ipv4().to_string(),
            "7400",
            "--bytes",
            "1",
            "--tally",
        ],
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    mesh_testbed::wait_until(
        "the access line of the denied connection",
        std::time::Duration::from_secs(5),
        || {
            Ok(agent.log().lines().any(|l| {
                l.contains(" access:") && l.contains("outcome=denied by default/deny-b rule[0]")
            }))
        },
    )
    .unwrap();
}

#[test]
fn sigterm_turns_readiness_off_refuses_new_connections_and_lets_open_ones_finish() {
    if !e2e_enabled("sigterm_turns_readiness_off_refuses_new_connections_and_lets_open_ones_finish")
    {
        return;
    }
    use std::time::{Duration, Instant};
    let topo = Topology::builder("drain")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let _server = mesh_testbed::traffic::TrafficServer::start(b, 7500).unwrap();
    let mut agent = NodeAgent::start(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a, b]),
        "onStop: release\ndrainTimeout: 8s\n",
    )
    .unwrap();
    // A connection that is still sending for two seconds after SIGTERM: an
    // echo of 100 bytes, then ten more every 250 ms, then a half-close and
    // EOF. It prints `connected` after the first echo and `ok 11` at the end.
    let mut client = a
        .spawn_tool(&[
            "chat",
            &b.ipv4().to_string(),
            "7500",
            "--bytes",
            "100",
            "--times",
            "11",
            "--every-ms",
            "250",
            "--shutdown",
        ])
        .unwrap();
    mesh_testbed::wait_until(
        "the long connection to start",
        Duration::from_secs(10),
        || Ok(client.stdout_so_far().contains("connected")),
    )
    .unwrap();
    let signalled = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    // Readiness goes first; the admin API still answers.
    mesh_testbed::wait_until("readiness to turn off", Duration::from_secs(2), || {
        Ok(agent
            .get("/readyz")
            .map(|(code, _)| code == 503)
            .unwrap_or(false))
    })
    .unwrap();
    // No new connection is accepted while draining.
    let outcome = connect_result(a, b.ipv4(), 7500).unwrap();
    assert_ne!(outcome, ConnectOutcome::Connected);
    // The open connection finishes intact, then the agent exits by itself,
    // well before the drain deadline.
    let out = client.wait_with_deadline(Duration::from_secs(20)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok 11"),
        "{}",
        client.output_report()
    );
    let log = agent.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(log.contains("drained: no connection in flight"), "{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "the agent waited for the deadline"
    );
}

#[test]
fn istio_request_metrics_count_allowed_and_denied_requests_by_code() {
    if !e2e_enabled("istio_request_metrics_count_allowed_and_denied_requests_by_code") {
        return;
    }
    use std::time::Duration;
    let topo = Topology::builder("istiohttp")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    // Every answer is `ok`: two bytes.
    let server = b
        .spawn_tool(&["http-server", "0.0.0.0:7600", "--body", "ok"])
        .unwrap();
    mesh_testbed::wait_until("the HTTP server", Duration::from_secs(10), || {
        Ok(server.stdout_so_far().contains("ready"))
    })
    .unwrap();
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-ok, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  rules:\n  - to: [{operation: {methods: [\"GET\"], paths: [\"/ok/*\"]}}]\n";
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a, b]),
        "",
        &[("policies/b.yaml", policy.to_string())],
    )
    .unwrap();
    // Five allowed and three denied requests on one keep-alive connection.
    let out = a
        .run_tool(
            &[
                "http-client",
                &b.ipv4().to_string(),
                "7600",
                "/ok/1",
                "/ok/1",
                "/ok/1",
                "/ok/1",
                "/ok/1",
                "/no",
                "/no",
                "/no",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let statuses: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(
        statuses,
        ["200", "200", "200", "200", "200", "403", "403", "403"],
        "{stdout}"
    );
    let labels = |code: &'static str| {
        [
            ("reporter", "destination"),
            ("source_workload", "a"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
            ("destination_workload", "b"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/b",
            ),
            ("connection_security_policy", "none"),
            ("response_code", code),
        ]
    };
    assert_eq!(agent.metric_sum("istio_requests_total", &labels("200")), 5);
    assert_eq!(agent.metric_sum("istio_requests_total", &labels("403")), 3);
    assert_eq!(
        agent.metric_sum(
            "istio_requests_total",
            &[("response_code", "403"), ("response_flags", "DENY")]
        ),
        3
    );
    assert_eq!(
        agent.metric_sum("istio_request_duration_milliseconds_count", &labels("200")),
        5
    );
    // Five responses of two bytes each.
    assert_eq!(
        agent.metric_sum("istio_response_bytes_sum", &labels("200")),
        10
    );
    // Decisions by the policy (rule) that made them.
    let decisions = |decision, policy| {
        agent.metric_sum(
            "mesh_authorization_decisions_total",
            &[("decision", decision), ("policy", policy)],
        )
    };
    assert_eq!(decisions("allow", "default/only-ok rule[0]"), 5);
    assert_eq!(
        decisions("deny", "allow-nothing (no ALLOW policy matched)"),
        3
    );
    // The whole exposition, histograms included, is valid text format.
    agent.scrape_valid_metrics().unwrap();

    // One access-log line per request, with its path and code; a denied
    // one names the policy decision.
    let requests: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains(" access: request") && l.contains("destination_workload=b"))
        .map(str::to_owned)
        .collect();
    assert_eq!(requests.len(), 8, "{requests:#?}");
    let allowed = requests
        .iter()
        .filter(|l| {
            l.contains("response_code=200") && l.contains("/ok/1") && l.contains("method=GET")
        })
        .count();
    let denied = requests
        .iter()
        .filter(|l| {
            l.contains("response_code=403")
                && l.contains("\"/no\"")
                && l.contains("allow-nothing (no ALLOW policy matched)")
        })
        .count();
    assert_eq!((allowed, denied), (5, 3), "{requests:#?}");
}

/// `/readyz` says no, and why, while an enrolled pod has no certificate (its
/// peers could not verify it); the certificate appearing on disk makes the
/// agent ready without a restart.
#[test]
fn readyz_waits_for_every_enrolled_pods_certificate() {
    if !e2e_enabled("readyz_waits_for_every_enrolled_pods_certificate") {
        return;
    }
    use std::time::Duration;
    let topo = Topology::builder("readycert")
        .node("n1", &["a", "b"])
        .build()
        .unwrap();
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let certs = topo.tmp_dir().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    // Files named as the agent looks for them: <namespace>.<serviceAccount>.
    let install = |pod: &Pod| {
        let (crt, key) = ca
            .issue_valid_files(&mesh_e2e::mesh::pod_identity(pod))
            .unwrap();
        let stem = format!("default.{}", pod.name());
        std::fs::copy(key, certs.join(format!("{stem}.key"))).unwrap();
        std::fs::copy(crt, certs.join(format!("{stem}.crt"))).unwrap();
    };
    install(a);
    let identity = format!(
        "identity:\n  files: {{dir: {}, trustBundle: {}}}\n",
        certs.display(),
        ca.cert_path().display()
    );
    let mut agent =
        NodeAgent::configure(&topo, topo.node("n1"), &pods_yaml(&[a, b]), &identity, &[]).unwrap();
    agent.start_process().unwrap();
    let mut answer = (0, String::new());
    mesh_testbed::wait_until("/readyz to say why not", Duration::from_secs(20), || {
        answer = agent.get("/readyz").unwrap_or_default();
        Ok(answer.1.contains("no valid certificate"))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {answer:?}\n{}", agent.log()));
    assert_eq!(answer.0, 503);
    assert!(
        answer.1.contains("spiffe://cluster.local/ns/default/sa/b"),
        "{answer:?}"
    );
    assert!(!answer.1.contains("sa/a"), "{answer:?}");
    // Alive all the same: liveness must not restart it for this.
    assert_eq!(agent.get("/healthz").unwrap().0, 200);

    install(b);
    agent
        .wait_ready(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(agent.get("/readyz").unwrap(), (200, "ready\n".to_string()));
}
