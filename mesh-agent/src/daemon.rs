//! `mesh-agent run`: load config and kernel programs, enrol pods, proxy their
//! traffic, follow config changes, and stop as `onStop` says on SIGTERM/SIGINT.

use std::{os::fd::AsFd, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin, apply,
    capture::Enroller,
    config::{
        self, Discovery, OnStop,
        mesh::IdentityConfig,
        watch::{Changes, FileWatch},
    },
    ebpf::{KernelPrograms, LoadOptions, bpffs},
    handover,
    kubernetes::KubeSource,
    logging,
    mtls::Mtls,
    proxy::ProxyContext,
    state::AgentState,
};

/// How often stale captured-connection records are looked for, and how old
/// they must be to go.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_AGE: Duration = Duration::from_secs(30);
/// How long a new agent waits for the one it replaces to let go of the
/// pinned state.
const HANDOVER_LOCK_WAIT: Duration = Duration::from_secs(10);

/// This agent's side of a handover to its successor.
struct Handing {
    state: Arc<AgentState>,
    admin_socket: std::os::fd::OwnedFd,
    handed: tokio::sync::oneshot::Sender<()>,
}

impl handover::Handing for Handing {
    fn offer(&mut self) -> handover::Offer {
        // From here the successor owns the kernel state: configuration
        // changes are its to apply.
        self.state.set_handing_over(true);
        let mut enroller = self.state.enroller.lock();
        enroller.programs.release_pin_lock();
        let mut offer = enroller.offer();
        offer.admin = self.admin_socket.try_clone().ok();
        offer
    }

    fn resume(&mut self) {
        let mut enroller = self.state.enroller.lock();
        match enroller.programs.retake_pin_lock() {
            Ok(()) => self.state.set_handing_over(false),
            Err(err) => tracing::error!(
                error = format!("{err:#}"),
                "the pinned state stays with the other agent; this one applies no configuration change"
            ),
        }
    }

    fn handed_over(self) {
        let _ = self.handed.send(());
    }
}

