//! What the agent knows of the cluster: the facts of namespaces, pods,
//! Services and EndpointSlices, kept from the watches (or the saved state),
//! and the parts of the desired state made from them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use super::{
    pods::{NotEnrolled, PodFacts},
    services::{ServiceFacts, SliceFacts, service_config},
};
use crate::config::{PodConfig, RemoteWorkload, ServiceConfig};

/// The cluster as last seen; written to disk whole, so a restarted agent
/// serves from it before the API answers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Pod UID → facts.
    pub pods: BTreeMap<String, PodFacts>,
    /// `namespace/name` → facts.
    pub services: BTreeMap<String, ServiceFacts>,
    /// `namespace/name` → facts.
    pub slices: BTreeMap<String, SliceFacts>,
    /// Route resources by kind: `namespace/name` → the object's document.
    /// (Absent from states saved before routes were watched.)
    #[serde(default)]
    pub routes: BTreeMap<super::watch::Kind, BTreeMap<String, String>>,
}

/// Where an enrolled pod of this node lives on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// The parts of the desired state that come from the cluster.
#[derive(Debug, Default)]
pub struct Parts {
    pub pods: Vec<PodConfig>,
    pub workloads: Vec<RemoteWorkload>,
    pub services: Vec<ServiceConfig>,
    /// Pods of the mesh on this node not enrolled yet, and why.
    pub waiting: Vec<(String, String)>,
    /// Services not served, and why.
    pub skipped: Vec<(String, String)>,
}

impl ClusterView {
    /// Whether `pod` is in the mesh and ready to be enrolled.
    pub fn enrolment(&self, pod: &PodFacts) -> Result<(), NotEnrolled> {
        pod.enrolment(self.namespaces.get(&pod.namespace))
    }

    /// The enrolled pods that run on `node` (what must be placed).
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodFacts> + 'a {
        self.pods
            .values()
            .filter(move |p| p.node.as_deref() == Some(node) && self.enrolment(p).is_ok())
    }

    /// The pods, remote workloads and services for `node`, with the local
    /// pods placed by `placements` (pod UID → where it lives); a local pod
    /// without a placement waits.
    pub fn parts(&self, node: &str, placements: &HashMap<String, Placement>) -> Parts {
        let mut parts = Parts::default();
        // Two pods never share an address: a pod object that outlived its
        // sandbox (its IP since given to another) is the older; keep the
        // first of each address in UID order and name the rest.
        let opaque = opaque_ports(self.slices.values());
        let mut addresses = HashSet::new();
        let mut mesh: HashMap<(&str, &str), &PodFacts> = HashMap::new();
        for pod in self.pods.values().filter(|p| self.enrolment(p).is_ok()) {
            if pod.ips().any(|ip| !addresses.insert(ip)) {
                parts
                    .waiting
                    .push((pod.key(), "its IP is also another pod's".into()));
                continue;
            }
            mesh.insert((pod.namespace.as_str(), pod.name.as_str()), pod);
            if pod.node.as_deref() == Some(node) {
                match placements.get(&pod.uid) {
                    Some(place) => {
                        let ports = opaque
                            .get(&(pod.namespace.as_str(), pod.name.as_str()))
                            .cloned()
                            .unwrap_or_default();
                        parts.pods.push(local_pod(pod, place, ports))
                    }
                    None => parts.waiting.push((
                        pod.key(),
                        "its network namespace or cgroup is not found yet".into(),
                    )),
                }
            } else {
                parts.workloads.push(RemoteWorkload {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    node: pod.node.clone().unwrap_or_default(),
                    ipv4: pod.ipv4,
                    ipv6: pod.ipv6,
                });
            }
        }
        let mut slices_of: HashMap<(&str, &str), Vec<&SliceFacts>> = HashMap::new();
        for slice in self.slices.values() {
            slices_of
                .entry((slice.namespace.as_str(), slice.service.as_str()))
                .or_default()
                .push(slice);
        }
        let mut vips = HashSet::new();
        for service in self.services.values() {
            let slices = slices_of
                .remove(&(service.namespace.as_str(), service.name.as_str()))
                .unwrap_or_default();
            match service_config(service, slices, |ns, name| mesh.get(&(ns, name)).copied()) {
                Ok(config) => {
                    if config.vips.iter().any(|vip| !vips.insert(*vip)) {
                        parts.skipped.push((
                            service.key(),
                            "its cluster IP is also another Service's".into(),
                        ));
                        continue;
                    }
                    parts.services.push(config)
                }
                Err(why) => parts.skipped.push((service.key(), why.to_string())),
            }
        }
        parts
    }
}

/// Pod (namespace, name) → its ports that a Service declares not HTTP
/// (`tcp-…`, `mysql`, `appProtocol: tls`, ...), sorted, from the
/// EndpointSlices that name the pod.
fn opaque_ports<'a>(
    slices: impl Iterator<Item = &'a SliceFacts>,
) -> HashMap<(&'a str, &'a str), Vec<u16>> {
    let mut opaque: HashMap<(&str, &str), Vec<u16>> = HashMap::new();
    for slice in slices {
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .filter(|p| p.declares_opaque())
            .map(|p| p.port)
            .collect();
        if ports.is_empty() {
            continue;
        }
        for pod in slice.endpoints.iter().filter_map(|e| e.pod.as_deref()) {
            let entry = opaque.entry((slice.namespace.as_str(), pod)).or_default();
            entry.extend(&ports);
            entry.sort_unstable();
            entry.dedup();
        }
    }
    opaque
}

