//! Pods from the API: the few fields the agent keeps of each, and whether it
//! is enrolled in the mesh.
//!
//! Enrolment follows Istio ambient's labels, so a cluster that already uses
//! them needs no new ones: a pod is in the mesh when its namespace, or the pod
//! itself, is labelled `istio.io/dataplane-mode=ambient`, unless the pod is
//! labelled `istio.io/dataplane-mode=none`. A pod is enrolled only once it is
//! Running with an IP; host-network pods never (they are the node).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize};

use super::cgroup::QosClass;

/// The label that puts a namespace or a pod in the mesh, or a pod out of it.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// `istio.io/dataplane-mode` value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// `istio.io/dataplane-mode` value that keeps a pod out.
pub const DATAPLANE_MODE_NONE: &str = "none";

/// What the agent keeps of a Pod: only the fields it uses, so memory grows
/// with the pods, not with the size of their specs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName` (none while unscheduled).
    pub node: Option<String>,
    pub service_account: String,
    pub labels: Labels,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// `status.phase` is Running.
    pub running: bool,
    pub host_network: bool,
    pub qos: Option<QosClass>,
    /// `status.hostIPs`: the node's addresses, where the kubelet's probes
    /// come from.
    pub host_ips: Vec<IpAddr>,
    /// Ports the kubelet probes (HTTP, TCP and gRPC probes of every container).
    pub probe_ports: Vec<u16>,
}

/// A pod's labels, kept compact: sorted pairs in one allocation (a
/// `BTreeMap` spends about half a kilobyte on its first node alone, more
/// than the rest of a pod's facts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order: sorted already.
        Self(map.into_iter().collect())
    }
}

/// Why a pod is not enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotEnrolled {
    NotInMesh,
    OptedOut,
    HostNetwork,
    NotRunning,
    NoAddress,
}

impl std::fmt::Display for NotEnrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotInMesh => {
                "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"
            }
            Self::OptedOut => "the pod is labelled istio.io/dataplane-mode=none",
            Self::HostNetwork => "the pod uses the host's network",
            Self::NotRunning => "the pod is not Running",
            Self::NoAddress => "the pod has no IP yet",
        })
    }
}

