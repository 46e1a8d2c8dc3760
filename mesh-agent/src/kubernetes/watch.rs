//! The watches: one per kind (namespaces, pods, Services, EndpointSlices,
//! and the route resources: HTTPRoute, GRPCRoute, VirtualService,
//! DestinationRule), each a list then a watch from the API server's watch
//! cache, kept in the [`ClusterView`] as facts.
//!
//! The route resources are custom resources: a cluster without their
//! definitions answers 404, which is "none of that kind" (the kind is shown
//! as not installed, and looked for again every few seconds), not an error.
//!
//! A (re)list — at start, after `410 Gone`, after an error the watch could
//! not resume from — replaces that kind's facts whole once it is complete,
//! so an object deleted while the watch was down goes, and a half-done list
//! never shows. While the API is away the watch retries (250 ms doubling to
//! 5 s) and the last facts keep serving. Health per kind (synced, last sync,
//! errors) is kept for `/status` and the metrics.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event, watcher},
    },
};
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    cluster::ClusterView,
    pods::PodFacts,
    services::{ServiceFacts, SliceFacts},
};

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    HttpRoutes,
    GrpcRoutes,
    VirtualServices,
    DestinationRules,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::HttpRoutes,
        Kind::GrpcRoutes,
        Kind::VirtualServices,
        Kind::DestinationRules,
    ];

    /// The route resources (custom resources, kept as their documents).
    pub const ROUTES: [Kind; 4] = [
        Kind::HttpRoutes,
        Kind::GrpcRoutes,
        Kind::VirtualServices,
        Kind::DestinationRules,
    ];

    /// The API group (`""` for the core group), as RBAC rules name it.
    pub fn api_group(self) -> &'static str {
        match self {
            Kind::Namespaces | Kind::Pods | Kind::Services => "",
            Kind::EndpointSlices => "discovery.k8s.io",
            Kind::HttpRoutes | Kind::GrpcRoutes => "gateway.networking.k8s.io",
            Kind::VirtualServices | Kind::DestinationRules => "networking.istio.io",
        }
    }

    /// The resource's name in the API (and in RBAC rules).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::HttpRoutes => "httproutes",
            Kind::GrpcRoutes => "grpcroutes",
            Kind::VirtualServices => "virtualservices",
            Kind::DestinationRules => "destinationrules",
        }
    }

    /// The object kind, as documents name it (`kind: HTTPRoute`).
    pub fn object_kind(self) -> &'static str {
        match self {
            Kind::Namespaces => "Namespace",
            Kind::Pods => "Pod",
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::HttpRoutes => "HTTPRoute",
            Kind::GrpcRoutes => "GRPCRoute",
            Kind::VirtualServices => "VirtualService",
            Kind::DestinationRules => "DestinationRule",
        }
    }

    /// The version watched: the group's served, stable one (the API server
    /// converts objects stored at older versions).
    fn version(self) -> &'static str {
        "v1"
    }

    /// How to reach a custom resource's objects.
    fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.api_group(), self.version(), self.object_kind()),
            self.name(),
        )
    }
}

/// How one watch is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KindHealth {
    /// A complete list has been received (and the watch follows it).
    pub synced: bool,
    /// When the last complete list was received.
    #[serde(default, with = "humantime_serde")]
    pub last_sync: Option<SystemTime>,
    /// When the last event (list, change, bookmark-free) was received.
    #[serde(default, with = "humantime_serde")]
    pub last_event: Option<SystemTime>,
    /// Complete lists received (1 + relists).
    pub lists: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// The API does not serve this kind (its CustomResourceDefinition is
    /// not installed): none of it, looked for again every few seconds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_installed: bool,
}

/// Health of every watch, shared with `/status` and the metrics.
#[derive(Debug)]
pub struct WatchHealth {
    kinds: Mutex<BTreeMap<Kind, KindHealth>>,
    synced: IntGaugeVec,
    lists: IntCounterVec,
    errors: IntCounterVec,
    last_sync: IntGaugeVec,
}

