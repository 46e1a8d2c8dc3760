//! The agent's side of the CNI plugin (`mesh-cni`, docs/kubernetes.md):
//! the runtime's ADD for a new pod sandbox reaches here before any of the
//! pod's containers runs, and is answered only once the pod's capture is
//! attached, so that its first connection is the mesh's.
//!
//! - ADD: the sandbox (network namespace, addresses) is kept by the source,
//!   which enrols the pod from it without waiting for the API to say the pod
//!   runs. The pod must be described by the API (its service account is its
//!   identity, its labels say whether it is in the mesh): a pod the watch has
//!   not seen within `kubernetes.cni.addTimeout` is refused, so its sandbox
//!   is not started and the runtime tries again; nothing of it runs outside
//!   the mesh meanwhile. A pod not in the mesh is answered at once.
//! - DEL: the sandbox is forgotten; the pod is released as it goes.
//! - CHECK: whether the pod is enrolled in that sandbox (or rightly not).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_cni::protocol::{Answer, MAX_LINE, PodSandbox, Request};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::source::{KubeSource, Membership};
use crate::state::AgentState;

/// A plugin has this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Looks again at least this often while an ADD waits (a pod's
/// description arrives without an apply).
const RECHECK: Duration = Duration::from_millis(25);

/// The requests served, for the metrics.
#[derive(Clone)]
pub struct CniMetrics {
    requests: IntCounterVec,
    add_seconds: HistogramVec,
}

impl CniMetrics {
    pub fn new() -> Self {
        Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "mesh_cni_requests_total",
                    "CNI plugin requests by command and answer",
                ),
                &["command", "answer"],
            )
            .expect("valid metric"),
            add_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "mesh_cni_add_duration_seconds",
                    "Time an ADD waited for the agent, by answer (a pod's start waits this long)",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    20.0,
                ]),
                &["answer"],
            )
            .expect("valid metric"),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.add_seconds.clone()),
        ]
    }
}

impl Default for CniMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Binds the plugin's socket (replacing a stale one), readable and
/// writable by root only.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves the plugin's requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    source: Arc<KubeSource>,
    state: Arc<AgentState>,
    metrics: CniMetrics,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "accepting a CNI plugin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (source, state, metrics) = (source.clone(), state.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(err) = exchange(stream, &source, &state, &metrics).await {
                tracing::warn!(error = %err, "a CNI plugin request was not answered");
            }
        });
    }
}

async fn exchange(
    stream: UnixStream,
    source: &KubeSource,
    state: &AgentState,
    metrics: &CniMetrics,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE as u64));
    let mut line = String::new();
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(err)) => return Err(err),
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within 5 s",
            ));
        }
    }
    let answer = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(request) => answer(request, source, state, metrics).await,
        Err(err) => Answer::Refused {
            reason: format!("the agent cannot read the request: {err}"),
        },
    };
    let mut out = serde_json::to_vec(&answer).expect("an answer serializes");
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn answer_name(answer: &Answer) -> &'static str {
    match answer {
        Answer::Enrolled { .. } => "enrolled",
        Answer::NotInMesh { .. } => "not_in_mesh",
        Answer::Released => "released",
        Answer::Refused { .. } => "refused",
    }
}