fn local_pod(pod: &PodFacts, place: &Placement, opaque_ports: Vec<u16>) -> PodConfig {
    PodConfig {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.to_map(),
        ipv4: pod.ipv4,
        ipv6: pod.ipv6,
        netns: place.netns.clone(),
        cgroup: place.cgroup.clone(),
        capture_exclusions: Default::default(),
        opaque_ports,
        kubelet_probes: crate::config::KubeletProbes {
            from: pod.host_ips.clone(),
            ports: pod.probe_ports.clone(),
        },
    }
}

/// The IPs a pod of this node is found by.
pub fn pod_ips(pod: &PodFacts) -> Vec<IpAddr> {
    pod.ips().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::pods::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL};

    fn pod(uid: &str, name: &str, node: &str, ip: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            node: Some(node.into()),
            service_account: format!("sa-{name}"),
            labels: Default::default(),
            ipv4: ip.parse().ok(),
            ipv6: None,
            running: true,
            host_network: false,
            qos: None,
            host_ips: vec!["192.168.0.1".parse().unwrap()],
            probe_ports: vec![8080],
        }
    }

    fn view(pods: Vec<PodFacts>) -> ClusterView {
        let mut view = ClusterView::default();
        view.namespaces.insert(
            "shop".into(),
            [(
                DATAPLANE_MODE_LABEL.to_string(),
                DATAPLANE_MODE_AMBIENT.to_string(),
            )]
            .into(),
        );
        view.namespaces.insert("other".into(), BTreeMap::new());
        for p in pods {
            view.pods.insert(p.uid.clone(), p);
        }
        view
    }

    #[test]
    fn local_pods_are_enrolled_when_placed_remote_ones_become_workloads() {
        let mut outside = pod("u4", "outside", "n1", "10.0.0.4");
        outside.namespace = "other".into();
        let view = view(vec![
            pod("u1", "here", "n1", "10.0.0.1"),
            pod("u2", "here-unplaced", "n1", "10.0.0.2"),
            pod("u3", "there", "n2", "10.0.1.3"),
            outside,
        ]);
        let placements = HashMap::from([(
            "u1".to_string(),
            Placement {
                netns: "/var/run/netns/cni-1".into(),
                cgroup: "/sys/fs/cgroup/kubepods/podu1".into(),
            },
        )]);
        let parts = view.parts("n1", &placements);
        let pods: Vec<&str> = parts.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(pods, vec!["here"]);
        assert_eq!(parts.pods[0].netns, PathBuf::from("/var/run/netns/cni-1"));
        assert_eq!(parts.pods[0].service_account, "sa-here");
        assert_eq!(parts.pods[0].kubelet_probes.ports, vec![8080]);
        assert_eq!(
            parts.waiting,
            vec![(
                "shop/here-unplaced".to_string(),
                "its network namespace or cgroup is not found yet".to_string()
            )]
        );
        let workloads: Vec<(&str, &str)> = parts
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.node.as_str()))
            .collect();
        assert_eq!(workloads, vec![("there", "n2")]);
        let local: Vec<&str> = view.local_pods("n1").map(|p| p.name.as_str()).collect();
        assert_eq!(local, vec!["here", "here-unplaced"]);
    }

    #[test]
    fn ports_a_service_declares_not_http_are_the_pods_opaque_ports() {
        use crate::kubernetes::services::{EndpointFacts, SlicePort};
        let mut view = view(vec![
            pod("u1", "db", "n1", "10.0.0.1"),
            pod("u2", "web", "n1", "10.0.0.2"),
        ]);
        let port = |name: Option<&str>, port: u16, app: Option<&str>| SlicePort {
            name: name.map(Into::into),
            port,
            app_protocol: app.map(Into::into),
        };
        let endpoint = |pod: &str| EndpointFacts {
            addresses: vec![],
            ready: true,
            serving: true,
            terminating: false,
            node: Some("n1".into()),
            zone: None,
            pod: Some(pod.into()),
        };
        view.slices.insert(
            "shop/db-1".into(),
            SliceFacts {
                namespace: "shop".into(),
                name: "db-1".into(),
                service: "db".into(),
                ports: vec![
                    port(Some("mysql"), 3306, None),
                    port(Some("tcp-admin"), 9000, None),
                    port(Some("metrics"), 9100, Some("tls")),
                    // Declared HTTP, or nothing: left to detection.
                    port(Some("http-api"), 8080, None),
                    port(None, 7000, None),
                    port(Some("tcp-x"), 7001, Some("http")),
                ],
                endpoints: vec![endpoint("db")],
            },
        );
        let place = |uid: &str| {
            (
                uid.to_string(),
                Placement {
                    netns: format!("/var/run/netns/{uid}").into(),
                    cgroup: format!("/sys/fs/cgroup/pod{uid}").into(),
                },
            )
        };
        let parts = view.parts("n1", &HashMap::from([place("u1"), place("u2")]));
        let opaque = |name: &str| {
            parts
                .pods
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.opaque_ports.clone())
                .unwrap()
        };
        assert_eq!(opaque("db"), vec![3306, 9000, 9100]);
        assert_eq!(opaque("web"), Vec::<u16>::new());
    }

    #[test]
    fn a_reused_ip_keeps_the_first_pod_and_names_the_other() {
        let view = view(vec![
            pod("u1", "old", "n2", "10.0.1.3"),
            pod("u2", "new", "n2", "10.0.1.3"),
        ]);
        let parts = view.parts("n1", &HashMap::new());
        assert_eq!(parts.workloads.len(), 1);
        assert_eq!(parts.waiting.len(), 1);
    }
}
