//! Services and EndpointSlices from the API, as kube-proxy reads them, to
//! the agent's services.
//!
//! - A Service with cluster IPs (IPv4, IPv6 or both) becomes a service on
//!   those VIPs, one port per TCP port. Headless Services (`clusterIP: None`)
//!   and ExternalName Services have no VIP: clients dial the pods themselves,
//!   which capture already serves. UDP and SCTP ports are left out (capture is
//!   TCP); each of these is named when skipped.
//! - A port speaks HTTP when its `appProtocol` says so (`http`, `http2`,
//!   `grpc`, `kubernetes.io/h2c`) or, without one, when its name has Istio's
//!   prefix (`http`, `http-…`, `http2…`, `grpc…`); TCP otherwise.
//! - Endpoints are the EndpointSlices' (label `kubernetes.io/service-name`):
//!   the ready ones, or, when none is ready, the serving ones that are
//!   terminating (kube-proxy's fallback), with their node and zone.
//! - An endpoint's identity is its pod's service account, known from the
//!   pod the slice names (`targetRef`) when that pod is in the mesh; such an
//!   endpoint on another node is reached only through the mTLS tunnel and must
//!   prove that identity. An endpoint whose pod is not in the mesh (or not
//!   known) has no identity and is dialled directly, as a workload outside
//!   the mesh is: no identity is ever assumed.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::{Deserialize, Serialize};

