//! Kubernetes mode end to end, with a MODEL of the API server: pods are
//! real pod sandboxes made through a real containerd's CRI API (runc, the
//! CNI plugins), as the kubelet makes them; their Pod objects (and the
//! namespace, Service and EndpointSlice) are served by the stand-in API
//! server (`mesh_testbed::kube_api`, the API's list/watch protocol over HTTP,
//! on the test bed's control-plane address; not a real API server, none can
//! be installed here). The agents run with `discovery: kubernetes` and no
//! pods.yaml: they find, enrol and capture the pods themselves.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::proxy::connections::Direction;
use mesh_e2e::{agent::NodeAgent, kube::*};
use mesh_testbed::{Process, Topology, cri::cri_enabled, wait_until};

#[test]
fn model_api_pods_made_through_cri_are_found_enrolled_captured_and_released() {
    if !cri_enabled("model_api_pods_made_through_cri_are_found_enrolled_captured_and_released") {
        return;
    }
    let topo = Topology::builder("kubernetes_cri")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&topo, 201);

    // Pods appear: each is enrolled by its node's agent, found by its IP
    // and UID alone, soon after its object is Running.
    let client = cluster.create_pod("n1", "client");
    let web = cluster.create_pod("n1", "web");
    let db = cluster.create_pod("n2", "db");
    let mut took = Vec::new();
    for (node, pod) in [("n1", &client), ("n1", &web), ("n2", &db)] {
        took.push(cluster.wait_enrolled(node, pod));
    }
    eprintln!("enrolled after the Pod object was Running: {took:?}");
    let n1 = &cluster.node("n1").agent;
    let n2 = &cluster.node("n2").agent;
    let status = n1.status().unwrap();
    let kubernetes = status.kubernetes.expect("the Kubernetes part of /status");
    assert!(kubernetes.synced, "{kubernetes:?}");
    assert!(kubernetes.report.waiting.is_empty(), "{kubernetes:?}");

    let generation = n2.status().unwrap().config_generation;
    n2.write_file("policies/db.yaml", DB_ALLOWS_ONLY_CLIENT)
        .unwrap();
    n2.wait_generation_after(generation).unwrap();
    let _servers: Vec<Process> = [&web, &db]
        .iter()
        .map(|p| cluster.spawn(p, &["peer-echo-server", &ECHO_PORT.to_string()]))
        .collect();

    // Same node: captured by n1's agent, delivered into web (from the
    // agent's own address in the pod: keeping the client's is issue 22).
    let answer = retry(|| cluster.send(&client, &web));
    assert!(answer.ends_with("|hello"), "{answer}");
    let local = n1
        .wait_for_connection("client -> web on n1", |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == web.ip()
        })
        .unwrap();
    assert_eq!(
        local.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/client")
    );
    // Across nodes: mutual TLS, and db's policy admits the client only.
    let answer = retry(|| cluster.send(&client, &db));
    assert!(answer.ends_with("|hello"), "{answer}");
    let tunnelled = n1
        .wait_for_connection("client -> db through the tunnel", |r| {
            r.direction == Direction::Outbound && r.original_dst.ip() == db.ip()
        })
        .unwrap();
    assert_eq!(tunnelled.security, "mutual_tls", "{tunnelled:?}");
    assert_eq!(
        tunnelled.peer_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/db")
    );
    assert!(
        cluster.send(&web, &db).is_err(),
        "web is not admitted into db"
    );

    // The kubelet's probe (db's readiness probe, TCP on ECHO_PORT) from
    // the node's address passes db's policy; the node's connection to
    // another port of db does not.
    let _other = cluster.spawn(&db, &["peer-echo-server", &OTHER_PORT.to_string()]);
    let from_node = |port: u16| {
        cluster
            .node("n2")
            .node
            .run_tool(
                &["send", &db.ip().to_string(), &port.to_string(), "probe"],
                Duration::from_secs(10),
            )
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let probed = from_node(ECHO_PORT).expect("the kubelet's probe reaches db");
    assert!(probed.ends_with("|probe"), "{probed}");
    let client_other = cluster
        .spawn(
            &client,
            &["send", &db.ip().to_string(), &OTHER_PORT.to_string(), "x"],
        )
        .wait_success(Duration::from_secs(10));
    assert!(
        client_other.is_ok(),
        "the client reaches db's other port: {client_other:?}"
    );
    assert!(
        from_node(OTHER_PORT).is_err(),
        "the node's connection to a port that is not probed must be refused by db's policy"
    );
    assert_eq!(
        n2.metric_sum(
            "mesh_authorization_decisions_total",
            &[("decision", "kubelet_probe")]
        ),
        1
    );

    // A deleted pod is released.
    cluster.delete_pod("n1", &web);
    wait_until("n1 to release web", Duration::from_secs(10), || {
        Ok(!n1.status()?.pods.iter().any(|p| p.name == "web"))
    })
    .unwrap();

    // Recreated under the same name: a new sandbox, a new namespace, and
    // the agent follows it there.
    let old_cookie = netns_cookie(n2, "db").expect("db enrolled");
    cluster.delete_pod("n2", &db);
    let db2 = cluster.create_pod("n2", "db");
    assert_ne!(db2.sandbox.netns_path, db.sandbox.netns_path);
    let n2 = &cluster.node("n2").agent;
    wait_until("db enrolled in its new namespace", ENROL_DEADLINE, || {
        Ok(netns_cookie(n2, "db").is_some_and(|c| c != old_cookie))
    })
    .unwrap();
    let _db2_server = cluster.spawn(&db2, &["peer-echo-server", &ECHO_PORT.to_string()]);
    let answer = retry_or(
        || cluster.send(&client, &db2),
        || {
            format!(
                "n1 connections: {:#?}\nn1 log: {}\nn2 connections: {:#?}\nn2 log: {}",
                cluster.node("n1").agent.connections(),
                tail(&cluster.node("n1").agent.log()),
                cluster.node("n2").agent.connections(),
                tail(&cluster.node("n2").agent.log())
            )
        },
    );
    assert!(answer.ends_with("|hello"), "{answer}");
    n2.wait_for_connection("client -> the recreated db, inbound on n2", |r| {
        r.direction == Direction::Inbound && r.original_dst.ip() == db2.ip()
    })
    .unwrap();
}

