//! Loader rejections: every error must name the file, the line, the
//! document and policy, and the field.

use crate::policy::load;

struct Reject {
    name: &'static str,
    yaml: &'static str,
    /// Expected full error text (file is `policies/test.yaml`).
    want: &'static str,
}

const REJECTS: &[Reject] = &[
    Reject {
        name: "broken YAML",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: x
  namespace: foo
spec:
  rules: [{to: [
",
        want: "policies/test.yaml:8:1: document 1 (?): invalid YAML: did not find expected node content",
    },
    Reject {
        name: "unknown field (typo notPort)",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: ns1
spec:
  action: DENY
  rules:
  - to:
    - operation:
        notPort: [\"80\"]
",
        want: "policies/test.yaml:11:9: document 1 (ns1/deny-admin): field spec.rules[0].to[0].operation: unknown field `notPort`, expected one of `hosts`, `notHosts`, `ports`, `notPorts`, `methods`, `notMethods`, `paths`, `notPaths`",
    },
    Reject {
        name: "bad port in the second document",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: ns1}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: ns1
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports:
        - \"80\"
        - \"80x\"
",
        want: "policies/test.yaml:17: document 2 (ns1/deny-admin): field spec.rules[0].to[0].operation.ports[1]: \"80x\" is not a port",
    },
    Reject {
        name: "CUSTOM action",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  action: CUSTOM
  rules: [{}]
",
        want: "policies/test.yaml:5: document 1 (foo/ext): field spec.action: action CUSTOM is not supported (external authorization providers are not available in mesh-agent)",
    },
    Reject {
        name: "provider",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  provider: {name: opa}
",
        want: "policies/test.yaml:5: document 1 (foo/ext): field spec.provider: `provider` is not supported: CUSTOM (external authorization) policies are not supported",
    },
    Reject {
        name: "lowercase action",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec: {action: deny}
",
        want: "policies/test.yaml:4: document 1 (foo/p): field spec.action: \"deny\" is not an action (expected ALLOW, DENY or AUDIT)",
    },
    Reject {
        name: "bad CIDR",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/8, 10.0.0.0/33]
",
        want: "policies/test.yaml:8: document 1 (foo/p): field spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not an IP address or CIDR",
    },
    Reject {
        name: "wrong kind",
        yaml: "apiVersion: security.istio.io/v1
kind: Sidecar
metadata: {name: p, namespace: foo}
",
        want: "policies/test.yaml:2: document 1 (foo/p): field kind: \"Sidecar\" is not supported (expected AuthorizationPolicy, PeerAuthentication, RequestAuthentication or HTTPLocalRateLimitPolicy)",
    },
    Reject {
        name: "wrong apiVersion",
        yaml: "apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
",
        want: "policies/test.yaml:1: document 1 (foo/p): field apiVersion: \"security.istio.io/v1alpha1\" is not supported (expected security.istio.io/v1 or security.istio.io/v1beta1)",
    },
    Reject {
        name: "unknown when key",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - when:
    - key: source.ip
      values: [10.0.0.1]
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: [\"[update]\"]
",
        want: "policies/test.yaml:9: document 1 (foo/p): field spec.rules[0].when[1].key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\" is not a supported condition key (supported: request.headers[<name>], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni)",
    },
    Reject {
        name: "malformed request.auth.claims key",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - when:
    - {key: \"request.auth.claims[iss\", values: [x]}
",
        want: "policies/test.yaml:7: document 1 (foo/p): field spec.rules[0].when[0].key: \"request.auth.claims[iss\": expected request.auth.claims[<name>] or request.auth.claims[<name>][<nested name>]...",
    },
    Reject {
        name: "condition without values",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - when:
    - key: source.ip
",
        want: "policies/test.yaml:7: document 1 (foo/p): field spec.rules[0].when[0]: a condition needs `values` or `notValues`",
    },
    Reject {
        name: "bad IP in a condition",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - when:
    - key: destination.ip
      notValues: [10.0.0.1, nope]
",
        want: "policies/test.yaml:8: document 1 (foo/p): field spec.rules[0].when[0].notValues[1]: \"nope\" is not an IP address or CIDR",
    },
    Reject {
        name: "missing namespace",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
spec: {}
",
        want: "policies/test.yaml:4: document 1 (?/p): field metadata: missing field `namespace`",
    },
    Reject {
        name: "targetRefs to a waypoint",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
",
        want: "policies/test.yaml:6: document 1 (foo/p): field spec.targetRefs[0].kind: gateway.networking.k8s.io/Gateway is not supported: mesh-agent applies a policy to the workloads of a Service (`group: \"\"`, `kind: Service`), not to a waypoint or another kind",
    },
    Reject {
        name: "bad dry-run annotation",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: foo
  annotations:
    istio.io/dry-run: \"yes\"
",
        want: "policies/test.yaml:7: document 1 (foo/p): field metadata.annotations: istio.io/dry-run: \"yes\" must be \"true\" or \"false\"",
    },
    Reject {
        name: "dry-run on AUDIT",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: foo
  annotations: {istio.io/dry-run: \"true\"}
spec: {action: AUDIT, rules: [{}]}
",
        want: "policies/test.yaml:7: document 1 (foo/p): field spec: istio.io/dry-run is only supported on ALLOW and DENY policies",
    },
    Reject {
        name: "path not in normalised form",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin//x]}}]}]
",
        want: "policies/test.yaml:6: document 1 (foo/p): field spec.rules[0].to[0].operation.paths[0]: \"/admin//x\": not in normalised form (requests are matched as \"/admin/x\")",
    },
    Reject {
        name: "path template",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{to: [{operation: {paths: [\"/foo/{*}/bar\"]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].to[0].operation.paths[0]: \"/foo/{*}/bar\": path templates ({*}, {**}) are not supported",
    },
    Reject {
        name: "wildcard in the middle",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{from: [{source: {principals: [\"cluster.local/ns/*/sa/x\"]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].from[0].source.principals[0]: \"cluster.local/ns/*/sa/x\": '*' is only allowed as the whole value, as a prefix or as a suffix",
    },
    Reject {
        name: "wrong type",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - to: [{operation: {ports: [{port: 80}]}}]
",
        want: "policies/test.yaml:6:31: document 1 (foo/p): field spec.rules[0].to[0].operation.ports[0]: invalid type: map, expected a string",
    },
    Reject {
        name: "unknown metadata field (server-set ones are accepted)",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo, uid: abc, nmespace: bar}
",
        want: "policies/test.yaml:3:47: document 1 (foo/p): field metadata: unknown field `nmespace`, expected one of `name`, `namespace`, `annotations`, `labels`, `uid`, `resourceVersion`, `generation`, `creationTimestamp`, `deletionTimestamp`, `deletionGracePeriodSeconds`, `managedFields`, `selfLink`, `finalizers`, `ownerReferences`, `generateName`",
    },
    Reject {
        name: "serviceAccounts with principals (Istio's CRD rule)",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{from: [{source: {serviceAccounts: [foo/a], principals: [x]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].from[0].source.principals: `principals` cannot be set with `serviceAccounts` or `notServiceAccounts`",
    },
    Reject {
        name: "notServiceAccounts with namespaces",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{from: [{source: {notServiceAccounts: [a], namespaces: [foo]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].from[0].source.namespaces: `namespaces` cannot be set with `serviceAccounts` or `notServiceAccounts`",
    },
    Reject {
        name: "a wildcard in serviceAccounts",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{from: [{source: {serviceAccounts: [foo/a, \"foo/*\"]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].from[0].source.serviceAccounts[1]: \"foo/*\": expected <namespace>/<serviceaccount> or <serviceaccount>, without wildcards",
    },
    Reject {
        name: "a service account with two slashes",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules: [{from: [{source: {serviceAccounts: [cluster.local/ns/foo/sa/a]}}]}]
",
        want: "policies/test.yaml:5: document 1 (foo/p): field spec.rules[0].from[0].source.serviceAccounts[0]: \"cluster.local/ns/foo/sa/a\": expected <namespace>/<serviceaccount> or <serviceaccount>, without wildcards",
    },
    Reject {
        name: "selector.matchExpressions (not in Istio's WorkloadSelector)",
        yaml: "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  selector:
    matchExpressions: []
",
        want: "policies/test.yaml:6:5: document 1 (foo/p): field spec.selector: unknown field `matchExpressions`, expected `matchLabels`",
    },
];

/// Each case is refused: either the whole load fails (invalid YAML, another
/// kind, no namespace...) or the policy loads as a DENY-all carrying the
/// error (an AuthorizationPolicy that cannot be enforced as written). The
/// text is the same either way.
#[test]
fn rejections() {
    let mut failures = Vec::new();
    for case in REJECTS {
        let error = match load([("policies/test.yaml", case.yaml)]) {
            Err(e) => e,
            Ok(set) => match set.unenforceable().next() {
                Some(policy) => {
                    assert_eq!(policy.action(), crate::policy::Action::Deny);
                    assert_eq!(policy.rule_count(), 1, "{}", case.name);
                    policy.unenforceable().unwrap().clone()
                }
                None => {
                    failures.push(format!("{}: loaded, expected an error", case.name));
                    continue;
                }
            },
        };
        if error.to_string() == case.want {
            assert_eq!(error.file.to_str(), Some("policies/test.yaml"));
            assert!(error.line.is_some(), "{}: no line", case.name);
        } else {
            failures.push(format!(
                "{}:\n    want {}\n    got  {error}",
                case.name, case.want
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn a_policy_that_cannot_be_enforced_denies_what_it_selects_and_only_that() {
    let good = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\nspec: {rules: [{}]}\n";
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: foo}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: CUSTOM\n  provider: {name: ext-authz}\n";
    let set = load([("a.yaml", good), ("b.yaml", bad)]).unwrap();
    assert_eq!(set.len(), 2);
    let broken: Vec<_> = set.unenforceable().collect();
    assert_eq!(broken.len(), 1);
    let error = broken[0].unenforceable().unwrap();
    assert_eq!(error.file.to_str(), Some("b.yaml"));
    assert_eq!(error.line, Some(7));
    let compiled = set.compile(crate::policy::DEFAULT_ROOT_NAMESPACE);
    let decide = |labels: &[(&str, &str)]| {
        let wl = super::workload("foo", labels);
        super::render(&super::R::default().decide_with(&compiled.for_workload(&wl)))
    };
    assert_eq!(decide(&[("app", "db")]), "deny by foo/b rule[0]");
    assert_eq!(decide(&[("app", "web")]), "allow");
}

#[test]
fn a_policy_whose_selector_cannot_be_read_denies_its_whole_namespace() {
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: foo}\nspec:\n  selector: {matchExpressions: [{key: app, operator: In, values: [db]}]}\n  rules: [{}]\n";
    let set = load([("b.yaml", bad)]).unwrap();
    let compiled = set.compile(crate::policy::DEFAULT_ROOT_NAMESPACE);
    let wl = super::workload("foo", &[("app", "web")]);
    let req = super::R::default();
    assert_eq!(
        super::render(&req.decide_with(&compiled.for_workload(&wl))),
        "deny by foo/b rule[0]"
    );
    let elsewhere = super::workload("bar", &[("app", "db")]);
    assert_eq!(
        super::render(&req.decide_with(&compiled.for_workload(&elsewhere))),
        "allow"
    );
}

#[test]
fn invalid_yaml_still_fails_the_whole_load() {
    let good = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\n";
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: foo\n";
    let err = load([("a.yaml", good), ("b.yaml", bad)]).unwrap_err();
    assert_eq!(err.file.to_str(), Some("b.yaml"));
    assert!(err.message.starts_with("invalid YAML"), "{err}");
    assert_eq!(load([("a.yaml", good)]).unwrap().len(), 1);
}

#[test]
fn duplicate_policy_names_are_rejected() {
    let a = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\n";
    let b = "# comment\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\n  namespace: foo\n";
    let err = load([("one.yaml", a), ("two.yaml", b)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "two.yaml:5: document 1 (foo/a): field metadata.name: duplicate AuthorizationPolicy foo/a: already defined in one.yaml document 1"
    );
}

/// A policy as `kubectl get authorizationpolicy -o yaml` prints it: the
/// server-set metadata and `status` are not policy and load.
#[test]
fn a_policy_exported_by_kubectl_loads() {
    let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {\"apiVersion\":\"security.istio.io/v1\",\"kind\":\"AuthorizationPolicy\"}
  creationTimestamp: \"2026-11-30T09:12:44Z\"
  generation: 3
  managedFields:
  - apiVersion: security.istio.io/v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        .: {}
        f:rules: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: \"2026-11-30T09:12:44Z\"
  name: httpbin
  namespace: foo
  resourceVersion: \"918273\"
  uid: 6f1c2a43-9b7e-4c1d-8a55-0e2d3c4b5a69
spec:
  selector:
    matchLabels:
      app: httpbin
  rules:
  - from:
    - source:
        serviceAccounts:
        - client/sleep
status:
  validationMessages:
  - documentationUrl: https://istio.io/latest/docs/reference/config/analysis/ist0001/
    level: ERROR
    type:
      code: IST0001
";
    let set = match load([("exported.yaml", text)]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(set.len(), 1);
}

#[test]
fn accepted_documents() {
    // Several documents, empty ones, comments, other annotations and labels,
    // v1beta1, every supported field at once.
    let text = "---
# leading comment
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: everything
  namespace: foo
  labels: {team: a}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{}'
    istio.io/dry-run: \"false\"
spec:
  selector:
    matchLabels: {app: httpbin}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [a, \"b*\", \"*c\", \"*\"]
        notPrincipals: [x]
        namespaces: [foo]
        notNamespaces: [bar]
        ipBlocks: [10.0.0.0/8, 2001:db8::/32, 192.168.0.1]
        notIpBlocks: [10.1.0.0/16]
        remoteIpBlocks: [0.0.0.0/0]
        notRemoteIpBlocks: [\"::/0\"]
    to:
    - operation:
        hosts: [a.example.com, \"*.example.com\"]
        notHosts: [b.example.com]
        ports: [\"80\", 443] # plain YAML integers are read as strings
        notPorts: [\"8080\"]
        methods: [GET, POST]
        notMethods: [DELETE]
        paths: [/api/*, /healthz, \"*.json\", \"*\"]
        notPaths: [/api/internal/*]
    when:
    - {key: \"request.headers[x-user]\", values: [alice], notValues: [bob]}
    - {key: source.ip, values: [10.0.0.0/8]}
    - {key: remote.ip, notValues: [203.0.113.0/24]}
    - {key: source.namespace, values: [foo]}
    - {key: source.principal, values: [\"cluster.local/*\"]}
    - {key: destination.ip, values: [10.0.1.1]}
    - {key: destination.port, values: [\"80\"]}
    - {key: connection.sni, values: [\"*.svc\"]}
---
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: second, namespace: istio-system}
spec: {action: AUDIT, rules: [{}]}
";
    let set = match load([("ok.yaml", text)]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let names: Vec<String> = set.iter().map(|p| p.name().to_string()).collect();
    assert_eq!(names, ["foo/everything", "istio-system/second"]);
    assert!(set.iter().next().unwrap().has_http_rules());
    assert!(load(std::iter::empty::<(&str, &str)>()).unwrap().is_empty());
    assert!(load([("empty.yaml", "")]).unwrap().is_empty());
}
