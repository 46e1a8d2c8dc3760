//! `mesh-agent run`: load config and kernel programs, enrol pods, serve the admin
//! API, and on SIGTERM/SIGINT detach everything and exit.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin, config,
    ebpf::{KernelPrograms, bpffs},
    logging,
    state::{AgentState, PodStatus},
};

pub async fn run(config_dir: &Path) -> Result<()> {
    let config = config::load_dir(config_dir).map_err(|e| anyhow!("invalid configuration: {e}"))?;
    tracing::info!(node = %config.node.name, dir = %config_dir.display(), pods = config.pods.len(), "configuration loaded");
    bpffs::ensure_mounted(&config.node.bpffs)?;
    warn_about_memlock();

    let programs = KernelPrograms::load(logging::max_level())?;
    tracing::info!(programs = ?programs.program_names(), "kernel programs loaded");
    let state = Arc::new(AgentState::new(
        config.node.name.clone(),
        config_dir.to_path_buf(),
        programs,
    ));
    enrol_pods(&state, &config.pods);

    let listener = admin::bind(config.node.admin_address).await?;
    tracing::info!(address = %config.node.admin_address, "admin API listening");
    let admin_task = tokio::spawn(admin::serve(listener, state.clone()));
    state.set_ready(true);
    tracing::info!("agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = signal_name, "shutting down");
    state.set_ready(false);
    admin_task.abort();
    release_all(&state);
    tracing::info!("kernel programs detached; bye");
    Ok(())
}

/// Enrols every configured pod. A pod that cannot be enrolled (missing netns or
/// cgroup) is reported and does not stop the others.
fn enrol_pods(state: &AgentState, pods: &[config::PodConfig]) {
    let mut programs = state.programs.lock().expect("programs lock");
    let mut statuses = Vec::with_capacity(pods.len());
    for pod in pods {
        let mut status = PodStatus {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            enrolled: false,
            error: None,
            netns_cookie: None,
            counters: None,
        };
        match programs.enrol(pod) {
            Ok(enrolment) => {
                tracing::info!(pod = %pod.key(), netns_cookie = enrolment.netns_cookie, cgroup = %pod.cgroup.display(), "pod enrolled");
                status.enrolled = true;
                status.netns_cookie = Some(enrolment.netns_cookie);
            }
            Err(err) => {
                tracing::error!(pod = %pod.key(), error = format!("{err:#}"), "pod NOT enrolled: its traffic is not captured");
                status.error = Some(format!("{err:#}"));
            }
        }
        statuses.push(status);
    }
    *state.pods.lock().expect("pods lock") = statuses;
}

fn release_all(state: &AgentState) {
    let mut programs = state.programs.lock().expect("programs lock");
    for pod in state
        .pods
        .lock()
        .expect("pods lock")
        .iter()
        .filter(|p| p.enrolled)
    {
        let key = format!("{}/{}", pod.namespace, pod.name);
        if let Err(err) = programs.release(&key) {
            tracing::warn!(pod = %key, error = %err, "releasing pod failed");
        }
    }
}

/// Kernels since 5.11 account BPF memory to the memory cgroup, so a low
/// RLIMIT_MEMLOCK no longer matters; raise it where allowed, else just say so.
fn warn_about_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}
