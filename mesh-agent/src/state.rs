//! What the running agent knows, shared by the daemon loop and the admin API.

use std::{
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::{admin::metrics::Metrics, ebpf::KernelPrograms};

/// One configured pod and whether the kernel programs cover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub enrolled: bool,
    /// Why it is not enrolled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<PodCountersView>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCountersView {
    pub connect4: u64,
    pub connect6: u64,
}

/// The summary behind `/status` and `mesh-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub node: String,
    pub version: String,
    pub config_dir: PathBuf,
    pub ready: bool,
    pub programs: Vec<String>,
    pub attachments: usize,
    pub pods: Vec<PodStatus>,
}

pub struct AgentState {
    pub node: String,
    pub config_dir: PathBuf,
    ready: AtomicBool,
    pub programs: Mutex<KernelPrograms>,
    pub pods: Mutex<Vec<PodStatus>>,
    pub metrics: Metrics,
}

impl AgentState {
    pub fn new(node: String, config_dir: PathBuf, programs: KernelPrograms) -> Self {
        Self {
            node,
            config_dir,
            ready: AtomicBool::new(false),
            programs: Mutex::new(programs),
            pods: Mutex::new(Vec::new()),
            metrics: Metrics::new(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    /// Pod statuses with fresh counters from the kernel maps.
    pub fn pods_with_counters(&self) -> Vec<PodStatus> {
        let programs = self.programs.lock().expect("programs lock");
        let mut pods = self.pods.lock().expect("pods lock").clone();
        for pod in pods.iter_mut().filter(|p| p.enrolled) {
            let key = format!("{}/{}", pod.namespace, pod.name);
            match programs.counters(&key) {
                Ok(c) => {
                    pod.counters = Some(PodCountersView {
                        connect4: c.connect4,
                        connect6: c.connect6,
                    })
                }
                Err(err) => tracing::warn!(pod = %key, error = %err, "reading pod counters failed"),
            }
        }
        pods
    }

    pub fn status(&self) -> StatusReport {
        let pods = self.pods_with_counters();
        let programs = self.programs.lock().expect("programs lock");
        StatusReport {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_dir: self.config_dir.clone(),
            ready: self.is_ready(),
            programs: programs
                .program_names()
                .into_iter()
                .map(String::from)
                .collect(),
            attachments: programs.attachment_count(),
            pods,
        }
    }

    /// Brings the metrics up to date; called on every scrape.
    pub fn refresh_metrics(&self) {
        let pods = self.pods_with_counters();
        let m = &self.metrics;
        m.pods_enrolled
            .set(pods.iter().filter(|p| p.enrolled).count() as i64);
        m.pods_failed
            .set(pods.iter().filter(|p| !p.enrolled).count() as i64);
        m.programs_attached.set(
            self.programs
                .lock()
                .expect("programs lock")
                .attachment_count() as i64,
        );
        for pod in &pods {
            let Some(c) = pod.counters else { continue };
            for (family, total) in [("ipv4", c.connect4), ("ipv6", c.connect6)] {
                m.sync_pod_connects(&pod.namespace, &pod.name, family, total);
            }
        }
    }
}
