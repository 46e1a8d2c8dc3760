//! The plugin's exchange with the node's agent: one request, one answer,
//! each a JSON object on one line, over the agent's Unix socket (only root
//! on the node can reach it: the socket's directory is the agent's).
//!
//! The agent also keeps a file of the namespaces it last saw labelled for
//! the mesh ([`EnrolledNamespaces`]); the plugin reads it only when the
//! agent cannot be reached, to fail the pods of those namespaces (they
//! wait for the agent) and let every other pod start.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Longest line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

/// One pod sandbox, as the runtime described it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSandbox {
    /// `CNI_CONTAINERID`: the sandbox's id.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace (may be empty on DEL).
    pub netns: String,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID` (empty if the runtime did not give it).
    pub uid: String,
    /// From `prevResult` (empty on DEL).
    pub ips: Vec<IpAddr>,
}

impl PodSandbox {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Request {
    /// Enrol the pod; answer once its capture is attached.
    Add(PodSandbox),
    /// The sandbox is gone: release the pod.
    Del(PodSandbox),
    /// Is the pod enrolled (or rightly not)?
    Check(PodSandbox),
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "camelCase")]
pub enum Answer {
    /// The pod is in the mesh and its capture is attached.
    Enrolled {
        /// How long the agent took, in microseconds.
        waited_us: u64,
    },
    /// The pod is not in the mesh: nothing to do.
    NotInMesh { reason: String },
    /// The sandbox is released (or was never enrolled).
    Released,
    /// The pod is in the mesh (or may be) and is not enrolled: the sandbox
    /// must not start.
    Refused { reason: String },
}

/// The exchange failed before an answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Nothing listens at the socket (no agent, or not started yet).
    #[error("the agent is not reachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// Connected, but no whole answer came.
    #[error("no answer from the agent at {socket}: {why}")]
    NoAnswer { socket: String, why: String },
}

/// Sends `request` to the agent at `socket` and reads its answer, all
/// within `timeout`.
pub fn exchange(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Answer, ExchangeError> {
    let name = socket.display().to_string();
    let no_answer = |why: String| ExchangeError::NoAnswer {
        socket: name.clone(),
        why,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ExchangeError::Unreachable {
        socket: name.clone(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| no_answer(e.to_string()))?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| no_answer(format!("sending: {e}")))?;
    let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_LINE as u64));
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(0) => Err(no_answer("it closed the connection".into())),
        Ok(_) => serde_json::from_str(answer.trim_end())
            .map_err(|e| no_answer(format!("{e} in {answer:?}"))),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(no_answer(format!("nothing within {timeout:?}")))
        }
        Err(e) => Err(no_answer(e.to_string())),
    }
}

/// The file of namespaces labelled for the mesh, as the agent last saw
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolledNamespaces {
    pub namespaces: Vec<String>,
}

impl EnrolledNamespaces {
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Written to a temporary file renamed over the old one: a reader sees
    /// the old list or the new, never half of one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_json_line_each() {
        let sandbox = PodSandbox {
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            ips: vec!["10.1.200.7".parse().unwrap()],
        };
        let text = serde_json::to_string(&Request::Add(sandbox.clone())).unwrap();
        assert!(
            text.starts_with(r#"{"command":"ADD","containerId":"c1""#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<Request>(&text).unwrap(),
            Request::Add(sandbox)
        );
        let answer = Answer::Refused { reason: "x".into() };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(text, r#"{"answer":"refused","reason":"x"}"#);
    }

    #[test]
    fn an_absent_agent_is_unreachable_and_a_silent_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let request = Request::Check(PodSandbox {
            container_id: "c".into(),
            netns: String::new(),
            namespace: "n".into(),
            name: "p".into(),
            uid: String::new(),
            ips: vec![],
        });
        let err = exchange(&socket, &request, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ExchangeError::Unreachable { .. }), "{err}");
        // Listening, never answering.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = exchange(&socket, &request, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ExchangeError::NoAnswer { .. }), "{err}");
    }

    #[test]
    fn the_namespaces_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni/namespaces.json");
        assert!(EnrolledNamespaces::read(&path).is_err());
        let list = EnrolledNamespaces {
            namespaces: vec!["shop".into()],
        };
        list.write(&path).unwrap();
        assert_eq!(EnrolledNamespaces::read(&path).unwrap(), list);
    }
}
