//! dnsmasq (Debian's dnsmasq-base) as a DNS server in a pod of the test bed:
//! the resolver the DNS tests and the bench query, never one outside the
//! machine. Only what its options say is answered (no upstream, no
//! /etc/hosts); it stops with the value.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Pod, Process, wait_until};

pub struct Dnsmasq {
    process: Process,
}

impl Dnsmasq {
    /// Starts dnsmasq in `pod` on `port` of the pod's addresses (IPv4 and
    /// IPv6) with `options` (`--address=/name/ip`, ...), logging every
    /// query if `log_queries`; waits until it serves.
    pub fn start(pod: &Pod, port: u16, log_queries: bool, options: &[&str]) -> Result<Self> {
        let listen_v4 = format!("--listen-address={}", pod.ipv4());
        let listen_v6 = format!("--listen-address={}", pod.ipv6());
        let port = format!("--port={port}");
        let mut args = vec![
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            &listen_v4,
            &listen_v6,
            &port,
        ];
        if log_queries {
            args.push("--log-queries");
        }
        args.extend_from_slice(options);
        let mut process = pod.spawn("dnsmasq", &args)?;
        let started = wait_until("dnsmasq to serve", Duration::from_secs(20), || {
            if let Some(status) = process.try_status()? {
                bail!("dnsmasq exited ({status})");
            }
            Ok(process.stderr_so_far().contains("started, version"))
        });
        started.with_context(|| process.output_report())?;
        Ok(Self { process })
    }

    /// The queries logged so far (with `log_queries`), each as
    /// `query[TYPE] name from address`.
    pub fn queries_seen(&self) -> Vec<String> {
        self.process
            .stderr_so_far()
            .lines()
            .filter_map(|l| l.split_once("query[").map(|(_, q)| format!("query[{q}")))
            .collect()
    }
}
