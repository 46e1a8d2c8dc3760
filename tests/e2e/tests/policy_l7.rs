//! HTTP authorization (L7) by the destination's agent: every request decided on
//! its own with real clients (curl, HTTP/1.1 and HTTP/2), denied ones answered
//! 403 `RBAC: access denied` on a connection that stays usable, path tricks
//! normalised before matching, gRPC-style trailers intact.

use std::{convert::Infallible, time::Duration};

use hyper::{
    Request, Response,
    body::{Bytes, Frame, Incoming},
    service::service_fn,
};
use mesh_e2e::mesh::{TestCa, node_issuers, start_mesh};
use mesh_testbed::{Pod, Topology, e2e_enabled, wait_until};

const HTTP1: u16 = 8080;
const HTTP2: u16 = 8081;

const C_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-allow-a, namespace: default}
spec:
  selector: {matchLabels: {app: c}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/a"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/public/*", "/grpc.Echo/*"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/a"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/submit"]}}]
    when: [{key: "request.headers[x-token]", values: ["secret"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: c}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/public/admin", "/public/admin/*"]}}]
"#;

const B_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-no-delete-from-default, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {namespaces: ["default"]}}]
    to: [{operation: {methods: ["DELETE"]}}]
"#;

/// An HTTP/1.1 server (`pod-tool http-server`) answering `ok <method> <path>`
/// to everything.
fn start_http1_server(pod: &Pod) -> mesh_testbed::Process {
    let p = pod
        .spawn_tool(&["http-server", &format!("0.0.0.0:{HTTP1}")])
        .unwrap();
    wait_until("the HTTP server", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("ready"))
    })
    .unwrap();
    p
}

/// An HTTP/2 (h2c) server in `pod`'s namespace, run by this test process:
/// echoes the path and ends every response with gRPC-style trailers.
fn start_h2_server(pod: &Pod) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = pod.netns_path();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", HTTP2))
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let body = format!("h2 {} {}", req.method(), req.uri().path());
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let body = WithTrailers {
                            data: Some(Bytes::from(body)),
                            trailers: Some(trailers),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

/// A response body: one data frame, then trailers (as gRPC ends a call).
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(data))));
        }
        std::task::Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// curl from `pod`; returns stdout (with `-w` status codes) and stderr.
fn curl(pod: &Pod, args: &[&str]) -> (String, String) {
    let mut all = vec!["-s", "--max-time", "10", "--path-as-is"];
    all.extend_from_slice(args);
    let out = pod
        .spawn("curl", &all)
        .unwrap()
        .wait_with_deadline(Duration::from_secs(20))
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Status codes of one curl run over several URLs (one connection, keep-alive).
fn statuses(pod: &Pod, base: &str, paths: &[&str], extra: &[&str]) -> Vec<String> {
    let urls: Vec<String> = paths.iter().map(|p| format!("{base}{p}")).collect();
    let mut args: Vec<&str> = vec!["-w", "%{http_code}\\n"];
    args.extend_from_slice(extra);
    for url in &urls {
        // curl's -o applies to one URL: one per URL.
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    curl(pod, &args).0.lines().map(str::to_string).collect()
}

#[test]
fn every_http_request_is_authorized_on_its_own() {
    if !e2e_enabled("every_http_request_is_authorized_on_its_own") {
        return;
    }
    let topo = Topology::builder("policy_l7")
        .node("n1", &["a", "b", "outsider"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, b, c, outsider) = (
        topo.pod("a"),
        topo.pod("b"),
        topo.pod("c"),
        topo.pod("outsider"),
    );
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _http = [start_http1_server(b), start_http1_server(c)];
    start_h2_server(c);
    for (agent, file, policy) in [
        (&agents[1], "policies/c.yaml", C_POLICIES),
        (&agents[0], "policies/b.yaml", B_POLICIES),
    ] {
        let generation = agent.status().unwrap().config_generation;
        agent.write_file(file, policy).unwrap();
        agent.wait_generation_after(generation).unwrap();
    }
    let c1 = format!("http://{}:{HTTP1}", c.ipv4());

    // One connection, allowed and denied requests interleaved: each decided on
    // its own, the connection stays usable after a 403.
    assert_eq!(
        statuses(a, &c1, &["/public/x", "/private", "/public/y"], &[]),
        ["200", "403", "200"]
    );
    let (body, _) = curl(a, &[&format!("{c1}/private")]);
    assert_eq!(body, "RBAC: access denied");
    // Method and header conditions.
    assert_eq!(
        statuses(
            a,
            &c1,
            &["/submit"],
            &["-X", "POST", "-d", "x", "-H", "x-token: secret"]
        ),
        ["200"]
    );
    assert_eq!(
        statuses(
            a,
            &c1,
            &["/submit"],
            &["-X", "POST", "-d", "x", "-H", "x-token: guess"]
        ),
        ["403"]
    );
    assert_eq!(statuses(a, &c1, &["/public/x"], &["-X", "DELETE"]), ["403"]);
    // Path tricks cannot reach the denied /public/admin: normalised first, or refused.
    for (path, expected) in [
        ("/public/admin", "403"),
        ("//public/admin", "403"),
        ("/public/x/../admin", "403"),
        ("/public/%61dmin", "403"),
        ("/public/./admin/", "403"),
        ("/public/admin%2Fx", "400"),
        ("/public/admin%5cx", "400"),
    ] {
        assert_eq!(statuses(a, &c1, &[path], &[]), [expected], "{path}");
    }
    // The request that reached the app is the normalised one.
    let (body, _) = curl(a, &[&format!("{c1}/public//a/./b/../c?q=1")]);
    assert_eq!(body, "ok GET /public/a/c?q=1");

    // HTTP/2 (prior knowledge), gRPC-style: trailers intact end to end.
    let c2 = format!("http://{}:{HTTP2}", c.ipv4());
    let (body, verbose) = curl(
        a,
        &[
            "--http2-prior-knowledge",
            "-v",
            &format!("{c2}/grpc.Echo/Say"),
        ],
    );
    assert_eq!(body, "h2 GET /grpc.Echo/Say", "{verbose}");
    assert!(
        verbose.contains("grpc-status: 0"),
        "trailers lost:\n{verbose}"
    );
    assert_eq!(
        statuses(a, &c2, &["/grpc.Other/Say"], &["--http2-prior-knowledge"]),
        ["403"]
    );

    // Another principal (b, proven by mTLS) is not allowed into c either.
    assert_eq!(
        statuses(b, &c1, &["/public/x"], &[]),
        ["403"],
        "principal b"
    );
    // Plaintext from outside the mesh has no principal: nothing allowed into c.
    assert_eq!(statuses(outsider, &c1, &["/public/x"], &[]), ["403"]);
    // Same node: b's policy applies to a's requests, with a's identity from the capture.
    let b1 = format!("http://{}:{HTTP1}", b.ipv4());
    assert_eq!(statuses(a, &b1, &["/anything"], &[]), ["200"]);
    assert_eq!(
        statuses(a, &b1, &["/anything"], &["-X", "DELETE"]),
        ["403"],
        "a is in namespace default"
    );
    // Plaintext has no namespace, so the namespace rule does not match it.
    assert_eq!(
        statuses(outsider, &b1, &["/anything"], &["-X", "DELETE"]),
        ["200"]
    );

    // Each deny is counted with the policy and rule that decided it.
    let decisions = agents[1].status().unwrap().authorization;
    assert!(
        decisions
            .iter()
            .any(|d| d.policy == "default/c-deny-admin rule[0]"
                && d.decision == "deny"
                && d.count >= 5),
        "{decisions:?}"
    );
    assert!(
        agents[1].log().contains("request denied"),
        "{}",
        agents[1].log()
    );
}

const JWT_ISSUER: &str = "https://issuer.test";

/// An ES256 key the test generates: its public JWK set, and tokens it signs.
struct TestIssuer {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

impl TestIssuer {
    fn new() -> Self {
        use base64::Engine as _;
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "test",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]})
        .to_string();
        Self { key, jwks }
    }

    /// A token for `sub` with `groups`, expiring `exp_in` seconds from now
    /// (negative: already expired).
    fn token(&self, sub: &str, groups: &[&str], exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test".into());
        let claims = serde_json::json!({
            "iss": JWT_ISSUER, "sub": sub, "groups": groups, "exp": now + exp_in,
        });
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

#[test]
fn jwt_tokens_are_checked_per_request_and_policies_see_their_claims() {
    if !e2e_enabled("jwt_tokens_are_checked_per_request_and_policies_see_their_claims") {
        return;
    }
    let topo = Topology::builder("policy_jwt")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _http = start_http1_server(c);
    let issuer = TestIssuer::new();
    let impostor = TestIssuer::new();
    let policies = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: c-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: c}}}}
  jwtRules:
  - issuer: "{JWT_ISSUER}"
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: c-require-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: c}}}}
  rules:
  - to: [{{operation: {{paths: ["/public/*"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{JWT_ISSUER}/*"]}}}}]
    to: [{{operation: {{paths: ["/secure/*"]}}}}]
  - to: [{{operation: {{paths: ["/admin/*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: ["admins"]}}]
"#,
        jwks = issuer.jwks
    );
    let generation = agents[1].status().unwrap().config_generation;
    agents[1].write_file("policies/c.yaml", &policies).unwrap();
    agents[1].wait_generation_after(generation).unwrap();

    let c1 = format!("http://{}:{HTTP1}", c.ipv4());
    let bearer = |token: &str| format!("authorization: Bearer {token}");
    let valid = bearer(&issuer.token("alice", &["dev"], 600));
    let admin = bearer(&issuer.token("root", &["dev", "admins"], 600));
    let expired = bearer(&issuer.token("alice", &["dev"], -600));
    let forged = bearer(&impostor.token("alice", &["admins"], 600));
    let cases: [(&str, Option<&str>, &str); 10] = [
        ("/secure/x", Some(&valid), "200"),
        ("/secure/x", Some(&expired), "401"),
        ("/secure/x", Some(&forged), "401"),
        // No token: not rejected by the RequestAuthentication, but the
        // policy wants a request principal.
        ("/secure/x", None, "403"),
        ("/public/x", None, "200"),
        // An invalid token is 401 even where no principal is needed.
        ("/public/x", Some(&expired), "401"),
        ("/admin/x", Some(&admin), "200"),
        ("/admin/x", Some(&valid), "403"),
        ("/admin/x", Some(&forged), "401"),
        ("/other", Some(&valid), "403"),
    ];
    for (path, header, want) in cases {
        let mut extra = vec![];
        if let Some(h) = header {
            extra.extend(["-H", h]);
        }
        assert_eq!(
            statuses(a, &c1, &[path], &extra),
            [want],
            "{path} with {header:?}"
        );
    }
    // The 401 says why in its header, as Envoy does.
    let (_, verbose) = curl(a, &["-v", "-H", &forged, &format!("{c1}/secure/x")]);
    assert!(
        verbose
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer error=\"invalid_token\""),
        "{verbose}"
    );
    // Shown in /config_dump with its keys.
    let (_, dump) = agents[1].get("/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let shown = &dump["requestAuthentications"][0];
    assert_eq!(shown["name"], "c-jwt", "{dump}");
    assert_eq!(shown["jwtRules"][0]["issuer"], JWT_ISSUER, "{dump}");
    assert_eq!(shown["jwtRules"][0]["keys"], 1, "{dump}");
    // Counted, and logged with the reason.
    let decisions = agents[1].status().unwrap().authorization;
    assert!(
        decisions
            .iter()
            .any(|d| d.decision == "unauthenticated" && d.count >= 5),
        "{decisions:?}"
    );
    assert!(
        agents[1].log().contains("invalid JWT"),
        "{}",
        agents[1].log()
    );
}
