//! A MODEL of the Kubernetes API server, not the real thing (none can be
//! installed on these machines): a scripted stand-in that speaks the API's
//! wire protocol over real HTTP for the kinds the agent watches
//! (namespaces, pods, Services, EndpointSlices; and the custom resources
//! HTTPRoute, GRPCRoute, VirtualService, DestinationRule once a test
//! installs them: until then their paths answer 404 as for a resource
//! definition not installed), as the API concepts page
//! defines it (<https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//!
//! - list: `GET /api/v1/pods` → a `PodList` with `metadata.resourceVersion`;
//! - watch: `?watch=1&resourceVersion=N` → newline-delimited JSON events
//!   (`ADDED`, `MODIFIED`, `DELETED`) after N; `BOOKMARK`s every 200 ms when
//!   `allowWatchBookmarks=true`; an `ERROR` event with a `410 Gone` Status
//!   when N is older than the compacted history; the stream ends at
//!   `timeoutSeconds`;
//! - one global resourceVersion counter, as etcd's revision.
//!
//! A test scripts it: put and delete objects, compact the history (the next
//! resume gets 410 and must relist), cut every open watch, or take the whole
//! server away and back on the same port (an outage).
//!
//! Also, for the mesh's signer (issue 26): `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` answered from tokens the
//! test registers (authenticated with the user and extras given, the
//! audiences intersected as the API server does; anything else
//! `authenticated: false`), a pod read by name
//! (`GET /api/v1/namespaces/{ns}/pods/{name}`), and pod lists filtered by
//! `fieldSelector=spec.nodeName=<node>` (any other field selector is
//! answered 400, so a client relying on one is noticed).
//!
//! Not modelled: label selectors (everything is returned), pagination
//! (`limit` is ignored, as the API server itself does for lists served from
//! its watch cache), authentication of the model's own clients, other kinds
//! and verbs.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::broadcast, task::JoinSet};

/// The kinds served: (collection path, kind, apiVersion).
const KINDS: [(&str, &str, &str); 8] = [
    ("/api/v1/namespaces", "Namespace", "v1"),
    ("/api/v1/pods", "Pod", "v1"),
    ("/api/v1/services", "Service", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "HTTPRoute",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        "GRPCRoute",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/networking.istio.io/v1/virtualservices",
        "VirtualService",
        "networking.istio.io/v1",
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        "DestinationRule",
        "networking.istio.io/v1",
    ),
];

/// The built-in kinds, always served; the others are custom resources,
/// served once installed.
const BUILT_IN: [&str; 4] = ["Namespace", "Pod", "Service", "EndpointSlice"];

