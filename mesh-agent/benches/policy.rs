//! `decide` cost with 1,000 policies across 50 workloads (20 per workload,
//! 3 rules each, mixed exact/prefix/suffix values, IP blocks, ports, HTTP
//! fields). Policies are generated in code. Run: `cargo bench --bench policy`.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_agent::policy::{
    DEFAULT_ROOT_NAMESPACE, HttpAttributes, NoHeaders, PolicySet, Request, Workload, load,
};

const WORKLOADS: usize = 50;
const PER_WORKLOAD: usize = 20;
const DENY_POLICIES: usize = 6;

fn workload(w: usize) -> Workload {
    Workload {
        namespace: format!("ns{}", w / 5),
        labels: [("app".to_owned(), format!("app{}", w % 5))].into(),
    }
}

/// 20 policies for workload `w`: 6 DENY then 14 ALLOW, 3 rules each.
fn policies_for(w: usize, out: &mut String) {
    let wl = workload(w);
    let (ns, app) = (&wl.namespace, &wl.labels["app"]);
    for k in 0..PER_WORKLOAD {
        let head = format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {app}-p{k}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n"
        );
        out.push_str(&head);
        if k < DENY_POLICIES {
            write!(
                out,
                "  action: DENY
  rules:
  - from: [{{source: {{principals: ['cluster.local/ns/evil{k}/*'], ipBlocks: [192.168.{k}.0/24]}}}}]
  - to: [{{operation: {{ports: ['{hport}'], methods: [DELETE], paths: ['/admin{k}/*', '*.bak{k}']}}}}]
  - to: [{{operation: {{ports: ['{port}']}}}}]
    when: [{{key: source.ip, values: [172.16.{k}.0/24]}}]
",
                port = 10000 + k,
                hport = 20000 + k
            )
            .unwrap();
        } else {
            write!(
                out,
                "  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/svc-{k}-a, '*/sa/svc-{k}-b']}}}}]
    to: [{{operation: {{ports: ['{port}']}}}}]
  - from: [{{source: {{namespaces: ['team-{k}*'], ipBlocks: [10.{k}.0.0/16, 10.{k2}.0.0/16]}}}}]
  - from: [{{source: {{principals: [cluster.local/ns/client/sa/client-{k}]}}}}]
    to: [{{operation: {{hosts: [svc-{k}.{ns}.svc.cluster.local, '*.svc-{k}.example.com'], methods: [GET, POST], paths: ['/api/v{k}/*']}}}}]
",
                port = 9000 + k,
                k2 = 100 + k
            )
            .unwrap();
        }
    }
}

fn policy_text() -> String {
    let mut text = String::new();
    for w in 0..WORKLOADS {
        policies_for(w, &mut text);
    }
    text
}

fn load_all(text: &str) -> PolicySet {
    load([("bench.yaml", text)]).expect("generated policies load")
}

fn bench(c: &mut Criterion) {
    let text = policy_text();
    let set = load_all(&text);
    assert_eq!(set.len(), WORKLOADS * PER_WORKLOAD);
    let compiled = set.compile(DEFAULT_ROOT_NAMESPACE);
    let wl = workload(WORKLOADS - 1);
    let wp = compiled.for_workload(&wl);
    assert_eq!(wp.policy_names().count(), PER_WORKLOAD);

    let host = format!("svc-19.{}.svc.cluster.local:8080", wl.namespace);
    let http = |path| HttpAttributes {
        method: "GET",
        host: &host,
        path,
        headers: &NoHeaders,
    };
    // Matches only rule[2] of the last ALLOW policy: every DENY rule and
    // every earlier ALLOW rule is evaluated first.
    let last_rule = Request {
        source_principal: Some("spiffe://cluster.local/ns/client/sa/client-19"),
        source_namespace: Some("client"),
        source_ip: "10.200.0.1".parse().unwrap(),
        remote_ip: "10.200.0.1".parse().unwrap(),
        destination_ip: "10.0.1.1".parse().unwrap(),
        destination_port: 8080,
        sni: None,
        http: Some(http("/api/v19/items")),
    };
    let no_match = Request {
        http: Some(http("/other")),
        ..last_rule
    };
    let tcp = Request {
        http: None,
        ..last_rule
    };
    assert!(wp.decide(&last_rule).is_allow());
    assert!(!wp.decide(&no_match).is_allow());
    // The last ALLOW rule uses HTTP fields, so it can never match TCP.
    assert!(!wp.decide(&tcp).is_allow());

    let mut g = c.benchmark_group("policy");
    g.bench_function("decide_http_last_rule", |b| {
        b.iter(|| wp.decide(black_box(&last_rule)))
    });
    g.bench_function("decide_http_no_match", |b| {
        b.iter(|| wp.decide(black_box(&no_match)))
    });
    g.bench_function("decide_tcp_no_match", |b| {
        b.iter(|| wp.decide(black_box(&tcp)))
    });
    g.bench_function("for_workload_cached", |b| {
        b.iter(|| compiled.for_workload(black_box(&wl)))
    });
    g.sample_size(10);
    g.bench_function("load_and_compile_1000", |b| {
        b.iter(|| load_all(black_box(&text)).compile(DEFAULT_ROOT_NAMESPACE))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
