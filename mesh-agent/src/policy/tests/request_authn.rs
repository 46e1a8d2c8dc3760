//! RequestAuthentication and JWT: token checks (valid, expired, not yet
//! valid, wrongly signed, wrong audience, unknown issuer, none, not a JWT),
//! token locations and outputs, `requestPrincipals` and `request.auth.*` in
//! AuthorizationPolicy (Istio's semantics, one case each), what is refused
//! at load, and `jwksUri` fetched from a server on loopback. Tokens are
//! signed by keys generated here.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderMap;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::{R, workload};
use crate::policy::{
    CompiledPolicies, DEFAULT_ROOT_NAMESPACE, JwtKeys, RequestAuth, Unauthenticated, load,
};

const ISSUER: &str = "https://issuer.example";

/// An ES256 signing key and its public JWK.
struct Signer {
    key: EncodingKey,
    kid: String,
    jwk: Value,
}

impl Signer {
    fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        Self {
            key,
            kid: kid.to_owned(),
            jwk,
        }
    }

    fn jwks(&self) -> String {
        json!({ "keys": [self.jwk] }).to_string()
    }

    fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({ "iss": ISSUER, "sub": "alice", "exp": now() + 3600 });
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c
}

fn request_authn(name: &str, selector: &str, rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  {selector}\n  jwtRules:\n  - {rule}\n"
    )
}

fn jwks_rule(signer: &Signer, more: &str) -> String {
    format!("{{issuer: {ISSUER:?}, jwks: {:?}{more}}}", signer.jwks())
}

fn compiled(docs: &[String]) -> CompiledPolicies {
    let text = docs.join("---\n");
    load([("ra.yaml", text.as_str())])
        .unwrap_or_else(|e| panic!("did not load: {e}\n{text}"))
        .compile(DEFAULT_ROOT_NAMESPACE)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(http::HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
    }
    map
}

fn check(
    policies: &CompiledPolicies,
    headers: &mut HeaderMap,
    query: Option<&str>,
) -> Result<Option<Arc<RequestAuth>>, Unauthenticated> {
    policies
        .for_workload(&workload("foo", &[("app", "web")]))
        .authenticate(headers, query)
}

fn bearer(token: &str) -> HeaderMap {
    headers(&[("authorization", &format!("Bearer {token}"))])
}