pub async fn run(config_dir: &Path) -> Result<()> {
    let mut config =
        config::load_dir(config_dir).map_err(|e| anyhow!("invalid configuration: {e}"))?;
    // With the API as the source, the first desired state holds the pods of
    // the saved state: they are served (and an inherited agent's kept)
    // before the API answers.
    let kubernetes = match config.node.discovery {
        Discovery::Files => None,
        Discovery::Kubernetes => {
            let source = KubeSource::new(&config.node.kubernetes, &config.node.name)?;
            let dir = config_dir.to_path_buf();
            let reading = source.clone();
            config = tokio::task::spawn_blocking(move || reading.desired(&dir))
                .await?
                .map_err(|e| anyhow!("invalid configuration: {e}"))?;
            Some(source)
        }
    };
    let node = config.node.clone();
    tracing::info!(node = %node.name, dir = %config_dir.display(), pods = config.pods.len(), "configuration loaded");
    bpffs::ensure_mounted(&node.bpffs)?;
    raise_limits();
    // Before anything is loaded: a kernel without what the agent needs is
    // refused here, naming the feature, not later by the verifier.
    let kernel = crate::ebpf::probe::probe().context("probing the kernel")?;
    kernel.require_all()?;
    for fallback in &kernel.fallbacks {
        tracing::warn!(missing = %fallback.missing, fallback = %fallback.fallback, "kernel feature missing: fallback taken");
    }
    tracing::info!(release = %kernel.release, features = kernel.features_checked, fallbacks = kernel.fallbacks.len(), "kernel probed");

    // An agent already running on this node hands over its listeners: this
    // one serves on the same sockets, so no connection is refused meanwhile.
    let handover_name = handover::socket_name(&node.pin_dir());
    let mut inherited = tokio::task::spawn_blocking({
        let name = handover_name.clone();
        move || handover::take_over(&name)
    })
    .await?
    .context("taking over from the agent running on this node")?;
    let mut programs = KernelPrograms::load(&LoadOptions {
        pin_dir: node.pin_dir(),
        max_connections: node.max_connections,
        kernel_log_level: logging::max_level(),
        // The agent handing over lets go of the pinned state as it does.
        lock_wait: if inherited.is_some() {
            HANDOVER_LOCK_WAIT
        } else {
            Duration::ZERO
        },
    })?;
    tracing::info!(programs = ?programs.program_names(), pin_dir = %node.pin_dir().display(), "kernel programs loaded");
    let mtls = Arc::new(Mtls::new(
        &node.trust_domain,
        node.identity.as_ref(),
        node.tunnel.idle_timeout,
        node.tunnel.handshake_timeout,
    )?);
    match &mtls.identities {
        Some(ids) => {
            tracing::info!(trust_domain = %node.trust_domain, roots = ids.trust_bundle_len(), "workload identities ready")
        }
        None => tracing::warn!(
            "no identity source configured: no mutual TLS; traffic to mesh workloads on other nodes is refused"
        ),
    }
    let fast_path = programs.fast_path(
        crate::ebpf::FastPathOptions {
            loopback: node.fast_path.loopback,
            splice: node.fast_path.splice,
        },
        kernel.fast_path_unavailable(),
    )?;
    if fast_path.options().loopback {
        tracing::warn!(
            splice = fast_path.splicing(),
            "EXPERIMENTAL same-node fast path on: a blocking read in a pod can return EAGAIN instead of ECONNRESET when its connection is reset (kernel sockmap behaviour; docs/fastpath.md)"
        );
    }
    let mut proxy = ProxyContext::new(programs.orig_dst_table()?, mtls.clone());
    proxy.dns = Arc::new(crate::dns::Dns::new(programs.dns_resolvers()?));
    proxy.connections.set_access_log(node.access_log);
    proxy.admission.set_limits(node.limits);
    proxy.set_http(node.http);
    if let Some(settings) = &node.tracing {
        let tracer =
            crate::spans::RequestTracer::start(settings, &node.name, proxy.span_counters.clone())
                .context("tracing")?;
        proxy.tracer = Some(Arc::new(tracer));
        tracing::info!(
            endpoint = settings.endpoint,
            protocol = ?settings.protocol,
            random_sampling_percentage = settings.random_sampling_percentage,
            "request spans go to the OTLP collector"
        );
    }
    proxy.fast_path = Some(Arc::new(fast_path));
    let proxy = Arc::new(proxy);
    let mut enroller = Enroller::new(programs, proxy.clone());
    enroller.preserve_source_address = node.preserve_source_address;
    if let Some(inherited) = &mut inherited {
        tracing::info!(
            pods = inherited.pods.len(),
            "an agent runs on this node: taking over its listeners"
        );
        enroller.adopt(std::mem::take(&mut inherited.pods));
    }
    let map_gauges = enroller.programs.map_gauges().unwrap_or_else(|err| {
        tracing::warn!(
            error = format!("{err:#}"),
            "kernel map occupancy will not be exposed"
        );
        Vec::new()
    });
    let state = Arc::new(
        AgentState::new(
            config_dir.to_path_buf(),
            enroller,
            proxy.clone(),
            node.clone(),
        )
        .with_map_gauges(map_gauges)
        .with_kernel(kernel)
        .with_kubernetes(kubernetes.clone()),
    );
    tracing::info!(policies = config.policies.set.len(), root_namespace = %node.root_namespace, "authorization policies loaded");
    // RequestAuthentications' jwksUri key sets: fetched by the agent only.
    crate::policy::start_fetching_jwks();
    apply::apply(&state, config).context("applying the configuration")?;
    state.set_reload_result(None);
    release_what_was_not_taken_over(&state);
    state.metrics.register(proxy.telemetry.collectors());
    state.metrics.register(proxy.http_telemetry.collectors());
    state.metrics.register(proxy.span_counters.collectors());
    state.metrics.register(proxy.mirror_counters.collectors());
    state.metrics.register(proxy.admission.collectors());

    let listener = match inherited.as_mut().and_then(|i| i.admin.take()) {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)?
        }
        None => admin::bind(node.admin_address).await?,
    };
    let admin_socket = listener.as_fd().try_clone_to_owned()?;
    tracing::info!(address = %node.admin_address, "admin API listening");
    let admin_task = tokio::spawn(admin::serve(listener, state.clone()));
    // Watching starts before the agent says it is ready, and the first pass
    // compares the files with what was loaded: a change made at any time
    // after the load is seen.
    let identity_paths = node
        .identity
        .as_ref()
        .map(identity_paths)
        .unwrap_or_default();
    let (_file_watch, config_changes, identity_changes) =
        match FileWatch::start(&state.config_dir, &identity_paths) {
            Ok((watch, config, identity)) => (Some(watch), Some(config), Some(identity)),
            Err(err) => {
                tracing::error!(
                    error = format!("{err:#}"),
                    "configuration and identity file changes will NOT be followed"
                );
                (None, None, None)
            }
        };
    // The CNI plugin's socket: from here on a new pod's sandbox waits for
    // its enrolment (before, the plugin finds no agent and the sandbox
    // waits for one).
    let cni_task = match &kubernetes {
        Some(source) => {
            let listener = crate::kubernetes::cni::bind(&node.kubernetes.cni.socket)?;
            tracing::info!(socket = %node.kubernetes.cni.socket.display(), "serving the CNI plugin");
            let metrics = crate::kubernetes::cni::CniMetrics::new();
            state.metrics.register(metrics.collectors());
            Some(tokio::spawn(crate::kubernetes::cni::serve(
                listener,
                source.clone(),
                state.clone(),
                metrics,
            )))
        }
        None => None,
    };
    let (updates, received) = tokio::sync::mpsc::channel(1);
    let state_dir = state.config_dir.clone();
    let source_task = tokio::spawn(async move {
        match kubernetes {
            Some(source) => source.run(state_dir, config_changes, updates).await,
            None => {
                if let Some(changes) = config_changes {
                    config::source::run(state_dir, changes, updates).await;
                }
            }
        }
    });
    let watch_task = tokio::spawn(follow_source(state.clone(), received));
    let sweep_task = tokio::spawn(sweep_stale_records(proxy.clone()));
    let trim_task = tokio::spawn(return_freed_memory());
    let identity_task = tokio::spawn(keep_identities_fresh(mtls.clone(), identity_changes));
    state.set_ready(true);
    tracing::info!("agent ready");
    if let Some(inherited) = inherited {
        // This agent serves whatever the answer: if the old one is gone
        // meanwhile (stopped early), it has nothing more to hand over.
        match tokio::task::spawn_blocking(move || inherited.serving()).await? {
            Ok(()) => tracing::info!("took over from the previous agent"),
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "took over the previous agent's sockets, but it did not confirm; serving anyway"
            ),
        }
    }
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel();
    handover::serve(
        handover_name,
        Handing {
            state: state.clone(),
            admin_socket,
            handed: handed_tx,
        },
    )?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut handed_over = false;
    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        Ok(()) = handed_rx => {
            handed_over = true;
            "handover"
        }
    };
    tracing::info!(reason = signal_name, "shutting down: draining");
    // Readiness off first (the admin API keeps answering, with 503), then no
    // new connection is accepted, then the ones in flight get up to
    // `drainTimeout` to finish. After a handover the listeners (the admin
    // API's too) are the new agent's: this one only stops accepting on them.
    watch_task.abort();
    source_task.abort();
    if let Some(cni_task) = cni_task {
        cni_task.abort();
    }
    state.set_ready(false);
    if handed_over {
        admin_task.abort();
    }
    state.enroller.lock().stop_serving();
    proxy.start_draining();
    drain(&proxy, node.drain_timeout).await;
    if handed_over {
        // Exiting on our own would have a restart policy start this agent
        // again, over the new one: wait to be stopped.
        tracing::info!("handed over to a new agent; waiting for SIGTERM to exit");
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    }
    for task in [admin_task, sweep_task, identity_task, trim_task] {
        task.abort();
    }
    let mut enroller = state.enroller.lock();
    if handed_over {
        tracing::info!("kernel programs stay attached: they are the new agent's");
        return Ok(());
    }
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

