//! Path normalisation, as properties. For any request path that normalises
//! to N:
//! - N normalises to itself;
//! - N with any of its unreserved characters percent-encoded (either hex
//!   case) normalises to N again;
//! - `/x/../` or `/./` in front of it, encoded or not, normalises to N again;
//! - so a DENY rule on `/admin` (and below) decides every such spelling of
//!   an `/admin` path as it decides N: it can never be made to miss.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{
    CompiledPolicies, Decision, HttpAttributes, NoHeaders, Request, Workload, load, normalize_path,
};

const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/admin\", \"/admin/*\"]}}]
";

static POLICIES: OnceLock<CompiledPolicies> = OnceLock::new();

fn denied(path: &str) -> bool {
    let policies = POLICIES.get_or_init(|| {
        load([("deny.yaml", DENY_ADMIN)])
            .expect("the policy loads")
            .compile("istio-system")
    });
    let workload = Workload {
        namespace: "default".into(),
        labels: Default::default(),
    };
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let decision = policies.for_workload(&workload).decide(&Request {
        source_principal: None,
        source_namespace: None,
        source_ip: ip,
        remote_ip: ip,
        destination_ip: ip,
        destination_port: 80,
        sni: None,
        http: Some(HttpAttributes {
            method: "GET",
            host: "a",
            path,
            headers: &NoHeaders,
            auth: None,
        }),
    });
    matches!(decision, Decision::Deny { .. })
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encodes the unreserved characters of `path` that `mask` picks
/// (never the hex digits of an escape already there: that would be another
/// path, not another spelling).
fn encode(path: &str, mask: &[u8]) -> String {
    let mut out = String::with_capacity(path.len() * 3);
    let mut escape_left: u8 = 0;
    for (i, b) in path.bytes().enumerate() {
        let pick = mask.get(i % mask.len().max(1)).copied().unwrap_or(0);
        let in_escape = escape_left > 0;
        escape_left = if b == b'%' {
            2
        } else {
            escape_left.saturating_sub(1)
        };
        if unreserved(b) && !in_escape && pick & 1 == 1 {
            if pick & 2 == 2 {
                out.push_str(&format!("%{b:02x}"));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(b as char);
        }
    }
    out
}

fuzz_target!(|input: (String, Vec<u8>)| {
    let (raw, mask) = input;
    let Ok(normal) = normalize_path(&raw) else {
        return;
    };
    assert_eq!(
        normalize_path(&normal).as_ref(),
        Ok(&normal),
        "not idempotent: {raw:?}"
    );
    if normal == "*" {
        return;
    }
    let deny = denied(&normal);
    let spellings = [
        encode(&normal, &mask),
        format!("/x/..{normal}"),
        format!("/x/%2e%2E{}", encode(&normal, &mask)),
        format!("/.{normal}"),
        format!("//{}", &normal[1..]),
    ];
    for spelling in spellings {
        let again = normalize_path(&spelling);
        assert_eq!(again.as_ref(), Ok(&normal), "{spelling:?} (from {raw:?})");
        assert_eq!(denied(again.as_deref().unwrap()), deny, "{spelling:?}");
    }
});
