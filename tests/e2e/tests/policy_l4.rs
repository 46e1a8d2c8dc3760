//! Istio AuthorizationPolicy enforced by the destination's agent at L4: across
//! nodes (principal proven by mTLS), on the same node (principal from the
//! capture) and for plaintext from outside the mesh (no principal); policies
//! applied live; a file that is not valid YAML (or not a policy) rejected
//! with the last good set still enforced; a policy that cannot be enforced
//! as written denying all traffic to the workload it selects, and only to
//! it; a policy exported by `kubectl get -o yaml` (with `serviceAccounts`)
//! enforced as written; PeerAuthentication STRICT refusing plaintext by
//! Istio's precedence (workload over namespace over mesh).

use std::{net::IpAddr, time::Duration};

use mesh_e2e::{
    mesh::{TestCa, node_issuers, start_mesh},
    traffic_servers,
};
use mesh_testbed::{Pod, Topology, e2e_enabled, traffic::bulk_upload, wait_until};

const PORT: u16 = 7100;

fn allowed(client: &Pod, ip: IpAddr, port: u16) -> bool {
    bulk_upload(client, ip, port, 64 * 1024).is_ok()
}

const C_ALLOWS_ONLY_A_ON_7100: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: c-allow-a
  namespace: default
spec:
  selector:
    matchLabels:
      app: c
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/a"]
    to:
    - operation:
        ports: ["7100"]
"#;

const B_DENIES_A: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: b-deny-a
  namespace: default
spec:
  selector:
    matchLabels:
      app: b
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/a"]
"#;

const D_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: d-strict, namespace: default}
spec:
  selector: {matchLabels: {app: d}}
  mtls: {mode: STRICT}
";

const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

const DEFAULT_NAMESPACE_PERMISSIVE: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: PERMISSIVE}}
";

/// An ALLOW policy for d as `kubectl get -o yaml` prints it.
const D_EXPORTED_ALLOWS_SERVICE_ACCOUNT_A: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"annotations":{},"name":"d-allow-a","namespace":"default"}}
  creationTimestamp: "2026-12-01T10:00:00Z"
  generation: 1
  managedFields:
  - apiVersion: security.istio.io/v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        .: {}
        f:rules: {}
        f:selector: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2026-12-01T10:00:00Z"
  name: d-allow-a
  namespace: default
  resourceVersion: "48213"
  uid: 0b6f3c2e-5d41-4a8e-9f1b-7c2d4e6a8b90
spec:
  selector:
    matchLabels:
      app: d
  rules:
  - from:
    - source:
        serviceAccounts: ["a"]
status: {}
"#;

