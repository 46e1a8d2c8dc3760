//! `http-load`, the test bed's HTTP client (a hyper client in a pod: its
//! requests are captured), and what it reports.

use std::{path::PathBuf, time::Duration};

use mesh_testbed::Pod;
use serde_json::Value;

/// The `http-load` binary, built next to the tests (as the agent is).
pub fn http_load_binary() -> PathBuf {
    crate::agent::agent_binary().with_file_name("http-load")
}

/// What `http-load` reports.
pub struct Load {
    pub json: Value,
}

impl Load {
    pub fn requests(&self) -> u64 {
        self.json["requests"].as_u64().unwrap()
    }
    pub fn ok(&self) -> u64 {
        self.json["ok"].as_u64().unwrap()
    }
    pub fn errors(&self) -> u64 {
        self.json["errors"].as_u64().unwrap()
    }
    pub fn status(&self, code: u16) -> u64 {
        self.json["statuses"][code.to_string()]
            .as_u64()
            .unwrap_or(0)
    }
    pub fn served_by(&self, endpoint: &str) -> u64 {
        self.json["tally"][endpoint].as_u64().unwrap_or(0)
    }
    pub fn p99_us(&self) -> u64 {
        self.json["latency_us"]["p99"].as_u64().unwrap()
    }
    pub fn endpoint_p99_us(&self, endpoint: &str) -> u64 {
        self.json["tally_latency_us"][endpoint]["p99"]
            .as_u64()
            .unwrap_or(0)
    }
    pub fn all_ok(&self) -> bool {
        self.ok() == self.requests() && self.errors() == 0
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests: ok {}, errors {} {}, statuses {}, by endpoint {}, p50 {} us, p99 {} us",
            self.requests(),
            self.ok(),
            self.errors(),
            self.json["error_kinds"],
            self.json["statuses"],
            self.json["tally"],
            self.json["latency_us"]["p50"],
            self.json["latency_us"]["p99"]
        )
    }
}

/// Runs `http-load` in `client` (its cgroup and netns: captured) with `args`.
pub fn load(client: &Pod, url: &str, args: &[&str]) -> Load {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    let out = client
        .run(http_load_binary(), &all, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("http-load: {e:#}"));
    Load::parse(&out.stdout)
}

impl Load {
    /// What `http-load` printed.
    pub fn parse(stdout: &[u8]) -> Load {
        let json: Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
            panic!("http-load output: {e}: {}", String::from_utf8_lossy(stdout))
        });
        Load { json }
    }
}