impl Default for WatchHealth {
    fn default() -> Self {
        let health = Self {
            kinds: Mutex::default(),
            synced: IntGaugeVec::new(
                Opts::new(
                    "mesh_kubernetes_watch_synced",
                    "1 once the watch of this kind has listed completely (it follows changes from then on)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            lists: IntCounterVec::new(
                Opts::new(
                    "mesh_kubernetes_watch_lists_total",
                    "Complete lists of this kind (the first, then relists after 410 Gone or errors)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "mesh_kubernetes_watch_errors_total",
                    "Failed list or watch calls of this kind (the last state keeps serving)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            last_sync: IntGaugeVec::new(
                Opts::new(
                    "mesh_kubernetes_watch_last_sync_timestamp_seconds",
                    "When the watch of this kind last listed completely (Unix time)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        };
        for kind in Kind::ALL {
            health.synced.with_label_values(&[kind.name()]).set(0);
            health.lists.with_label_values(&[kind.name()]);
            health.errors.with_label_values(&[kind.name()]);
            health.last_sync.with_label_values(&[kind.name()]).set(0);
        }
        health
    }
}

impl WatchHealth {
    pub fn snapshot(&self) -> BTreeMap<Kind, KindHealth> {
        let mut kinds = self.kinds.lock().clone();
        for kind in Kind::ALL {
            kinds.entry(kind).or_default();
        }
        kinds
    }

    /// Every kind has been listed completely at least once.
    pub fn all_synced(&self) -> bool {
        let kinds = self.kinds.lock();
        Kind::ALL
            .iter()
            .all(|k| kinds.get(k).is_some_and(|h| h.synced))
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.synced.clone()),
            Box::new(self.lists.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.last_sync.clone()),
        ]
    }

    fn errored(&self, kind: Kind, error: String) {
        self.errors.with_label_values(&[kind.name()]).inc();
        let mut kinds = self.kinds.lock();
        let health = kinds.entry(kind).or_default();
        health.errors += 1;
        health.last_error = Some(error);
    }

    fn event(&self, kind: Kind, at: SystemTime) {
        self.kinds.lock().entry(kind).or_default().last_event = Some(at);
    }

    fn listed(&self, kind: Kind, at: SystemTime) {
        self.synced.with_label_values(&[kind.name()]).set(1);
        self.lists.with_label_values(&[kind.name()]).inc();
        let unix = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_sync
            .with_label_values(&[kind.name()])
            .set(i64::try_from(unix).unwrap_or(i64::MAX));
        let mut kinds = self.kinds.lock();
        let health = kinds.entry(kind).or_default();
        health.synced = true;
        health.lists += 1;
        health.last_sync = Some(at);
        health.last_error = None;
        health.not_installed = false;
    }

    /// The API answered that it does not serve `kind`. True the first time
    /// (until the kind is listed again).
    fn not_installed(&self, kind: Kind, at: SystemTime) -> bool {
        self.synced.with_label_values(&[kind.name()]).set(1);
        let mut kinds = self.kinds.lock();
        let health = kinds.entry(kind).or_default();
        let first = !health.not_installed;
        health.synced = true;
        health.not_installed = true;
        health.last_sync.get_or_insert(at);
        health.last_error = None;
        first
    }
}

/// An API object the view keeps facts of.
trait Watched:
    kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static
{
    type Facts: Send;
    /// The facts, with the key they are kept under; None for an object the
    /// view has no use for.
    fn facts(&self, kind: Kind) -> Option<(String, Self::Facts)>;
    fn key(&self) -> Option<String>;
    /// Where the view keeps this kind's facts.
    fn kept(view: &mut ClusterView, kind: Kind) -> &mut BTreeMap<String, Self::Facts>;
}

fn namespaced_key(meta: &kube::api::ObjectMeta) -> Option<String> {
    Some(format!(
        "{}/{}",
        meta.namespace.as_deref()?,
        meta.name.as_deref()?
    ))
}

impl Watched for Namespace {
    type Facts = BTreeMap<String, String>;
    fn facts(&self, _: Kind) -> Option<(String, Self::Facts)> {
        Some((
            self.metadata.name.clone()?,
            self.metadata.labels.clone().unwrap_or_default(),
        ))
    }
    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }
    fn kept(view: &mut ClusterView, _: Kind) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.namespaces
    }
}

impl Watched for Pod {
    type Facts = PodFacts;
    fn facts(&self, _: Kind) -> Option<(String, Self::Facts)> {
        let facts = PodFacts::from_pod(self)?;
        Some((facts.uid.clone(), facts))
    }
    fn key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn kept(view: &mut ClusterView, _: Kind) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.pods
    }
}