const BOOKMARK_EVERY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct State {
    revision: u64,
    /// (kind, namespace, name) → object (with its resourceVersion).
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (revision, kind, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Resumes from before this revision get 410 Gone.
    compacted: u64,
    /// Requests served, by `list` / `watch`, for assertions.
    lists: u64,
    watches: u64,
    gone: u64,
    /// Custom resources whose definitions are installed.
    installed: std::collections::BTreeSet<String>,
    /// Tokens TokenReview authenticates: token → (user, the token's audiences).
    tokens: BTreeMap<String, (Value, Vec<String>)>,
    token_reviews: u64,
}

/// The stand-in API server. Dropping it stops it.
pub struct StandInApi {
    addr: SocketAddr,
    /// Binds a listener on a port of the server's address.
    bind: Box<dyn Fn(u16) -> std::io::Result<std::net::TcpListener> + Send + Sync>,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<()>,
    /// Cuts every open watch when sent.
    cut: broadcast::Sender<()>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl StandInApi {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> Result<Self> {
        Self::start_with(|port| std::net::TcpListener::bind(("127.0.0.1", port))).await
    }

    /// Starts on a listener `bind(0)` makes; after [`Self::go_away`],
    /// [`Self::come_back`] binds the same port again with it. E.g. the test
    /// bed's control-plane address (`Topology::control_plane_binder`), which
    /// every node reaches.
    pub async fn start_with(
        bind: impl Fn(u16) -> std::io::Result<std::net::TcpListener> + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = tokio_listener(bind(0)?)?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1024);
        let (cut, _) = broadcast::channel(4);
        let mut api = Self {
            addr,
            bind: Box::new(bind),
            state: Arc::default(),
            events,
            cut,
            server: None,
        };
        api.serve(listener);
        Ok(api)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: model\n  cluster:\n    server: {}\ncontexts:\n- name: model\n  context:\n    cluster: model\n    user: model\ncurrent-context: model\nusers:\n- name: model\n  user: {{}}\n",
            self.url()
        )
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let events = self.events.clone();
        let cut = self.cut.clone();
        self.server = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the server ends them all.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As the API server (Go sets it on every connection): answers
                // are not held back by Nagle waiting for a delayed ACK.
                let _ = stream.set_nodelay(true);
                let (state, events, cut) = (state.clone(), events.clone(), cut.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (state, events, cut) = (state.clone(), events.clone(), cut.clone());
                        async move { Ok::<_, Infallible>(route(req, state, events, cut).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Takes the server away: the port refuses connections and every open
    /// watch breaks, as when the API server's host is gone.
    pub fn go_away(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Brings it back on the same port, with everything changed meanwhile.
    pub async fn come_back(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match (self.bind)(self.addr.port()).and_then(tokio_listener) {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err).context("binding the stand-in API's port again"),
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Adds or replaces an object (`kind`, `metadata.name`, optional
    /// `metadata.namespace`); sets its resourceVersion (and a uid if it has
    /// none). Returns the revision.
    pub fn put(&self, mut object: Value) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.revision += 1;
        let revision = state.revision;
        let key = key_of(&object);
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(revision.to_string()));
        if !meta.contains_key("uid") {
            meta.insert(
                "uid".into(),
                json!(format!("00000000-0000-4000-8000-{revision:012}")),
            );
        }
        let kind = key.0.clone();
        let event = if state.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.history.push((revision, kind, event, object));
        drop(state);
        let _ = self.events.send(());
        revision
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.state.lock().unwrap();
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        let Some(mut object) = state.objects.remove(&key) else {
            return false;
        };
        state.revision += 1;
        let revision = state.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        state
            .history
            .push((revision, kind.to_string(), "DELETED", object));
        drop(state);
        let _ = self.events.send(());
        true
    }

    /// Forgets the history up to now: a watch resuming from an older
    /// resourceVersion gets 410 Gone (as after etcd compaction).
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.compacted = state.revision + 1;
        state.history.clear();
    }

    /// Ends every open watch stream (as the API server does at its watch
    /// timeout or when it restarts); clients resume from their last version.
    pub fn cut_watches(&self) {
        let _ = self.cut.send(());
    }

    /// Installs the definition of a custom resource (`HTTPRoute`, ...): its
    /// path is served from now on.
    pub fn install(&self, kind: &str) {
        assert!(
            KINDS.iter().any(|(_, k, _)| *k == kind) && !BUILT_IN.contains(&kind),
            "{kind} is not a custom resource of the model"
        );
        self.state
            .lock()
            .unwrap()
            .installed
            .insert(kind.to_string());
    }

    /// Makes TokenReview authenticate `token` as the service account
    /// `namespace/account`, bound to the pod `pod_name` with `pod_uid`, for
    /// `audiences` (what a projected token of that pod says).
    pub fn accept_token(
        &self,
        token: &str,
        (namespace, account): (&str, &str),
        (pod_name, pod_uid): (&str, &str),
        audiences: &[&str],
    ) {
        let user = json!({
            "username": format!("system:serviceaccount:{namespace}:{account}"),
            "uid": format!("sa-uid-{namespace}-{account}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"),
                       "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod_name],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
            },
        });
        self.state.lock().unwrap().tokens.insert(
            token.to_string(),
            (user, audiences.iter().map(|a| a.to_string()).collect()),
        );
    }

    /// Puts a Running pod of `account` scheduled on `node` (the fields the
    /// mesh's signer reads) and returns its uid.
    pub fn put_running_pod(
        &self,
        namespace: &str,
        name: &str,
        account: &str,
        node: &str,
    ) -> String {
        self.put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": account,
                     "containers": [{"name": "app", "image": "localhost/mesh-pause:1"}]},
            "status": {"phase": "Running"}
        }));
        self.uid_of("Pod", namespace, name)
            .expect("the pod just put has a uid")
    }

    /// TokenReviews answered so far.
    pub fn token_reviews(&self) -> u64 {
        self.state.lock().unwrap().token_reviews
    }

    /// The uid the model gave an object.
    pub fn uid_of(&self, kind: &str, namespace: &str, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        state
            .objects
            .get(&key)
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
    }

    /// (lists, watches, 410 answers) served so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let state = self.state.lock().unwrap();
        (state.lists, state.watches, state.gone)
    }
}

impl Drop for StandInApi {
    fn drop(&mut self) {
        self.go_away();
    }
}

fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn key_of(object: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        text(&object["kind"]),
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

type Body = BoxBody<bytes::Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// TokenReviews and single pods; everything else is [`handle`]'s.
async fn route(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<()>,
    cut: broadcast::Sender<()>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if req.method() == hyper::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        let Ok(body) = req.into_body().collect().await else {
            return full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "no body"),
            );
        };
        let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "not JSON"),
            );
        };
        return full(StatusCode::CREATED, token_review(&state, review));
    }
    if let Some((namespace, name)) = path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.split_once("/pods/"))
        .filter(|(_, name)| !name.contains('/'))
    {
        let state = state.lock().unwrap();
        let key = ("Pod".to_string(), namespace.to_string(), name.to_string());
        return match state.objects.get(&key) {
            Some(pod) => full(StatusCode::OK, pod.clone()),
            None => full(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("pods \"{name}\" not found")),
            ),
        };
    }
    handle(req, state, events, cut)
}

/// The API server's answer to a TokenReview: the token's user when it is
/// known and for one of the audiences asked (all of the token's when none
/// are asked, as for the API server's own audience).
fn token_review(state: &Mutex<State>, mut review: Value) -> Value {
    let mut state = state.lock().unwrap();
    state.token_reviews += 1;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let answer = match state.tokens.get(token) {
        Some((user, audiences)) => {
            let common: Vec<&String> = if asked.is_empty() {
                audiences.iter().collect()
            } else {
                audiences.iter().filter(|a| asked.contains(a)).collect()
            };
            if common.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match"})
            } else {
                json!({"authenticated": true, "user": user, "audiences": common})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review["status"] = answer;
    review["metadata"] = json!({"creationTimestamp": null});
    review
}

fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<()>,
    cut: broadcast::Sender<()>,
) -> Response<Body> {
    let path = req.uri().path();
    let served = KINDS.iter().find(|(p, kind, _)| {
        *p == path && (BUILT_IN.contains(kind) || state.lock().unwrap().installed.contains(*kind))
    });
    let Some(&(_, kind, api_version)) = served else {
        return full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let on_node = match query.get("fieldSelector") {
        None => None,
        Some(selector) => match selector.strip_prefix("spec.nodeName=") {
            Some(node) if kind == "Pod" && !watching => Some(node.to_string()),
            _ => {
                return full(
                    StatusCode::BAD_REQUEST,
                    status(
                        400,
                        "BadRequest",
                        &format!("field selector {selector:?} is not modelled"),
                    ),
                );
            }
        },
    };
    if !watching {
        let mut state = state.lock().unwrap();
        state.lists += 1;
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), _)| k == kind)
            .filter(|(_, object)| {
                on_node
                    .as_deref()
                    .is_none_or(|node| object["spec"]["nodeName"].as_str() == Some(node))
            })
            .map(|(_, object)| object.clone())
            .collect();
        return full(
            StatusCode::OK,
            json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                   "metadata": {"resourceVersion": state.revision.to_string()},
                   "items": items}),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, Infallible>>(64);
    let mut changed = events.subscribe();
    let mut cut = cut.subscribe();
    let kind = kind.to_string();
    let api_version = api_version.to_string();
    {
        let mut s = state.lock().unwrap();
        s.watches += 1;
    }
    tokio::spawn(async move {
        let send = |value: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Frame::data(bytes::Bytes::from(format!("{value}\n")))))
                    .await
                    .is_ok()
            }
        };
        let mut sent_up_to = from;
        let expired = {
            let mut s = state.lock().unwrap();
            let expired = from != 0 && from < s.compacted;
            s.gone += u64::from(expired);
            expired
        };
        if expired {
            let _ = send(json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from}"))}))
            .await;
            return;
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
        let mut bookmark_due = false;
        loop {
            // What is due, and the revision it brings the client to, read
            // together: a bookmark never claims an event not yet sent.
            let (due, revision) = {
                let s = state.lock().unwrap();
                let due: Vec<(u64, &'static str, Value)> = s
                    .history
                    .iter()
                    .filter(|(rev, k, _, _)| *rev > sent_up_to && *k == kind)
                    .map(|(rev, _, event, object)| (*rev, *event, object.clone()))
                    .collect();
                (due, s.revision)
            };
            for (rev, event, object) in due {
                if !send(json!({"type": event, "object": object})).await {
                    return;
                }
                sent_up_to = rev;
            }
            if std::mem::take(&mut bookmark_due) {
                sent_up_to = sent_up_to.max(revision);
                let mark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": revision.to_string()}}});
                if !send(mark).await {
                    return;
                }
            }
            tokio::select! {
                _ = changed.recv() => {}
                _ = cut.recv() => return,
                _ = &mut end => return,
                _ = bookmark.tick(), if bookmarks => bookmark_due = true,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
        .expect("valid response")
}

/// An mpsc receiver as a stream of body frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<bytes::Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<bytes::Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