#[test]
fn the_destination_agent_enforces_l4_policy_by_principal_port_and_plaintext() {
    if !e2e_enabled("the_destination_agent_enforces_l4_policy_by_principal_port_and_plaintext") {
        return;
    }
    let topo = Topology::builder("policy_l4")
        .node("n1", &["a", "b", "outsider"])
        .node("n2", &["c", "d"])
        .build()
        .unwrap();
    let (a, b, c, d, outsider) = (
        topo.pod("a"),
        topo.pod("b"),
        topo.pod("c"),
        topo.pod("d"),
        topo.pod("outsider"),
    );
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    // The outsider is not enrolled on n1 and not a mesh workload for n2.
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _servers = traffic_servers(&[b, c, d], PORT);
    let c_ip = IpAddr::V4(c.ipv4());
    let d_ip = IpAddr::V4(d.ipv4());
    let b_ip = IpAddr::V4(b.ipv4());
    // Without policies everything flows.
    assert!(allowed(b, c_ip, PORT) && allowed(outsider, c_ip, PORT) && allowed(a, b_ip, PORT));

    // PeerAuthentication on n2. d STRICT: plaintext from the outsider is
    // refused, a (mutual TLS) still gets in, c (not selected) still takes
    // plaintext. Then mesh-wide STRICT covers c too, and the namespace's
    // PERMISSIVE overrides the mesh's again (Istio's precedence).
    let apply = |yaml: &str| {
        let generation = agents[1].status().unwrap().config_generation;
        agents[1].write_file("policies/peer.yaml", yaml).unwrap();
        agents[1].wait_generation_after(generation).unwrap();
    };
    apply(D_STRICT);
    assert!(
        !allowed(outsider, d_ip, PORT),
        "STRICT refuses plaintext into d"
    );
    assert!(allowed(a, d_ip, PORT), "STRICT lets mutual TLS into d");
    assert!(allowed(outsider, c_ip, PORT), "c is not selected");
    // The refusal is recorded with its own outcome and Istio's response
    // flag for it (NR: no filter chain takes plaintext).
    let refused = agents[1].connections().unwrap();
    assert!(
        refused.iter().any(|r| r.outcome.response_flags() == "NR"
            && matches!(&r.outcome, mesh_agent::proxy::outcome::Outcome::PlaintextRefused(by)
                if by == "default/d-strict (PeerAuthentication STRICT: plaintext refused)")),
        "{refused:?}"
    );
    let n2 = agents[1].status().unwrap();
    assert!(
        n2.authorization.iter().any(|d| d.policy
            == "default/d-strict (PeerAuthentication STRICT: plaintext refused)"
            && d.decision == "deny"
            && d.count >= 1),
        "{:?}",
        n2.authorization
    );
    apply(&format!("{D_STRICT}---\n{MESH_STRICT}"));
    assert!(!allowed(outsider, c_ip, PORT), "mesh-wide STRICT covers c");
    assert!(allowed(a, c_ip, PORT), "mutual TLS into c");
    apply(&format!(
        "{D_STRICT}---\n{MESH_STRICT}---\n{DEFAULT_NAMESPACE_PERMISSIVE}"
    ));
    assert!(
        allowed(outsider, c_ip, PORT),
        "the namespace's PERMISSIVE wins over the mesh's"
    );
    assert!(
        !allowed(outsider, d_ip, PORT),
        "d's own STRICT wins over its namespace"
    );
    std::fs::remove_file(agents[1].config_dir().join("policies/peer.yaml")).unwrap();
    wait_until("plaintext into d again", Duration::from_secs(5), || {
        Ok(allowed(outsider, d_ip, PORT))
    })
    .unwrap();

    for (agent, file, policy) in [
        (&agents[1], "policies/c.yaml", C_ALLOWS_ONLY_A_ON_7100),
        (&agents[0], "policies/b.yaml", B_DENIES_A),
    ] {
        let generation = agent.status().unwrap().config_generation;
        agent.write_file(file, policy).unwrap();
        agent.wait_generation_after(generation).unwrap();
    }

    // Across nodes, principal proven by mTLS: only a, only on 7100.
    assert!(allowed(a, c_ip, PORT), "a may reach c:7100");
    assert!(!allowed(b, c_ip, PORT), "b is not allowed into c");
    assert!(!allowed(a, c_ip, PORT + 1), "c allows a only on port 7100");
    // Plaintext from outside the mesh has no principal: not allowed into c.
    assert!(!allowed(outsider, c_ip, PORT), "plaintext into c");
    // Same node, principal from the capture: b denies a; others still reach b.
    assert!(!allowed(a, b_ip, PORT), "b denies a");
    assert!(
        allowed(c, b_ip, PORT),
        "b has no ALLOW policy: c may reach it"
    );
    assert!(
        allowed(outsider, b_ip, PORT),
        "plaintext into b is not denied by b's policy"
    );

    // Each deny says which policy and rule decided it.
    let n2 = agents[1].status().unwrap();
    let denied_into_c: u64 = n2
        .authorization
        .iter()
        .filter(|d| d.decision == "deny" && !d.policy.contains("PeerAuthentication"))
        .map(|d| d.count)
        .sum();
    assert_eq!(denied_into_c, 3, "{:?}", n2.authorization);
    assert!(
        agents[1].log().contains("connection denied"),
        "a deny log line on n2"
    );
    let n1 = agents[0].status().unwrap();
    // On a's node, c's deny shows as what it is, not as a tunnel failure.
    assert!(
        n1.tunnel_rejections
            .get("denied_by_peer")
            .copied()
            .unwrap_or(0)
            >= 1
            && !n1.tunnel_rejections.contains_key("tunnel_failed"),
        "{:?}",
        n1.tunnel_rejections
    );
    assert!(
        n1.authorization
            .iter()
            .any(|d| d.policy == "default/b-deny-a rule[0]"
                && d.decision == "deny"
                && d.count == 1),
        "{:?}",
        n1.authorization
    );
    let (_, metrics) = agents[0].get("/metrics").unwrap();
    assert!(
        metrics.contains(r#"mesh_authorization_decisions_total{decision="deny",policy="default/b-deny-a rule[0]"} 1"#),
        "{metrics}"
    );

    // Allows are attributed to the rule that allowed them.
    assert!(
        n2.authorization
            .iter()
            .any(|d| d.policy == "default/c-allow-a rule[0]" && d.decision == "allow"),
        "{:?}",
        n2.authorization
    );

    // Files that are not valid YAML or not an AuthorizationPolicy: refused,
    // with the file and what is wrong; a new bad file stays out, so the
    // last good policies stay in force every time.
    let good = C_ALLOWS_ONLY_A_ON_7100;
    let bad_files = [
        (
            "broken YAML",
            "apiVersion: security.istio.io/v1\nkind: [AuthorizationPolicy\n",
            "did not find expected",
        ),
        (
            "wrong kind",
            &good.replace("kind: AuthorizationPolicy", "kind: Sidecar") as &str,
            "\"Sidecar\" is not supported",
        ),
    ];
    for (what, content, expected) in bad_files {
        let generation = agents[1].status().unwrap().config_generation;
        let content = content.replace("c-allow-a", "bad-one");
        agents[1]
            .write_file("policies/z-bad.yaml", &content)
            .unwrap();
        let mut error = String::new();
        wait_until(
            &format!("the {what} file to be rejected"),
            Duration::from_secs(5),
            || {
                error = agents[1].status()?.last_reload_error.unwrap_or_default();
                Ok(error.contains(expected))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}: last error {error:?}"));
        assert!(error.contains("policies/z-bad.yaml"), "{what}: {error}");
        assert_eq!(
            agents[1].status().unwrap().config_generation,
            generation,
            "{what} must not apply"
        );
        assert!(
            allowed(a, c_ip, PORT) && !allowed(b, c_ip, PORT),
            "{what}: the last good policies still apply"
        );
    }

    // While z-bad.yaml stays bad, a change in another file still applies
    // (the bad file is kept back alone), and the refusal stays shown.
    let generation = agents[1].status().unwrap().config_generation;
    agents[1]
        .write_file(
            "policies/e.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: d-deny-b, namespace: default}
spec:
  selector: {matchLabels: {app: d}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/b"]}}]
"#,
        )
        .unwrap();
    agents[1].wait_generation_after(generation).unwrap();
    assert!(
        !allowed(b, d_ip, PORT) && allowed(a, d_ip, PORT),
        "e.yaml applied beside the bad file"
    );
    let error = agents[1]
        .status()
        .unwrap()
        .last_reload_error
        .unwrap_or_default();
    assert!(
        error.contains("policies/z-bad.yaml") && error.contains("last good version"),
        "{error}"
    );
    let generation = agents[1].status().unwrap().config_generation;
    std::fs::remove_file(agents[1].config_dir().join("policies/e.yaml")).unwrap();
    agents[1].wait_generation_after(generation).unwrap();
    assert!(allowed(b, d_ip, PORT), "e.yaml removed");

    // Policies that cannot be enforced as written (selecting c): each loads
    // alone as a DENY-all over c, says why in /status, and d (on the same
    // node, not selected) is untouched.
    let unenforceable = [
        (
            "unknown field",
            good.replace("action: ALLOW", "acton: ALLOW"),
            "acton",
        ),
        (
            "CUSTOM action",
            good.replace("action: ALLOW", "action: CUSTOM"),
            "CUSTOM",
        ),
        (
            "bad CIDR",
            good.replace(
                "principals: [\"cluster.local/ns/default/sa/a\"]",
                "ipBlocks: [\"10.1.0.0/40\"]",
            ),
            "10.1.0.0/40",
        ),
    ];
    for (what, content, expected) in unenforceable {
        let generation = agents[1].status().unwrap().config_generation;
        agents[1]
            .write_file(
                "policies/z-bad.yaml",
                &content.replace("c-allow-a", "bad-one"),
            )
            .unwrap();
        agents[1].wait_generation_after(generation).unwrap();
        let status = agents[1].status().unwrap();
        assert!(status.last_reload_error.is_none(), "{what}: {status:?}");
        assert!(
            status.unenforceable_policies.len() == 1
                && status.unenforceable_policies[0].contains("policies/z-bad.yaml:")
                && status.unenforceable_policies[0].contains(expected),
            "{what}: {:?}",
            status.unenforceable_policies
        );
        assert!(!allowed(a, c_ip, PORT), "{what}: c denies all, a too");
        assert!(
            allowed(a, d_ip, PORT) && allowed(b, d_ip, PORT),
            "{what}: d is not selected"
        );
    }

    // As `kubectl get -o yaml` prints it, with serviceAccounts: d allows a only.
    let generation = agents[1].status().unwrap().config_generation;
    agents[1]
        .write_file("policies/d.yaml", D_EXPORTED_ALLOWS_SERVICE_ACCOUNT_A)
        .unwrap();
    agents[1].wait_generation_after(generation).unwrap();
    assert!(allowed(a, d_ip, PORT), "d allows a's service account");
    assert!(!allowed(b, d_ip, PORT), "d allows nobody else");

    // Removing the bad file: c is governed by its good policy again.
    std::fs::remove_file(agents[1].config_dir().join("policies/z-bad.yaml")).unwrap();
    wait_until(
        "the unenforceable policy to go",
        Duration::from_secs(5),
        || Ok(agents[1].status()?.unenforceable_policies.is_empty()),
    )
    .unwrap();
    assert!(allowed(a, c_ip, PORT) && !allowed(b, c_ip, PORT));

    // targetRefs to a Service: the policy applies to the workloads its
    // selector selects (d), not to the rest of the namespace (c).
    let apply = |file: &str, yaml: &str| {
        let generation = agents[1].status().unwrap().config_generation;
        agents[1].write_file(file, yaml).unwrap();
        agents[1].wait_generation_after(generation).unwrap();
    };
    apply(
        "services.yaml",
        &format!(
            "services:\n  - name: d-svc\n    namespace: default\n    vips: [10.96.0.40]\n    ports: [{{port: 80, targetPort: {PORT}}}]\n    selector: {{app: d}}\n    endpoints:\n      - {{name: d, address: {}, node: {}}}\n",
            d.ipv4(),
            d.node_name()
        ),
    );
    let deny_a_to = |service: &str| {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-a-by-service, namespace: default}}
spec:
  targetRefs:
  - {{kind: Service, group: "", name: {service}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/default/sa/a"]}}}}]
"#
        )
    };
    apply("policies/t.yaml", &deny_a_to("d-svc"));
    assert!(!allowed(a, d_ip, PORT), "d is d-svc's: a denied");
    assert!(allowed(a, c_ip, PORT), "c is not d-svc's");
    // A Service this node does not know: the policy cannot be mapped, so
    // it denies its whole namespace, alone, and says why.
    apply("policies/t.yaml", &deny_a_to("no-such-svc"));
    assert!(!allowed(a, c_ip, PORT) && !allowed(a, d_ip, PORT));
    let unenforceable = agents[1].status().unwrap().unenforceable_policies;
    assert!(
        unenforceable.iter().any(|e| e.contains("policies/t.yaml")
            && e.contains("no-such-svc")
            && e.contains("is not known")),
        "{unenforceable:?}"
    );
    let generation = agents[1].status().unwrap().config_generation;
    std::fs::remove_file(agents[1].config_dir().join("policies/t.yaml")).unwrap();
    agents[1].wait_generation_after(generation).unwrap();
    assert!(allowed(a, c_ip, PORT) && allowed(a, d_ip, PORT));
}