#[test]
fn model_api_away_for_a_minute_under_traffic_then_a_change_made_meanwhile_is_applied() {
    if !cri_enabled(
        "model_api_away_for_a_minute_under_traffic_then_a_change_made_meanwhile_is_applied",
    ) {
        return;
    }
    const OUTAGE: Duration = Duration::from_secs(60);
    let topo = Topology::builder("kubernetes_outage")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&topo, 203);
    let client = cluster.create_pod("n1", "client");
    let db = cluster.create_pod("n2", "db");
    cluster.wait_enrolled("n1", &client);
    cluster.wait_enrolled("n2", &db);
    // The state is saved once every watch has listed.
    for node in topo.nodes() {
        let file = state_file(&topo, node);
        wait_until("the state saved", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&file).is_ok_and(|s| s.contains("\"db\"")))
        })
        .unwrap();
    }
    let _echo = cluster.spawn(&db, &["echo-server", &LOAD_PORT.to_string()]);
    retry(|| {
        cluster
            .spawn(
                &client,
                &[
                    "echo",
                    &db.ip().to_string(),
                    &LOAD_PORT.to_string(),
                    "--plain",
                ],
            )
            .wait_success(Duration::from_secs(10))
            .map(|_| "ok".to_string())
    });

    // Traffic for the whole outage and a little after.
    let seconds = (OUTAGE + Duration::from_secs(15)).as_secs().to_string();
    let mut load = cluster.spawn(
        &client,
        &[
            "load",
            "tcp",
            &db.ip().to_string(),
            &LOAD_PORT.to_string(),
            &seconds,
            "2",
        ],
    );
    let outage_started = Instant::now();
    cluster.api.go_away();
    // While the API is away: n2's agent is replaced (as a DaemonSet
    // rolling update does, taking over its listeners) and the new one must
    // serve db from the saved state alone; a pod is created meanwhile.
    let retired = cluster.nodes[1].agent.replace().unwrap();
    retired.stop(Duration::from_secs(30)).unwrap();
    assert!(
        cluster.nodes[1]
            .agent
            .status()
            .unwrap()
            .pods
            .iter()
            .any(|p| p.name == "db" && p.enrolled),
        "the restarted agent serves db from the saved state"
    );
    // `mesh-agent check` shows what the saved state holds, API or not.
    let check = Command::new(mesh_e2e::agent::agent_binary())
        .args(["check", "--config"])
        .arg(cluster.nodes[1].agent.config_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.contains("saved state") && said.contains("1 pods of this node found on it"),
        "{said}"
    );
    let late = cluster.create_pod("n1", "late");
    let errors = |agent: &NodeAgent| -> u64 {
        agent
            .status()
            .ok()
            .and_then(|s| s.kubernetes)
            .map_or(0, |k| k.watches.values().map(|w| w.errors).sum())
    };
    wait_until(
        "watch errors during the outage",
        Duration::from_secs(20),
        || Ok(errors(&cluster.nodes[0].agent) > 0),
    )
    .unwrap();
    if let Some(left) = OUTAGE.checked_sub(outage_started.elapsed()) {
        std::thread::sleep(left);
    }
    assert!(
        !cluster.nodes[0]
            .agent
            .status()
            .unwrap()
            .pods
            .iter()
            .any(|p| p.name == "late"),
        "nothing reached the agent while the API was away"
    );
    cluster.runtime.block_on(cluster.api.come_back()).unwrap();
    // The change made meanwhile is applied once the API is back.
    let took = cluster.wait_enrolled("n1", &late);
    eprintln!("the pod created during the outage enrolled {took:?} after the API came back");

    let out = load.wait_success(Duration::from_secs(60)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total = stdout
        .lines()
        .find_map(|l| l.strip_prefix("total tcp "))
        .unwrap_or_else(|| panic!("no total line: {stdout}"));
    let counts: Vec<u64> = total.split(' ').map(|n| n.parse().unwrap()).collect();
    let (sent, ok, failed) = (counts[0], counts[1], counts[2]);
    eprintln!("during the outage: {sent} exchanges, {ok} ok, {failed} failed");
    assert!(sent > 100, "{stdout}");
    assert_eq!(failed, 0, "{stdout}");
    assert_eq!(sent, ok);
}

