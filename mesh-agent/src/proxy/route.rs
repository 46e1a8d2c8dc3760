//! Where a captured outbound connection goes: a pure decision from the
//! original destination and the snapshot in force, made before any socket
//! is touched.

use std::{net::SocketAddr, sync::Arc};

use super::{pod::PodHandle, snapshot::Snapshot};
use crate::{
    mtls::RemotePeer,
    services::{PortProtocol, ServicePortEntry},
};

/// The way to a destination as the client addressed it.
#[derive(Clone)]
pub enum Route {
    /// A service's HTTP port: each request gets an endpoint of its own.
    ServiceHttp(Arc<ServicePortEntry>),
    /// A service's TCP port: the connection gets one endpoint, which is then
    /// reached as an address ([`endpoint_route`]).
    ServiceTcp(Arc<ServicePortEntry>),
    /// An address that is no service.
    Address(Hop),
}

/// The way to one address.
#[derive(Clone)]
pub enum Hop {
    /// A pod of this node: delivered inside its namespace, by its policies.
    LocalPod(Arc<PodHandle>),
    /// A mesh workload on another node: through the mTLS tunnel to its
    /// node's agent, which must prove this identity.
    Tunnel(Arc<RemotePeer>),
    /// Not part of the mesh: dialled from the source pod's namespace, so it
    /// leaves with the pod's own address.
    Passthrough,
}

/// The route of a connection to `dst`, as the client addressed it.
pub fn route(snapshot: &Snapshot, dst: SocketAddr) -> Route {
    match snapshot.services.lookup(dst) {
        Some(service) if service.protocol == PortProtocol::Tcp => Route::ServiceTcp(service),
        Some(service) => Route::ServiceHttp(service),
        None => Route::Address(endpoint_route(snapshot, dst, None)),
    }
}

/// The route to an address that is no service: a pod of this node comes
/// first (it never leaves the node), then a mesh workload elsewhere (the
/// identity `peer` that a service's endpoint names, else the one
/// workloads.yaml gives), else passthrough.
pub fn endpoint_route(snapshot: &Snapshot, addr: SocketAddr, peer: Option<Arc<RemotePeer>>) -> Hop {
    if let Some(pod) = snapshot.local_pod(addr.ip()) {
        return Hop::LocalPod(pod.clone());
    }
    match peer.or_else(|| snapshot.remote_peer(addr.ip()).cloned()) {
        Some(peer) => Hop::Tunnel(peer),
        None => Hop::Passthrough,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::pod_netns::PodNetns, desired::Desired, identity::SpiffeId, proxy::snapshot::Plan,
    };

    const NODE: &str = "name: n1\n";
    const WORKLOADS: &str = r#"
workloads:
  - {name: db-0, namespace: shop, serviceAccount: db, node: n2, ipv4: 10.2.0.7, ipv6: "fd00:2::7"}
"#;
    const SERVICES: &str = r#"
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10, "fd00:96::10"]
    ports: [{port: 80, targetPort: 8080, protocol: http}, {port: 9000, protocol: tcp}]
    endpoints:
      - {name: web-1, address: 10.1.0.3, node: n1}
"#;

    fn pod(name: &str, addrs: &[&str]) -> Arc<PodHandle> {
        Arc::new(PodHandle {
            key: format!("shop/{name}"),
            netns_cookie: 1,
            netns: PodNetns::detached(),
            identity: SpiffeId::new("cluster.local", "shop", name).unwrap(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            workload: crate::policy::Workload {
                namespace: "shop".into(),
                labels: Default::default(),
            },
            open_connections: Arc::default(),
            opaque_ports: Vec::new(),
            kubelet_probes: Default::default(),
            source_address: crate::proxy::source_address::SourceAddress::preserved(),
        })
    }

    fn snapshot() -> Snapshot {
        let desired = Desired {
            dir: "/nonexistent".into(),
            node: serde_yaml::from_str(NODE).unwrap(),
            pods: vec![],
            workloads: serde_yaml::from_str::<crate::config::WorkloadsFile>(WORKLOADS)
                .unwrap()
                .workloads,
            services: serde_yaml::from_str::<crate::config::ServicesFile>(SERVICES)
                .unwrap()
                .services,
            policies: Default::default(),
            routes: Default::default(),
        };
        Plan::build(&desired, &Snapshot::empty())
            .unwrap()
            .with_pods(&[pod("web-1", &["10.1.0.3", "fd00:1::3"])], 1)
    }

    fn kind(route: &Route) -> String {
        match route {
            Route::ServiceHttp(s) => format!("service-http {}", s.key),
            Route::ServiceTcp(s) => format!("service-tcp {}", s.key),
            Route::Address(hop) => hop_kind(hop),
        }
    }

    fn hop_kind(hop: &Hop) -> String {
        match hop {
            Hop::LocalPod(p) => format!("local {}", p.key),
            Hop::Tunnel(p) => format!("tunnel {} {}", p.key, p.identity),
            Hop::Passthrough => "passthrough".into(),
        }
    }

    fn routed(to: &str) -> String {
        kind(&route(&snapshot(), to.parse().unwrap()))
    }

    #[test]
    fn service_ports_route_by_their_protocol_on_every_vip() {
        assert_eq!(routed("10.96.0.10:80"), "service-http shop/web:80");
        assert_eq!(routed("[fd00:96::10]:80"), "service-http shop/web:80");
        assert_eq!(routed("10.96.0.10:9000"), "service-tcp shop/web:9000");
        assert_eq!(routed("[fd00:96::10]:9000"), "service-tcp shop/web:9000");
        // A port the service does not have is no service.
        assert_eq!(routed("10.96.0.10:81"), "passthrough");
    }

    #[test]
    fn a_pod_of_this_node_is_delivered_locally_on_both_families() {
        assert_eq!(routed("10.1.0.3:8080"), "local shop/web-1");
        assert_eq!(routed("[fd00:1::3]:8080"), "local shop/web-1");
    }

    #[test]
    fn a_remote_workload_goes_through_the_tunnel_proving_its_identity() {
        let expected = "tunnel shop/db-0 spiffe://cluster.local/ns/shop/sa/db";
        assert_eq!(routed("10.2.0.7:5432"), expected);
        assert_eq!(routed("[fd00:2::7]:5432"), expected);
    }

    #[test]
    fn anything_else_passes_through() {
        assert_eq!(routed("192.0.2.1:443"), "passthrough");
        assert_eq!(routed("[2001:db8::1]:443"), "passthrough");
    }

    #[test]
    fn an_endpoint_names_its_own_identity_but_a_local_pod_comes_first() {
        let snapshot = snapshot();
        let named = Arc::new(RemotePeer {
            key: "shop/api-0".into(),
            node: "n3".into(),
            identity: SpiffeId::new("cluster.local", "shop", "api").unwrap(),
        });
        let elsewhere = endpoint_route(
            &snapshot,
            "10.3.0.9:80".parse().unwrap(),
            Some(named.clone()),
        );
        assert_eq!(
            hop_kind(&elsewhere),
            "tunnel shop/api-0 spiffe://cluster.local/ns/shop/sa/api"
        );
        let local = endpoint_route(&snapshot, "10.1.0.3:80".parse().unwrap(), Some(named));
        assert_eq!(hop_kind(&local), "local shop/web-1");
    }
}
