//! Table-driven tests: `semantics` (one case per documented Istio rule),
//! `loader` (rejections and error text), `normalize` (paths and bypasses).

mod loader;
mod normalize;
mod peer_auth;
mod request_authn;
mod semantics;
mod target_refs;

use std::collections::BTreeMap;

use super::{
    CompiledPolicies, DEFAULT_ROOT_NAMESPACE, Decision, HttpAttributes, Request, Workload,
};

/// Prepends `apiVersion`/`kind` to every `---`-separated document so that
/// the tables only show what matters.
pub(super) fn with_header(yaml: &str) -> String {
    yaml.split("\n---\n")
        .map(|doc| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n{}",
                doc.trim_start_matches('\n')
            )
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

pub(super) fn compile(yaml: &str, root: &str) -> CompiledPolicies {
    let text = with_header(yaml);
    match super::load([("test.yaml", text.as_str())]) {
        Ok(set) => set.compile(root),
        Err(e) => panic!("policy did not load: {e}\n{text}"),
    }
}

pub(super) fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: ns.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// An owned description of a request; tables mutate the default one.
#[derive(Clone, Debug)]
pub(super) struct R {
    pub principal: Option<&'static str>,
    pub ns: Option<&'static str>,
    pub src: &'static str,
    pub remote: Option<&'static str>,
    pub dst: &'static str,
    pub port: u16,
    pub sni: Option<&'static str>,
    pub http: Option<H>,
}

#[derive(Clone, Debug)]
pub(super) struct H {
    pub method: &'static str,
    pub host: &'static str,
    pub path: &'static str,
    pub headers: Vec<(&'static str, &'static str)>,
    pub auth: Option<crate::policy::RequestAuth>,
}

impl Default for R {
    fn default() -> Self {
        R {
            principal: Some("spiffe://cluster.local/ns/client/sa/sleep"),
            ns: Some("client"),
            src: "10.0.0.1",
            remote: None,
            dst: "10.0.1.1",
            port: 8080,
            sni: None,
            http: Some(H {
                method: "GET",
                host: "httpbin.foo:8080",
                path: "/",
                headers: Vec::new(),
                auth: None,
            }),
        }
    }
}

impl R {
    pub fn http(&mut self) -> &mut H {
        self.http.as_mut().expect("HTTP request")
    }

    pub fn decide_with(&self, wp: &super::WorkloadPolicy) -> Decision {
        let src = self.src.parse().unwrap();
        let http = self.http.as_ref().map(|h| HttpAttributes {
            method: h.method,
            host: h.host,
            path: h.path,
            headers: &h.headers,
            auth: h.auth.as_ref(),
        });
        wp.decide(&Request {
            source_principal: self.principal,
            source_namespace: self.ns,
            source_ip: src,
            remote_ip: self.remote.map_or(src, |r| r.parse().unwrap()),
            destination_ip: self.dst.parse().unwrap(),
            destination_port: self.port,
            sni: self.sni,
            http,
        })
    }
}

/// `allow`, `deny by ns/name rule[0]`, `deny by allow-nothing (...)`, with
/// ` +audit` and ` +dry-run(<ref>)` suffixes.
pub(super) fn render(d: &Decision) -> String {
    let mut s = match d {
        Decision::Allow { .. } => "allow".to_owned(),
        Decision::Deny { by, .. } => format!("deny by {by}"),
    };
    if d.audit() {
        s.push_str(" +audit");
    }
    for r in d.dry_run_denies() {
        s.push_str(&format!(" +dry-run({r})"));
    }
    s
}

pub(super) const ROOT: &str = DEFAULT_ROOT_NAMESPACE;