#[test]
fn tokens_are_checked_as_istio_does() {
    let signer = Signer::new("k1");
    let other = Signer::new("k1"); // same kid, another key
    let policies = compiled(&[request_authn(
        "jwt",
        "selector: {matchLabels: {app: web}}",
        &jwks_rule(&signer, ""),
    )]);
    let unknown_issuer = signer.sign(json!({ "iss": "https://elsewhere", "sub": "x" }));
    /// (case, headers, `Ok(principal)` or `Err(part of the 401 reason)`).
    type Case<'a> = (&'a str, Option<HeaderMap>, Result<Option<&'a str>, &'a str>);
    let cases: Vec<Case> = vec![
        ("no token", None, Ok(None)),
        (
            "valid",
            Some(bearer(&signer.sign(claims(json!({}))))),
            Ok(Some("https://issuer.example/alice")),
        ),
        (
            "valid, scheme in lower case",
            Some(headers(&[(
                "authorization",
                &format!("bearer {}", signer.sign(claims(json!({})))),
            )])),
            Ok(Some("https://issuer.example/alice")),
        ),
        (
            "valid without exp (Envoy does not require it)",
            Some(bearer(&signer.sign(json!({ "iss": ISSUER, "sub": "bob" })))),
            Ok(Some("https://issuer.example/bob")),
        ),
        (
            "expired",
            Some(bearer(&signer.sign(claims(json!({ "exp": now() - 3600 }))))),
            Err("ExpiredSignature"),
        ),
        (
            "not yet valid",
            Some(bearer(&signer.sign(claims(json!({ "nbf": now() + 3600 }))))),
            Err("ImmatureSignature"),
        ),
        (
            "signed by another key",
            Some(bearer(&other.sign(claims(json!({}))))),
            Err("InvalidSignature"),
        ),
        (
            "an issuer no rule names: not ours to judge",
            Some(bearer(&unknown_issuer)),
            Ok(None),
        ),
        (
            "not a JWT",
            Some(bearer("abc.def")),
            Err("Header.Payload.Signature"),
        ),
        (
            "another scheme: no token",
            Some(headers(&[(
                "authorization",
                "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
            )])),
            Ok(None),
        ),
    ];
    let mut failures = Vec::new();
    for (name, headers, want) in cases {
        let mut headers = headers.unwrap_or_default();
        let got = check(&policies, &mut headers, None);
        let ok = match (&got, &want) {
            (Ok(auth), Ok(principal)) => auth.as_ref().map(|a| a.principal.as_str()) == *principal,
            (Err(e), Err(part)) => e.0.contains(part),
            _ => false,
        };
        if !ok {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn audiences_are_checked_when_the_rule_names_them() {
    let signer = Signer::new("k1");
    let policies = compiled(&[request_authn(
        "jwt",
        "",
        &jwks_rule(&signer, ", audiences: [bookstore, other]"),
    )]);
    let token = |aud: Value| signer.sign(claims(json!({ "aud": aud })));
    let ok = check(&policies, &mut bearer(&token(json!("bookstore"))), None).unwrap();
    assert_eq!(ok.unwrap().audiences, ["bookstore"]);
    let ok = check(&policies, &mut bearer(&token(json!(["x", "other"]))), None).unwrap();
    assert_eq!(ok.unwrap().audiences, ["x", "other"]);
    let err = check(&policies, &mut bearer(&token(json!("elsewhere"))), None).unwrap_err();
    assert!(err.0.contains("InvalidAudience"), "{err}");
    let err = check(
        &policies,
        &mut bearer(&signer.sign(claims(json!({})))),
        None,
    )
    .unwrap_err();
    assert!(err.0.contains("aud"), "no aud at all: {err}");
}

#[test]
fn locations_and_outputs() {
    let signer = Signer::new("k1");
    let token = signer.sign(claims(
        json!({ "groups": ["dev", "ops"], "team": "core", "level": 3 }),
    ));
    // Default locations: the header is removed (forwardOriginalToken unset).
    let policies = compiled(&[request_authn("jwt", "", &jwks_rule(&signer, ""))]);
    let mut h = bearer(&token);
    assert!(check(&policies, &mut h, None).unwrap().is_some());
    assert!(h.get("authorization").is_none(), "token forwarded: {h:?}");
    // ... and the `access_token` query parameter.
    let query = format!("a=1&access_token={token}");
    assert!(
        check(&policies, &mut HeaderMap::new(), Some(&query))
            .unwrap()
            .is_some()
    );

    // fromHeaders with a prefix, fromParams, fromCookies; outputs.
    let policies = compiled(&[request_authn(
        "jwt",
        "",
        &jwks_rule(
            &signer,
            ", fromHeaders: [{name: x-jwt, prefix: \"Token \"}], fromParams: [jwt], fromCookies: [session], forwardOriginalToken: true, outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{header: x-team, claim: team}, {header: x-level, claim: level}, {header: x-groups, claim: groups}]",
        ),
    )]);
    let mut h = headers(&[("x-jwt", &format!("Token {token}"))]);
    let auth = check(&policies, &mut h, None).unwrap().unwrap();
    assert_eq!(auth.principal, "https://issuer.example/alice");
    assert!(h.get("x-jwt").is_some(), "forwardOriginalToken: kept");
    let payload = h.get("x-jwt-payload").unwrap().to_str().unwrap();
    let decoded: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["team"], "core");
    assert_eq!(h.get("x-team").unwrap(), "core");
    assert_eq!(h.get("x-level").unwrap(), "3");
    assert!(h.get("x-groups").is_none(), "a list claim is not written");
    // The default locations are not looked at once locations are given.
    assert_eq!(check(&policies, &mut bearer(&token), None).unwrap(), None);
    let query = format!("jwt={token}");
    assert!(
        check(&policies, &mut HeaderMap::new(), Some(&query))
            .unwrap()
            .is_some()
    );
    let mut h = headers(&[("cookie", &format!("a=b; session={token}"))]);
    assert!(check(&policies, &mut h, None).unwrap().is_some());
    // A bad token in any location is 401.
    let mut h = headers(&[("x-jwt", "Token not.a.jwt")]);
    assert!(check(&policies, &mut h, None).is_err());
}

#[test]
fn rules_of_the_mesh_namespace_and_workload_combine_and_selectors_narrow() {
    let a = Signer::new("a");
    let b = Signer::new("b");
    let mesh = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: mesh, namespace: istio-system}}\nspec:\n  jwtRules:\n  - {{issuer: mesh-issuer, jwks: {:?}}}\n",
        a.jwks()
    );
    let other_app = request_authn(
        "other",
        "selector: {matchLabels: {app: other}}",
        &format!("{{issuer: other-issuer, jwks: {:?}}}", b.jwks()),
    );
    let policies = compiled(&[mesh, other_app]);
    let token = a.sign(json!({ "iss": "mesh-issuer", "sub": "s" }));
    let auth = check(&policies, &mut bearer(&token), None)
        .unwrap()
        .unwrap();
    assert_eq!(auth.principal, "mesh-issuer/s");
    // `other`'s rule does not apply to app=web: its issuer is unknown here.
    let token = b.sign(json!({ "iss": "other-issuer", "sub": "s" }));
    assert_eq!(check(&policies, &mut bearer(&token), None).unwrap(), None);
    let wp = policies.for_workload(&workload("foo", &[("app", "other")]));
    let auth = wp.authenticate(&mut bearer(&token), None).unwrap().unwrap();
    assert_eq!(auth.principal, "other-issuer/s");
    // A RequestAuthentication makes connections to the workload HTTP-parsed.
    assert!(wp.has_http_rules_on(9999));
    let bar = policies.for_workload(&workload("bar", &[]));
    assert!(
        bar.checks_jwt(),
        "the mesh-wide rule applies in every namespace"
    );
}