use super::pods::PodFacts;
use crate::config::{EndpointConfig, ServiceConfig, ServicePort};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the agent keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (empty when headless or ExternalName).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.type`.
    pub kind: String,
    pub ports: Vec<PortFacts>,
    /// `spec.selector` (absent in states saved before it was kept).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortFacts {
    pub name: Option<String>,
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    pub app_protocol: Option<String>,
    /// A numbered `targetPort` (a named one is resolved by the slices).
    pub target_port: Option<u16>,
}

/// What the agent keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceFacts {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    /// The Service port's `appProtocol`, copied into the slice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl SlicePort {
    /// Whether the port is declared a protocol that is not HTTP, so that
    /// the pod's port is never parsed as HTTP ([`declares_opaque`]).
    pub fn declares_opaque(&self) -> bool {
        declares_opaque(self.name.as_deref(), self.app_protocol.as_deref())
    }
}

/// Whether a Service port declares a protocol other than HTTP, as Istio
/// reads it: `appProtocol`, else the port name's prefix before `-`
/// (`tcp`, `tls`, `https`, `mongo`, `mysql`, `redis`; case-insensitive).
/// Such a port of a pod is served as plain TCP at once, never waiting to
/// detect HTTP (a server that speaks first is not kept waiting). A port
/// that declares nothing, or something unknown, is left to detection.
pub fn declares_opaque(name: Option<&str>, app_protocol: Option<&str>) -> bool {
    let declared = match app_protocol.filter(|a| !a.is_empty()) {
        Some(app) => app.to_ascii_lowercase(),
        None => name
            .unwrap_or_default()
            .split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase(),
    };
    matches!(
        declared.as_str(),
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis"
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointFacts {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The pod behind it (`targetRef` of kind Pod), in the slice's namespace.
    pub pod: Option<String>,
}

impl ServiceFacts {
    pub fn from_service(service: &Service) -> Option<Self> {
        let spec = service.spec.as_ref();
        let cluster_ips = spec
            .and_then(|s| {
                s.cluster_ips
                    .clone()
                    .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        Some(Self {
            namespace: service.metadata.namespace.clone()?,
            name: service.metadata.name.clone()?,
            cluster_ips,
            kind: spec
                .and_then(|s| s.type_.clone())
                .unwrap_or_else(|| "ClusterIP".to_string()),
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some(PortFacts {
                        name: p.name.clone(),
                        port: u16::try_from(p.port).ok()?,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                        app_protocol: p.app_protocol.clone(),
                        target_port: match &p.target_port {
                            Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n),
                            ) => u16::try_from(*n).ok(),
                            _ => None,
                        },
                    })
                })
                .collect(),
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl SliceFacts {
    /// None for a slice of no Service (no `kubernetes.io/service-name`).
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        let meta = &slice.metadata;
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service: meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    Some(SlicePort {
                        name: p.name.clone().filter(|n| !n.is_empty()),
                        port: u16::try_from(p.port?).ok()?,
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| {
                    let conditions = e.conditions.as_ref();
                    // Unset ready means ready; unset serving follows ready.
                    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                    EndpointFacts {
                        addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        ready,
                        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                        node: e.node_name.clone(),
                        zone: e.zone.clone(),
                        pod: e
                            .target_ref
                            .as_ref()
                            .filter(|r| r.kind.as_deref() == Some("Pod"))
                            .and_then(|r| r.name.clone()),
                    }
                })
                .collect(),
        })
    }
}

/// Why a Service is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    Headless,
    ExternalName,
    NoTcpPort,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Headless => {
                "headless (clusterIP: None): clients dial its pods, which capture serves"
            }
            Self::ExternalName => "type ExternalName: a DNS alias, no VIP to serve",
            Self::NoTcpPort => "no TCP port (UDP and SCTP are not captured)",
        })
    }
}

/// The agent's protocol for a Service port (`tcp`, `http`, `http2`, `grpc`).
pub fn port_protocol(port: &PortFacts) -> &'static str {
    if let Some(app) = port.app_protocol.as_deref() {
        return match app {
            "http" => "http",
            "http2" | "kubernetes.io/h2c" => "http2",
            "grpc" => "grpc",
            _ => "tcp",
        };
    }
    let name = port.name.as_deref().unwrap_or_default();
    let prefix = name.split('-').next().unwrap_or_default();
    match prefix {
        "http" => "http",
        "http2" => "http2",
        "grpc" | "grpc-web" => "grpc",
        _ => "tcp",
    }
}

/// The service the agent serves for `service` with its `slices`; `pod`
/// finds a pod of the mesh by namespace and name (None when it is not in the
/// mesh or not known).
pub fn service_config<'a>(
    service: &ServiceFacts,
    slices: impl IntoIterator<Item = &'a SliceFacts>,
    pod: impl Fn(&str, &str) -> Option<&'a PodFacts>,
) -> Result<ServiceConfig, Skipped> {
    if service.kind == "ExternalName" {
        return Err(Skipped::ExternalName);
    }
    if service.cluster_ips.is_empty() {
        return Err(Skipped::Headless);
    }
    let slices: Vec<&SliceFacts> = slices.into_iter().collect();
    let ports: Vec<ServicePort> = service
        .ports
        .iter()
        .filter(|p| p.protocol == "TCP")
        .map(|p| ServicePort {
            port: p.port,
            // A named target port is a number per endpoint, which the slices
            // carry under the Service port's name.
            target_port: slices
                .iter()
                .flat_map(|s| &s.ports)
                .find(|sp| sp.name == p.name)
                .map(|sp| sp.port)
                .or(p.target_port),
            protocol: port_protocol(p).to_string(),
        })
        .collect();
    if ports.is_empty() {
        return Err(Skipped::NoTcpPort);
    }
    let all: Vec<&EndpointFacts> = slices.iter().flat_map(|s| &s.endpoints).collect();
    let any_ready = all.iter().any(|e| e.ready);
    let chosen = all.into_iter().filter(|e| {
        if any_ready {
            e.ready
        } else {
            e.serving && e.terminating
        }
    });
    let mut endpoints = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in chosen {
        let member = e
            .pod
            .as_deref()
            .and_then(|name| pod(&service.namespace, name));
        for address in &e.addresses {
            if !seen.insert(*address) {
                continue;
            }
            endpoints.push(EndpointConfig {
                name: e.pod.clone().unwrap_or_else(|| address.to_string()),
                address: *address,
                node: e.node.clone().unwrap_or_default(),
                zone: e.zone.clone(),
                weight: 1,
                labels: member
                    .map(|p| p.labels.to_map())
                    .unwrap_or_else(BTreeMap::new),
                service_account: member.map(|p| p.service_account.clone()),
                namespace: None,
            });
        }
    }
    Ok(ServiceConfig {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        vips: service.cluster_ips.clone(),
        ports,
        selector: service.selector.clone(),
        endpoints,
        ..ServiceConfig::with_defaults()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dual-stack Service as `kubectl get svc -o yaml` prints it.
    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: "2026-12-01T10:00:00Z"
  labels:
    app: reviews
  name: reviews
  namespace: shop
  resourceVersion: "4711"
  uid: 11111111-2222-4333-8444-555555555555
spec:
  clusterIP: 10.96.12.34
  clusterIPs:
  - 10.96.12.34
  - fd00:96::1234
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  - IPv6
  ipFamilyPolicy: PreferDualStack
  ports:
  - name: http-api
    port: 80
    protocol: TCP
    targetPort: http
  - name: metrics
    port: 9090
    protocol: TCP
    targetPort: 9090
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 53
  - appProtocol: kubernetes.io/h2c
    name: internal
    port: 8081
    protocol: TCP
    targetPort: 8081
  selector:
    app: reviews
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"#;

    /// Its IPv4 slice: one ready endpoint in the mesh, one ready outside it,
    /// one terminating.
    const SLICE_V4: &str = r#"
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.17
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-1
  targetRef:
    kind: Pod
    name: reviews-v2-7d9f8-abcde
    namespace: shop
    uid: 5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50
  zone: zone-a
- addresses:
  - 10.244.2.9
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-2
  targetRef:
    kind: Pod
    name: reviews-v1-abc-xyz12
    namespace: shop
  zone: zone-b
- addresses:
  - 10.244.3.4
  conditions:
    ready: false
    serving: true
    terminating: true
  nodeName: node-3
  targetRef:
    kind: Pod
    name: reviews-v1-abc-old99
    namespace: shop
kind: EndpointSlice
metadata:
  generateName: reviews-
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: reviews
  name: reviews-x7k2p
  namespace: shop
  ownerReferences:
  - apiVersion: v1
    kind: Service
    name: reviews
    uid: 11111111-2222-4333-8444-555555555555
ports:
- name: http-api
  port: 9080
  protocol: TCP
- name: metrics
  port: 9090
  protocol: TCP
- name: dns
  port: 53
  protocol: UDP
- name: internal
  port: 8081
  protocol: TCP
"#;

    fn service() -> ServiceFacts {
        ServiceFacts::from_service(&serde_yaml::from_str(SERVICE).unwrap()).unwrap()
    }

    fn slice(yaml: &str) -> SliceFacts {
        SliceFacts::from_slice(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn mesh_pod() -> PodFacts {
        let mut pod = PodFacts::from_pod(
            &serde_yaml::from_str(super::super::pods::tests::RUNNING_POD).unwrap(),
        )
        .unwrap();
        pod.labels = super::super::pods::tests::with_label(&pod.labels, "version", "v2");
        pod
    }

    #[test]
    fn a_dual_stack_service_with_its_slice_becomes_a_service_with_mesh_and_plain_endpoints() {
        let pod = mesh_pod();
        let config = service_config(&service(), [&slice(SLICE_V4)], |ns, name| {
            (ns == pod.namespace && name == pod.name).then_some(&pod)
        })
        .unwrap();
        assert_eq!(config.name, "reviews");
        assert_eq!(config.namespace, "shop");
        // What an AuthorizationPolicy's targetRefs to it applies to.
        assert_eq!(
            config.selector,
            BTreeMap::from([("app".to_string(), "reviews".to_string())])
        );
        assert_eq!(
            config.vips,
            vec![
                "10.96.12.34".parse::<IpAddr>().unwrap(),
                "fd00:96::1234".parse().unwrap()
            ]
        );
        let ports: Vec<(u16, Option<u16>, &str)> = config
            .ports
            .iter()
            .map(|p| (p.port, p.target_port, p.protocol.as_str()))
            .collect();
        // The named target port resolves through the slice; UDP is left out.
        assert_eq!(
            ports,
            vec![
                (80, Some(9080), "http"),
                (9090, Some(9090), "tcp"),
                (8081, Some(8081), "http2")
            ]
        );
        // The terminating endpoint is left out while others are ready.
        assert_eq!(config.endpoints.len(), 2);
        let mesh = &config.endpoints[0];
        assert_eq!(mesh.address, "10.244.1.17".parse::<IpAddr>().unwrap());
        assert_eq!(mesh.node, "node-1");
        assert_eq!(mesh.zone.as_deref(), Some("zone-a"));
        assert_eq!(mesh.service_account.as_deref(), Some("bookinfo-reviews"));
        assert_eq!(mesh.labels.get("version").map(String::as_str), Some("v2"));
        // Not a pod of the mesh: no identity, dialled directly.
        let plain = &config.endpoints[1];
        assert_eq!(plain.name, "reviews-v1-abc-xyz12");
        assert_eq!(plain.service_account, None);
        assert!(plain.labels.is_empty());
    }

    #[test]
    fn with_no_ready_endpoint_the_serving_terminating_ones_are_used() {
        let draining = SLICE_V4.replace("    ready: true\n", "    ready: false\n");
        let config = service_config(&service(), [&slice(&draining)], |_, _| None).unwrap();
        let addresses: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addresses, vec!["10.244.3.4"]);
    }

    #[test]
    fn headless_external_name_and_udp_only_services_are_skipped_with_a_reason() {
        let headless = SERVICE
            .replace("  clusterIP: 10.96.12.34\n", "  clusterIP: None\n")
            .replace(
                "  clusterIPs:\n  - 10.96.12.34\n  - fd00:96::1234\n",
                "  clusterIPs:\n  - None\n",
            );
        let facts = ServiceFacts::from_service(&serde_yaml::from_str(&headless).unwrap()).unwrap();
        assert_eq!(
            service_config(&facts, [], |_, _| None),
            Err(Skipped::Headless)
        );

        let mut external = service();
        external.kind = "ExternalName".into();
        assert_eq!(
            service_config(&external, [], |_, _| None),
            Err(Skipped::ExternalName)
        );

        let mut udp = service();
        udp.ports.retain(|p| p.protocol == "UDP");
        assert_eq!(
            service_config(&udp, [], |_, _| None),
            Err(Skipped::NoTcpPort)
        );
    }

    #[test]
    fn port_protocols_follow_app_protocol_then_istio_port_name_prefixes() {
        let port = |name: Option<&str>, app: Option<&str>| PortFacts {
            name: name.map(Into::into),
            port: 80,
            protocol: "TCP".into(),
            app_protocol: app.map(Into::into),
            target_port: None,
        };
        assert_eq!(port_protocol(&port(Some("http"), None)), "http");
        assert_eq!(port_protocol(&port(Some("http-web"), None)), "http");
        assert_eq!(port_protocol(&port(Some("http2-x"), None)), "http2");
        assert_eq!(port_protocol(&port(Some("grpc-api"), None)), "grpc");
        assert_eq!(port_protocol(&port(Some("https"), None)), "tcp");
        assert_eq!(port_protocol(&port(Some("web"), None)), "tcp");
        assert_eq!(port_protocol(&port(None, None)), "tcp");
        // appProtocol wins over the name.
        assert_eq!(port_protocol(&port(Some("http"), Some("mysql"))), "tcp");
        assert_eq!(port_protocol(&port(Some("tcp-x"), Some("grpc"))), "grpc");
        assert_eq!(
            port_protocol(&port(None, Some("kubernetes.io/h2c"))),
            "http2"
        );
    }
}
