//! The kubelet's probes come from the node's own address. They reach a pod
//! whose ALLOW policy admits one other workload only (as Istio lets them),
//! on the probe ports only: the node's other connections, and everyone
//! else's to the probe port, are decided by the policy as usual.

use std::net::{IpAddr, SocketAddr};

use mesh_e2e::{
    agent::{NodeAgent, pod_yaml},
    backend::HttpBackend,
    traffic_servers,
};
use mesh_testbed::{Topology, e2e_enabled, traffic::bulk_upload};

/// The probe port (an HTTP health endpoint) and another HTTP port of c.
const PROBE_PORT: u16 = 8080;
const OTHER_PORT: u16 = 8081;
/// A TCP port where a (the one workload admitted) is served.
const DATA_PORT: u16 = 7100;

const C_ALLOWS_ONLY_A: &str = r#"
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
"#;

#[test]
fn kubelet_probes_from_the_node_pass_an_allow_policy_on_probe_ports_only() {
    if !e2e_enabled("kubelet_probes_from_the_node_pass_an_allow_policy_on_probe_ports_only") {
        return;
    }
    let topo = Topology::builder("kubelet_probes")
        .node("n1", &["a", "b", "c"])
        .build()
        .unwrap();
    let node = topo.node("n1");
    let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
    // The node reaches its pods from its bridge address: that is where the
    // kubelet's probes come from.
    let node_address = IpAddr::V4(node.bridge_ipv4());
    let probes =
        format!("    kubeletProbes: {{from: [\"{node_address}\"], ports: [{PROBE_PORT}]}}\n");
    let pods = format!(
        "pods:\n{}{}{}",
        pod_yaml(a, ""),
        pod_yaml(b, ""),
        pod_yaml(c, &probes)
    );
    let agent = NodeAgent::start(&topo, node, &pods, "").unwrap();
    let generation = agent.status().unwrap().config_generation;
    agent
        .write_file("policies/c.yaml", C_ALLOWS_ONLY_A)
        .unwrap();
    agent.wait_generation_after(generation).unwrap();

    let _health = HttpBackend::start(c, PROBE_PORT, "health").unwrap();
    let _other = HttpBackend::start(c, OTHER_PORT, "other").unwrap();
    let _data = traffic_servers(&[c], DATA_PORT);
    let c_ip = IpAddr::V4(c.ipv4());

    // The admitted workload is served; the policy is in force.
    assert!(
        bulk_upload(a, c_ip, DATA_PORT, 64 * 1024).is_ok(),
        "a into c"
    );
    assert!(
        bulk_upload(b, c_ip, DATA_PORT, 64 * 1024).is_err(),
        "b is not admitted into c"
    );

    // The probe from the node's address to the probe port passes.
    let (status, body) = node
        .http_get(SocketAddr::new(c_ip, PROBE_PORT), "/healthz")
        .expect("the kubelet's probe reaches c");
    assert_eq!((status, body.as_str()), (200, "health"));
    // The node's connection to another port of c is decided by the policy:
    // refused.
    assert!(
        node.http_get(SocketAddr::new(c_ip, OTHER_PORT), "/")
            .is_err(),
        "a connection from the node to a port that is not probed must be refused"
    );
    // Nobody else gets the pass on the probe port.
    assert!(
        bulk_upload(b, c_ip, PROBE_PORT, 1024).is_err(),
        "b into c's probe port"
    );

    // The pass is counted apart from policy decisions.
    let probes_counted = |agent: &NodeAgent| -> u64 {
        agent
            .status()
            .unwrap()
            .authorization
            .iter()
            .filter(|d| d.decision == "kubelet_probe")
            .map(|d| d.count)
            .sum()
    };
    assert_eq!(probes_counted(&agent), 1);
    assert_eq!(
        agent.metric_sum(
            "mesh_authorization_decisions_total",
            &[("decision", "kubelet_probe"), ("policy", "-")]
        ),
        1
    );
}
