//! What a route costs the client's agent per request: the lookup of the
//! service port's routes, the match (two header matches, one a regular
//! expression), the weighted pick and a request header modifier, against
//! the lookup for a service port with no route (what every request to a
//! service pays). Run: `cargo bench -p mesh-agent --bench routes`.

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::Request;
use mesh_agent::{
    config::{ServiceConfig, ServicePort},
    routes::{RouteTable, Routed, load},
};

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches:
    - headers:
      - {name: x-env, value: prod}
      - {name: x-team, type: RegularExpression, value: "bench|perf"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-routed, value: "1"}]
    backendRefs: [{name: web, port: 80}]
"#;

fn services() -> Vec<ServiceConfig> {
    ["web", "other"]
        .into_iter()
        .map(|name| {
            let mut s = ServiceConfig::with_defaults();
            s.name = name.into();
            s.namespace = "bench".into();
            s.ports = vec![ServicePort {
                port: 80,
                target_port: Some(8080),
                protocol: "http".into(),
            }];
            s
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let routes = load([("routes/web.yaml", ROUTE)]).unwrap().routes;
    let table = Arc::new(RouteTable::build(&routes, &services()));
    let request = Request::get("/api/v1/items")
        .header("host", "web.bench")
        .header("x-env", "prod")
        .header("x-team", "bench")
        .header("user-agent", "bench/1")
        .body(())
        .unwrap();
    let (parts, ()) = request.into_parts();
    let mut group = c.benchmark_group("route a request");
    group.bench_function("no route on the service port", |b| {
        b.iter(|| {
            black_box(table.route(
                black_box("bench/other:80"),
                "client-ns",
                &parts.method,
                &parts.uri,
                &parts.headers,
            ))
        })
    });
    group.bench_function("2 header matches + header modifier", |b| {
        b.iter(|| {
            let Some(Routed::Rule(rule)) = table.route(
                black_box("bench/web:80"),
                "client-ns",
                &parts.method,
                &parts.uri,
                &parts.headers,
            ) else {
                panic!("the route matches");
            };
            let backend = rule.rule().pick(black_box(7)).unwrap();
            let mut edited = parts.clone();
            rule.rule()
                .filters
                .on_request(&mut edited, rule.matched_prefix());
            black_box((backend, edited))
        })
    });
    group.bench_function("clone of the request head (in the line above)", |b| {
        b.iter(|| black_box(parts.clone()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
