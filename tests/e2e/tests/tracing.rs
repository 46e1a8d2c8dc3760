//! Request spans and request telemetry, on real traffic between two nodes.
//!
//! Client `a` on n1 calls the service `web` (an HTTP port, balanced by n1's
//! agent) whose endpoint `b` is on n2, behind an AuthorizationPolicy with
//! HTTP rules (so n2's agent decides each request). Each node's agent sends
//! its spans to an OTLP receiver the test runs in that node's network
//! namespace, built from the collector's protobuf definitions: n1 over
//! OTLP/gRPC, n2 over OTLP/HTTP (protobuf). The receivers are the real
//! protocol; the collector behind them is the test.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use mesh_e2e::{
    NodeAgent,
    backend::HttpBackend,
    load::load,
    mesh::{TestCa, node_issuers, start_mesh_each},
};
use mesh_testbed::{
    Topology, e2e_enabled,
    otlp::{OtlpReceiver, OtlpTransport, ReceivedSpan},
    wait_until,
};

const PORT: u16 = 8080;
const WEB: &str = "10.96.0.40";
const WEB_TCP: &str = "10.96.0.41";
const GRPC: &str = "127.0.0.1:4317";
const HTTP: &str = "127.0.0.1:4318";

const A: &str = "spiffe://cluster.local/ns/default/sa/a";
const B: &str = "spiffe://cluster.local/ns/default/sa/b";
const WEB_HOST: &str = "web.default.svc.cluster.local";

/// b takes requests from a, except `/forbidden`.
const B_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-allow-a, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/a"]}}]
    to: [{operation: {notPaths: ["/forbidden"]}}]
"#;

fn services_yaml(topo: &Topology) -> String {
    let b = topo.pod("b");
    let endpoint = format!(
        "      - {{name: b, address: {}, node: {}}}\n",
        b.ipv4(),
        b.node_name()
    );
    format!(
        "services:
  - name: web
    namespace: default
    vips: [{WEB}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]
    endpoints:
{endpoint}  - name: web-tcp
    namespace: default
    vips: [{WEB_TCP}]
    ports: [{{port: 80, targetPort: {PORT}, protocol: tcp}}]
    endpoints:
{endpoint}"
    )
}

/// n1 sends over gRPC, n2 over HTTP; every new trace sampled.
fn tracing_yaml(node: &str) -> String {
    let (endpoint, protocol) = if node.ends_with("n1") {
        (GRPC, "grpc")
    } else {
        (HTTP, "http/protobuf")
    };
    format!(
        "tracing:\n  endpoint: http://{endpoint}\n  protocol: {protocol}\n  randomSamplingPercentage: 100\n  exportTimeout: 2s\n"
    )
}

struct Bed {
    topo: Topology,
}

fn bed(name: &str) -> Bed {
    let topo = Topology::builder(name)
        .node("n1", &["a"])
        .node("n2", &["b"])
        .build()
        .unwrap();
    Bed { topo }
}

/// Receivers in each node's netns, agents told about them, services on
/// both nodes, b's policy on n2.
fn start<'t>(topo: &'t Topology) -> (Vec<NodeAgent<'t>>, OtlpReceiver, OtlpReceiver, HttpBackend) {
    let nodes = topo.nodes();
    let grpc = OtlpReceiver::start(
        Some(&nodes[0].netns_path()),
        GRPC.parse::<SocketAddr>().unwrap(),
        OtlpTransport::Grpc,
    )
    .unwrap();
    let http = OtlpReceiver::start(
        Some(&nodes[1].netns_path()),
        HTTP.parse::<SocketAddr>().unwrap(),
        OtlpTransport::HttpProtobuf,
    )
    .unwrap();
    let ca = TestCa::new(topo, "root").unwrap();
    let issuers = node_issuers(topo, &ca).unwrap();
    let agents = start_mesh_each(topo, &issuers, "1h", |node| tracing_yaml(node.name())).unwrap();
    let backend = HttpBackend::start(topo.pod("b"), PORT, "b").unwrap();
    for (agent, policy) in [(&agents[0], None), (&agents[1], Some(B_POLICY))] {
        let generation = agent.status().unwrap().config_generation;
        agent
            .write_file("services.yaml", &services_yaml(topo))
            .unwrap();
        if let Some(policy) = policy {
            agent.write_file("policies/b.yaml", policy).unwrap();
        }
        agent.wait_generation_after(generation).unwrap();
    }
    (agents, grpc, http, backend)
}

