//! The plugin program: the runtime runs it with the command in
//! `CNI_COMMAND`, the network configuration on stdin; it answers on stdout
//! (the previous result, an error, or the versions) and exits non-zero on
//! error.

use std::{
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    protocol::{self, Answer, EnrolledNamespaces, ExchangeError, PodSandbox, Request},
    spec::{self, CniError, ErrorCode, NetConf, PodArgs},
};
use serde_json::Value;

/// DEL and CHECK wait this long for the agent (a DEL must not hold a
/// pod's teardown).
const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The whole plugin run: reads the environment and stdin, answers, exits.
pub fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let (version, outcome) = match read {
        Err(e) => (
            "1.0.0".to_string(),
            Err(CniError::new(
                ErrorCode::Io,
                "cannot read stdin",
                e.to_string(),
            )),
        ),
        Ok(_) => run(&command, &stdin),
    };
    let mut stdout = std::io::stdout();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(stdout, "{result}");
        }
        Ok(None) => {}
        Err(err) => {
            eprintln!("mesh-cni {command}: {err}");
            let _ = writeln!(stdout, "{}", err.to_json(&version));
            let _ = stdout.flush();
            std::process::exit(1);
        }
    }
}

/// The answer to `command` (None: nothing to print), and the version to
/// answer errors in.
fn run(command: &str, stdin: &[u8]) -> (String, Result<Option<Value>, CniError>) {
    if command == "VERSION" {
        // The configuration's version if it says one, else the newest.
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
            .unwrap_or_else(|| "1.0.0".into());
        return (version.clone(), Ok(Some(spec::version_result(&version))));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(err) => return ("1.0.0".into(), Err(err)),
    };
    let version = conf.cni_version.clone();
    let outcome = match command {
        "ADD" => add(&conf),
        "DEL" => del(&conf).map(|()| None),
        "CHECK" => check(&conf).map(|()| None),
        "GC" | "STATUS" => Ok(None),
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    };
    (version, outcome)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// The sandbox as the environment and the configuration describe it; None
/// for a sandbox that is not a Kubernetes pod's.
fn sandbox(conf: &NetConf, with_ips: bool) -> Result<Option<PodSandbox>, CniError> {
    let Some(pod) = PodArgs::parse(&env("CNI_ARGS")) else {
        return Ok(None);
    };
    let netns = env("CNI_NETNS");
    let ips = if with_ips {
        conf.pod_ips(&netns)?
    } else {
        Vec::new()
    };
    Ok(Some(PodSandbox {
        container_id: env("CNI_CONTAINERID"),
        netns,
        namespace: pod.namespace,
        name: pod.name,
        uid: pod.uid,
        ips,
    }))
}

/// The previous result, unchanged, once the agent has the pod (or says it
/// is not the mesh's).
fn add(conf: &NetConf) -> Result<Option<Value>, CniError> {
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "mesh-cni has no prevResult: it must be chained after the plugin that gives the pod its address",
            "",
        )
    })?;
    let Some(sandbox) = sandbox(conf, true)? else {
        return Ok(Some(prev));
    };
    if env("CNI_NETNS").is_empty() {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "CNI_NETNS is not set",
            "",
        ));
    }
    let started = Instant::now();
    let timeout = Duration::from_secs(conf.settings.timeout_seconds.max(1));
    let answer = protocol::exchange(
        &conf.settings.agent_socket,
        &Request::Add(sandbox.clone()),
        timeout,
    );
    match answer {
        Ok(Answer::Enrolled { waited_us }) => {
            eprintln!(
                "mesh-cni ADD {}: enrolled by the agent in {} µs ({} µs in all)",
                sandbox.key(),
                waited_us,
                started.elapsed().as_micros()
            );
            Ok(Some(prev))
        }
        Ok(Answer::NotInMesh { .. } | Answer::Released) => Ok(Some(prev)),
        Ok(Answer::Refused { reason }) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!("the mesh agent refused pod {}", sandbox.key()),
            reason,
        )),
        Err(err) => without_agent(conf, &sandbox, err),
    }
}

/// The agent cannot be reached: pods of namespaces it last saw in the mesh
/// must wait for it; the others start as if the plugin were not there.
fn without_agent(
    conf: &NetConf,
    sandbox: &PodSandbox,
    err: ExchangeError,
) -> Result<Option<Value>, CniError> {
    let file: &Path = &conf.settings.enrolled_namespaces_file;
    match EnrolledNamespaces::read(file) {
        Ok(list) if !list.namespaces.contains(&sandbox.namespace) => {
            eprintln!(
                "mesh-cni: {err}; pod {} started without it (namespace {} not in the mesh per {})",
                sandbox.key(),
                sandbox.namespace,
                file.display()
            );
            Ok(conf.prev_result.clone())
        }
        Ok(_) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "pod {} is in the mesh and the node's mesh agent is not reachable: it waits for the agent",
                sandbox.key()
            ),
            err.to_string(),
        )),
        Err(why) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "the node's mesh agent is not reachable and whether pod {} is in the mesh is not known: it waits for the agent",
                sandbox.key()
            ),
            format!("{err}; enrolled namespaces: {why}"),
        )),
    }
}

/// Tells the agent; never fails (a DEL must succeed when there is nothing
/// left to release, and a stopped agent releases at its next start what
/// no longer exists).
fn del(conf: &NetConf) -> Result<(), CniError> {
    let Ok(Some(sandbox)) = sandbox(conf, false) else {
        return Ok(());
    };
    if let Err(err) = protocol::exchange(
        &conf.settings.agent_socket,
        &Request::Del(sandbox.clone()),
        SHORT_TIMEOUT,
    ) {
        eprintln!(
            "mesh-cni DEL {}: {err} (nothing to undo here)",
            sandbox.key()
        );
    }
    Ok(())
}

fn check(conf: &NetConf) -> Result<(), CniError> {
    let Some(sandbox) = sandbox(conf, true)? else {
        return Ok(());
    };
    match protocol::exchange(
        &conf.settings.agent_socket,
        &Request::Check(sandbox.clone()),
        SHORT_TIMEOUT,
    ) {
        Ok(Answer::Enrolled { .. } | Answer::NotInMesh { .. }) => Ok(()),
        Ok(Answer::Refused { reason }) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!("pod {} is in the mesh and not enrolled", sandbox.key()),
            reason,
        )),
        Ok(Answer::Released) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!("pod {} is not enrolled", sandbox.key()),
            "",
        )),
        Err(err) => without_agent(conf, &sandbox, err).map(|_| ()),
    }
}
