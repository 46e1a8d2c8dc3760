//! `mesh-agent run`: load config and kernel programs, enrol pods, proxy their
//! traffic, follow config changes, and stop as `onStop` says on SIGTERM/SIGINT.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin,
    capture::Enroller,
    config::{self, Config, OnStop, watch::ConfigWatch},
    ebpf::{KernelPrograms, LoadOptions, bpffs},
    logging,
    proxy::ProxyContext,
    state::AgentState,
};

/// How often stale captured-connection records are looked for, and how old
/// they must be to go.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_AGE: Duration = Duration::from_secs(30);

pub async fn run(config_dir: &Path) -> Result<()> {
    let config = config::load_dir(config_dir).map_err(|e| anyhow!("invalid configuration: {e}"))?;
    let node = config.node.clone();
    tracing::info!(node = %node.name, dir = %config_dir.display(), pods = config.pods.len(), "configuration loaded");
    bpffs::ensure_mounted(&node.bpffs)?;
    raise_limits();

    let mut programs = KernelPrograms::load(&LoadOptions {
        pin_dir: node.pin_dir(),
        max_connections: node.max_connections,
        kernel_log_level: logging::max_level(),
    })?;
    tracing::info!(programs = ?programs.program_names(), pin_dir = %node.pin_dir().display(), "kernel programs loaded");
    let proxy = Arc::new(ProxyContext::new(programs.orig_dst_table()?));
    let mut enroller = Enroller::new(programs, proxy.clone());
    enroller.reconcile(&config.pods);
    let released = enroller.programs.release_inherited();
    if released > 0 {
        tracing::info!(
            released,
            "released pods an earlier agent enrolled that are no longer configured"
        );
    }
    let state = Arc::new(AgentState::new(
        node.name.clone(),
        config_dir.to_path_buf(),
        enroller,
        proxy.clone(),
    ));
    state
        .config_generation
        .store(1, std::sync::atomic::Ordering::SeqCst);
    state
        .metrics
        .config_reloads
        .with_label_values(&["ok"])
        .inc();

    let listener = admin::bind(node.admin_address).await?;
    tracing::info!(address = %node.admin_address, "admin API listening");
    let admin_task = tokio::spawn(admin::serve(listener, state.clone()));
    let watch_task = tokio::spawn(follow_config(state.clone(), config));
    let sweep_task = tokio::spawn(sweep_stale_records(proxy.clone()));
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
    for task in [admin_task, watch_task, sweep_task] {
        task.abort();
    }
    let mut enroller = state.enroller.lock().expect("enroller lock");
    enroller.stop_serving();
    match node.on_stop {
        OnStop::KeepCapture => tracing::info!(
            "kernel programs stay attached (onStop: keepCapture): enrolled pods' connections are refused until an agent is back"
        ),
        OnStop::Release => {
            enroller.programs.release_all();
            tracing::info!("kernel programs detached (onStop: release)");
        }
    }
    Ok(())
}

/// Applies every valid change of the configuration directory; an invalid one is
/// reported (file, line, field) and the last good configuration keeps serving.
async fn follow_config(state: Arc<AgentState>, mut current: Config) {
    let mut watch = match ConfigWatch::start(&state.config_dir) {
        Ok(watch) => watch,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "configuration changes will NOT be followed"
            );
            return;
        }
    };
    while watch.changed().await {
        match config::load_dir(&state.config_dir) {
            Ok(new) if new == current => {
                // Back to what is running (e.g. a bad edit undone): nothing to
                // apply, but the files are valid again.
                *state.last_reload_error.lock().expect("reload error lock") = None;
            }
            Ok(new) => {
                if new.node != current.node {
                    tracing::warn!(
                        "node.yaml changed: node settings apply at the next restart; pods apply now"
                    );
                }
                state
                    .enroller
                    .lock()
                    .expect("enroller lock")
                    .reconcile(&new.pods);
                let generation = state
                    .config_generation
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    + 1;
                *state.last_reload_error.lock().expect("reload error lock") = None;
                state
                    .metrics
                    .config_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(generation, pods = new.pods.len(), "configuration reloaded");
                current = new;
            }
            Err(err) => {
                tracing::error!(error = %err, "configuration change rejected; the previous configuration keeps serving");
                *state.last_reload_error.lock().expect("reload error lock") = Some(err.to_string());
                state
                    .metrics
                    .config_reloads
                    .with_label_values(&["failed"])
                    .inc();
            }
        }
    }
}

async fn sweep_stale_records(proxy: Arc<ProxyContext>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        let removed = proxy.orig_dst.sweep(SWEEP_AGE);
        if removed > 0 {
            tracing::debug!(
                removed,
                "removed records of connections that never reached the agent"
            );
        }
    }
}

/// Each proxied connection holds two descriptors: take the hard limit. Kernels
/// since 5.11 charge BPF memory to the memory cgroup, so RLIMIT_MEMLOCK matters
/// no more; raise it where allowed, else just say so.
fn raise_limits() {
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) == 0 {
            nofile.rlim_cur = nofile.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
        }
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
        }
    }
    tracing::debug!(nofile = nofile.rlim_cur, "file descriptor limit");
}