fn spans_of_trace<'s>(spans: &'s [ReceivedSpan], trace: &str) -> Vec<&'s ReceivedSpan> {
    spans.iter().filter(|s| s.trace_id() == trace).collect()
}

/// `traceparent` → (trace id, parent id, flags).
fn parse_traceparent(value: &str) -> (String, String, String) {
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(fields.len(), 4, "traceparent {value}");
    (fields[1].into(), fields[2].into(), fields[3].into())
}

const T1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P1: &str = "00f067aa0ba902b7";
const T3: &str = "a3ce929d0e0e47364bf92f3577b34da6";
const P3: &str = "b7ad6b7169203331";
const T5: &str = "0af7651916cd43dd8448eb211c80319c";
const P5: &str = "b9c7c989f97918e1";

#[test]
fn spans_of_both_agents_link_client_to_server_to_application_and_metrics_name_every_peer() {
    if !e2e_enabled(
        "spans_of_both_agents_link_client_to_server_to_application_and_metrics_name_every_peer",
    ) {
        return;
    }
    let Bed { topo } = bed("trace");
    let (agents, grpc, http, backend) = start(&topo);
    let a = topo.pod("a");
    let web = format!("http://{WEB}");

    // 10 requests continuing the client's sampled W3C trace T1, 10 with
    // no context, 5 continuing a B3 trace, 5 whose context says "not
    // sampled", then 3 that b's policy refuses.
    let runs: [(&str, Vec<String>, usize); 5] = [
        ("/w3c", vec![format!("traceparent: 00-{T1}-{P1}-01")], 10),
        ("/none", vec![], 10),
        ("/b3", vec![format!("b3: {T3}-{P3}-1")], 5),
        (
            "/unsampled",
            vec![format!("traceparent: 00-{T5}-{P5}-00")],
            5,
        ),
        ("/forbidden", vec![], 3),
    ];
    for (path, headers, requests) in &runs {
        let mut args = vec!["--requests".to_string(), requests.to_string()];
        for header in headers {
            args.push("--header".into());
            args.push(header.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = load(a, &format!("{web}{path}"), &args);
        let expected = if *path == "/forbidden" { 403 } else { 200 };
        assert_eq!(run.status(expected), *requests as u64, "{path}: {run}");
    }
    let sampled = 10 + 10 + 5 + 3;
    wait_until("both agents' spans", Duration::from_secs(30), || {
        Ok(grpc.span_count() >= sampled && http.span_count() >= sampled)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: n1 sent {}, n2 sent {}\nn1 log:\n{}\nn2 log:\n{}",
            grpc.span_count(),
            http.span_count(),
            agents[0].log(),
            agents[1].log()
        )
    });
    let (client, server) = (grpc.spans(), http.spans());
    // Exactly one span per sampled request on each node: the unsampled
    // context was followed (it was sent before the last run, on the same
    // queues).
    assert_eq!(client.len(), sampled, "{client:#?}");
    assert_eq!(server.len(), sampled, "{server:#?}");
    assert!(spans_of_trace(&client, T5).is_empty());
    assert!(spans_of_trace(&server, T5).is_empty());

    for span in &client {
        assert_eq!(span.span.kind, 3, "CLIENT: {span:?}");
        assert_eq!(
            span.resource_attribute("service.name").as_deref(),
            Some("mesh-agent")
        );
        assert_eq!(
            span.resource_attribute("k8s.node.name").as_deref(),
            Some(topo.nodes()[0].name())
        );
    }
    for span in &server {
        assert_eq!(span.span.kind, 2, "SERVER: {span:?}");
        assert_eq!(
            span.resource_attribute("k8s.node.name").as_deref(),
            Some(topo.nodes()[1].name())
        );
    }

    // Client spans continue the client's context, or start a trace.
    let t1 = spans_of_trace(&client, T1);
    assert_eq!(t1.len(), 10);
    assert!(t1.iter().all(|s| s.parent_span_id() == P1), "{t1:#?}");
    let t3 = spans_of_trace(&client, T3);
    assert_eq!(t3.len(), 5);
    assert!(t3.iter().all(|s| s.parent_span_id() == P3), "{t3:#?}");
    let roots: Vec<_> = client
        .iter()
        .filter(|s| s.attribute("url.path").as_deref() == Some("/none"))
        .collect();
    assert_eq!(roots.len(), 10);
    assert!(roots.iter().all(|s| s.parent_span_id().is_empty()));
    let root_traces: BTreeSet<String> = roots.iter().map(|s| s.trace_id()).collect();
    assert_eq!(root_traces.len(), 10, "a new trace per request");

    // Every server span is the child of one client span, in its trace.
    for span in &server {
        let parents: Vec<_> = client
            .iter()
            .filter(|c| c.span_id() == span.parent_span_id())
            .collect();
        assert_eq!(parents.len(), 1, "parent of {span:?}");
        assert_eq!(parents[0].trace_id(), span.trace_id());
    }

    // The application's parent is n2's span: W3C always, B3 too for a
    // request that came with B3.
    let seen = backend.seen_requests();
    assert_eq!(seen.len(), 10 + 10 + 5 + 5, "{seen:#?}");
    let server_ids: BTreeSet<(String, String)> =
        server.iter().map(|s| (s.trace_id(), s.span_id())).collect();
    for request in seen.iter().filter(|r| r.path != "/unsampled") {
        let (trace, parent, flags) =
            parse_traceparent(request.traceparent.as_deref().expect("traceparent"));
        assert!(
            server_ids.contains(&(trace.clone(), parent.clone())),
            "{request:?} is not the child of an n2 span"
        );
        assert_eq!(flags, "01");
        if request.path == "/b3" {
            assert_eq!(request.b3.as_deref(), Some(&*format!("{trace}-{parent}-1")));
            assert_eq!(trace, T3);
        }
    }
    for request in seen.iter().filter(|r| r.path == "/unsampled") {
        let (trace, parent, flags) =
            parse_traceparent(request.traceparent.as_deref().expect("traceparent"));
        assert_eq!((trace.as_str(), flags.as_str()), (T5, "00"));
        assert_ne!(parent, P5, "carried on under the agents' spans");
    }

    // Attributes: HTTP semantic conventions and the mesh's peers.
    let ok = t1[0];
    for (key, value) in [
        ("http.request.method", "GET"),
        ("url.path", "/w3c"),
        ("server.address", WEB),
        ("http.response.status_code", "200"),
        ("mesh.source.workload", "a"),
        ("mesh.source.principal", A),
        ("mesh.destination.workload", "b"),
        ("mesh.destination.namespace", "default"),
        ("mesh.destination.principal", B),
        ("mesh.destination.service", WEB_HOST),
        ("mesh.response_flags", "-"),
    ] {
        assert_eq!(ok.attribute(key).as_deref(), Some(value), "{key}: {ok:?}");
    }
    let served = server
        .iter()
        .find(|s| s.parent_span_id() == ok.span_id())
        .unwrap();
    for (key, value) in [
        ("http.response.status_code", "200"),
        ("mesh.source.principal", A),
        ("mesh.source.workload", "a"),
        ("mesh.destination.principal", B),
        ("mesh.destination.service", WEB_HOST),
        ("mesh.connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(
            served.attribute(key).as_deref(),
            Some(value),
            "{key}: {served:?}"
        );
    }
    let refused: Vec<_> = server
        .iter()
        .filter(|s| s.attribute("url.path").as_deref() == Some("/forbidden"))
        .collect();
    assert_eq!(refused.len(), 3);
    for span in refused {
        assert_eq!(
            span.attribute("http.response.status_code").as_deref(),
            Some("403")
        );
        assert_eq!(
            span.attribute("mesh.response_flags").as_deref(),
            Some("DENY")
        );
        assert!(span.attribute("mesh.policy").is_some(), "{span:?}");
        // A server's 4xx is not its error.
        assert_eq!(span.attribute("error.type"), None);
    }
    let refused_client = client
        .iter()
        .find(|s| s.attribute("url.path").as_deref() == Some("/forbidden"))
        .unwrap();
    assert_eq!(
        refused_client.attribute("error.type").as_deref(),
        Some("403")
    );

    // Access-log lines carry the trace id.
    let log = agents[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("access") && l.contains(&format!("trace_id={T1}"))),
        "no access line of trace {T1} on n1:\n{log}"
    );

    // Request metrics: every label known on both nodes. (On the source,
    // `connection_security_policy` is `unknown` by Istio's definition:
    // the source cannot know the destination's policy.)
    let source_ok = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "default"),
        ("source_principal", A),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", B),
        ("destination_service", WEB_HOST),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    // Every answered request, sampled or not.
    let answered = 10 + 10 + 5 + 5;
    assert_eq!(
        agents[0].metric_sum("istio_requests_total", &source_ok),
        answered
    );
    let destination_ok = [
        ("reporter", "destination"),
        ("source_workload", "a"),
        ("source_workload_namespace", "default"),
        ("source_principal", A),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", B),
        ("destination_service", WEB_HOST),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        agents[1].metric_sum("istio_requests_total", &destination_ok),
        answered
    );
    let denied = [("response_code", "403"), ("response_flags", "DENY")];
    assert_eq!(agents[1].metric_sum("istio_requests_total", &denied), 3);
    for (agent, reporter) in [(&agents[0], "source"), (&agents[1], "destination")] {
        let (_, metrics) = agent.get("/metrics").unwrap();
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
        {
            let known = line.replace("connection_security_policy=\"unknown\"", "");
            assert!(
                line.contains(&format!("reporter=\"{reporter}\""))
                    && !known.contains("\"unknown\""),
                "a label the agent knows is unknown: {line}"
            );
        }
    }

    // Plain TCP through a service VIP names the service.
    let tcp = load(a, &format!("http://{WEB_TCP}/tcp"), &["--requests", "3"]);
    assert!(tcp.all_ok(), "{tcp}");
    let tcp_labels = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("destination_workload", "b"),
        ("destination_principal", B),
        ("destination_service", "web-tcp.default.svc.cluster.local"),
    ];
    wait_until(
        "the TCP connection's record",
        Duration::from_secs(10),
        || Ok(agents[0].metric_sum("istio_tcp_connections_closed_total", &tcp_labels) >= 1),
    )
    .unwrap_or_else(|e| {
        let (_, metrics) = agents[0].get("/metrics").unwrap();
        panic!("{e}:\n{metrics}")
    });
}

