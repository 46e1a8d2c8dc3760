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
        auth: None,
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

/// One request's JWT check (an ES256 token, inline key set, the header
/// removed), the cost a RequestAuthentication adds: a token seen for the
/// first time (signature checked) and one seen before (remembered).
fn bench_jwt(c: &mut Criterion) {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = ec.public_key_raw();
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "ec",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: ns}}\nspec:\n  jwtRules:\n  - issuer: issuer\n    audiences: [api]\n    jwks: '{jwks}'\n"
    );
    let compiled = load([("ra.yaml", yaml.as_str())])
        .unwrap()
        .compile(DEFAULT_ROOT_NAMESPACE);
    let wp = compiled.for_workload(&Workload {
        namespace: "ns".into(),
        labels: Default::default(),
    });
    let key = jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("ec".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"iss": "issuer", "sub": "alice", "aud": "api", "exp": exp, "groups": ["a", "b"]});
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let value: http::HeaderValue = format!("Bearer {token}").parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value.clone());
    assert!(
        wp.authenticate(&mut headers.clone(), None)
            .unwrap()
            .is_some()
    );

    // More distinct tokens than a rule remembers: each check verifies.
    let fresh: Vec<http::HeaderMap> = (0..1024)
        .map(|n| {
            let mut claims = claims.clone();
            claims["n"] = n.into();
            let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            h
        })
        .collect();

    let mut g = c.benchmark_group("jwt");
    let mut next = 0;
    g.bench_function("es256_token_seen_first", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            let mut h = fresh[next].clone();
            wp.authenticate(black_box(&mut h), None).unwrap()
        })
    });
    g.bench_function("es256_token_seen_before", |b| {
        b.iter(|| {
            let mut h = headers.clone();
            wp.authenticate(black_box(&mut h), None).unwrap()
        })
    });
    let mut none = http::HeaderMap::new();
    g.bench_function("no_token", |b| {
        b.iter(|| wp.authenticate(black_box(&mut none), None).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench, bench_jwt);
criterion_main!(benches);
