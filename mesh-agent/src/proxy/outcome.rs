//! What became of a connection, as typed values: how it ended, over which
//! path, and with what security. Metrics, the access log and
//! `/debug/connections` are all derived from them; their text forms (what
//! operators read and the JSON carries) are made in one place, here.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// How a connection ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Outcome {
    /// Still open (the record of a connection in flight).
    #[default]
    Open,
    /// Both sides closed.
    Closed,
    /// The client reset the connection.
    ClientReset,
    /// The upstream reset it.
    UpstreamReset,
    /// A tunnel stream was aborted by either side.
    Reset,
    /// Nothing moved for the relay's idle timeout.
    IdleTimeout,
    /// Refused by a policy (`policy rule`); `not_http` when the policies
    /// have HTTP rules but the connection did not speak HTTP.
    Denied { by: String, not_http: bool },
    /// Plaintext refused by a STRICT PeerAuthentication (its name).
    PlaintextRefused(String),
    /// No upstream connection could be made.
    UpstreamFailed(String),
    /// The kernel had no record of where the client was going.
    NoOriginalDestination(String),
    /// The service (its key) had no endpoint to serve it.
    NoHealthyEndpoint(String),
    /// Served as HTTP: requests, of which denied and malformed.
    Http {
        requests: u64,
        denied: u64,
        bad: u64,
    },
    /// An HTTP connection that ended otherwise (a protocol error).
    HttpEnded(String),
    /// The client did not speak HTTP to a service's HTTP port (its key).
    NotHttpOnHttpPort(String),
    /// Not HTTP, relayed as bytes to the end; `reset` if it ended in one.
    RelayedNotHttp { reset: bool },
    /// The handler went away before the connection ended (cancelled or
    /// panicked): recorded so that no connection is lost from the counts.
    Abandoned,
}

impl Outcome {
    /// Whether the connection failed (the client did not get what it
    /// asked for), for the `failed` totals.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            Self::Denied { .. }
                | Self::PlaintextRefused(_)
                | Self::UpstreamFailed(_)
                | Self::NoOriginalDestination(_)
                | Self::NoHealthyEndpoint(_)
                | Self::NotHttpOnHttpPort(_)
                | Self::Abandoned
        )
    }

    /// Istio's (Envoy's) response flags: of a connection that was relayed,
    /// `DC` downstream terminated, `UR` upstream reset, `IT` idle timeout;
    /// `NR` for plaintext refused by STRICT mTLS (what Istio's sidecar logs:
    /// no filter chain takes plaintext).
    pub fn response_flags(&self) -> &'static str {
        match self {
            Self::PlaintextRefused(_) => "NR",
            Self::ClientReset => "DC",
            Self::UpstreamReset => "UR",
            Self::IdleTimeout => "IT",
            _ => "-",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open"),
            Self::Closed => f.write_str("closed"),
            Self::ClientReset => f.write_str("client-reset"),
            Self::UpstreamReset => f.write_str("upstream-reset"),
            Self::Reset => f.write_str("reset"),
            Self::IdleTimeout => f.write_str("idle-timeout"),
            Self::Denied {
                by,
                not_http: false,
            } => write!(f, "denied by {by}"),
            Self::Denied { by, not_http: true } => write!(f, "denied by {by} (not HTTP)"),
            Self::PlaintextRefused(by) => write!(f, "plaintext refused by {by}"),
            Self::UpstreamFailed(why) => write!(f, "upstream-failed: {why}"),
            Self::NoOriginalDestination(why) => write!(f, "no-original-destination: {why}"),
            Self::NoHealthyEndpoint(service) => write!(f, "no-healthy-endpoint: {service}"),
            Self::Http {
                requests,
                denied,
                bad,
            } => write!(f, "http: {requests} requests, {denied} denied, {bad} bad"),
            Self::HttpEnded(why) => write!(f, "http connection ended: {why}"),
            Self::NotHttpOnHttpPort(service) => write!(f, "not HTTP on HTTP port {service}"),
            Self::RelayedNotHttp { reset: false } => f.write_str("closed (not HTTP)"),
            Self::RelayedNotHttp { reset: true } => f.write_str("reset (not HTTP)"),
            Self::Abandoned => f.write_str("abandoned"),
        }
    }
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let unit = match s {
            "open" => Some(Self::Open),
            "closed" => Some(Self::Closed),
            "client-reset" => Some(Self::ClientReset),
            "upstream-reset" => Some(Self::UpstreamReset),
            "reset" => Some(Self::Reset),
            "idle-timeout" => Some(Self::IdleTimeout),
            "closed (not HTTP)" => Some(Self::RelayedNotHttp { reset: false }),
            "reset (not HTTP)" => Some(Self::RelayedNotHttp { reset: true }),
            "abandoned" => Some(Self::Abandoned),
            _ => None,
        };
        if let Some(outcome) = unit {
            return Ok(outcome);
        }
        let text = |rest: &str| rest.to_string();
        if let Some(by) = s.strip_prefix("denied by ") {
            return Ok(match by.strip_suffix(" (not HTTP)") {
                Some(by) => Self::Denied {
                    by: text(by),
                    not_http: true,
                },
                None => Self::Denied {
                    by: text(by),
                    not_http: false,
                },
            });
        }
        if let Some(by) = s.strip_prefix("plaintext refused by ") {
            return Ok(Self::PlaintextRefused(text(by)));
        }
        if let Some(why) = s.strip_prefix("upstream-failed: ") {
            return Ok(Self::UpstreamFailed(text(why)));
        }
        if let Some(why) = s.strip_prefix("no-original-destination: ") {
            return Ok(Self::NoOriginalDestination(text(why)));
        }
        if let Some(service) = s.strip_prefix("no-healthy-endpoint: ") {
            return Ok(Self::NoHealthyEndpoint(text(service)));
        }
        if let Some(why) = s.strip_prefix("http connection ended: ") {
            return Ok(Self::HttpEnded(text(why)));
        }
        if let Some(service) = s.strip_prefix("not HTTP on HTTP port ") {
            return Ok(Self::NotHttpOnHttpPort(text(service)));
        }
        if let Some(counts) = s.strip_prefix("http: ") {
            let numbers: Vec<u64> = counts
                .split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .filter_map(|n| n.parse().ok())
                .collect();
            if let [requests, denied, bad] = numbers[..] {
                return Ok(Self::Http {
                    requests,
                    denied,
                    bad,
                });
            }
        }
        Err(format!("not a connection outcome: {s:?}"))
    }
}