/// After the first apply: pods and listeners an earlier agent had that
/// are no longer wanted go.
fn release_what_was_not_taken_over(state: &AgentState) {
    let mut enroller = state.enroller.lock();
    let released = enroller.programs.release_inherited();
    if released > 0 {
        tracing::info!(
            released,
            "released pods an earlier agent enrolled that are no longer configured"
        );
    }
    let unadopted = enroller.close_unadopted();
    if unadopted > 0 {
        tracing::info!(
            pods = unadopted,
            "closed handed-over listeners of pods no longer configured"
        );
    }
}

/// Applies every desired state the source sends, whole or not at all; a
/// refused or failed one is reported and the last good state keeps serving.
async fn follow_source(
    state: Arc<AgentState>,
    mut updates: tokio::sync::mpsc::Receiver<crate::desired::Update>,
) {
    use crate::desired::Update;
    while let Some(update) = updates.recv().await {
        if state.handing_over() {
            tracing::warn!(
                "configuration change not applied: a new agent is taking over and applies it"
            );
            continue;
        }
        match update {
            Update::Desired(desired) => apply::reload(&state, *desired),
            Update::Rejected(reason) => apply::rejected(&state, reason),
            Update::DesiredFilesRefused(desired, reason) => {
                apply::reload(&state, *desired);
                state.keep_refusal(reason);
            }
        }
    }
}

