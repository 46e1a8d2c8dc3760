//! PeerAuthentication: Istio's precedence (workload over namespace over
//! mesh; port-level over workload-level; UNSET inherits; PERMISSIVE when
//! nothing is set), one case each, and what is refused at load.

use crate::policy::{DEFAULT_ROOT_NAMESPACE, MtlsMode, load};

fn doc(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

struct Case {
    name: &'static str,
    /// (namespace, name, spec) of each PeerAuthentication.
    docs: &'static [(&'static str, &'static str, &'static str)],
    /// The workload: namespace `foo`, labels `app: web`; the port asked.
    port: u16,
    want: MtlsMode,
    /// The policy that refuses plaintext, when the mode is STRICT.
    by: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "nothing set: PERMISSIVE",
        docs: &[],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "mesh-wide STRICT (root namespace, no selector)",
        docs: &[("istio-system", "default", "{mtls: {mode: STRICT}}")],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("istio-system/default"),
    },
    Case {
        name: "a selector in the root namespace is not mesh-wide",
        docs: &[(
            "istio-system",
            "gw",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
        )],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "namespace-wide PERMISSIVE overrides mesh-wide STRICT",
        docs: &[
            ("istio-system", "default", "{mtls: {mode: STRICT}}"),
            ("foo", "default", "{mtls: {mode: PERMISSIVE}}"),
        ],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "namespace-wide UNSET inherits the mesh's STRICT",
        docs: &[
            ("istio-system", "default", "{mtls: {mode: STRICT}}"),
            ("foo", "default", "{mtls: {mode: UNSET}}"),
        ],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("istio-system/default"),
    },
    Case {
        name: "no mtls at all is UNSET",
        docs: &[
            ("istio-system", "default", "{mtls: {mode: STRICT}}"),
            ("foo", "default", "{}"),
        ],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("istio-system/default"),
    },
    Case {
        name: "workload STRICT overrides namespace PERMISSIVE",
        docs: &[
            ("foo", "default", "{mtls: {mode: PERMISSIVE}}"),
            (
                "foo",
                "web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
        ],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("foo/web"),
    },
    Case {
        name: "a workload policy that does not select it does not apply",
        docs: &[(
            "foo",
            "db",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}",
        )],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "another namespace's policy does not apply",
        docs: &[("bar", "default", "{mtls: {mode: STRICT}}")],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "port-level PERMISSIVE overrides the workload's STRICT on that port",
        docs: &[(
            "foo",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}",
        )],
        port: 8080,
        want: MtlsMode::Permissive,
        by: None,
    },
    Case {
        name: "... and not on the others",
        docs: &[(
            "foo",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}",
        )],
        port: 9090,
        want: MtlsMode::Strict,
        by: Some("foo/web"),
    },
    Case {
        name: "port-level STRICT under a PERMISSIVE namespace, port written as a string",
        docs: &[
            ("foo", "default", "{mtls: {mode: PERMISSIVE}}"),
            (
                "foo",
                "web",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {'9090': {mode: STRICT}}}",
            ),
        ],
        port: 9090,
        want: MtlsMode::Strict,
        by: Some("foo/web"),
    },
    Case {
        name: "port-level UNSET inherits the namespace",
        docs: &[
            ("foo", "default", "{mtls: {mode: STRICT}}"),
            (
                "foo",
                "web",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: UNSET}}}",
            ),
        ],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("foo/default"),
    },
    Case {
        name: "DISABLE lets plaintext in (mesh traffic stays mutual TLS, as in ambient)",
        docs: &[
            ("istio-system", "default", "{mtls: {mode: STRICT}}"),
            (
                "foo",
                "web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
            ),
        ],
        port: 8080,
        want: MtlsMode::Disable,
        by: None,
    },
    Case {
        name: "two workload policies: the first by name (Istio: the oldest)",
        docs: &[
            (
                "foo",
                "b-permissive",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}",
            ),
            (
                "foo",
                "a-strict",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
        ],
        port: 8080,
        want: MtlsMode::Strict,
        by: Some("foo/a-strict"),
    },
];

#[test]
fn precedence() {
    let mut failures = Vec::new();
    for case in CASES {
        let text: Vec<String> = case
            .docs
            .iter()
            .map(|(ns, name, spec)| doc(ns, name, spec))
            .collect();
        let text = text.join("---\n");
        let set =
            load([("pa.yaml", text.as_str())]).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let compiled = set.compile(DEFAULT_ROOT_NAMESPACE);
        let wp = compiled.for_workload(&super::workload("foo", &[("app", "web")]));
        let mode = wp.inner.peer_auth.mode_on(case.port);
        let by = wp.refusing_plaintext(case.port).map(|r| r.to_string());
        let want_by = case
            .by
            .map(|p| format!("{p} (PeerAuthentication STRICT: plaintext refused)"));
        if mode != case.want || by != want_by {
            failures.push(format!(
                "{}: want {} by {want_by:?}, got {mode} by {by:?}",
                case.name, case.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn peer_authentications_load_beside_authorization_policies() {
    let text = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: default, namespace: foo}}\nspec: {{rules: [{{}}]}}\n",
        doc("foo", "default", "{mtls: {mode: STRICT}}")
    );
    let set = load([("mixed.yaml", text.as_str())]).unwrap();
    assert_eq!(set.len(), 1, "one AuthorizationPolicy");
    assert_eq!(set.peer_authentications().count(), 1);
}

#[test]
fn what_is_refused_at_load() {
    for (spec, want) in [
        (
            "{mtls: {mode: STRIKT}}",
            "pa.yaml:4: document 1 (foo/p): field spec.mtls.mode: \"STRIKT\" is not a mode (expected UNSET, DISABLE, PERMISSIVE or STRICT)",
        ),
        (
            "{portLevelMtls: {8080: {mode: STRICT}}}",
            "pa.yaml:4: document 1 (foo/p): field spec.portLevelMtls: portLevelMtls needs a workload selector (spec.selector.matchLabels)",
        ),
        (
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {70000: {mode: STRICT}}}",
            "pa.yaml:4: document 1 (foo/p): field spec.portLevelMtls: 70000 is not a port (1-65535)",
        ),
        (
            "{mtls: {mode: STRICT, extra: 1}}",
            "pa.yaml:4:29: document 1 (foo/p): field spec.mtls: unknown field `extra`, expected `mode`",
        ),
    ] {
        let text = doc("foo", "p", spec);
        match load([("pa.yaml", text.as_str())]) {
            Err(e) => assert_eq!(e.to_string(), want, "{spec}"),
            Ok(_) => panic!("{spec}: loaded"),
        }
    }
}