impl From<Outcome> for String {
    fn from(outcome: Outcome) -> Self {
        outcome.to_string()
    }
}

impl TryFrom<String> for Outcome {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<Outcome>().is_ok_and(|o| o == *self)
    }
}

/// Which way the agent reached the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Path {
    /// Not decided yet (refused before a route was chosen).
    #[default]
    None,
    /// A pod of this node (`namespace/name`), entered through its namespace.
    Pod(String),
    /// Through the mTLS tunnel to a workload of another node.
    Tunnel(String),
    /// A service's HTTP port: an endpoint per request (`namespace/name:port`).
    Service(String),
    /// Straight from the source pod's namespace.
    Direct,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => Ok(()),
            Self::Pod(key) => write!(f, "pod:{key}"),
            Self::Tunnel(key) => write!(f, "tunnel:{key}"),
            Self::Service(key) => write!(f, "service:{key}"),
            Self::Direct => f.write_str("direct"),
        }
    }
}

impl FromStr for Path {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Self::None);
        }
        if s == "direct" {
            return Ok(Self::Direct);
        }
        match s.split_once(':') {
            Some(("pod", key)) => Ok(Self::Pod(key.to_string())),
            Some(("tunnel", key)) => Ok(Self::Tunnel(key.to_string())),
            Some(("service", key)) => Ok(Self::Service(key.to_string())),
            _ => Err(format!("not an upstream path: {s:?}")),
        }
    }
}

impl From<Path> for String {
    fn from(path: Path) -> Self {
        path.to_string()
    }
}

impl TryFrom<String> for Path {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl PartialEq<&str> for Path {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<Path>().is_ok_and(|p| p == *self)
    }
}

impl PartialEq<String> for Path {
    fn eq(&self, other: &String) -> bool {
        *self == other.as_str()
    }
}

/// Istio's `connection_security_policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Never left the node, or plaintext from outside the mesh.
    #[default]
    None,
    /// Crossed nodes inside the mTLS tunnel.
    MutualTls,
}

impl Security {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::MutualTls => "mutual_tls",
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.as_label()
    }
}

impl PartialEq<&str> for Security {
    fn eq(&self, other: &&str) -> bool {
        self.as_label() == *other
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_reads_back_from_its_text() {
        let all = [
            Outcome::Open,
            Outcome::Closed,
            Outcome::ClientReset,
            Outcome::UpstreamReset,
            Outcome::Reset,
            Outcome::IdleTimeout,
            Outcome::Denied {
                by: "default/deny-b rule[0]".into(),
                not_http: false,
            },
            Outcome::Denied {
                by: "ns/p rule[2]".into(),
                not_http: true,
            },
            Outcome::UpstreamFailed("connecting to 10.1.0.3:80: refused".into()),
            Outcome::NoOriginalDestination("no record".into()),
            Outcome::NoHealthyEndpoint("shop/web:80".into()),
            Outcome::Http {
                requests: 12,
                denied: 3,
                bad: 1,
            },
            Outcome::HttpEnded("connection error".into()),
            Outcome::NotHttpOnHttpPort("shop/web:80".into()),
            Outcome::RelayedNotHttp { reset: false },
            Outcome::RelayedNotHttp { reset: true },
            Outcome::Abandoned,
            Outcome::PlaintextRefused("foo/strict (PeerAuthentication STRICT)".into()),
        ];
        for outcome in all {
            let json = serde_json::to_string(&outcome).unwrap();
            let back: Outcome = serde_json::from_str(&json).unwrap();
            assert_eq!(back, outcome, "{json}");
        }
        assert_eq!(Outcome::ClientReset, "client-reset");
        assert!("whatever".parse::<Outcome>().is_err());
    }

    #[test]
    fn failures_and_response_flags_come_from_the_outcome() {
        assert!(Outcome::NoHealthyEndpoint("s".into()).failed());
        assert!(!Outcome::Closed.failed());
        assert!(!Outcome::RelayedNotHttp { reset: true }.failed());
        assert_eq!(Outcome::ClientReset.response_flags(), "DC");
        assert_eq!(Outcome::UpstreamReset.response_flags(), "UR");
        assert_eq!(Outcome::IdleTimeout.response_flags(), "IT");
        assert_eq!(Outcome::Closed.response_flags(), "-");
        assert_eq!(Outcome::PlaintextRefused("p".into()).response_flags(), "NR");
        assert!(Outcome::PlaintextRefused("p".into()).failed());
    }

    #[test]
    fn paths_and_security_read_back() {
        for path in [
            Path::None,
            Path::Pod("default/b".into()),
            Path::Tunnel("default/c".into()),
            Path::Service("default/web:80".into()),
            Path::Direct,
        ] {
            let json = serde_json::to_string(&path).unwrap();
            assert_eq!(serde_json::from_str::<Path>(&json).unwrap(), path);
        }
        assert_eq!(
            serde_json::to_string(&Security::MutualTls).unwrap(),
            "\"mutual_tls\""
        );
    }
}