/// Renews minted certificates before they expire, and reloads the issuer,
/// bundle and certificate files when they change on disk (no restart needed;
/// open connections keep the certificates they were made with).
async fn keep_identities_fresh(mtls: Arc<Mtls>, changes: Option<Changes>) {
    let Some(manager) = mtls.identities.clone() else {
        return;
    };
    if matches!(
        manager.source(),
        crate::identity::IdentitySource::SigningRequest(_)
    ) {
        // Asked from the CA, renewed by the requester; the token and the CA
        // roots are read again at each request, so there is nothing to watch.
        crate::identity::requester::run(manager).await;
        return;
    }
    // Files changing is the watcher's to say, on a task of its own: a
    // change being debounced is never dropped for a renewal tick.
    if let Some(mut changes) = changes {
        let manager = manager.clone();
        tokio::spawn(async move {
            while changes.changed().await {
                reload_identities(&manager).await;
            }
        });
    }
    // Renewal is due by the clock (and a clock set back is seen at the next
    // look).
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        every.tick().await;
        let manager = manager.clone();
        match tokio::task::spawn_blocking(move || manager.renew_due()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(renewed)) => tracing::info!(renewed, "workload certificates renewed"),
            Ok(Err(err)) => {
                tracing::error!(error = format!("{err:#}"), "certificate renewal failed")
            }
            Err(err) => tracing::error!(error = %err, "certificate renewal task failed"),
        }
    }
}

/// The identity files changed: reload the issuer and bundle (keeping the
/// previous material if the new one is broken), then load certificates that
/// were missing.
async fn reload_identities(manager: &Arc<crate::identity::IdentityManager>) {
    let reloading = manager.clone();
    match tokio::task::spawn_blocking(move || reloading.reload()).await {
        Ok(Ok(())) => {
            tracing::info!("identity material changed on disk and was reloaded");
            let manager = manager.clone();
            match tokio::task::spawn_blocking(move || manager.retry_missing()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(missing)) => {
                    tracing::info!(missing, "missing workload certificates loaded")
                }
                Ok(Err(err)) => tracing::error!(
                    error = format!("{err:#}"),
                    "some workload certificates are still missing"
                ),
                Err(err) => tracing::error!(error = %err, "certificate task failed"),
            }
        }
        // Keep the previous material; try again when the files change.
        Ok(Err(err)) => tracing::error!(
            error = format!("{err:#}"),
            "identity reload failed; previous certificates stay in force"
        ),
        Err(err) => tracing::error!(error = %err, "identity reload task failed"),
    }
}

/// Where the identity material lives: the files themselves, and the
/// directory of workload certificates.
fn identity_paths(identity: &IdentityConfig) -> Vec<std::path::PathBuf> {
    let mut paths = Vec::new();
    if let Some(issuer) = &identity.issuer {
        paths.extend([issuer.cert.clone(), issuer.key.clone()]);
        paths.extend(issuer.trust_bundle.clone());
    }
    if let Some(files) = &identity.files {
        paths.extend([files.trust_bundle.clone(), files.dir.clone()]);
    }
    paths
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

/// Waits until no proxied connection is in flight, or `deadline` passes.
async fn drain(proxy: &ProxyContext, deadline: Duration) {
    use crate::proxy::connections::Direction;
    let started = std::time::Instant::now();
    let in_flight = || {
        proxy.connections.active(Direction::Outbound)
            + proxy.connections.active(Direction::Inbound)
            + proxy.tunnel_connections() as u64
    };
    loop {
        let left = in_flight();
        if left == 0 {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "drained: no connection in flight"
            );
            return;
        }
        if started.elapsed() >= deadline {
            tracing::warn!(
                connections = left,
                deadline_secs = deadline.as_secs_f64(),
                "drain deadline reached; the connections still open are closed"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// glibc keeps memory freed after a burst (relay buffers of a thousand
/// connections, TLS sessions) in its arenas, so RSS stays at the burst's
/// peak. Giving it back every few seconds makes RSS follow the live load;
/// it costs a walk over the free lists, nothing while memory is in use.
async fn return_freed_memory() {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Each proxied connection holds two descriptors: take the hard limit. Kernels
/// since 5.11 charge BPF memory to the memory cgroup, so RLIMIT_MEMLOCK matters
/// no more; raise it where allowed, else just say so.
fn raise_limits() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let open_files = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(err) => {
                tracing::warn!(error = %err, "could not raise the open file limit to its hard limit");
                soft
            }
        },
        Err(err) => {
            tracing::warn!(error = %err, "could not read the open file limit");
            0
        }
    };
    if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(error = %err, "could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
    tracing::info!(
        open_files,
        "file descriptor limit (each proxied connection takes one or two)"
    );
}
