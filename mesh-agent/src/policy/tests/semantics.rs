//! One case per documented Istio semantic. The workload is `foo` with label
//! `app: httpbin` unless a case says otherwise; the default request is
//! `GET httpbin.foo:8080 /` from `cluster.local/ns/client/sa/sleep`
//! (namespace `client`, 10.0.0.1) to 10.0.1.1:8080.

use super::{R, ROOT, compile, render, workload};

struct Case {
    name: &'static str,
    yaml: &'static str,
    /// Workload namespace and labels.
    wl: (&'static str, &'static [(&'static str, &'static str)]),
    req: fn(&mut R),
    want: &'static str,
}

const HTTPBIN: (&str, &[(&str, &str)]) = ("foo", &[("app", "httpbin")]);
const NO_ALLOW: &str = "deny by allow-nothing (no ALLOW policy matched)";

fn same(_: &mut R) {}
fn tcp(r: &mut R) {
    r.http = None;
}

const CASES: &[Case] = &[
    // --- evaluation order and special policies -----------------------------
    Case {
        name: "no policy at all: allow",
        yaml: "metadata: {name: other, namespace: bar}\nspec: {action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "allow-nothing: ALLOW with spec {} denies everything",
        yaml: "metadata: {name: allow-nothing, namespace: foo}\nspec: {}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "allow-nothing: missing spec is spec {}",
        yaml: "metadata: {name: allow-nothing, namespace: foo}",
        wl: HTTPBIN,
        req: tcp,
        want: NO_ALLOW,
    },
    Case {
        name: "allow-all: ALLOW with rules [{}]",
        yaml: "metadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "deny-all: DENY with rules [{}]",
        yaml: "metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny-all rule[0]",
    },
    Case {
        name: "DENY without rules matches nothing",
        yaml: "metadata: {name: deny-none, namespace: foo}\nspec: {action: DENY}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "DENY is evaluated before ALLOW",
        yaml: "metadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}
---
metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny-all rule[0]",
    },
    Case {
        name: "no ALLOW policy for the workload: allow what DENY does not match",
        yaml: "metadata: {name: deny-admin, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/ok",
        want: "allow",
    },
    Case {
        name: "ALLOW policies present but none matches: deny",
        yaml: "metadata: {name: allow-admin-sa, namespace: foo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/admin/sa/admin]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "any one of several ALLOW policies is enough",
        yaml: "metadata: {name: a-other, namespace: foo}
spec: {rules: [{from: [{source: {namespaces: [other]}}]}]}
---
metadata: {name: b-client, namespace: foo}
spec: {rules: [{from: [{source: {namespaces: [client]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "rules are ORed (the matching rule index is reported)",
        yaml: "metadata: {name: deny-two, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin]}}]
  - to: [{operation: {methods: [DELETE]}}]",
        wl: HTTPBIN,
        req: |r| r.http().method = "DELETE",
        want: "deny by foo/deny-two rule[1]",
    },
    Case {
        name: "from and to are ANDed within a rule",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - from: [{source: {namespaces: [client]}}]
    to: [{operation: {methods: [POST]}}]",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "from entries are ORed",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [other]}
    - source: {principals: [cluster.local/ns/client/sa/sleep]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "to entries are ORed",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - to:
    - operation: {methods: [POST]}
    - operation: {paths: [/]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "fields of one source are ANDed",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: [cluster.local/ns/client/sa/sleep], namespaces: [other]}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "when conditions are ANDed",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - when:
    - {key: source.namespace, values: [client]}
    - {key: destination.port, values: ['9090']}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "X and notX of one field are ANDed",
        yaml: "metadata: {name: allow, namespace: foo}
spec:
  rules:
  - to: [{operation: {paths: [/api/*], notPaths: [/api/internal]}}]",
        wl: HTTPBIN,
        req: |r| r.http().path = "/api/internal",
        want: NO_ALLOW,
    },
    // --- principals ----------------------------------------------------------
    Case {
        name: "principal exact, request ID with spiffe://",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/client/sa/sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "principal written with spiffe:// in the policy, request without",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/client/sa/sleep']}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("cluster.local/ns/client/sa/sleep"),
        want: "allow",
    },
    Case {
        name: "principal prefix match",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/client/*]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "principal suffix match",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "principal suffix mismatch",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {principals: ['*/sa/other']}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "principal presence '*' requires an identity (plaintext denied)",
        yaml: "metadata: {name: require-mtls, namespace: foo}
spec: {rules: [{from: [{source: {principals: ['*']}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = None,
        want: NO_ALLOW,
    },
    Case {
        name: "principal presence '*' with mTLS",
        yaml: "metadata: {name: require-mtls, namespace: foo}
spec: {rules: [{from: [{source: {principals: ['*']}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "notPrincipals: listed principal is not denied",
        yaml: "metadata: {name: only-sleep, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/client/sa/sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "notPrincipals: any other principal is denied",
        yaml: "metadata: {name: only-sleep, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/client/sa/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("spiffe://cluster.local/ns/client/sa/other"),
        want: "deny by foo/only-sleep rule[0]",
    },
    Case {
        name: "notPrincipals: plaintext (no principal) satisfies notX",
        yaml: "metadata: {name: only-sleep, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/client/sa/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = None,
        want: "deny by foo/only-sleep rule[0]",
    },
    // --- serviceAccounts (Istio: `<ns>/<sa>`, or `<sa>` in the policy's namespace)
    Case {
        name: "serviceAccounts <ns>/<sa>: the peer's namespace and service account",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "serviceAccounts: same name in another namespace does not match",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [other/sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "serviceAccounts bare <sa> is in the policy's namespace (foo, not the client's)",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "serviceAccounts bare <sa> matches a peer of the policy's namespace",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("spiffe://cluster.local/ns/foo/sa/sleep"),
        want: "allow",
    },
    Case {
        name: "serviceAccounts: any trust domain (derived from the verified certificate)",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("spiffe://other.domain/ns/client/sa/sleep"),
        want: "allow",
    },
    Case {
        name: "serviceAccounts require mTLS: plaintext does not match",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = None,
        want: NO_ALLOW,
    },
    Case {
        name: "serviceAccounts: a longer name with the same suffix does not match",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("spiffe://cluster.local/ns/client/sa/deep-sleep"),
        want: NO_ALLOW,
    },
    Case {
        name: "notServiceAccounts: every other service account is denied",
        yaml: "metadata: {name: only-sleep, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notServiceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.principal = Some("spiffe://cluster.local/ns/client/sa/other"),
        want: "deny by foo/only-sleep rule[0]",
    },
    Case {
        name: "notServiceAccounts: the listed one is not denied",
        yaml: "metadata: {name: only-sleep, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notServiceAccounts: [client/sleep]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    // --- namespaces / IPs ----------------------------------------------------
    Case {
        name: "notNamespaces: deny other namespaces",
        yaml: "metadata: {name: ns-only, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notNamespaces: [client, foo]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.ns = Some("bar"),
        want: "deny by foo/ns-only rule[0]",
    },
    Case {
        name: "ipBlocks: CIDR matches the source address",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/24, 192.168.0.1]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "ipBlocks: IPv4-mapped IPv6 source matches an IPv4 CIDR",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.src = "::ffff:10.0.0.7",
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "ipBlocks use the peer address, not the original client",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.remote = Some("203.0.113.9"),
        want: NO_ALLOW,
    },
    Case {
        name: "remoteIpBlocks use the original client",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.remote = Some("203.0.113.9"),
        want: "allow",
    },
    Case {
        name: "notIpBlocks / notRemoteIpBlocks",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8], notRemoteIpBlocks: [10.0.0.0/8]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.remote = Some("198.51.100.1"),
        want: "allow",
    },
    // --- operations -----------------------------------------------------------
    Case {
        name: "ports match the destination port",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{to: [{operation: {ports: ['8080', '9000']}}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "allow",
    },
    Case {
        name: "notPorts",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {notPorts: ['8080']}}]}]}",
        wl: HTTPBIN,
        req: |r| {
            r.http = None;
            r.port = 9000
        },
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "hosts: case-insensitive, request port stripped",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{to: [{operation: {hosts: [HttpBin.FOO]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "hosts: suffix wildcard",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{to: [{operation: {hosts: ['*.example.com']}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().host = "API.Example.com:443",
        want: "allow",
    },
    Case {
        name: "notHosts with port and trailing dot in the request",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {hosts: ['*'], notHosts: [httpbin.foo]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().host = "HTTPBIN.foo.:80",
        want: "allow",
    },
    Case {
        name: "methods are case-sensitive",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().method = "get",
        want: NO_ALLOW,
    },
    Case {
        name: "notMethods",
        yaml: "metadata: {name: read-only, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {notMethods: [GET, HEAD]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().method = "POST",
        want: "deny by foo/read-only rule[0]",
    },
    Case {
        name: "paths: exact",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/admin",
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "paths: exact does not cover sub-paths",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/admin/users",
        want: "allow",
    },
    Case {
        name: "paths: prefix",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/admin/users",
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "paths: suffix",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: ['*.php']}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/x/index.php",
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "paths are case-sensitive",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/ADMIN",
        want: "allow",
    },
    Case {
        name: "notPaths in an ALLOW policy",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{to: [{operation: {notPaths: [/private/*]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/private/x",
        want: NO_ALLOW,
    },
    // --- HTTP-only fields on plain TCP -----------------------------------------
    Case {
        name: "TCP + ALLOW rule with HTTP fields: the rule is ignored (deny)",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec: {rules: [{to: [{operation: {methods: [GET], ports: ['8080']}}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: NO_ALLOW,
    },
    Case {
        name: "TCP + ALLOW: a rule without HTTP fields still allows",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: [GET]}}]
  - to: [{operation: {ports: ['8080']}}]",
        wl: HTTPBIN,
        req: tcp,
        want: "allow",
    },
    Case {
        name: "same ALLOW rule with HTTP fields matches HTTP traffic",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec: {rules: [{to: [{operation: {methods: [GET], ports: ['8080']}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "TCP + ALLOW rule with request.headers condition: ignored (deny)",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: 'request.headers[x-token]', values: ['*']}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: NO_ALLOW,
    },
    Case {
        name: "TCP + DENY with only HTTP fields: fields ignored, denies all TCP",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "deny by foo/tcp-policy rule[0]",
    },
    Case {
        name: "TCP + DENY with HTTP and TCP fields: only the TCP fields count (other port)",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
        wl: HTTPBIN,
        req: |r| {
            r.http = None;
            r.port = 9001
        },
        want: "allow",
    },
    Case {
        name: "TCP + DENY with HTTP and TCP fields: only the TCP fields count (same port)",
        yaml: "metadata: {name: tcp-policy, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]}",
        wl: HTTPBIN,
        req: |r| {
            r.http = None;
            r.port = 9000
        },
        want: "deny by foo/tcp-policy rule[0]",
    },
    Case {
        name: "TCP + DENY with a request.headers condition: condition ignored",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: 'request.headers[x-debug]', values: ['1']}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "deny by foo/deny rule[0]",
    },
    // --- when conditions, one per key ------------------------------------------
    Case {
        name: "when request.headers: value match (header name case-insensitive)",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: 'request.headers[X-User]', values: ['admin*']}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().headers = vec![("x-user", "admin-bob")],
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when request.headers: absent header fails values",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: 'request.headers[x-token]', values: ['*']}]}]}",
        wl: HTTPBIN,
        req: same,
        want: NO_ALLOW,
    },
    Case {
        name: "when request.headers: absent header satisfies notValues",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: 'request.headers[x-token]', notValues: [secret]}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when request.headers: '*' means present, even with an empty value",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: 'request.headers[x-debug]', values: ['*']}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().headers = vec![("X-Debug", "")],
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when source.ip",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: source.ip, values: [10.0.0.0/16]}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when remote.ip (notValues)",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: remote.ip, notValues: [203.0.113.0/24]}]}]}",
        wl: HTTPBIN,
        req: |r| r.remote = Some("203.0.113.5"),
        want: "allow",
    },
    Case {
        name: "when source.namespace",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: source.namespace, values: [cli*]}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "allow",
    },
    Case {
        name: "when source.principal (spiffe:// in the value)",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: source.principal, values: ['spiffe://cluster.local/ns/client/sa/sleep']}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when destination.ip",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: destination.ip, values: [10.0.1.0/24]}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "allow",
    },
    Case {
        name: "when destination.port",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {action: DENY, rules: [{when: [{key: destination.port, notValues: ['8080']}]}]}",
        wl: HTTPBIN,
        req: |r| r.port = 8443,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "when connection.sni: absent SNI fails values",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: connection.sni, values: ['*.foo.svc.cluster.local']}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: NO_ALLOW,
    },
    Case {
        name: "when connection.sni: suffix match",
        yaml: "metadata: {name: allow, namespace: foo}
spec: {rules: [{when: [{key: connection.sni, values: ['*.foo.svc.cluster.local']}]}]}",
        wl: HTTPBIN,
        req: |r| {
            r.http = None;
            r.sni = Some("httpbin.foo.svc.cluster.local")
        },
        want: "allow",
    },
    // --- dry-run and audit -----------------------------------------------------
    Case {
        name: "dry-run DENY: reported, not enforced",
        yaml: "metadata:
  name: deny-path-headers
  namespace: foo
  annotations: {istio.io/dry-run: 'true', owner: team-a}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/headers]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/headers",
        want: "allow +dry-run(foo/deny-path-headers rule[0])",
    },
    Case {
        name: "dry-run 'false' is enforced",
        yaml: "metadata:
  name: deny-path-headers
  namespace: foo
  annotations: {istio.io/dry-run: 'false'}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/headers]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/headers",
        want: "deny by foo/deny-path-headers rule[0]",
    },
    Case {
        name: "dry-run ALLOW that does not match: reported, not enforced (and not an ALLOW policy)",
        yaml: "metadata:
  name: allow-other
  namespace: foo
  annotations: {istio.io/dry-run: 'true'}
spec: {rules: [{from: [{source: {namespaces: [other]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow +dry-run(allow-nothing (no ALLOW policy matched))",
    },
    Case {
        name: "dry-run ALLOW that matches: nothing reported",
        yaml: "metadata:
  name: allow-client
  namespace: foo
  annotations: {istio.io/dry-run: 'true'}
spec: {rules: [{from: [{source: {namespaces: [client]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "dry-run results are reported on denied requests too",
        yaml: "metadata: {name: deny-all, namespace: foo}
spec: {action: DENY, rules: [{}]}
---
metadata:
  name: dry
  namespace: foo
  annotations: {istio.io/dry-run: 'true'}
spec: {action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "deny by foo/deny-all rule[0] +dry-run(foo/dry rule[0])",
    },
    Case {
        name: "AUDIT marks the request, never changes the decision (allow)",
        yaml: "metadata: {name: audit-admin, namespace: foo}
spec: {action: AUDIT, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}",
        wl: HTTPBIN,
        req: |r| r.http().path = "/admin/x",
        want: "allow +audit",
    },
    Case {
        name: "AUDIT on a denied request",
        yaml: "metadata: {name: audit-all, namespace: foo}
spec: {action: AUDIT, rules: [{}]}
---
metadata: {name: allow-nothing, namespace: foo}
spec: {}",
        wl: HTTPBIN,
        req: same,
        want: "deny by allow-nothing (no ALLOW policy matched) +audit",
    },
    Case {
        name: "AUDIT not matching",
        yaml: "metadata: {name: audit-admin, namespace: foo}
spec: {action: AUDIT, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "AUDIT on TCP ignores HTTP-only fields (like DENY)",
        yaml: "metadata: {name: audit-admin, namespace: foo}
spec: {action: AUDIT, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}",
        wl: HTTPBIN,
        req: tcp,
        want: "allow +audit",
    },
    // --- scope: root namespace, namespaces, selectors ----------------------------
    Case {
        name: "root namespace policy applies to every namespace",
        yaml: "metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [client]}}]}]}",
        wl: ("elsewhere", &[]),
        req: same,
        want: "deny by istio-system/mesh-deny rule[0]",
    },
    Case {
        name: "root namespace policy with a selector only selects matching workloads",
        yaml: "metadata: {name: mesh-deny, namespace: istio-system}
spec: {selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "root allow-nothing + namespace ALLOW: any ALLOW match allows",
        yaml: "metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
---
metadata: {name: allow-client, namespace: foo}
spec: {rules: [{from: [{source: {namespaces: [client]}}]}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "policy of another namespace does not apply",
        yaml: "metadata: {name: deny-all, namespace: bar}
spec: {action: DENY, rules: [{}]}",
        wl: HTTPBIN,
        req: same,
        want: "allow",
    },
    Case {
        name: "selector matches (subset of the workload labels)",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{}]}",
        wl: ("foo", &[("app", "httpbin"), ("version", "v1")]),
        req: same,
        want: "deny by foo/deny rule[0]",
    },
    Case {
        name: "selector mismatch (value differs)",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin, version: v2}}, action: DENY, rules: [{}]}",
        wl: ("foo", &[("app", "httpbin"), ("version", "v1")]),
        req: same,
        want: "allow",
    },
    Case {
        name: "empty matchLabels selects every workload of the namespace",
        yaml: "metadata: {name: deny, namespace: foo}
spec: {selector: {matchLabels: {}}, action: DENY, rules: [{}]}",
        wl: ("foo", &[]),
        req: same,
        want: "deny by foo/deny rule[0]",
    },
];

#[test]
fn semantics_table() {
    assert!(CASES.len() >= 40, "at least 40 cases");
    let mut failures = Vec::new();
    for case in CASES {
        let compiled = compile(case.yaml, ROOT);
        let wp = compiled.for_workload(&workload(case.wl.0, case.wl.1));
        let mut req = R::default();
        (case.req)(&mut req);
        let got = render(&req.decide_with(&wp));
        if got != case.want {
            failures.push(format!(
                "{}:\n    want {}\n    got  {got}",
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
fn custom_root_namespace() {
    let yaml =
        "metadata: {name: mesh-deny, namespace: mesh-root}\nspec: {action: DENY, rules: [{}]}";
    let wl = workload("foo", &[]);
    let custom = compile(yaml, "mesh-root").for_workload(&wl);
    assert_eq!(
        render(&R::default().decide_with(&custom)),
        "deny by mesh-root/mesh-deny rule[0]"
    );
    // With the default root the same policy only applies to namespace mesh-root.
    let default = compile(yaml, ROOT).for_workload(&wl);
    assert_eq!(render(&R::default().decide_with(&default)), "allow");
}

#[test]
fn has_http_rules() {
    let cases = [
        (
            "spec: {action: DENY, rules: [{to: [{operation: {ports: ['80']}}]}]}",
            false,
        ),
        (
            "spec: {action: DENY, rules: [{to: [{operation: {notPaths: [/x]}}]}]}",
            true,
        ),
        (
            "spec: {action: AUDIT, rules: [{to: [{operation: {hosts: [a]}}]}]}",
            true,
        ),
        (
            "spec: {rules: [{when: [{key: 'request.headers[a]', values: [b]}]}]}",
            true,
        ),
        (
            "spec: {rules: [{when: [{key: connection.sni, values: [b]}]}]}",
            false,
        ),
    ];
    for (spec, want) in cases {
        let yaml = format!("metadata: {{name: p, namespace: foo}}\n{spec}");
        let wp = compile(&yaml, ROOT).for_workload(&workload("foo", &[]));
        assert_eq!(wp.has_http_rules(), want, "{spec}");
        // A workload the policy does not apply to never needs HTTP.
        let other = compile(&yaml, ROOT).for_workload(&workload("bar", &[]));
        assert!(!other.has_http_rules());
    }
}

/// HTTP rules make a connection HTTP only on the ports they can apply to.
#[test]
fn http_rules_apply_only_on_the_ports_they_can_match() {
    let cases = [
        // No port restriction: every port.
        (
            "{to: [{operation: {paths: [/x]}}]}",
            &[(80, true), (25, true)][..],
        ),
        // Operations restricted to 80 (and 8080).
        (
            "{to: [{operation: {ports: ['80', '8080'], methods: [GET]}}]}",
            &[(80, true), (8080, true), (25, false)],
        ),
        // An HTTP operation on 80 and a plain one on 25: the rule has HTTP
        // fields and may apply on both (conservative: both are parsed).
        (
            "{to: [{operation: {ports: ['80'], paths: [/x]}}, {operation: {ports: ['25']}}]}",
            &[(80, true), (25, true), (3306, false)],
        ),
        // notPorts rules its ports out.
        (
            "{to: [{operation: {notPorts: ['25'], paths: [/x]}}]}",
            &[(80, true), (25, false)],
        ),
        // A destination.port condition restricts too.
        (
            "{when: [{key: destination.port, values: ['80']}, {key: 'request.headers[a]', values: [b]}]}",
            &[(80, true), (25, false)],
        ),
        // No HTTP fields: never.
        (
            "{to: [{operation: {ports: ['80']}}]}",
            &[(80, false), (25, false)],
        ),
    ];
    for (rule, ports) in cases {
        let yaml = format!(
            "metadata: {{name: p, namespace: foo}}\nspec: {{action: ALLOW, rules: [{rule}]}}"
        );
        let wp = compile(&yaml, ROOT).for_workload(&workload("foo", &[]));
        for (port, want) in ports {
            assert_eq!(wp.has_http_rules_on(*port), *want, "{rule} on port {port}");
        }
    }
}

#[test]
fn workload_cache_returns_the_same_selection() {
    let compiled = compile(
        "metadata: {name: deny, namespace: foo}\nspec: {action: DENY, rules: [{}]}",
        ROOT,
    );
    let wl = workload("foo", &[("app", "x")]);
    let a = compiled.for_workload(&wl);
    let b = compiled.for_workload(&wl);
    assert!(std::sync::Arc::ptr_eq(&a.inner, &b.inner));
    assert_eq!(
        a.policy_names().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["foo/deny"]
    );
}