fn spans_counted(agent: &NodeAgent, result: &str) -> u64 {
    agent.metric_sum("mesh_trace_spans_total", &[("result", result)])
}

fn spans_dropped(agent: &NodeAgent) -> u64 {
    spans_counted(agent, "dropped_queue_full") + spans_counted(agent, "dropped_export_failed")
}

#[test]
fn with_the_collector_gone_every_request_is_answered_and_every_lost_span_counted() {
    if !e2e_enabled("with_the_collector_gone_every_request_is_answered_and_every_lost_span_counted")
    {
        return;
    }
    let Bed { topo } = bed("trace-down");
    let (agents, mut grpc, mut http, _backend) = start(&topo);
    let a = topo.pod("a");
    let web = format!("http://{WEB}/");

    // The collectors take spans, then go away.
    let first = load(a, &web, &["--requests", "20"]);
    assert!(first.all_ok(), "{first}");
    wait_until("the first spans exported", Duration::from_secs(30), || {
        Ok(spans_counted(&agents[0], "exported") == 20
            && spans_counted(&agents[1], "exported") == 20)
    })
    .unwrap();
    grpc.stop();
    http.stop();

    let requests = 10_000u64;
    let run = load(
        a,
        &web,
        &["--requests", &requests.to_string(), "--connections", "4"],
    );
    eprintln!("collector away: {run}");
    assert!(run.all_ok(), "{run}");
    assert_eq!(run.requests(), requests);

    // Every span of those requests is accounted for as dropped: the queue
    // overflowed, or its batch failed.
    for agent in &agents {
        wait_until("every span accounted for", Duration::from_secs(60), || {
            Ok(spans_dropped(agent) == requests)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: exported {}, dropped {}",
                spans_counted(agent, "exported"),
                spans_dropped(agent)
            )
        });
        assert_eq!(spans_counted(agent, "exported"), 20);
        eprintln!(
            "spans dropped: queue full {}, export failed {}",
            spans_counted(agent, "dropped_queue_full"),
            spans_counted(agent, "dropped_export_failed")
        );
    }
}
