use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};

use super::*;
use crate::balance::rng::{Rng, SplitMix64};
use crate::config::{ServiceConfig, ServicePort};
use crate::routes::filters::PathModifier as Modifier;

fn load_one(text: &str) -> Vec<Arc<HttpRoute>> {
    load([("routes/r.yaml", text)])
        .unwrap_or_else(|e| panic!("{e}"))
        .routes
}

fn load_err(text: &str) -> String {
    load([("routes/r.yaml", text)]).unwrap_err().to_string()
}

fn service(namespace: &str, name: &str, protocol: &str) -> ServiceConfig {
    let mut s = ServiceConfig::with_defaults();
    s.namespace = namespace.into();
    s.name = name.into();
    s.ports = vec![ServicePort {
        port: 80,
        target_port: Some(8080),
        protocol: protocol.into(),
    }];
    s
}

fn services() -> Vec<ServiceConfig> {
    vec![
        service("faces", "smiley", "http"),
        service("faces", "smiley2", "http"),
        service("faces", "raw", "tcp"),
    ]
}

fn request(method: &str, uri: &str, headers: &[(&'static str, &str)]) -> (Method, Uri, HeaderMap) {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(*k, HeaderValue::from_str(v).unwrap());
    }
    (method.parse().unwrap(), uri.parse().unwrap(), map)
}

/// The name of the rule (or `404`) a request to smiley:80 from `ns` takes.
fn rule_for(
    table: &RouteTable,
    ns: &str,
    method: &str,
    uri: &str,
    headers: &[(&'static str, &str)],
) -> String {
    let (m, u, h) = request(method, uri, headers);
    match table.route("faces/smiley:80", ns, &m, &u, &h) {
        None => "none".into(),
        Some(Routed::NoMatch) => "404".into(),
        Some(Routed::Rule(chosen)) => {
            format!(
                "{}#{}",
                chosen.route(),
                chosen.rule().name.clone().unwrap_or_default()
            )
        }
    }
}

/// The Gateway API documentation's GAMMA canary example, unchanged.
const DOCS_CANARY: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: smiley-route
  namespace: faces
spec:
  parentRefs:
    - name: smiley
      kind: Service
      group: \"\"
      port: 80
  rules:
    - backendRefs:
        - name: smiley
          port: 80
          weight: 90
        - name: smiley2
          port: 80
          weight: 10
";

#[test]
fn the_documentations_canary_loads_and_splits_by_weight() {
    let routes = load_one(DOCS_CANARY);
    let table = RouteTable::build(&routes, &services());
    let (m, u, h) = request("GET", "/anything?x=1", &[]);
    let Some(Routed::Rule(chosen)) = table.route("faces/smiley:80", "other", &m, &u, &h) else {
        panic!("the route applies");
    };
    let rule = chosen.rule();
    let mut rng = SplitMix64::new(7);
    let n = 100_000;
    let v2 = (0..n)
        .filter(|_| {
            let picked = rule.pick(rng.next_u64()).unwrap();
            rule.backends[picked].backend.service_port_key() == Some("faces/smiley2:80")
        })
        .count();
    // 10% ± 4 standard deviations (σ = √(n·0.1·0.9) ≈ 95).
    assert!((10_000 - 380..=10_000 + 380).contains(&v2), "{v2}");
    assert!(table.statuses()[0].parents[0].accepted);
    assert!(table.statuses()[0].unresolved_backends.is_empty());
}

#[test]
fn kubectl_output_with_status_and_server_fields_loads() {
    let text = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {}
  creationTimestamp: \"2026-01-02T03:04:05Z\"
  generation: 1
  name: r
  namespace: faces
  resourceVersion: \"1234\"
  uid: 0b6c8a4e-0000-0000-0000-000000000000
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: smiley
    port: 80
  rules:
  - backendRefs:
    - group: \"\"
      kind: Service
      name: smiley2
      port: 80
      weight: 1
    matches:
    - path:
        type: PathPrefix
        value: /
status:
  parents:
  - conditions:
    - lastTransitionTime: \"2026-01-02T03:04:06Z\"
      message: Route was valid
      reason: Accepted
      status: \"True\"
      type: Accepted
    controllerName: istio.io/gateway-controller
    parentRef:
      group: \"\"
      kind: Service
      name: smiley
      port: 80
";
    let routes = load_one(text);
    assert_eq!(routes[0].created.as_deref(), Some("2026-01-02T03:04:05Z"));
    assert_eq!(routes[0].rules[0].backends.len(), 1);
}

#[test]
fn precedence_follows_the_specification() {
    let text = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-newer, namespace: faces, creationTimestamp: \"2026-02-01T00:00:00Z\"}
spec:
  parentRefs: [{kind: Service, group: \"\", name: smiley}]
  rules:
    - name: prefix-short
      matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: smiley, port: 80}]
    - name: prefix-long
      matches: [{path: {type: PathPrefix, value: /api/v2/}}]
      backendRefs: [{name: smiley, port: 80}]
    - name: exact
      matches: [{path: {type: Exact, value: /api/v2/exact}}]
      backendRefs: [{name: smiley, port: 80}]
    - name: regex
      matches: [{path: {type: RegularExpression, value: \"/api/v[0-9]+/special\"}}]
      backendRefs: [{name: smiley, port: 80}]
    - name: tie-newer
      matches: [{path: {value: /tie}}]
      backendRefs: [{name: smiley, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-older, namespace: faces, creationTimestamp: \"2026-01-01T00:00:00Z\"}
spec:
  parentRefs: [{kind: Service, group: \"\", name: smiley, port: 80}]
  rules:
    - name: method
      matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
      backendRefs: [{name: smiley2, port: 80}]
    - name: two-headers
      matches:
        - path: {type: PathPrefix, value: /api}
          headers: [{name: X-User, value: ann}, {name: x-group, type: RegularExpression, value: \"beta|gamma\"}]
      backendRefs: [{name: smiley2, port: 80}]
    - name: query
      matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: canary, value: \"yes\"}]}]
      backendRefs: [{name: smiley2, port: 80}]
    - name: tie-older
      matches: [{path: {value: /tie}}]
      backendRefs: [{name: smiley2, port: 80}]
";
    let table = RouteTable::build(&load_one(text), &services());
    let at = |method, uri, headers: &[(&'static str, &str)]| {
        rule_for(&table, "faces", method, uri, headers)
    };
    assert_eq!(at("GET", "/api/v2/exact", &[]), "faces/b-newer#exact");
    assert_eq!(at("GET", "/api/v2/x", &[]), "faces/b-newer#prefix-long");
    assert_eq!(at("GET", "/api/v2", &[]), "faces/b-newer#prefix-long");
    assert_eq!(at("GET", "/api/v3", &[]), "faces/b-newer#prefix-short");
    // Element-wise: /apix is not under /api.
    assert_eq!(at("GET", "/apix", &[]), "404");
    // Same prefix: a method beats headers, headers beat a query.
    assert_eq!(
        at("POST", "/api/x", &[("x-user", "ann"), ("x-group", "beta")]),
        "faces/a-older#method"
    );
    assert_eq!(
        at(
            "GET",
            "/api/x?canary=yes",
            &[("x-user", "ann"), ("x-group", "beta")]
        ),
        "faces/a-older#two-headers"
    );
    assert_eq!(
        at(
            "GET",
            "/api/x?canary=yes",
            &[("x-user", "ann"), ("x-group", "betamax")]
        ),
        "faces/a-older#query"
    );
    assert_eq!(
        at("GET", "/api/x?canary=no", &[]),
        "faces/b-newer#prefix-short"
    );
    // A regular expression ranks after every prefix of the Service, and
    // matches the whole path.
    assert_eq!(
        at("GET", "/api/v9/special", &[]),
        "faces/b-newer#prefix-short"
    );
    assert_eq!(at("GET", "/tie", &[]), "faces/a-older#tie-older");
}

#[test]
fn consumer_routes_apply_to_their_namespace_only_and_override_producers() {
    let text = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: faces}
spec:
  parentRefs: [{kind: Service, group: \"\", name: smiley}]
  rules: [{name: p, backendRefs: [{name: smiley, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: web}
spec:
  parentRefs: [{kind: Service, group: \"\", name: smiley, namespace: faces}]
  rules: [{name: c, matches: [{path: {type: Exact, value: /only}}]}]
";
    let table = RouteTable::build(&load_one(text), &services());
    assert_eq!(
        rule_for(&table, "faces", "GET", "/x", &[]),
        "faces/producer#p"
    );
    assert_eq!(
        rule_for(&table, "web", "GET", "/only", &[]),
        "web/consumer#c"
    );
    // For web's clients the producer route is gone: no rule matches.
    assert_eq!(rule_for(&table, "web", "GET", "/x", &[]), "404");
}

#[test]
fn unknown_parents_and_backends_are_reported_and_no_route_means_the_service() {
    let text = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: faces}
spec:
  parentRefs:
    - {kind: Service, group: \"\", name: missing}
    - {kind: Service, group: \"\", name: raw}
    - {kind: Service, group: \"\", name: smiley2}
  rules:
    - backendRefs:
        - {name: nowhere, port: 80}
        - {name: smiley, port: 81}
        - {name: smiley, namespace: other, port: 80}
        - {name: bucket, kind: Bucket, group: example.com}
";
    let table = RouteTable::build(&load_one(text), &services());
    let status = &table.statuses()[0];
    let accepted: Vec<bool> = status.parents.iter().map(|p| p.accepted).collect();
    assert_eq!(accepted, [false, false, true]);
    assert!(
        status.parents[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("no HTTP port"),
        "{status:?}"
    );
    assert_eq!(status.unresolved_backends.len(), 4, "{status:?}");
    assert!(
        status.unresolved_backends[2].contains("ReferenceGrant"),
        "{status:?}"
    );
    // smiley has no route: its own endpoints serve.
    assert_eq!(rule_for(&table, "faces", "GET", "/", &[]), "none");
    assert!(table.has_routes("faces/smiley2:80"));
}

#[test]
fn zero_weights_pick_nothing_and_a_zero_weight_backend_is_never_picked() {
    let text = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: faces}
spec:
  parentRefs: [{kind: Service, group: \"\", name: smiley}]
  rules:
    - name: none
      matches: [{path: {value: /none}}]
      backendRefs: [{name: smiley, port: 80, weight: 0}]
    - name: one
      backendRefs: [{name: smiley, port: 80, weight: 0}, {name: smiley2, port: 80}]
";
    let routes = load_one(text);
    assert!(routes[0].rules[0].pick(12345).is_none());
    let mut rng = SplitMix64::new(1);
    for _ in 0..1000 {
        let picked = routes[0].rules[1].pick(rng.next_u64()).unwrap();
        assert_eq!(picked, 1);
    }
}

#[test]
fn what_cannot_be_served_as_written_is_named_with_file_line_and_field() {
    let base = |rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: faces}}
spec:
  parentRefs: [{{kind: Service, group: \"\", name: smiley}}]
  rules:
{rule}"
        )
    };
    let cases = [
        (
            "    - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: a}}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].filters[0].type: ExtensionRef is not supported yet",
        ),
        (
            "    - retry: {codes: [200]}\n",
            "routes/r.yaml:7",
            "spec.rules[0].retry.codes: 200 is not an error status",
        ),
        (
            "    - retry: {backoff: soon}\n",
            "routes/r.yaml:7",
            "spec.rules[0].retry.backoff: \"soon\" is not a duration",
        ),
        (
            "    - sessionPersistence: {sessionName: s}\n",
            "routes/r.yaml:7",
            "spec.rules[0].sessionPersistence: not supported yet",
        ),
        (
            "    - timeouts: {request: 1.5s}\n",
            "routes/r.yaml:7",
            "spec.rules[0].timeouts.request: \"1.5s\" is not a duration",
        ),
        (
            "    - timeouts: {request: 1s, backendRequest: 2s}\n",
            "routes/r.yaml:7",
            "spec.rules[0].timeouts.backendRequest: must not be longer than `request`",
        ),
        (
            "    - filters:\n        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}\n        - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: a, value: b}]}}\n",
            "routes/r.yaml:9",
            "spec.rules[0].filters[1].type: RequestHeaderModifier may appear once",
        ),
        (
            "    - filters:\n        - {type: RequestHeaderModifier}\n",
            "routes/r.yaml:8",
            "spec.rules[0].filters[0]: type RequestHeaderModifier needs `requestHeaderModifier`",
        ),
        (
            "    - matches: [{path: {type: Exact, value: /a}}]\n      filters:\n        - type: URLRewrite\n          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}\n",
            "routes/r.yaml:10",
            "spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
        ),
        (
            "    - filters:\n        - {type: URLRewrite, urlRewrite: {hostname: x}}\n        - {type: RequestRedirect, requestRedirect: {hostname: y}}\n",
            "routes/r.yaml:8",
            "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be on the same rule",
        ),
        (
            "    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].filters[0].requestRedirect.statusCode: 304 is not a redirect status",
        ),
        (
            "    - backendRefs: [{name: s, port: 80, filters: [{type: RequestRedirect, requestRedirect: {}}]}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].backendRefs[0].filters[0].type: RequestRedirect is not supported on a backend",
        ),
        (
            "    - matches: [{path: {type: Prefix, value: /}}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].matches[0].path.type: \"Prefix\" is not a path match type",
        ),
        (
            "    - matches:\n        - path: {type: RegularExpression, value: \"([\"}\n",
            "routes/r.yaml:8",
            "spec.rules[0].matches[0].path.value: not a regular expression",
        ),
        (
            "    - matches: [{method: FETCH}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].matches[0].method: \"FETCH\" is not one of",
        ),
        (
            "    - backendRefs: [{name: smiley}]\n",
            "routes/r.yaml:7",
            "spec.rules[0].backendRefs[0].port: a Service backend needs its port",
        ),
        (
            "    - backendRef: []\n",
            "routes/r.yaml:7",
            "unknown field `backendRef`",
        ),
    ];
    for (rule, at, says) in cases {
        let err = load_err(&base(rule));
        assert!(err.starts_with(at), "{rule}: {err}");
        assert!(err.contains(says), "{rule}: {err}");
    }
    let gateway = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: faces}
spec:
  parentRefs: [{name: my-gateway}]
";
    let err = load_err(gateway);
    assert!(err.contains("spec.parentRefs[0].kind: a Gateway"), "{err}");
    let tcp = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: t, namespace: faces}\n";
    assert!(load_err(tcp).contains("TCPRoute is not supported yet"));
    let no_ns = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{kind: Service, group: \"\", name: s}]}\n";
    assert!(load_err(no_ns).contains("metadata.namespace is required"));
    let twice = format!("{}---\n{}", base("    - {}\n"), base("    - {}\n"));
    assert!(load_err(&twice).contains("duplicate HTTPRoute faces/r"));
}

/// The first rule of the only route in `text`.
fn first_rule(text: &str) -> RuleRef {
    let table = RouteTable::build(&load_one(text), &services());
    let (m, u, h) = request("GET", "/", &[]);
    match table.route("faces/smiley:80", "faces", &m, &u, &h) {
        Some(Routed::Rule(rule)) => rule,
        other => panic!("{other:?}"),
    }
}

fn route_with(filters: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: faces}}
spec:
  parentRefs: [{{kind: Service, group: \"\", name: smiley}}]
  rules:
    - backendRefs: [{{name: smiley, port: 80}}]
      filters:
{filters}"
    )
}

#[test]
fn header_modifiers_set_add_and_remove() {
    let rule = first_rule(&route_with(
        "        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Set, value: one}]
            add: [{name: x-add, value: two}]
            remove: [x-drop]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served, value: mesh}], remove: [server]}
",
    ));
    let (_, _, h) = request(
        "GET",
        "/",
        &[("x-set", "old"), ("x-add", "first"), ("x-drop", "1")],
    );
    let mut parts = http::Request::builder()
        .uri("/")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    parts.headers = h;
    rule.rule().filters.on_request(&mut parts, None);
    let all = |name: &str| -> Vec<String> {
        parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(all("x-set"), ["one"]);
    assert_eq!(all("x-add"), ["first", "two"]);
    assert!(all("x-drop").is_empty());
    let mut response = HeaderMap::new();
    response.insert("server", HeaderValue::from_static("app"));
    rule.rule().filters.on_response(&mut response);
    assert_eq!(response.get("x-served").unwrap(), "mesh");
    assert!(response.get("server").is_none());
}

/// The Gateway API specification's `ReplacePrefixMatch` table.
#[test]
fn replace_prefix_match_follows_the_specifications_table() {
    let cases = [
        ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo", "/foo/", "/xyz", "/xyz/"),
        ("/foo/", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo/", "/xyz", "/xyz/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "/foo/", "/", "/"),
        ("/foo/", "/foo/bar", "/", "/bar"),
        ("/", "/foo", "/xyz", "/xyz/foo"),
    ];
    for (prefix, path, replacement, want) in cases {
        // As the loader keeps them: without a trailing `/`.
        let prefix = prefix.trim_end_matches('/');
        let modifier = Modifier::ReplacePrefixMatch(replacement.trim_end_matches('/').to_string());
        assert_eq!(
            modifier.apply(path, Some(prefix)),
            want,
            "{prefix} {path} {replacement}"
        );
    }
}

#[test]
fn url_rewrite_changes_path_and_host_and_keeps_the_query() {
    let rule = first_rule(&route_with(
        "        - type: URLRewrite
          urlRewrite:
            hostname: backend.internal
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
",
    ));
    let mut parts = http::Request::builder()
        .uri("/reviews/1?x=1")
        .header("host", "reviews")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    rule.rule()
        .filters
        .on_request(&mut parts, rule.matched_prefix());
    assert_eq!(parts.uri.to_string(), "/v2/reviews/1?x=1");
    assert_eq!(parts.headers.get("host").unwrap(), "backend.internal");
}

#[test]
fn redirects_build_their_location_as_the_specification_says() {
    let redirect = |spec: &str| {
        let rule = first_rule(&route_with(&format!(
            "        - type: RequestRedirect\n          requestRedirect: {spec}\n"
        )));
        let redirect = rule.rule().filters.redirect.clone().unwrap();
        move |uri: &str, host: &str| {
            let (status, location) = redirect.location(&uri.parse().unwrap(), host, Some(""));
            format!("{} {location}", status.as_u16())
        }
    };
    let to_https = redirect("{scheme: https}");
    assert_eq!(to_https("/a?b=1", "web:8080"), "302 https://web/a?b=1");
    let moved = redirect("{hostname: new.example, statusCode: 301}");
    assert_eq!(moved("/a", "web:8080"), "301 http://new.example:8080/a");
    let port = redirect("{port: 9090, path: {type: ReplaceFullPath, replaceFullPath: /login}}");
    assert_eq!(port("/a?x", "web"), "302 http://web:9090/login?x");
    let default_port = redirect("{scheme: http, port: 80}");
    assert_eq!(default_port("/", "web:8080"), "302 http://web/");
}

#[test]
fn mirrors_load_with_their_share_and_bad_shares_are_named() {
    let rule = first_rule(&route_with(
        "        - type: RequestMirror
          requestMirror: {backendRef: {name: smiley2, port: 80}, percent: 25}
        - type: RequestMirror
          requestMirror: {backendRef: {name: smiley2, port: 80}, fraction: {numerator: 1, denominator: 3}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: nowhere, port: 80}}
",
    ));
    let mirrors = &rule.rule().filters.mirrors;
    assert_eq!(mirrors.len(), 3);
    let mut rng = SplitMix64::new(3);
    let n = 30_000;
    let quarter = (0..n)
        .filter(|_| mirrors[0].samples(rng.next_u64()))
        .count();
    let third = (0..n)
        .filter(|_| mirrors[1].samples(rng.next_u64()))
        .count();
    let all = (0..n)
        .filter(|_| mirrors[2].samples(rng.next_u64()))
        .count();
    // ± 4σ (σ ≈ 75 and 82).
    assert!((7_500 - 300..=7_500 + 300).contains(&quarter), "{quarter}");
    assert!((10_000 - 330..=10_000 + 330).contains(&third), "{third}");
    assert_eq!(all, n);
    // An unknown mirror Service is reported like a backend.
    let table = RouteTable::build(
        &load_one(&route_with(
            "        - {type: RequestMirror, requestMirror: {backendRef: {name: nowhere, port: 80}}}\n",
        )),
        &services(),
    );
    assert_eq!(
        table.statuses()[0].unresolved_backends,
        ["faces/nowhere:80: no such Service"]
    );
    for (mirror, says) in [
        (
            "{backendRef: {name: s, port: 80}, percent: 101}",
            "requestMirror.percent: 101 is more than 100",
        ),
        (
            "{backendRef: {name: s, port: 80}, percent: 5, fraction: {numerator: 1}}",
            "`percent` and `fraction` are exclusive",
        ),
        (
            "{backendRef: {name: s, port: 80}, fraction: {numerator: 3, denominator: 2}}",
            "3/2 is not a fraction of at most 1",
        ),
        (
            "{backendRef: {name: s}}",
            "requestMirror.backendRef.port: a Service backend needs its port",
        ),
    ] {
        let err = load_err(&route_with(&format!(
            "        - {{type: RequestMirror, requestMirror: {mirror}}}\n"
        )));
        assert!(err.contains(says), "{mirror}: {err}");
    }
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: faces}}
spec:
  hosts: [smiley]
  http:
{http}"
    )
}

#[test]
fn a_virtual_service_keeps_its_order_and_carries_its_fault() {
    let text = vs("  - name: abort
    match:
    - headers: {x-fault: {exact: abort}}
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
    route: [{destination: {host: smiley2}}]
  - name: short-prefix-first
    match: [{uri: {prefix: /api}}]
    timeout: 2s
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 100}}
    route:
    - {destination: {host: smiley.faces.svc.cluster.local, port: {number: 80}}, weight: 80}
    - {destination: {host: smiley2.faces}, weight: 20}
  - name: longer-prefix-later
    match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: smiley2}}]
");
    let table = RouteTable::build(&load_one(&text), &services());
    let at = |uri, headers: &[(&'static str, &str)]| rule_for(&table, "faces", "GET", uri, headers);
    assert_eq!(at("/x", &[("x-fault", "abort")]), "faces/ratings#abort");
    // Istio: the first match wins (no Gateway API ranking), and a prefix
    // is a string prefix.
    assert_eq!(at("/api/v2/x", &[]), "faces/ratings#short-prefix-first");
    assert_eq!(at("/apix", &[]), "faces/ratings#short-prefix-first");
    assert_eq!(at("/other", &[]), "404");
    let routes = load_one(&text);
    let abort = routes[0].rules[0].filters.fault.clone().unwrap();
    let mut rng = SplitMix64::new(11);
    let n = 100_000;
    let aborted = (0..n)
        .filter(|_| abort.abort_for(rng.next_u64()) == Some(http::StatusCode::SERVICE_UNAVAILABLE))
        .count();
    // 50% ± 4σ (σ ≈ 158).
    assert!(
        (50_000 - 632..=50_000 + 632).contains(&aborted),
        "{aborted}"
    );
    assert!(abort.delay_for(rng.next_u64()).is_none());
    let delay = routes[0].rules[1].filters.fault.clone().unwrap();
    assert_eq!(
        delay.delay_for(rng.next_u64()),
        Some(std::time::Duration::from_millis(100))
    );
    assert_eq!(
        routes[0].rules[1].timeouts.request,
        Some(std::time::Duration::from_secs(2))
    );
    // A destination without a port takes the port the request was sent to.
    let same = &routes[0].rules[0].backends[0];
    assert_eq!(same.weight, 100);
    assert_eq!(
        same.backend.key_for(80).as_deref(),
        Some("faces/smiley2:80")
    );
    let weights: Vec<u32> = routes[0].rules[1]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, [80, 20]);
}

/// Istio's fault injection task (ratings, jason, 7 s delay), with the
/// namespace it is applied in: it loads, routing to subset v1.
#[test]
fn the_istio_fault_injection_example_loads_with_its_subset() {
    let docs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
  namespace: default
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
";
    let routes = load_one(docs);
    let backend = &routes[0].rules[0].backends[0].backend;
    assert_eq!(
        backend.key_for(9080).as_deref(),
        Some("default/ratings~v1:9080")
    );
    assert_eq!(
        routes[0].rules[0].filters.fault.as_ref().unwrap().delay,
        Some((std::time::Duration::from_secs(7), 100.0))
    );
    for (http, says) in [
        (
            "  - fault: {abort: {percentage: {value: 10}}}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].fault.abort.httpStatus: an abort needs",
        ),
        (
            "  - fault: {abort: {httpStatus: 503, percentage: {value: 120}}}\n    route: [{destination: {host: smiley}}]\n",
            "120 is not a percentage",
        ),
        (
            "  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: smiley}}]\n",
            "exactly one of `exact`, `prefix`, `regex`",
        ),
        (
            "  - route: [{destination: {host: \"*.example.com\"}}]\n",
            "is not a mesh Service's name",
        ),
    ] {
        let err = load_err(&vs(http));
        assert!(err.contains(says), "{http}: {err}");
    }
    let gateway = vs("  - route: [{destination: {host: smiley}}]\n").replace(
        "  hosts: [smiley]\n",
        "  hosts: [smiley]\n  gateways: [my-gateway]\n",
    );
    assert!(load_err(&gateway).contains("only `mesh` is served"));
}

/// Istio's circuit-breaking task's DestinationRule, with the namespace it is
/// applied in, loads whole.
#[test]
fn destination_rules_set_the_pool_and_ejection_of_their_service() {
    let docs = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
  namespace: faces
spec:
  host: smiley
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";
    let text = docs;
    let loaded = load([("routes/r.yaml", text)]).unwrap();
    let rule = &loaded.destination_rules[0];
    assert_eq!(rule.policy.max_in_flight(), Some(2));
    let (applied, unresolved) = apply_destination_rules(&services(), &loaded.destination_rules);
    assert!(unresolved.is_empty());
    let smiley = applied.iter().find(|s| s.name == "smiley").unwrap();
    assert_eq!(smiley.max_requests_in_flight, Some(2));
    assert_eq!(
        smiley.max_requests_per_connection,
        std::num::NonZeroU32::new(1)
    );
    assert_eq!(smiley.outlier_detection.consecutive_failures, 1);
    assert_eq!(
        smiley.outlier_detection.base_ejection_time,
        std::time::Duration::from_secs(180)
    );
    assert_eq!(smiley.outlier_detection.max_ejection_percent, 100);
    let other = applied.iter().find(|s| s.name == "smiley2").unwrap();
    assert_eq!(other.max_requests_in_flight, None);
    // http2MaxRequests bounds alone; with both, the smaller.
    let h2 = TrafficPolicy {
        http2_max_requests: Some(5),
        ..TrafficPolicy::default()
    };
    assert_eq!(h2.max_in_flight(), Some(5));
    let both = TrafficPolicy {
        max_connections: Some(10),
        http1_max_pending_requests: Some(10),
        http2_max_requests: Some(7),
        ..TrafficPolicy::default()
    };
    assert_eq!(both.max_in_flight(), Some(7));
    // Without maxConnections nothing ever waits for a connection.
    let pending_only = TrafficPolicy {
        http1_max_pending_requests: Some(1),
        ..TrafficPolicy::default()
    };
    assert_eq!(pending_only.max_in_flight(), None);
    // A Service not known: reported.
    let nowhere = text.replace("host: smiley", "host: nowhere");
    let loaded = load([("routes/r.yaml", nowhere.as_str())]).unwrap();
    let (_, unresolved) = apply_destination_rules(&services(), &loaded.destination_rules);
    assert_eq!(unresolved[0].route, "DestinationRule faces/httpbin");
    for (policy, says) in [
        (
            "    loadBalancer: {simple: PASSTHROUGH}\n",
            "spec.trafficPolicy.loadBalancer.simple: \"PASSTHROUGH\" is not supported",
        ),
        (
            "    loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}\n",
            "`simple` and `consistentHash` are exclusive",
        ),
        (
            "    loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: 0s, attributes: [{name: SameSite, value: Strict}]}}}\n",
            "consistentHash.httpCookie.attributes: not supported yet",
        ),
        (
            "    loadBalancer: {consistentHash: {httpCookie: {name: \"a;b\"}}}\n",
            "is not a cookie name",
        ),
        (
            "    loadBalancer: {consistentHash: {}}\n",
            "exactly one of `httpHeaderName`, `httpCookie`, `httpQueryParameterName` and `useSourceIp: true`",
        ),
        (
            "    loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}\n",
            "exactly one of",
        ),
        (
            "    loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 1024}, useSourceIp: true}}\n",
            "consistentHash.ringHash: not supported yet",
        ),
        ("    tls: {mode: SIMPLE}\n", "only ISTIO_MUTUAL"),
        (
            "    outlierDetection: {maxEjectionPercent: 120}\n",
            "120 is more than 100",
        ),
        (
            "    connectionPool: {tcp: {connectTimeout: soon}}\n",
            "connectTimeout: \"soon\"",
        ),
    ] {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: faces}}\nspec:\n  host: smiley\n  trafficPolicy:\n{policy}"
        );
        let err = load_err(&text);
        assert!(err.contains(says), "{policy}: {err}");
    }
    let hash = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: faces}\nspec:\n  host: smiley\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: X-User}}\n";
    let loaded = load([("routes/r.yaml", hash)]).unwrap();
    let (applied, _) = apply_destination_rules(&services(), &loaded.destination_rules);
    let smiley = applied.iter().find(|s| s.name == "smiley").unwrap();
    assert_eq!(
        smiley.hash_by,
        Some(crate::config::HashKey::Header("x-user".into()))
    );
    for (hash, expected) in [
        (
            "{httpCookie: {name: session, path: /shop, ttl: 0s}}",
            crate::config::HashKey::Cookie {
                name: "session".into(),
                path: Some("/shop".into()),
                ttl: Some(std::time::Duration::ZERO),
            },
        ),
        (
            "{httpCookie: {name: session}}",
            crate::config::HashKey::Cookie {
                name: "session".into(),
                path: None,
                ttl: None,
            },
        ),
        (
            "{httpQueryParameterName: user}",
            crate::config::HashKey::QueryParameter("user".into()),
        ),
    ] {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: faces}}\nspec:\n  host: smiley\n  trafficPolicy:\n    loadBalancer: {{consistentHash: {hash}}}\n"
        );
        let loaded = load([("routes/r.yaml", text.as_str())]).unwrap();
        let (applied, _) = apply_destination_rules(&services(), &loaded.destination_rules);
        let smiley = applied.iter().find(|s| s.name == "smiley").unwrap();
        assert_eq!(smiley.hash_by.as_ref(), Some(&expected), "{hash}");
    }
    let retries = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: faces}\nspec:\n  host: smiley\n  trafficPolicy:\n    connectionPool: {http: {maxRetries: 3, maxRequestsPerConnection: 0}}\n";
    let loaded = load([("routes/r.yaml", retries)]).unwrap();
    let (applied, _) = apply_destination_rules(&services(), &loaded.destination_rules);
    let smiley = applied.iter().find(|s| s.name == "smiley").unwrap();
    assert_eq!(smiley.max_retries_in_flight, Some(3));
    assert_eq!(smiley.max_requests_per_connection, None, "0 is unlimited");
    let tls = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: faces}\nspec:\n  host: smiley\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n";
    assert!(load([("routes/r.yaml", tls)]).is_ok());
}

#[test]
fn grpc_routes_match_service_and_method_on_the_path() {
    let text = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: faces}
spec:
  parentRefs: [{group: \"\", kind: Service, name: smiley, port: 80}]
  rules:
  - name: login
    matches: [{method: {service: com.example.User, method: Login}}]
    backendRefs: [{name: smiley2, port: 80}]
  - name: user
    matches: [{method: {service: com.example.User}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-grpc, value: user}]}}
    backendRefs: [{name: smiley, port: 80}]
  - name: any-health
    matches:
    - method: {type: RegularExpression, service: \"grpc\\\\.health\\\\.v1\\\\..*\", method: \"Check|Watch\"}
      headers: [{name: x-env, value: prod}]
    backendRefs: [{name: smiley, port: 80}]
  - name: echo-anywhere
    matches: [{method: {method: Echo}}]
    backendRefs: [{name: smiley, port: 80}]
";
    let table = RouteTable::build(&load_one(text), &services());
    let at =
        |path, headers: &[(&'static str, &str)]| rule_for(&table, "faces", "POST", path, headers);
    assert_eq!(at("/com.example.User/Login", &[]), "faces/grpc#login");
    assert_eq!(at("/com.example.User/Logout", &[]), "faces/grpc#user");
    assert_eq!(at("/com.example.UserX/Login", &[]), "404");
    assert_eq!(
        at("/grpc.health.v1.Health/Check", &[("x-env", "prod")]),
        "faces/grpc#any-health"
    );
    assert_eq!(at("/grpc.health.v1.Health/Check", &[]), "404");
    assert_eq!(at("/a.B/Echo", &[]), "faces/grpc#echo-anywhere");
    assert_eq!(at("/a.B/Echo2", &[]), "404");
    for (rule, says) in [
        (
            "  - matches: [{method: {type: Exact}}]\n",
            "spec.rules[0].matches[0].method: one of `service` and `method` is required",
        ),
        (
            "  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
            "URLRewrite is not a GRPCRoute filter",
        ),
        (
            "  - matches: [{method: {service: a/b}}]\n",
            "is not a gRPC service name",
        ),
    ] {
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: faces}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: smiley}}]\n  rules:\n{rule}"
        );
        let err = load_err(&text);
        assert!(err.contains(says), "{rule}: {err}");
    }
    // The Gateway API documentation's GRPCRoute has a Gateway parent: named.
    let docs = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: foo-route
  namespace: default
