//! What the agent keeps per pod of the cluster: the facts, not the object.
//! Measured with a counting allocator over 10,000 pods as the API sends
//! them (docs/kubernetes.md quotes the figure for 30,000 and 150,000 pods).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use k8s_openapi::api::core::v1::Pod;
use mesh_agent::kubernetes::{cluster::ClusterView, pods::PodFacts};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, counting sizes on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A typical Deployment pod as the API serves it: labels, owner, one
/// container with probes, resources, env, mounts, and its status.
fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("reviews-v2-7d9f8b6c5-{i:05}"), "namespace": "shop",
            "uid": format!("5f0c6a3e-1b2d-4c5e-8f9a-{i:012}"),
            "labels": {"app": "reviews", "version": "v2", "pod-template-hash": "7d9f8b6c5"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v2-7d9f8b6c5",
                                  "uid": "0a0b0c0d-0000-4000-8000-000000000001", "controller": true}],
            "resourceVersion": "48213", "creationTimestamp": "2026-12-01T10:00:00Z"
        },
        "spec": {
            "nodeName": format!("node-{}", i % 1000), "serviceAccountName": "bookinfo-reviews",
            "containers": [{
                "name": "reviews", "image": "registry.example/reviews:2.1",
                "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
                "env": [{"name": "LOG_DIR", "value": "/tmp/logs"}, {"name": "JAVA_OPTS", "value": "-Xmx256m"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 9080}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler"
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable",
            "podIP": format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256),
            "podIPs": [{"ip": format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)}],
            "hostIP": "192.168.10.11", "hostIPs": [{"ip": "192.168.10.11"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "reviews", "ready": true, "restartCount": 0,
                                   "image": "registry.example/reviews:2.1", "imageID": "sha256:0123",
                                   "containerID": "containerd://0123456789abcdef"}]
        }
    }))
    .expect("a valid Pod")
}

#[test]
fn a_pod_of_the_cluster_costs_the_agent_well_under_a_kilobyte() {
    const PODS: usize = 10_000;
    let objects: Vec<Pod> = (0..PODS).map(pod).collect();
    let object_json = serde_json::to_vec(&objects[0]).unwrap().len();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut view = ClusterView::default();
    for object in &objects {
        let facts = PodFacts::from_pod(object).expect("facts");
        view.pods.insert(facts.uid.clone(), facts);
    }
    let per_pod = (LIVE_BYTES.load(Ordering::Relaxed) - before) as usize / PODS;
    println!(
        "pod facts: {per_pod} bytes of heap per pod ({PODS} pods); the Pod object is {object_json} bytes of JSON"
    );
    assert_eq!(view.pods.len(), PODS);
    assert!(
        per_pod < 1024,
        "{per_pod} bytes per pod: the facts grew (docs/kubernetes.md quotes the cost)"
    );
}
