//! The admin API's `/config_dump`: the configuration in force, with each
//! policy's source file, updated on reload, and never a private key.

use mesh_e2e::{NodeAgent, pods_yaml};
use mesh_testbed::{Topology, e2e_enabled};
use serde_json::Value;

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: default}
spec:
  selector: {matchLabels: {app: a}}
  rules:
  - to: [{operation: {methods: [\"GET\"], paths: [\"/api/*\"]}}]
";

fn dump(agent: &NodeAgent) -> Value {
    let (status, body) = agent.get("/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("PRIVATE KEY"),
        "the config dump shows a private key"
    );
    serde_json::from_str(&body).unwrap()
}

#[test]
fn config_dump_shows_the_configuration_in_force_and_follows_reloads() {
    if !e2e_enabled("config_dump_shows_the_configuration_in_force_and_follows_reloads") {
        return;
    }
    let topo = Topology::builder("cfgdump")
        .node("n1", &["a"])
        .build()
        .unwrap();
    let a = topo.pod("a");
    let agent = NodeAgent::start_with(
        &topo,
        topo.node("n1"),
        &pods_yaml(&[a]),
        "",
        &[("policies/a.yaml", POLICY.to_string())],
    )
    .unwrap();

    let first = dump(&agent);
    assert_eq!(first["node"]["name"], "n1");
    assert_eq!(first["pods"][0]["name"], "a");
    let policies = first["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1, "{first}");
    assert_eq!(policies[0]["name"], "allow-get");
    assert_eq!(policies[0]["action"], "ALLOW");
    assert_eq!(policies[0]["httpRules"], true);
    assert_eq!(policies[0]["selector"]["app"], "a");
    assert!(
        policies[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("policies/a.yaml"),
        "{first}"
    );

    // A second policy file: the dump follows the reload.
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file(
            "policies/b.yaml",
            &POLICY.replace("allow-get", "allow-get-too"),
        )
        .unwrap();
    agent.wait_generation_after(generation).unwrap();
    let second = dump(&agent);
    assert_eq!(second["configGeneration"], generation + 1);
    let names: Vec<&str> = second["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["allow-get", "allow-get-too"], "{second}");

    // A bad edit is rejected: the dump still shows the configuration in force.
    agent
        .write_file("policies/b.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: default}\nspec: {bogus: 1}\n")
        .unwrap();
    mesh_testbed::wait_until(
        "the bad edit to be rejected",
        std::time::Duration::from_secs(5),
        || Ok(agent.status()?.last_reload_error.is_some()),
    )
    .unwrap();
    let third = dump(&agent);
    assert_eq!(third["configGeneration"], second["configGeneration"]);
    assert_eq!(third["policies"].as_array().unwrap().len(), 2);
}
