//! The Kubernetes source against a MODEL of the API server
//! (`mesh_testbed::kube_api::StandInApi`: the API's list/watch wire protocol
//! over real HTTP, scripted; not a real API server, none can be installed
//! here). The agent's real client, watches and source run unchanged.

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use mesh_agent::{
    desired::{Desired, Update},
    kubernetes::KubeSource,
};
use mesh_testbed::kube_api::StandInApi;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, node: &str, ip: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "web", "image": "web:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "hostIP": "192.168.0.2", "qosClass": "BestEffort"}
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
            "nodeName": "n2", "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-abcde", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// A configuration directory for node n1 with the API as the source.
fn config_dir(dir: &Path, api: &StandInApi) {
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
    std::fs::write(
        dir.join("node.yaml"),
        format!(
            "name: n1\ndiscovery: kubernetes\nkubernetes:\n  kubeconfig: {}\n  stateFile: {}\n  netnsDir: {}\n",
            dir.join("kubeconfig").display(),
            dir.join("state/cluster.json").display(),
            dir.join("no-netns").display(),
        ),
    )
    .unwrap();
}

/// The remote workloads (name → service account) and the web service's
/// endpoints (address → service account) of a desired state.
/// (name, service account) pairs, or (address, service account).
type Pairs = BTreeSet<(String, String)>;

fn summary(desired: &Desired) -> (Pairs, Pairs) {
    let workloads = desired
        .workloads
        .iter()
        .map(|w| (w.name.clone(), w.service_account.clone()))
        .collect();
    let endpoints = desired
        .services
        .iter()
        .filter(|s| s.name == "web")
        .flat_map(|s| &s.endpoints)
        .map(|e| {
            (
                e.address.to_string(),
                e.service_account.clone().unwrap_or_else(|| "-".into()),
            )
        })
        .collect();
    (workloads, endpoints)
}