impl Watched for Service {
    type Facts = ServiceFacts;
    fn facts(&self, _: Kind) -> Option<(String, Self::Facts)> {
        let facts = ServiceFacts::from_service(self)?;
        Some((facts.key(), facts))
    }
    fn key(&self) -> Option<String> {
        namespaced_key(&self.metadata)
    }
    fn kept(view: &mut ClusterView, _: Kind) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.services
    }
}

impl Watched for EndpointSlice {
    type Facts = SliceFacts;
    fn facts(&self, _: Kind) -> Option<(String, Self::Facts)> {
        let facts = SliceFacts::from_slice(self)?;
        Some((format!("{}/{}", facts.namespace, facts.name), facts))
    }
    fn key(&self) -> Option<String> {
        namespaced_key(&self.metadata)
    }
    fn kept(view: &mut ClusterView, _: Kind) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.slices
    }
}

/// A route resource is kept as its document (YAML, without what only the
/// API server reads), loaded by the same loader as the files'.
impl Watched for DynamicObject {
    type Facts = String;
    fn facts(&self, kind: Kind) -> Option<(String, Self::Facts)> {
        let key = self.key()?;
        let mut object = self.clone();
        object.metadata.managed_fields = None;
        // List items may come without their type: the watch knows it.
        object.types = Some(kube::api::TypeMeta {
            api_version: format!("{}/{}", kind.api_group(), kind.version()),
            kind: kind.object_kind().to_string(),
        });
        match serde_yaml::to_string(&object) {
            Ok(text) => Some((key, text)),
            Err(err) => {
                tracing::warn!(kind = kind.name(), object = %key, error = %err, "an object could not be rendered; left out");
                None
            }
        }
    }
    fn key(&self) -> Option<String> {
        namespaced_key(&self.metadata)
    }
    fn kept(view: &mut ClusterView, kind: Kind) -> &mut BTreeMap<String, Self::Facts> {
        view.routes.entry(kind).or_default()
    }
}

/// What every watch writes to.
#[derive(Clone)]
pub struct Sink {
    pub view: Arc<Mutex<ClusterView>>,
    /// Woken after every change of the view.
    pub changed: Arc<Notify>,
    pub health: Arc<WatchHealth>,
}

/// Runs every watch until the task is dropped.
pub async fn follow_all(client: Client, sink: Sink) {
    let routes = futures_util::future::join_all(Kind::ROUTES.map(|kind| {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource());
        follow(api, kind, sink.clone())
    }));
    tokio::join!(
        follow(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespaces,
            sink.clone()
        ),
        follow(Api::<Pod>::all(client.clone()), Kind::Pods, sink.clone()),
        follow(
            Api::<Service>::all(client.clone()),
            Kind::Services,
            sink.clone()
        ),
        follow(
            Api::<EndpointSlice>::all(client),
            Kind::EndpointSlices,
            sink.clone()
        ),
        routes,
    );
}

/// The API does not serve the kind: a custom resource not installed.
fn is_not_installed(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404)
}