impl PodFacts {
    /// The facts of a Pod object; None when it lacks what identifies it
    /// (uid, namespace, name), which the API server always sets.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let pod_ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect::<Vec<_>>())
            .filter(|ips| !ips.is_empty())
            .or_else(|| status.and_then(|s| s.pod_ip.as_deref()).map(|ip| vec![ip]))
            .unwrap_or_default();
        let ips: Vec<IpAddr> = pod_ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let host_ips = status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect::<Vec<_>>())
            .filter(|ips| !ips.is_empty())
            .or_else(|| status.and_then(|s| s.host_ip.as_deref()).map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        Some(Self {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            node: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            labels: meta.labels.clone().unwrap_or_default().into(),
            ipv4: ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            ipv6: ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
            running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            qos: status
                .and_then(|s| s.qos_class.as_deref())
                .and_then(QosClass::parse),
            host_ips,
            probe_ports: probe_ports(containers),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the pod is in the mesh and ready to be enrolled, given its
    /// namespace's labels (None: the namespace is not known yet).
    pub fn enrolment(
        &self,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Result<(), NotEnrolled> {
        let pod_mode = self.labels.get(DATAPLANE_MODE_LABEL);
        let namespace_mode = namespace_labels
            .and_then(|labels| labels.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str);
        match (pod_mode, namespace_mode) {
            (Some(DATAPLANE_MODE_NONE), _) => return Err(NotEnrolled::OptedOut),
            (Some(DATAPLANE_MODE_AMBIENT), _) | (_, Some(DATAPLANE_MODE_AMBIENT)) => {}
            _ => return Err(NotEnrolled::NotInMesh),
        }
        if self.host_network {
            return Err(NotEnrolled::HostNetwork);
        }
        if !self.running {
            return Err(NotEnrolled::NotRunning);
        }
        if self.ipv4.is_none() && self.ipv6.is_none() {
            return Err(NotEnrolled::NoAddress);
        }
        Ok(())
    }

    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// The ports of every HTTP, TCP and gRPC probe of the pod's containers, a
/// named port resolved by the container's own port list.
fn probe_ports(containers: &[Container]) -> Vec<u16> {
    let mut ports = Vec::new();
    for container in containers {
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        for probe in probes.into_iter().flatten() {
            for port in probe_port(probe) {
                let number = match port {
                    IntOrString::Int(n) => u16::try_from(n).ok(),
                    IntOrString::String(name) => container
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name.as_str()))
                        .and_then(|p| u16::try_from(p.container_port).ok()),
                };
                if let Some(n) = number.filter(|n| *n != 0) {
                    ports.push(n);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn probe_port(probe: &Probe) -> Vec<IntOrString> {
    let mut ports = Vec::new();
    if let Some(http) = &probe.http_get {
        ports.push(http.port.clone());
    }
    if let Some(tcp) = &probe.tcp_socket {
        ports.push(tcp.port.clone());
    }
    if let Some(grpc) = &probe.grpc {
        ports.push(IntOrString::Int(grpc.port));
    }
    ports
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pod as `kubectl get pod -o yaml` prints it (trimmed of nothing the
    /// agent reads), dual-stack, Burstable, with named and numbered probes.
    pub(crate) const RUNNING_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2026-12-01T10:00:00Z"
  labels:
    app: reviews
    version: v2
    pod-template-hash: 7d9f8
  name: reviews-v2-7d9f8-abcde
  namespace: shop
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: reviews-v2-7d9f8
    uid: 0a0b0c0d-0000-4000-8000-000000000001
  resourceVersion: "48213"
  uid: 5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50
spec:
  containers:
  - image: registry.example/reviews:2.1
    imagePullPolicy: IfNotPresent
    livenessProbe:
      failureThreshold: 3
      httpGet:
        path: /healthz
        port: http
        scheme: HTTP
      periodSeconds: 10
      successThreshold: 1
      timeoutSeconds: 1
    name: reviews
    ports:
    - containerPort: 9080
      name: http
      protocol: TCP
    readinessProbe:
      tcpSocket:
        port: 9081
    resources:
      requests:
        cpu: 100m
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: node-1
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: bookinfo-reviews
  serviceAccountName: bookinfo-reviews
  terminationGracePeriodSeconds: 30
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2026-12-01T10:00:05Z"
    status: "True"
    type: Ready
  hostIP: 192.168.10.11
  hostIPs:
  - ip: 192.168.10.11
  - ip: fd00:10::11
  phase: Running
  podIP: 10.244.1.17
  podIPs:
  - ip: 10.244.1.17
  - ip: fd00:244:1::17
  qosClass: Burstable
  startTime: "2026-12-01T10:00:00Z"
"#;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("a valid Pod")
    }

    pub(crate) fn with_label(labels: &Labels, key: &str, value: &str) -> Labels {
        let mut map = labels.to_map();
        map.insert(key.into(), value.into());
        map.into()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_running_pod_as_kubectl_prints_it_gives_every_fact_the_agent_uses() {
        let facts = PodFacts::from_pod(&pod(RUNNING_POD)).unwrap();
        assert_eq!(facts.uid, "5f0c6a3e-1b2d-4c5e-8f9a-0b1c2d3e4f50");
        assert_eq!(facts.key(), "shop/reviews-v2-7d9f8-abcde");
        assert_eq!(facts.node.as_deref(), Some("node-1"));
        assert_eq!(facts.service_account, "bookinfo-reviews");
        assert_eq!(facts.labels.get("version"), Some("v2"));
        assert_eq!(facts.ipv4, Some("10.244.1.17".parse().unwrap()));
        assert_eq!(facts.ipv6, Some("fd00:244:1::17".parse().unwrap()));
        assert!(facts.running);
        assert!(!facts.host_network);
        assert_eq!(facts.qos, Some(QosClass::Burstable));
        assert_eq!(
            facts.host_ips,
            vec![
                "192.168.10.11".parse::<IpAddr>().unwrap(),
                "fd00:10::11".parse().unwrap()
            ]
        );
        // The liveness probe names its port ("http" = 9080).
        assert_eq!(facts.probe_ports, vec![9080, 9081]);
    }

    #[test]
    fn enrolment_follows_istio_ambient_labels_on_namespace_and_pod() {
        let facts = PodFacts::from_pod(&pod(RUNNING_POD)).unwrap();
        let ambient = labels(&[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)]);
        assert_eq!(facts.enrolment(Some(&ambient)), Ok(()));
        assert_eq!(
            facts.enrolment(Some(&labels(&[]))),
            Err(NotEnrolled::NotInMesh)
        );
        assert_eq!(facts.enrolment(None), Err(NotEnrolled::NotInMesh));

        let mut opted_out = facts.clone();
        opted_out.labels = with_label(&facts.labels, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE);
        assert_eq!(
            opted_out.enrolment(Some(&ambient)),
            Err(NotEnrolled::OptedOut)
        );

        let mut pod_level = facts.clone();
        pod_level.labels = with_label(&facts.labels, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT);
        assert_eq!(pod_level.enrolment(None), Ok(()));
    }

    #[test]
    fn pods_not_yet_running_without_an_ip_or_on_the_host_network_are_not_enrolled() {
        let ambient = labels(&[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)]);
        let pending = RUNNING_POD
            .replace("phase: Running", "phase: Pending")
            .replace("  podIP: 10.244.1.17\n", "")
            .replace(
                "  podIPs:\n  - ip: 10.244.1.17\n  - ip: fd00:244:1::17\n",
                "",
            );
        let facts = PodFacts::from_pod(&pod(&pending)).unwrap();
        assert_eq!((facts.ipv4, facts.ipv6), (None, None));
        assert_eq!(
            facts.enrolment(Some(&ambient)),
            Err(NotEnrolled::NotRunning)
        );

        let mut no_ip = facts.clone();
        no_ip.running = true;
        assert_eq!(no_ip.enrolment(Some(&ambient)), Err(NotEnrolled::NoAddress));

        let host = RUNNING_POD.replace("  dnsPolicy:", "  hostNetwork: true\n  dnsPolicy:");
        let facts = PodFacts::from_pod(&pod(&host)).unwrap();
        assert!(facts.host_network);
        assert_eq!(
            facts.enrolment(Some(&ambient)),
            Err(NotEnrolled::HostNetwork)
        );
    }

    #[test]
    fn a_pod_with_only_the_legacy_single_ip_fields_and_no_service_account() {
        let legacy = RUNNING_POD
            .replace(
                "  podIPs:\n  - ip: 10.244.1.17\n  - ip: fd00:244:1::17\n",
                "",
            )
            .replace(
                "  hostIPs:\n  - ip: 192.168.10.11\n  - ip: fd00:10::11\n",
                "",
            )
            .replace("  serviceAccount: bookinfo-reviews\n", "")
            .replace("  serviceAccountName: bookinfo-reviews\n", "");
        let facts = PodFacts::from_pod(&pod(&legacy)).unwrap();
        assert_eq!(facts.ipv4, Some("10.244.1.17".parse().unwrap()));
        assert_eq!(facts.ipv6, None);
        assert_eq!(
            facts.host_ips,
            vec!["192.168.10.11".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(facts.service_account, "default");
    }
}