/// A route resource as the API serves it (with what the API server adds).
fn web_route(extra_in_first_rule: &str) -> serde_json::Value {
    let mut route: serde_json::Value = serde_yaml::from_str(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: shop
  creationTimestamp: "2026-12-07T10:00:00Z"
  generation: 1
  managedFields:
  - manager: kubectl
    operation: Apply
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
    port: {port}
  rules:
  - matches:
    - headers:
      - name: x-version
        value: v2
{extra_in_first_rule}    backendRefs:
    - name: web-v2
      port: {port}
  - backendRefs:
    - name: web-v1
      port: {port}
"#,
        port = WEB_PORT
    ))
    .unwrap();
    route["status"] = serde_json::json!({"parents": []});
    route
}

const WEB_PORT: u16 = 8080;

#[test]
fn model_api_routes_from_the_api_are_applied_refused_alone_and_removed() {
    if !cri_enabled("model_api_routes_from_the_api_are_applied_refused_alone_and_removed") {
        return;
    }
    let topo = Topology::builder("kubernetes_routes")
        .node("n1", &[])
        .node("n2", &[])
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&topo, 206);
    let client = cluster.create_pod("n1", "client");
    let v1 = cluster.create_pod("n2", "v1");
    let v2 = cluster.create_pod("n2", "v2");
    cluster.wait_enrolled("n1", &client);
    cluster.wait_enrolled("n2", &v1);
    cluster.wait_enrolled("n2", &v2);
    let _servers = [
        cluster.http_backend(&v1, WEB_PORT, "v1"),
        cluster.http_backend(&v2, WEB_PORT, "v2"),
    ];
    cluster.put_service("web", "10.96.7.10", WEB_PORT, &[&v1, &v2]);
    cluster.put_service("web-v1", "10.96.7.11", WEB_PORT, &[&v1]);
    cluster.put_service("web-v2", "10.96.7.12", WEB_PORT, &[&v2]);
    let n1 = &cluster.node("n1").agent;
    let url = format!("http://10.96.7.10:{WEB_PORT}/");

    // The route resources' definitions are not installed: the agent says
    // so, and is synced all the same; web spreads over both.
    let kubernetes = n1.status().unwrap().kubernetes.unwrap();
    assert!(kubernetes.synced, "{kubernetes:?}");
    assert!(
        kubernetes.watches["httproutes"].not_installed,
        "{kubernetes:?}"
    );
    let spread = || {
        wait_until("web spread over v1 and v2", Duration::from_secs(30), || {
            let load = cluster.http_load(&client, &url, &["--requests", "100"]);
            Ok(load.all_ok() && load.served_by("v1") > 0 && load.served_by("v2") > 0)
        })
        .unwrap()
    };
    spread();

    // The definition is installed and an HTTPRoute applied: the agent
    // finds both (the watch looks again within seconds) and routes by
    // header, v2 for x-version: v2, v1 for the rest.
    cluster.api.install("HTTPRoute");
    cluster.api.put(web_route(""));
    let installed = Instant::now();
    let accepted = |agent: &NodeAgent| -> anyhow::Result<bool> {
        let (_, dump) = agent.get("/config_dump")?;
        let dump: serde_json::Value = serde_json::from_str(&dump)?;
        Ok(dump["routes"].as_array().is_some_and(|routes| {
            routes.iter().any(|r| {
                r["route"] == "shop/web"
                    && r["file"] == "kubernetes:HTTPRoute/shop/web"
                    && r["parents"][0]["accepted"] == true
            })
        }))
    };
    wait_until(
        "the route from the API in force",
        Duration::from_secs(30),
        || accepted(n1),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", n1.get("/config_dump").unwrap().1));
    eprintln!(
        "the route in force {:?} after its definition was installed",
        installed.elapsed()
    );
    assert!(!n1.status().unwrap().kubernetes.unwrap().watches["httproutes"].not_installed);
    let routed = |version: &str| {
        let mut args = vec!["--requests", "100", "--connections", "2"];
        let header = format!("x-version:{version}");
        if version == "v2" {
            args.extend(["--header", &header]);
        }
        let load = cluster.http_load(&client, &url, &args);
        eprintln!("routed to {version}: {load}");
        assert!(load.all_ok(), "{load}");
        assert_eq!(load.served_by(version), 100, "{version}: {load}");
    };
    routed("v2");
    routed("v1");

    // A new version with a field not served: refused alone, named with
    // its field; the last version that loaded keeps routing.
    cluster
        .api
        .put(web_route("    sessionPersistence:\n      type: Cookie\n"));
    wait_until("the bad version refused", Duration::from_secs(30), || {
        let kubernetes = n1.status()?.kubernetes.unwrap();
        Ok(kubernetes
            .report
            .refused_routes
            .iter()
            .any(|(object, why)| {
                object == "HTTPRoute shop/web"
                    && why.contains("sessionPersistence")
                    && why.contains("keeps serving")
            }))
    })
    .unwrap();
    routed("v2");
    routed("v1");
    // `mesh-agent check` names it from the saved state (where no good
    // version is kept: it says the object is refused).
    wait_until(
        "the state saved with the route",
        Duration::from_secs(10),
        || {
            Ok(
                std::fs::read_to_string(state_file(&topo, cluster.node("n1").node))
                    .is_ok_and(|s| s.contains("sessionPersistence")),
            )
        },
    )
    .unwrap();
    let check = Command::new(mesh_e2e::agent::agent_binary())
        .args(["check", "--config"])
        .arg(n1.config_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    eprintln!("check: {said}");
    assert!(!check.status.success(), "{said}");
    assert!(
        said.contains("HTTPRoute shop/web (from the API) is refused")
            && said.contains("sessionPersistence"),
        "{said}"
    );

    // Deleted: web spreads over both again.
    assert!(cluster.api.delete("HTTPRoute", "shop", "web"));
    wait_until("the route gone", Duration::from_secs(30), || {
        Ok(!accepted(n1)?
            && n1
                .status()?
                .kubernetes
                .unwrap()
                .report
                .refused_routes
                .is_empty())
    })
    .unwrap();
    spread();
}