async fn answer(
    request: Request,
    source: &KubeSource,
    state: &AgentState,
    metrics: &CniMetrics,
) -> Answer {
    let started = Instant::now();
    let (command, answer) = match request {
        Request::Add(sandbox) => {
            let answer = add(&sandbox, source, state).await;
            let elapsed = started.elapsed();
            metrics
                .add_seconds
                .with_label_values(&[answer_name(&answer)])
                .observe(elapsed.as_secs_f64());
            match &answer {
                Answer::Enrolled { .. } => {
                    tracing::info!(pod = %sandbox.key(), sandbox = %short(&sandbox.container_id), waited_ms = elapsed.as_secs_f64() * 1e3, "CNI ADD: pod enrolled before its containers start")
                }
                Answer::Refused { reason } => {
                    tracing::warn!(pod = %sandbox.key(), sandbox = %short(&sandbox.container_id), %reason, "CNI ADD refused: the sandbox does not start")
                }
                _ => tracing::debug!(pod = %sandbox.key(), "CNI ADD: not in the mesh"),
            }
            ("ADD", answer)
        }
        Request::Del(sandbox) => {
            if source.forget(&sandbox.container_id) {
                tracing::info!(pod = %sandbox.key(), sandbox = %short(&sandbox.container_id), "CNI DEL: sandbox gone");
            }
            ("DEL", Answer::Released)
        }
        Request::Check(sandbox) => ("CHECK", check(&sandbox, source, state)),
    };
    metrics
        .requests
        .with_label_values(&[command, answer_name(&answer)])
        .inc();
    answer
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn add(sandbox: &PodSandbox, source: &KubeSource, state: &AgentState) -> Answer {
    let started = Instant::now();
    let timeout = state.node_config().kubernetes.cni.add_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    if sandbox.netns.is_empty() || sandbox.ips.is_empty() {
        return Answer::Refused {
            reason: "the request names no network namespace or no address".into(),
        };
    }
    source.announce(sandbox.clone());
    loop {
        let applied = state.applied.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        let waiting_for = match source.membership(sandbox) {
            Membership::NotInMesh(why) => {
                source.forget(&sandbox.container_id);
                return Answer::NotInMesh {
                    reason: why.to_string(),
                };
            }
            Membership::ElsewhereScheduled(node) => {
                source.forget(&sandbox.container_id);
                return Answer::Refused {
                    reason: format!(
                        "the API says pod {} runs on node {node:?}, not on this agent's node (is NODE_NAME right?)",
                        sandbox.key()
                    ),
                };
            }
            Membership::Undescribed => format!(
                "the API has not described pod {} (uid {}) to this agent yet",
                sandbox.key(),
                sandbox.uid
            ),
            Membership::InMesh(key) => {
                let enroller = state.enroller.lock();
                if enroller
                    .enrolled_netns(&key)
                    .is_some_and(|netns| netns == Path::new(&sandbox.netns))
                {
                    return Answer::Enrolled {
                        waited_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    };
                }
                enroller
                    .enrolment_error(&key)
                    .or_else(|| source.waiting_reason(&key))
                    .unwrap_or_else(|| "its enrolment is not applied yet".into())
            }
        };
        tokio::select! {
            _ = &mut applied => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            source.forget(&sandbox.container_id);
            return Answer::Refused {
                reason: format!(
                    "not enrolled within {timeout:?} (kubernetes.cni.addTimeout): {waiting_for}; the sandbox must not start outside the mesh, the runtime tries again"
                ),
            };
        }
    }
}

fn check(sandbox: &PodSandbox, source: &KubeSource, state: &AgentState) -> Answer {
    match source.membership(sandbox) {
        Membership::NotInMesh(why) => Answer::NotInMesh {
            reason: why.to_string(),
        },
        Membership::InMesh(key) => {
            let enrolled_here = state
                .enroller
                .lock()
                .enrolled_netns(&key)
                .is_some_and(|netns| netns == Path::new(&sandbox.netns));
            if enrolled_here {
                Answer::Enrolled { waited_us: 0 }
            } else {
                Answer::Refused {
                    reason: format!(
                        "pod {key} is in the mesh and not enrolled in {}",
                        sandbox.netns
                    ),
                }
            }
        }
        Membership::Undescribed => Answer::Refused {
            reason: format!("the API has not described pod {} yet", sandbox.key()),
        },
        Membership::ElsewhereScheduled(node) => Answer::Refused {
            reason: format!("pod {} is scheduled on node {node:?}", sandbox.key()),
        },
    }
}