fn auth(principal: &str, claims: Value) -> RequestAuth {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(l)) => l
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    RequestAuth {
        principal: principal.to_owned(),
        audiences,
        presenter: claims
            .get("azp")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        claims,
    }
}

/// `requestPrincipals` and `request.auth.*`, one case each: (name, policy
/// rules of an ALLOW policy, the request's JWT, allowed).
#[test]
fn authorization_by_request_principal_and_claims() {
    let alice = || {
        Some(auth(
            "iss/alice",
            json!({ "iss": "iss", "sub": "alice", "aud": ["a1", "a2"], "azp": "web-app", "groups": ["dev", "ops"], "org": { "unit": "payments" }, "tier": "gold" }),
        ))
    };
    type Case = (&'static str, &'static str, Option<RequestAuth>, bool);
    let cases: Vec<Case> = vec![
        (
            "requestPrincipals [*] with a token",
            "[{from: [{source: {requestPrincipals: ['*']}}]}]",
            alice(),
            true,
        ),
        (
            "requestPrincipals [*] without a token",
            "[{from: [{source: {requestPrincipals: ['*']}}]}]",
            None,
            false,
        ),
        (
            "requestPrincipals exact",
            "[{from: [{source: {requestPrincipals: ['iss/alice']}}]}]",
            alice(),
            true,
        ),
        (
            "requestPrincipals other",
            "[{from: [{source: {requestPrincipals: ['iss/bob']}}]}]",
            alice(),
            false,
        ),
        (
            "requestPrincipals prefix",
            "[{from: [{source: {requestPrincipals: ['iss/*']}}]}]",
            alice(),
            true,
        ),
        (
            "notRequestPrincipals [*] without a token",
            "[{from: [{source: {notRequestPrincipals: ['*']}}]}]",
            None,
            true,
        ),
        (
            "notRequestPrincipals [*] with a token",
            "[{from: [{source: {notRequestPrincipals: ['*']}}]}]",
            alice(),
            false,
        ),
        (
            "request.auth.principal",
            "[{when: [{key: request.auth.principal, values: ['iss/alice']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.audiences: one of a list",
            "[{when: [{key: request.auth.audiences, values: ['a2']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.audiences: none",
            "[{when: [{key: request.auth.audiences, values: ['a3']}]}]",
            alice(),
            false,
        ),
        (
            "request.auth.presenter",
            "[{when: [{key: request.auth.presenter, values: ['web-*']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.claims, a list claim",
            "[{when: [{key: 'request.auth.claims[groups]', values: ['ops']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.claims, notValues over a list",
            "[{when: [{key: 'request.auth.claims[groups]', notValues: ['ops']}]}]",
            alice(),
            false,
        ),
        (
            "request.auth.claims, a string claim",
            "[{when: [{key: 'request.auth.claims[tier]', values: ['gold']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.claims, nested",
            "[{when: [{key: 'request.auth.claims[org][unit]', values: ['payments']}]}]",
            alice(),
            true,
        ),
        (
            "request.auth.claims, missing claim",
            "[{when: [{key: 'request.auth.claims[nope]', values: ['x']}]}]",
            alice(),
            false,
        ),
        (
            "request.auth.claims without a token",
            "[{when: [{key: 'request.auth.claims[groups]', values: ['ops']}]}]",
            None,
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (name, rules, token, want) in cases {
        let policies = super::compile(
            &format!(
                "metadata: {{name: p, namespace: foo}}\nspec: {{action: ALLOW, rules: {rules}}}"
            ),
            DEFAULT_ROOT_NAMESPACE,
        );
        let mut r = R::default();
        r.http().auth = token;
        let got = r
            .decide_with(&policies.for_workload(&workload("foo", &[])))
            .is_allow();
        if got != want {
            failures.push(format!("{name}: want allowed={want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn on_plain_tcp_jwt_fields_follow_istio_tcp_rules() {
    // ALLOW with requestPrincipals cannot match TCP; DENY ignores it.
    let allow = super::compile(
        "metadata: {name: p, namespace: foo}\nspec: {action: ALLOW, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}",
        DEFAULT_ROOT_NAMESPACE,
    );
    let tcp = R {
        http: None,
        ..R::default()
    };
    assert!(
        !tcp.decide_with(&allow.for_workload(&workload("foo", &[])))
            .is_allow()
    );
    let deny = super::compile(
        "metadata: {name: p, namespace: foo}\nspec: {action: DENY, rules: [{when: [{key: 'request.auth.claims[groups]', values: ['x']}]}]}",
        DEFAULT_ROOT_NAMESPACE,
    );
    assert!(
        !tcp.decide_with(&deny.for_workload(&workload("foo", &[])))
            .is_allow()
    );
}

#[test]
fn what_is_refused_at_load() {
    let signer = Signer::new("k1");
    let jwks = signer.jwks();
    for (rule, want) in [
        (
            "{jwks: '{}'}".to_string(),
            "field spec.jwtRules[0].issuer: a JWT rule needs an `issuer`",
        ),
        (
            "{issuer: i}".to_string(),
            "field spec.jwtRules[0].jwksUri: a JWT rule needs `jwks` or `jwksUri`",
        ),
        (
            format!("{{issuer: i, jwks: {jwks:?}, jwksUri: 'http://127.0.0.1:9/k'}}"),
            "field spec.jwtRules[0].jwks: set `jwks` or `jwksUri`, not both",
        ),
        (
            "{issuer: i, jwks: 'not json'}".to_string(),
            "field spec.jwtRules[0].jwks: not a JSON Web Key Set",
        ),
        (
            "{issuer: i, jwksUri: 'ftp://x/k'}".to_string(),
            "field spec.jwtRules[0].jwksUri: \"ftp://x/k\": expected an http or https URI",
        ),
        (
            format!("{{issuer: i, jwks: {jwks:?}, fromHeaders: [{{name: 'bad header'}}]}}"),
            "field spec.jwtRules[0].fromHeaders: \"bad header\" is not a header name",
        ),
        (
            format!("{{issuer: i, jwks: {jwks:?}, timeout: soon}}"),
            "field spec.jwtRules[0].timeout: \"soon\" is not a duration",
        ),
        (
            format!("{{issuer: i, jwks: {jwks:?}, issuers: [x]}}"),
            "unknown field `issuers`",
        ),
    ] {
        let text = request_authn("r", "", &rule);
        match load([("ra.yaml", text.as_str())]) {
            Err(e) => assert!(
                e.to_string().contains(want),
                "{rule}:\n got {e}\nwant {want}"
            ),
            Ok(_) => panic!("{rule}: loaded"),
        }
    }
    let text = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: foo}\nspec:\n  targetRefs: [{kind: Service, group: '', name: web}]\n";
    let e = load([("ra.yaml", text)]).unwrap_err().to_string();
    assert!(
        e.contains("ra.yaml:5") && e.contains("`targetRefs` is not supported"),
        "{e}"
    );
}

#[test]
fn istio_documented_example_loads_and_is_enforced() {
    // From istio.io's RequestAuthentication reference (jwks inline, with
    // our generated key in place of theirs), and its companion policy.
    let signer = Signer::new("k1");
    let text = format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: "issuer-foo"
    jwks: '{}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  rules:
  - from:
    - source:
        requestPrincipals: ["issuer-foo/*"]
"#,
        signer.jwks()
    );
    let policies = load([("ex.yaml", text.as_str())])
        .unwrap()
        .compile(DEFAULT_ROOT_NAMESPACE);
    let wp = policies.for_workload(&workload("foo", &[("app", "httpbin")]));
    let token = signer.sign(json!({ "iss": "issuer-foo", "sub": "carol", "exp": now() + 60 }));
    let auth = wp.authenticate(&mut bearer(&token), None).unwrap();
    let mut r = R::default();
    r.http().auth = auth.map(|a| (*a).clone());
    assert!(r.decide_with(&wp).is_allow());
    r.http().auth = None;
    assert!(
        !r.decide_with(&wp).is_allow(),
        "no token: 403 by the policy"
    );
}

#[test]
fn jwks_uri_is_fetched_from_a_server_on_loopback() {
    let signer = Signer::new("k1");
    let body = signer.jwks();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Serves the key set to every request, for the test's lifetime.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    crate::policy::start_fetching_jwks();
    let policies = compiled(&[request_authn(
        "jwt",
        "",
        &format!("{{issuer: {ISSUER:?}, jwksUri: 'http://{addr}/jwks.json'}}"),
    )]);
    let wp = policies.for_workload(&workload("foo", &[]));
    let remote = match &wp.inner.jwt_rules[0].keys {
        JwtKeys::Remote(remote) => Arc::clone(remote),
        JwtKeys::Set(_) => panic!("expected a fetched key set"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while remote.get().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "JWKS not fetched in 20 s: {:?}",
            remote.last_error()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = signer.sign(claims(json!({})));
    let auth = wp.authenticate(&mut bearer(&token), None).unwrap();
    assert_eq!(auth.unwrap().principal, "https://issuer.example/alice");
}

#[test]
fn a_verified_token_is_remembered_until_it_expires() {
    let signer = Signer::new("k1");
    let policies = compiled(&[request_authn("jwt", "", &jwks_rule(&signer, ""))]);
    let wp = policies.for_workload(&workload("foo", &[]));
    let rule = &wp.inner.jwt_rules[0];
    let token = signer.sign(claims(json!({})));
    let first = wp.authenticate(&mut bearer(&token), None).unwrap().unwrap();
    let again = wp.authenticate(&mut bearer(&token), None).unwrap().unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the second check was not served from the cache"
    );
    // An entry past its exp (and the skew) is not served: checked again, 401.
    let stale = signer.sign(claims(json!({ "exp": now() - 3600 })));
    let stale_auth = Arc::new(RequestAuth {
        principal: "https://issuer.example/alice".into(),
        audiences: vec![],
        presenter: None,
        claims: serde_json::from_value(claims(json!({ "exp": now() - 3600 }))).unwrap(),
    });
    rule.verified.insert_for_test(&stale, &stale_auth);
    assert!(wp.authenticate(&mut bearer(&stale), None).is_err());
    // Bounded.
    for i in 0..(crate::policy::jwt::CACHE_SIZE + 10) {
        let t = signer.sign(claims(json!({ "n": i })));
        wp.authenticate(&mut bearer(&t), None).unwrap().unwrap();
    }
    assert!(rule.verified.len() <= crate::policy::jwt::CACHE_SIZE);
}
