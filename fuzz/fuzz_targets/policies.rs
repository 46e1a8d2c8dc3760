//! The policy loader and engine on arbitrary YAML: an error or a policy set
//! that compiles and decides, never a panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{HttpAttributes, NoHeaders, Request, Workload, load};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = load([("fuzz.yaml", text)]) else {
        return;
    };
    let compiled = set.compile("istio-system");
    let workload = Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
    };
    let policy = compiled.for_workload(&workload);
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    for http in [
        None,
        Some(HttpAttributes {
            method: "GET",
            host: "web",
            path: "/admin",
            headers: &NoHeaders,
            auth: None,
        }),
    ] {
        let _ = policy.decide(&Request {
            source_principal: Some("cluster.local/ns/default/sa/client"),
            source_namespace: Some("default"),
            source_ip: ip,
            remote_ip: ip,
            destination_ip: ip,
            destination_port: 80,
            sni: None,
            http,
        });
    }
});