fn set(pairs: &[(&str, &str)]) -> Pairs {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Waits until the source sends a desired state for which `done` holds.
async fn until(
    updates: &mut mpsc::Receiver<Update>,
    what: &str,
    done: impl Fn(&Desired) -> bool,
) -> Desired {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let update = tokio::time::timeout_at(deadline, updates.recv())
            .await
            .unwrap_or_else(|_| panic!("no desired state with {what} within {DEADLINE:?}"))
            .expect("the source ended");
        match update {
            Update::Desired(desired) if done(&desired) => return *desired,
            Update::Desired(_) => {}
            Update::Rejected(why) | Update::DesiredFilesRefused(_, why) => {
                panic!("the source refused: {why}")
            }
        }
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_api_lists_follows_relists_after_410_and_keeps_serving_through_an_outage() {
    let mut api = StandInApi::start().await.unwrap();
    api.put(namespace("shop", true));
    api.put(namespace("plain", false));
    api.put(pod("web-1", "n2", "10.1.0.5", "web-sa"));
    api.put(service());
    api.put(slice(&[("web-1", "10.1.0.5")]));
    let dir = tempfile::tempdir().unwrap();
    config_dir(dir.path(), &api);
    let node = mesh_agent::config::load_dir(dir.path()).unwrap().node;

    let source = KubeSource::new(&node.kubernetes, "n1").unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    let task = tokio::spawn(source.clone().run(dir.path().to_path_buf(), None, tx));

    // The first list: a workload on n2 with its identity, the service with
    // that endpoint, which must prove the same identity.
    until(&mut updates, "web-1 and its service", |d| {
        summary(d) == (set(&[("web-1", "web-sa")]), set(&[("10.1.0.5", "web-sa")]))
    })
    .await;
    wait_for("every watch synced", || source.status().synced).await;

    // Followed: a new pod and endpoint appear.
    api.put(pod("web-2", "n2", "10.1.0.6", "web-sa"));
    api.put(slice(&[("web-1", "10.1.0.5"), ("web-2", "10.1.0.6")]));
    until(&mut updates, "web-2 followed", |d| {
        summary(d)
            == (
                set(&[("web-1", "web-sa"), ("web-2", "web-sa")]),
                set(&[("10.1.0.5", "web-sa"), ("10.1.0.6", "web-sa")]),
            )
    })
    .await;

    // The state is saved once synced.
    let state_file = dir.path().join("state/cluster.json");
    wait_for("the state saved with web-2", || {
        std::fs::read_to_string(&state_file).is_ok_and(|s| s.contains("web-2"))
    })
    .await;

    // An outage: the API goes away; the watches fail and retry, and the last
    // state keeps serving (nothing is withdrawn).
    let errors_before = errors(&source);
    api.go_away();
    wait_for("watch errors counted during the outage", || {
        errors(&source) > errors_before + 2
    })
    .await;
    let during = source.view();
    assert_eq!(
        during.pods.len(),
        2,
        "the pods known before the outage are kept"
    );
    assert!(source.status().synced);
    // Meanwhile the cluster changes, and its history is compacted: the
    // watches' resume gets 410 Gone and must list again.
    api.delete("Pod", "shop", "web-2");
    api.put(slice(&[("web-1", "10.1.0.5")]));
    api.put(pod("web-3", "n2", "10.1.0.7", "other-sa"));
    api.compact();
    let (lists_before, _, _) = api.counts();
    api.come_back().await.unwrap();
    until(&mut updates, "the changes made during the outage", |d| {
        summary(d)
            == (
                set(&[("web-1", "web-sa"), ("web-3", "other-sa")]),
                set(&[("10.1.0.5", "web-sa")]),
            )
    })
    .await;
    let (lists_after, _, _) = api.counts();
    assert!(lists_after > lists_before, "no relist after the outage");

    // A watch cut and resumed from a compacted version gets 410 Gone and
    // lists again; a change made after that is followed.
    api.compact();
    let (_, _, gone_before) = api.counts();
    api.cut_watches();
    wait_for("a 410 answered to the resume after compaction", || {
        api.counts().2 > gone_before
    })
    .await;
    api.put(pod("web-4", "n2", "10.1.0.8", "web-sa"));
    until(&mut updates, "web-4 after the relist", |d| {
        summary(d)
            .0
            .contains(&("web-4".to_string(), "web-sa".to_string()))
    })
    .await;

    // A restarted agent while the API is away serves from the saved state.
    wait_for("the state saved with web-4", || {
        std::fs::read_to_string(&state_file).is_ok_and(|s| s.contains("web-4"))
    })
    .await;
    task.abort();
    api.go_away();
    let restarted = KubeSource::new(&node.kubernetes, "n1").unwrap();
    assert!(restarted.status().report.from_saved_state);
    let reading = restarted.clone();
    let dir_path = dir.path().to_path_buf();
    let desired = tokio::task::spawn_blocking(move || reading.desired(&dir_path))
        .await
        .unwrap()
        .unwrap();
    let (workloads, endpoints) = summary(&desired);
    assert!(workloads.contains(&("web-4".to_string(), "web-sa".to_string())));
    assert_eq!(endpoints, set(&[("10.1.0.5", "web-sa")]));
}

fn errors(source: &Arc<KubeSource>) -> u64 {
    source.status().watches.values().map(|h| h.errors).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_api_pod_files_are_refused_with_the_api_as_source() {
    let api = StandInApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    config_dir(dir.path(), &api);
    std::fs::write(
        dir.path().join("pods.yaml"),
        "pods:\n- name: a\n  namespace: shop\n  netns: /var/run/netns/x\n  cgroup: /sys/fs/cgroup/x\n",
    )
    .unwrap();
    let node = mesh_agent::config::load_dir(dir.path()).unwrap().node;
    let source = KubeSource::new(&node.kubernetes, "n1").unwrap();
    let err = source.desired(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("pods.yaml") && err.contains("discovery: kubernetes"),
        "{err}"
    );
}

const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-web\n  namespace: shop\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/web-sa\"]\n";

/// Written whole or not at all (an editor's save, a ConfigMap update).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The next update, within the deadline.
async fn next(updates: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(DEADLINE, updates.recv())
        .await
        .unwrap_or_else(|_| panic!("no update within {DEADLINE:?}"))
        .expect("the source ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_api_changes_keep_flowing_while_a_policy_file_is_refused() {
    let api = StandInApi::start().await.unwrap();
    api.put(namespace("shop", true));
    api.put(pod("web-1", "n2", "10.1.0.5", "web-sa"));
    let dir = tempfile::tempdir().unwrap();
    config_dir(dir.path(), &api);
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/web.yaml"), POLICY).unwrap();
    let node = mesh_agent::config::load_dir(dir.path()).unwrap().node;
    let source = KubeSource::new(&node.kubernetes, "n1").unwrap();
    let (tx, mut updates) = mpsc::channel(16);
    let changes_dir = dir.path().to_path_buf();
    let (_watch, changes, _) =
        mesh_agent::config::watch::FileWatch::start(&changes_dir, &[]).unwrap();
    let task = tokio::spawn(source.clone().run(changes_dir, Some(changes), tx));
    until(&mut updates, "web-1 with the policy", |d| {
        summary(d)
            .0
            .contains(&("web-1".to_string(), "web-sa".to_string()))
            && d.policies.set.len() == 1
    })
    .await;

    // A bad edit: the file is refused, naming it, and keeps its last good
    // version (the rest of the files would apply).
    write_atomically(&dir.path().join("policies/web.yaml"), "kind: [not a policy");
    let refusal = loop {
        match next(&mut updates).await {
            Update::DesiredFilesRefused(desired, why) => {
                assert_eq!(desired.policies.set.len(), 1, "the last good version");
                break why;
            }
            Update::Desired(_) => continue,
            Update::Rejected(why) => panic!("rejected whole, not kept back: {why}"),
        }
    };
    assert!(
        refusal.contains("web.yaml") && refusal.contains("last good version"),
        "{refusal}"
    );

    // The cluster keeps flowing meanwhile, with the last good policies, and
    // the refusal still said.
    api.put(pod("web-2", "n2", "10.1.0.6", "web-sa"));
    let (desired, still) = match next(&mut updates).await {
        Update::DesiredFilesRefused(desired, why) => (desired, why),
        Update::Rejected(why) => panic!("rejected: {why}"),
        Update::Desired(_) => panic!("the refusal was forgotten"),
    };
    assert!(
        summary(&desired)
            .0
            .contains(&("web-2".to_string(), "web-sa".to_string()))
    );
    assert_eq!(
        desired.policies.set.len(),
        1,
        "the last good policy keeps serving"
    );
    assert_eq!(still, refusal);

    // Fixed: a plain desired state again (the refusal is over).
    write_atomically(&dir.path().join("policies/web.yaml"), POLICY);
    loop {
        match next(&mut updates).await {
            Update::Desired(desired) => {
                assert_eq!(desired.policies.set.len(), 1);
                break;
            }
            Update::DesiredFilesRefused(..) => continue,
            Update::Rejected(why) => panic!("still refused: {why}"),
        }
    }
    task.abort();
}
