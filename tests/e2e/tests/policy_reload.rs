//! Policies change while a client keeps making requests: each request is
//! decided by the set in force when it arrives, and nothing fails otherwise.

use std::time::Duration;

use mesh_e2e::{
    mesh::{TestCa, node_issuers, start_mesh},
    two_nodes,
};
use mesh_testbed::{Pod, e2e_enabled, wait_until};

const HTTP: u16 = 8080;

const ALLOW_X: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: toggle, namespace: default}
spec:
  selector: {matchLabels: {app: c}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/a"]}}]
    to: [{operation: {paths: ["/x"]}}]
"#;

const DENY_X: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: toggle, namespace: default}
spec:
  selector: {matchLabels: {app: c}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/x"]}}]
"#;

/// An HTTP/1.1 server (`pod-tool http-server`) answering `ok` to everything.
fn start_server(pod: &Pod) -> mesh_testbed::Process {
    let p = pod
        .spawn_tool(&["http-server", &format!("0.0.0.0:{HTTP}"), "--body", "ok"])
        .unwrap();
    wait_until("the HTTP server", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("ready"))
    })
    .unwrap();
    p
}

/// One keep-alive connection, a GET /x every 5 ms for `secs`; prints the
/// number of responses per status, the number of status changes seen, and
/// every failure (which must not happen; a connection that closes is one).
fn start_client(pod: &Pod, host: &str, secs: u32) -> mesh_testbed::Process {
    let p = pod
        .spawn_tool(&[
            "http-client",
            host,
            &HTTP.to_string(),
            "/x",
            "--for-secs",
            &secs.to_string(),
            "--every-ms",
            "5",
            "--timeout-secs",
            "5",
        ])
        .unwrap();
    wait_until("the first response", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("started"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.output_report()));
    p
}

fn probe(pod: &Pod, host: &str) -> String {
    let url = format!("http://{host}:{HTTP}/x");
    let out = pod
        .run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn policy_changes_under_load_apply_to_each_request_as_it_arrives() {
    if !e2e_enabled("policy_changes_under_load_apply_to_each_request_as_it_arrives") {
        return;
    }
    let topo = two_nodes("policy_reload");
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let ca = TestCa::new(&topo, "root").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    let agents = start_mesh(&topo, &issuers, "1h").unwrap();
    let _server = start_server(c);
    let c_agent = &agents[1];
    let host = c.ipv4().to_string();
    let apply = |policy: &str| {
        let generation = c_agent.status().unwrap().config_generation;
        c_agent.write_file("policies/toggle.yaml", policy).unwrap();
        c_agent.wait_generation_after(generation).unwrap();
    };
    apply(ALLOW_X);
    let mut client = start_client(a, &host, 6);

    for _ in 0..3 {
        apply(DENY_X);
        assert_eq!(
            probe(a, &host),
            "403",
            "a new request after the switch to DENY"
        );
        apply(ALLOW_X);
        assert_eq!(
            probe(a, &host),
            "200",
            "a new request after the switch to ALLOW"
        );
    }

    let out = client.wait_with_deadline(Duration::from_secs(30)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .unwrap_or_else(|| panic!("no result:\n{stdout}"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (ok, denied, other, changes, errors) =
        (result[0], result[1], result[2], result[3], result[4]);
    eprintln!(
        "under load: {ok} allowed, {denied} denied, {changes} switches seen on one connection, {errors} errors"
    );
    assert_eq!(
        (other, errors),
        (0, 0),
        "every request got 200 or 403 and nothing failed:\n{stdout}"
    );
    assert!(ok > 0 && denied > 0, "both decisions were seen: {stdout}");
    // The long-lived connection followed every switch (6 changes), so each of
    // its requests was decided by the set in force when it arrived.
    assert!(
        changes >= 6,
        "the keep-alive connection saw {changes} switches: {stdout}"
    );
}
