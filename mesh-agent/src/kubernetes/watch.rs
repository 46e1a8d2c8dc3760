//! The watches: one per kind (namespaces, pods, Services, EndpointSlices),
//! each a list then a watch from the API server's watch cache, kept in the
//! [`ClusterView`] as facts.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
    ];

    /// The API group (`""` for the core group), as RBAC rules name it.
    pub fn api_group(self) -> &'static str {
        match self {
            Kind::EndpointSlices => "discovery.k8s.io",
            _ => "",
        }
    }

    /// The resource's name in the API (and in RBAC rules).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
        }
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
            .all(|k| kinds.get(k).is_some_and(|h| h.lists > 0))
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
    }
}

/// An API object the view keeps facts of.
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    type Facts: Send;
    const KIND: Kind;
    /// The facts, with the key they are kept under; None for an object the
    /// view has no use for.
    fn facts(&self) -> Option<(String, Self::Facts)>;
    fn key(&self) -> Option<String>;
    /// Where the view keeps this kind's facts.
    fn kept(view: &mut ClusterView) -> &mut BTreeMap<String, Self::Facts>;
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
    const KIND: Kind = Kind::Namespaces;
    fn facts(&self) -> Option<(String, Self::Facts)> {
        Some((
            self.metadata.name.clone()?,
            self.metadata.labels.clone().unwrap_or_default(),
        ))
    }
    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }
    fn kept(view: &mut ClusterView) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.namespaces
    }
}

impl Watched for Pod {
    type Facts = PodFacts;
    const KIND: Kind = Kind::Pods;
    fn facts(&self) -> Option<(String, Self::Facts)> {
        let facts = PodFacts::from_pod(self)?;
        Some((facts.uid.clone(), facts))
    }
    fn key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn kept(view: &mut ClusterView) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.pods
    }
}

impl Watched for Service {
    type Facts = ServiceFacts;
    const KIND: Kind = Kind::Services;
    fn facts(&self) -> Option<(String, Self::Facts)> {
        let facts = ServiceFacts::from_service(self)?;
        Some((facts.key(), facts))
    }
    fn key(&self) -> Option<String> {
        namespaced_key(&self.metadata)
    }
    fn kept(view: &mut ClusterView) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.services
    }
}

impl Watched for EndpointSlice {
    type Facts = SliceFacts;
    const KIND: Kind = Kind::EndpointSlices;
    fn facts(&self) -> Option<(String, Self::Facts)> {
        let facts = SliceFacts::from_slice(self)?;
        Some((format!("{}/{}", facts.namespace, facts.name), facts))
    }
    fn key(&self) -> Option<String> {
        namespaced_key(&self.metadata)
    }
    fn kept(view: &mut ClusterView) -> &mut BTreeMap<String, Self::Facts> {
        &mut view.slices
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

/// Runs the four watches until the task is dropped.
pub async fn follow_all(client: Client, sink: Sink) {
    tokio::join!(
        follow(Api::<Namespace>::all(client.clone()), sink.clone()),
        follow(Api::<Pod>::all(client.clone()), sink.clone()),
        follow(Api::<Service>::all(client.clone()), sink.clone()),
        follow(Api::<EndpointSlice>::all(client), sink),
    );
}

async fn follow<K: Watched>(api: Api<K>, sink: Sink) {
    let kind = K::KIND;
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(RetryBackoff::default())
        .boxed();
    let mut listing: Vec<(String, K::Facts)> = Vec::new();
    while let Some(event) = stream.next().await {
        let now = SystemTime::now();
        let event = match event {
            Ok(event) => event,
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
                listing.extend(object.facts());
                false
            }
            Event::InitDone => {
                *K::kept(&mut sink.view.lock()) =
                    std::mem::take(&mut listing).into_iter().collect();
                sink.health.listed(kind, now);
                tracing::info!(kind = kind.name(), "Kubernetes list complete; watching");
                true
            }
            Event::Apply(object) => {
                let mut view = sink.view.lock();
                match object.facts() {
                    Some((key, facts)) => {
                        K::kept(&mut view).insert(key, facts);
                    }
                    // No longer of use (e.g. a slice that lost its Service label).
                    None => {
                        if let Some(key) = object.key() {
                            K::kept(&mut view).remove(&key);
                        }
                    }
                }
                true
            }
            Event::Delete(object) => {
                if let Some(key) = object.key() {
                    K::kept(&mut sink.view.lock()).remove(&key);
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