async fn follow<K: Watched>(api: Api<K>, kind: Kind, sink: Sink) {
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(RetryBackoff::default())
        .boxed();
    let mut listing: Vec<(String, K::Facts)> = Vec::new();
    while let Some(event) = stream.next().await {
        let now = SystemTime::now();
        let event = match event {
            Ok(event) => event,
            Err(err) if is_not_installed(&err) => {
                if sink.health.not_installed(kind, now) {
                    tracing::info!(
                        kind = kind.name(),
                        "not served by the API (its resource definition is not installed): none of this kind"
                    );
                    // Definitions removed take their objects; the view may
                    // be whole now.
                    K::kept(&mut sink.view.lock(), kind).clear();
                    sink.changed.notify_one();
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(kind = kind.name(), error = %err, "Kubernetes watch failed; retrying (the last state keeps serving)");
                sink.health.errored(kind, err.to_string());
                continue;
            }
        };
        sink.health.event(kind, now);
        let changed = match event {
            Event::Init => {
                listing.clear();
                false
            }
            Event::InitApply(object) => {
                listing.extend(object.facts(kind));
                false
            }
            Event::InitDone => {
                *K::kept(&mut sink.view.lock(), kind) =
                    std::mem::take(&mut listing).into_iter().collect();
                sink.health.listed(kind, now);
                tracing::info!(kind = kind.name(), "Kubernetes list complete; watching");
                true
            }
            Event::Apply(object) => {
                let mut view = sink.view.lock();
                match object.facts(kind) {
                    Some((key, facts)) => {
                        K::kept(&mut view, kind).insert(key, facts);
                    }
                    // No longer of use (e.g. a slice that lost its Service label).
                    None => {
                        if let Some(key) = object.key() {
                            K::kept(&mut view, kind).remove(&key);
                        }
                    }
                }
                true
            }
            Event::Delete(object) => {
                if let Some(key) = object.key() {
                    K::kept(&mut sink.view.lock(), kind).remove(&key);
                }
                true
            }
        };
        if changed {
            sink.changed.notify_one();
        }
    }
}

/// Retry delays while the API is away: 250 ms doubling to 5 s, so a
/// returning API is seen within seconds (client-go's reflector uses up to 30 s
/// with jitter; one agent per node watching four kinds is a small load).
#[derive(Debug)]
struct RetryBackoff {
    next: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(5);

impl Default for RetryBackoff {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(LAST_RETRY);
        Some(delay)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list item as the API server sends it: no type, managed fields.
    fn item(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn route_resources_are_kept_as_documents_the_files_loader_reads() {
        for (kind, spec) in [
            (
                Kind::HttpRoutes,
                serde_json::json!({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                                   "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]}),
            ),
            (
                Kind::VirtualServices,
                serde_json::json!({"hosts": ["reviews"],
                                   "http": [{"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}},
                                             "route": [{"destination": {"host": "reviews"}}]}]}),
            ),
            (
                Kind::DestinationRules,
                serde_json::json!({"host": "reviews",
                                   "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}),
            ),
        ] {
            let (key, text) = item(spec).facts(kind).unwrap();
            assert_eq!(key, "shop/reviews");
            assert!(!text.contains("managedFields"), "{text}");
            assert!(
                text.contains(&format!("kind: {}", kind.object_kind())),
                "{text}"
            );
            let loaded = crate::routes::load([("api", text.as_str())])
                .unwrap_or_else(|e| panic!("{kind:?}: {e}\n{text}"));
            assert_eq!(
                loaded.routes.len() + loaded.destination_rules.len(),
                1,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn not_installed_counts_as_synced_and_is_said_once() {
        let health = WatchHealth::default();
        let now = SystemTime::now();
        for kind in Kind::ALL {
            if Kind::ROUTES.contains(&kind) {
                assert!(health.not_installed(kind, now));
                assert!(!health.not_installed(kind, now), "said once");
            } else {
                assert!(!health.all_synced());
                health.listed(kind, now);
            }
        }
        assert!(health.all_synced());
        health.listed(Kind::HttpRoutes, now);
        assert!(!health.snapshot()[&Kind::HttpRoutes].not_installed);
    }
}
