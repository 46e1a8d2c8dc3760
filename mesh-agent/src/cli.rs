//! The command line: `run`, `check`, `status`, `version`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{config, daemon, logging, logging::LogFormat, status};

/// The environment variable with the node's name (the DaemonSet sets it
/// from the downward API's `spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "eBPF-accelerated node proxy for service meshes", long_about = None)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `mesh_agent=debug,info`.
    #[arg(long, global = true, default_value = "info", env = "MESH_LOG")]
    pub log: String,
    /// This node's name, in place of node.yaml's `name` (on Kubernetes, set
    /// `NODE_NAME` from the downward API's `spec.nodeName`).
    #[arg(long, global = true, env = NODE_NAME_ENV)]
    pub node_name: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: load the kernel programs, enrol the pods listed in the
    /// config directory and serve the admin API until SIGTERM or SIGINT, then
    /// detach everything and exit.
    Run {
        /// The node-local configuration directory (node.yaml, pods.yaml).
        #[arg(long, short, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration directory offline, as `run` would, and exit
    /// non-zero with the file, line and field of the first problem.
    Check {
        #[arg(long, short, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Print a running agent's state: readiness, programs, enrolled pods and their
    /// counters (read from its admin API).
    Status {
        /// The agent's admin API address.
        #[arg(long, default_value_t = config::default_admin_address())]
        admin: SocketAddr,
        /// Print the raw JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Detach every kernel program of this node and remove the pinned state, so
    /// enrolled pods connect directly again. For uninstalling: run it after the
    /// agent has stopped (a stopped agent otherwise keeps its pods captured).
    Release {
        #[arg(long, short, env = "MESH_CONFIG")]
        config: PathBuf,
    },
    /// Chain the CNI plugin into the node's CNI configuration, so that each
    /// new pod is enrolled before its containers start (the DaemonSet's
    /// init container runs this). Idempotent.
    CniInstall {
        #[arg(long, short, env = "MESH_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        dirs: CniDirs,
        /// The plugin binary to install (default: `mesh-cni` beside this
        /// program).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Stay running and put the plugin back whenever the conflist loses
        /// it (a pod network that rewrites its configuration), looking every
        /// this many seconds; exit on SIGTERM, leaving it installed.
        #[arg(long, value_name = "SECONDS")]
        keep: Option<u64>,
    },
    /// Take the CNI plugin out of the node's CNI configuration (the
    /// conflist as it was before, when nothing else changed it) and remove
    /// its binary. Run it when uninstalling, before the agent goes.
    CniUninstall {
        #[arg(long, short, env = "MESH_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        dirs: CniDirs,
    },
    /// Run the mesh's certificate authority for clusters without istiod: it
    /// serves the Istio CA API and signs a workload identity only for the
    /// node agent of a node where a pod of it runs (docs/mtls.md).
    Ca {
        /// The signer's configuration file (signer.yaml).
        #[arg(long, short, env = "MESH_CA_CONFIG")]
        config: PathBuf,
    },
    /// Print the version.
    Version,
}

/// Where the node's CNI plugins and configuration are.
#[derive(clap::Args)]
pub struct CniDirs {
    /// The runtime's CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The runtime's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

/// Entry point shared by the `mesh-agent` binary and the e2e test build of it.
pub fn main() -> ExitCode {
    limit_malloc_arenas();
    count_panics();
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("mesh-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration half of `check`.
fn check_config(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    match config::load_dir(config) {
        Ok(cfg) if cfg.node.discovery == config::Discovery::Kubernetes => {
            check_kubernetes(config, &cfg.node)
        }
        Ok(cfg) => {
            let mut unenforceable: Vec<String> = cfg
                .policies
                .set
                .unenforceable()
                .filter_map(|p| p.unenforceable().map(ToString::to_string))
                .collect();
            // targetRefs are mapped by the services of services.yaml
            // (and a rate limit's by the routes).
            let compiled = cfg.policies.set.compile_with(
                &cfg.node.root_namespace,
                &cfg.services,
                &cfg.routes.routes,
            );
            unenforceable.extend(compiled.unmapped_targets().iter().cloned());
            let route_problems = route_problems(&route_statuses(&cfg));
            for problem in &route_problems {
                eprintln!("error: {problem}");
            }
            if !unenforceable.is_empty() {
                for error in &unenforceable {
                    eprintln!(
                        "error: {error} (the policy would deny all traffic to the workloads it selects)"
                    );
                }
                eprintln!(
                    "{} of {} authorization policies cannot be enforced as written; the others load",
                    unenforceable.len(),
                    cfg.policies.set.len()
                );
                return Ok(ExitCode::FAILURE);
            }
            if !route_problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "ok: {} (node {}, {} pods)",
                config.display(),
                cfg.node.name,
                cfg.pods.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The kernel half of `check`, as root: the probe `run` starts with. Not
/// root: said, and not a failure (the probe needs CAP_BPF).
fn check_kernel() -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("kernel: not probed (the probe loads test programs: run check as root)");
        return true;
    }
    let kernel = match crate::ebpf::probe::probe() {
        Ok(kernel) => kernel,
        Err(err) => {
            eprintln!("error: probing the kernel: {err}");
            return false;
        }
    };
    if let Err(err) = kernel.require_all() {
        eprintln!("error: {err:#}");
        return false;
    }
    println!(
        "ok: kernel {} has every feature the agent needs ({} checked)",
        kernel.release, kernel.features_checked
    );
    for fallback in &kernel.fallbacks {
        println!("  missing {}: {}", fallback.missing, fallback.fallback);
    }
    true
}

/// `check` with `discovery: kubernetes`: the files, and what the saved state
/// from the API holds (what a restarted agent serves before the API answers).
fn check_kubernetes(dir: &std::path::Path, node: &config::NodeConfig) -> anyhow::Result<ExitCode> {
    let source = crate::kubernetes::KubeSource::new(&node.kubernetes, &node.name)?;
    let desired = match source.desired(dir) {
        Ok(desired) => desired,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let status = source.status();
    let state = &node.kubernetes.state_file;
    let from = if status.report.from_saved_state {
        format!("saved state {}", state.display())
    } else {
        format!("no saved state at {}", state.display())
    };
    println!(
        "ok: {} (node {}, discovery: kubernetes; {from}: {} pods of this node found on it, {} waiting, {} workloads on other nodes, {} services)",
        dir.display(),
        node.name,
        desired.pods.len(),
        status.report.waiting.len(),
        desired.workloads.len(),
        desired.services.len()
    );
    for (pod, why) in &status.report.waiting {
        println!("  waiting: {pod}: {why}");
    }
    // Route resources from the API that cannot be served, and routes
    // against the Services the saved state knows.
    let mut problems: Vec<String> = status
        .report
        .refused_routes
        .iter()
        .map(|(object, why)| format!("{object} (from the API) is refused: {why}"))
        .collect();
    problems.extend(route_problems(&route_statuses(&desired)));
    for problem in &problems {
        eprintln!("error: {problem}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The conditions of the routes and DestinationRules of `desired`.
fn route_statuses(desired: &crate::desired::Desired) -> Vec<crate::routes::RouteStatus> {
    let (with_rules, unresolved_rules) = crate::routes::apply_destination_rules(
        &desired.services,
        &desired.routes.destination_rules,
    );
    let mut routes = crate::routes::RouteTable::build(&desired.routes.routes, &with_rules);
    routes.add_statuses(unresolved_rules);
    routes.statuses().to_vec()
}

/// Waits up to `timeout` for one of the blocked `signals`; true if one came.
fn wait_for_signal(
    signals: &nix::sys::signal::SigSet,
    timeout: std::time::Duration,
) -> anyhow::Result<bool> {
    let timeout = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: 0,
    };
    // SAFETY: sigtimedwait reads the set and the timeout, writes nothing
    // (no siginfo asked for).
    let got = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &timeout) };
    if got >= 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        err if err.raw_os_error() == Some(libc::EAGAIN)
            || err.raw_os_error() == Some(libc::EINTR) =>
        {
            Ok(false)
        }
        err => Err(err.into()),
    }
}

/// A panic in a connection's task ends that task only (tokio catches it):
/// the agent keeps serving, but it is a bug. Each one is logged at error
/// level (also in JSON logs) and counted in `mesh_agent_panics_total`, so it
/// pages someone and fails the tests.
fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        crate::admin::metrics::PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(target: "panic", "{info}");
        default(info);
    }));
}

/// glibc gives every thread that allocates an arena of its own (up to eight
/// per core): memory freed in one arena cannot serve another, so RSS grew
/// with every burst. The thread per pod that made this worst is gone (pods'
/// sockets are made on the calling thread, `capture::pod_netns`), but the
/// runtime's workers (one per core) and its blocking pool remain. One arena
/// was tried (2026-12-07, one quick bench run): saturation fell to 32k req/s
/// on the mTLS path and 25k on the L7 path, against 33–39k and 30–33k with
/// two in the runs around it, so the limit stays at two.
///
/// The thresholds are fixed because glibc's dynamic ones kept a burst's
/// memory: freeing a large block raises the trim threshold, and
/// `malloc_trim` never shrinks the top of a thread's arena, so after one
/// bulk stream through the tunnel 3–5 MB freed at the top of the second arena
/// stayed resident for good. A 1 MiB trim threshold gives such a top back
/// when it is freed; a 32 MiB mmap threshold keeps large buffers in the
/// arenas (no mmap and munmap per buffer). Must run before any thread starts.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// What `check` says of routes: parents that do not accept them, backends
/// that cannot be served.
fn route_problems(statuses: &[crate::routes::RouteStatus]) -> Vec<String> {
    let mut problems = Vec::new();
    for status in statuses {
        for parent in status.parents.iter().filter(|p| !p.accepted) {
            problems.push(format!(
                "{} ({}): not accepted by {}: {}",
                status.route,
                status.file.display(),
                parent.parent,
                parent.reason.as_deref().unwrap_or("")
            ));
        }
        for backend in &status.unresolved_backends {
            problems.push(format!(
                "{} ({}): backend {backend} cannot be served (its requests are answered 500)",
                status.route,
                status.file.display()
            ));
        }
    }
    problems
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(name) = cli.node_name.filter(|n| !n.is_empty()) {
        config::set_node_name(name);
    }
    match cli.command {
        Command::Run { config } => {
            logging::init(cli.log_format, &cli.log)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca { config } => {
            logging::init(cli.log_format, &cli.log)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::signer::run(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config_code = check_config(&config)?;
            Ok(if check_kernel() {
                config_code
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { admin, json } => {
            let report = status::fetch(admin)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(if report.ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Release { config } => {
            let cfg = config::load_dir(&config)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let pin_dir = cfg.node.pin_dir();
            let removed = crate::ebpf::remove_pinned_state(&pin_dir)?;
            println!(
                "released: removed {removed} pinned objects under {}",
                pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CniInstall {
            config,
            dirs,
            plugin,
            keep,
        } => {
            let cfg = config::load_dir(&config)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let cni = &cfg.node.kubernetes.cni;
            let plugin = match plugin {
                Some(plugin) => plugin,
                None => std::env::current_exe()?.with_file_name(mesh_cni::PLUGIN_TYPE),
            };
            let settings = mesh_cni::spec::PluginSettings {
                agent_socket: cni.socket.clone(),
                enrolled_namespaces_file: cni.namespaces_file(),
                // The plugin outwaits the agent's own limit.
                timeout_seconds: cni.add_timeout.as_secs() + 10,
            };
            let install = || {
                mesh_cni::install::install(
                    &plugin,
                    &dirs.bin_dir,
                    &dirs.conf_dir,
                    &cni.state_dir.join("backup"),
                    &settings,
                )
            };
            match install().map_err(anyhow::Error::msg)? {
                mesh_cni::install::Installed::Added(path) => {
                    println!("installed: mesh-cni chained last in {}", path.display())
                }
                mesh_cni::install::Installed::AlreadyThere(path) => {
                    println!(
                        "installed already: mesh-cni is chained in {}",
                        path.display()
                    )
                }
            }
            let Some(every) = keep else {
                return Ok(ExitCode::SUCCESS);
            };
            // Until SIGTERM (or SIGINT): the signal is taken as a wake-up.
            let signals = nix::sys::signal::SigSet::from_iter([
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::Signal::SIGINT,
            ]);
            signals.thread_block()?;
            let every = std::time::Duration::from_secs(every.max(1));
            loop {
                if wait_for_signal(&signals, every)? {
                    println!("stopping: mesh-cni stays installed (cni-uninstall removes it)");
                    return Ok(ExitCode::SUCCESS);
                }
                match install() {
                    Ok(mesh_cni::install::Installed::Added(path)) => println!(
                        "put back: {} had lost mesh-cni (rewritten by the pod network?)",
                        path.display()
                    ),
                    Ok(mesh_cni::install::Installed::AlreadyThere(_)) => {}
                    Err(err) => eprintln!("mesh-agent cni-install: {err}"),
                }
            }
        }
        Command::CniUninstall { config, dirs } => {
            let cfg = config::load_dir(&config)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let backup = cfg.node.kubernetes.cni.state_dir.join("backup");
            match mesh_cni::install::uninstall(&dirs.bin_dir, &dirs.conf_dir, &backup)
                .map_err(anyhow::Error::msg)?
            {
                mesh_cni::install::Uninstalled::Restored(path) => {
                    println!("uninstalled: {} is as it was before", path.display())
                }
                mesh_cni::install::Uninstalled::EntryRemoved(path) => println!(
                    "uninstalled: mesh-cni removed from {} (changed since the install: only the plugin's entry was removed)",
                    path.display()
                ),
                mesh_cni::install::Uninstalled::NotInstalled => {
                    println!(
                        "not installed: no conflist in {} chains mesh-cni",
                        dirs.conf_dir.display()
                    )
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("mesh-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}