spec:
  parentRefs:
  - name: example-gateway
  hostnames:
  - \"foo.example.com\"
  rules:
  - matches:
    - method:
        service: com.example.User
        method: Login
    backendRefs:
    - name: foo-svc
      port: 50051
";
    let err = load_err(docs);
    assert!(
        err.contains("not supported yet on a route whose parents are Services")
            || err.contains("a Gateway"),
        "{err}"
    );
}

#[test]
fn a_rules_retry_has_its_codes_attempts_and_backoff() {
    let text = route_with("        []\n").replace(
        "      filters:\n        []\n",
        "      retry: {codes: [500, 503], attempts: 3, backoff: 100ms}\n",
    );
    let routes = load_one(&text);
    assert_eq!(
        routes[0].rules[0].retry,
        Some(RetryPolicy {
            codes: vec![500, 503],
            attempts: 3,
            backoff: std::time::Duration::from_millis(100),
        })
    );
    let one = route_with("        []\n").replace(
        "      filters:\n        []\n",
        "      retry: {codes: [502]}\n",
    );
    assert_eq!(
        load_one(&one)[0].rules[0].retry.as_ref().unwrap().attempts,
        1
    );
}

#[test]
fn a_virtual_service_mirrors_retries_and_changes_headers() {
    let routes = load_one(&vs("  - name: all
    headers:
      request: {set: {x-env: prod}, add: {x-via: mesh}, remove: [x-debug]}
      response: {set: {x-served: mesh}}
    mirror: {host: smiley2}
    mirrorPercentage: {value: 50.0}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,connect-failure,429\"}
    route: [{destination: {host: smiley}}]
"));
    let rule = &routes[0].rules[0];
    assert_eq!(
        rule.retry,
        Some(RetryPolicy {
            codes: vec![429, 502, 503, 504],
            attempts: 3,
            backoff: std::time::Duration::from_millis(25),
        })
    );
    assert_eq!(
        rule.timeouts.backend_request,
        Some(std::time::Duration::from_secs(2))
    );
    let mirror = &rule.filters.mirrors[0];
    assert_eq!(
        mirror.backend.key_for(80).as_deref(),
        Some("faces/smiley2:80")
    );
    let mut rng = SplitMix64::new(5);
    let n = 20_000;
    let copied = (0..n).filter(|_| mirror.samples(rng.next_u64())).count();
    assert!((10_000 - 283..=10_000 + 283).contains(&copied), "{copied}");
    let mut parts = http::Request::builder()
        .uri("/")
        .header("x-debug", "1")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    rule.filters.on_request(&mut parts, None);
    assert_eq!(parts.headers["x-env"], "prod");
    assert_eq!(parts.headers["x-via"], "mesh");
    assert!(parts.headers.get("x-debug").is_none());
    // Istio's defaults: 2 attempts, 503.
    let defaults = load_one(&vs(
        "  - retries: {}\n    route: [{destination: {host: smiley}}]\n",
    ));
    let retry = defaults[0].rules[0].retry.clone().unwrap();
    assert_eq!((retry.attempts, retry.codes), (2, vec![503]));
    for (http, says) in [
        (
            "  - retries: {retryOn: bogus}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].retries.retryOn: \"bogus\" is not supported yet",
        ),
        (
            "  - mirrorPercentage: {value: 5}\n    route: [{destination: {host: smiley}}]\n",
            "a mirror percentage needs a `mirror`",
        ),
    ] {
        let err = load_err(&vs(http));
        assert!(err.contains(says), "{http}: {err}");
    }
}

/// Istio's Bookinfo `destination-rule-reviews.yaml` (subsets v1, v2, v3 by
/// the `version` label, a RANDOM balancer with v2 ROUND_ROBIN), unchanged
/// but for its namespace: each subset is a backend of its own, of the
/// endpoints with its labels, with the rule's policy and the subset's own
/// components in place of the rule's.
#[test]
fn destination_rule_subsets_are_backends_of_their_labelled_endpoints() {
    let rule = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: faces
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
    connectionPool:
      tcp: {maxConnections: 10}
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
    trafficPolicy:
      connectionPool:
        tcp: {connectTimeout: 2s}
";
    let mut reviews = service("faces", "reviews", "http");
    reviews.endpoints = ["v1", "v2", "v2", "v3"]
        .iter()
        .enumerate()
        .map(|(i, version)| crate::config::EndpointConfig {
            name: format!("reviews-{version}-{i}"),
            address: format!("10.1.0.{}", i + 1).parse().unwrap(),
            node: "n2".into(),
            zone: None,
            weight: 1,
            labels: [("version".to_string(), version.to_string())].into(),
            service_account: Some("reviews".into()),
            namespace: None,
        })
        .collect();
    let loaded = load([("routes/r.yaml", rule)]).unwrap();
    let (applied, unresolved) =
        apply_destination_rules(&[reviews.clone()], &loaded.destination_rules);
    assert!(unresolved.is_empty());
    let by_subset = |subset: Option<&str>| {
        applied
            .iter()
            .find(|s| s.subset.as_deref() == subset)
            .unwrap_or_else(|| panic!("{subset:?}"))
    };
    use crate::balance::Choice;
    let whole = by_subset(None);
    assert_eq!(whole.endpoints.len(), 4);
    assert_eq!(whole.choice, Choice::Random);
    assert_eq!(
        whole.max_requests_in_flight,
        Some(10u32.saturating_add(u32::MAX))
    );
    for (subset, endpoints, choice) in [
        ("v1", 1, Choice::Random),
        ("v2", 2, Choice::RoundRobin),
        ("v3", 1, Choice::Random),
    ] {
        let part = by_subset(Some(subset));
        assert_eq!(part.endpoints.len(), endpoints, "{subset}");
        assert!(
            part.endpoints.iter().all(|e| e.labels["version"] == subset),
            "{subset}"
        );
        assert!(part.vips.is_empty(), "reached only by routes");
        assert_eq!(part.choice, choice, "{subset}");
        assert_eq!(part.port_key(80), format!("faces/reviews~{subset}:80"));
    }
    // v3's connectionPool replaces the rule's whole: no maxConnections.
    assert_eq!(by_subset(Some("v3")).max_requests_in_flight, None);
    assert_eq!(
        by_subset(Some("v3")).connect_timeout,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(
        by_subset(Some("v1")).max_requests_in_flight,
        whole.max_requests_in_flight
    );

    // A VirtualService naming the subsets: v1 and v3 resolve, v4 is named
    // as not defined.
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: faces}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v3, port: {number: 80}}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v4}, weight: 10}
";
    let routes = load_one(vs);
    let table = RouteTable::build(&routes, &applied);
    let status = &table.statuses()[0];
    assert!(status.parents[0].accepted, "{status:?}");
    assert_eq!(
        status.unresolved_backends,
        ["faces/reviews: no subset \"v4\" (no DestinationRule of the Service defines it)"]
    );
    let (m, u, h) = request("GET", "/", &[("end-user", "jason")]);
    let Some(Routed::Rule(chosen)) = table.route("faces/reviews:80", "faces", &m, &u, &h) else {
        panic!("routed");
    };
    assert_eq!(
        chosen.rule().backends[0].backend.key_for(80).as_deref(),
        Some("faces/reviews~v3:80")
    );
    for (bad, says) in [
        (
            "  - name: v1\n    labels: {version: v9}\n",
            "subset \"v1\" is defined twice",
        ),
        ("  - name: \"\"\n", "\"\" is not a subset's name"),
        (
            "  - name: v9\n    trafficPolicy: {portLevelSettings: []}\n",
            "spec.subsets[3].trafficPolicy.portLevelSettings: not supported yet",
        ),
    ] {
        let err = load_err(&format!("{rule}{bad}"));
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// Istio's VirtualService reference examples: `rewrite` (the matched
/// prefix replaced), `redirect` (path and authority, 301), `mirrors` (two,
/// with percentages); what is not served is named.
#[test]
fn a_virtual_service_rewrites_redirects_and_mirrors_to_several() {
    let routed = |text: &str, path: &str| {
        let table = RouteTable::build(&load_one(text), &services());
        let (m, u, h) = request("GET", path, &[]);
        match table.route("faces/smiley:80", "faces", &m, &u, &h) {
            Some(Routed::Rule(rule)) => rule,
            other => panic!("{other:?}"),
        }
    };
    let rewritten = |text: &str, path: &str| {
        let rule = routed(text, path);
        let mut parts = http::Request::get(path)
            .header("host", "smiley")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        rule.rule()
            .filters
            .on_request(&mut parts, rule.matched_prefix());
        (parts.uri.to_string(), parts.headers["host"].clone())
    };
    let rewrite = vs("  - match: [{uri: {prefix: /ratings}}]
    rewrite: {uri: /v1/bookRatings}
    route: [{destination: {host: smiley}}]
  - match: [{uri: {exact: /old}}]
    rewrite: {uri: /new, authority: smiley2.faces}
    route: [{destination: {host: smiley}}]
  - rewrite: {uri: /v2}
    route: [{destination: {host: smiley}}]
");
    assert_eq!(
        rewritten(&rewrite, "/ratings/123?x=1").0,
        "/v1/bookRatings/123?x=1"
    );
    let (uri, host) = rewritten(&rewrite, "/old");
    assert_eq!(
        (uri.as_str(), host.to_str().unwrap()),
        ("/new", "smiley2.faces")
    );
    // No match is Istio's prefix `/`: replaced as a prefix.
    assert_eq!(rewritten(&rewrite, "/x").0, "/v2x");

    let redirect = vs("  - match: [{uri: {exact: /v1/getProductRatings}}]
    redirect: {uri: /v1/bookRatings, authority: newratings.default.svc.cluster.local}
");
    let rule = routed(&redirect, "/v1/getProductRatings");
    let (status, location) = rule.rule().filters.redirect.as_ref().unwrap().location(
        &"/v1/getProductRatings".parse().unwrap(),
        "smiley",
        rule.matched_prefix(),
    );
    assert_eq!(status, 301);
    assert_eq!(
        location,
        "http://newratings.default.svc.cluster.local/v1/bookRatings"
    );

    let mirrors = vs("  - route: [{destination: {host: smiley}}]
    mirrors:
    - destination: {host: smiley2, port: {number: 80}}
      percentage: {value: 50}
    - destination: {host: smiley2, port: {number: 80}, subset: v2}
");
    let rule = first_rule(&mirrors);
    let shares: Vec<(u32, u32, Option<&str>)> = rule
        .rule()
        .filters
        .mirrors
        .iter()
        .map(|m| (m.numerator, m.denominator, m.backend.service_port_key()))
        .collect();
    assert_eq!(
        shares,
        [
            (500_000, 1_000_000, Some("faces/smiley2:80")),
            (1_000_000, 1_000_000, Some("faces/smiley2~v2:80")),
        ]
    );

    for (http, says) in [
        (
            "  - redirect: {uri: /a}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].redirect: a redirect is answered by the agent",
        ),
        (
            "  - redirect: {uri: /a, redirectCode: 200}\n",
            "spec.http[0].redirect.redirectCode: 200 is not a redirect status",
        ),
        (
            "  - redirect: {derivePort: FROM_REQUEST_PORT}\n",
            "spec.http[0].redirect.derivePort: not supported yet",
        ),
        (
            "  - rewrite: {uriRegexRewrite: {match: a, rewrite: b}}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].rewrite.uriRegexRewrite: not supported yet",
        ),
        (
            "  - rewrite: {uri: v1}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].rewrite.uri: \"v1\" does not start with `/`",
        ),
        (
            "  - corsPolicy: {allowOrigins: [{exact: a}]}\n    route: [{destination: {host: smiley}}]\n",
            "spec.http[0].corsPolicy: not supported yet",
        ),
    ] {
        let err = load_err(&vs(http));
        assert!(err.contains(says), "{http}: {err}");
    }
}
