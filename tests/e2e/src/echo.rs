//! Clients of the traffic server's echo (`ECHO\n`, then every line back),
//! run in pods (`pod-tool`): one exchange, or a connection that keeps
//! exchanging so a test can tell whether it survived something.

use std::{net::IpAddr, time::Duration};

use mesh_testbed::{Pod, Process, wait_until};

/// One connection to the echo on `ip:port`: `Ok` if the line came back.
pub fn echo_once(pod: &Pod, ip: IpAddr, port: u16) -> anyhow::Result<()> {
    pod.run_tool(
        &["echo", &ip.to_string(), &port.to_string(), "--line", "ping"],
        Duration::from_secs(10),
    )
    .map(|_| ())
}

/// A connection to the echo on `ip:port` that exchanges a line every 10 ms;
/// the process exits non-zero once the connection breaks. Returns once the
/// first line came back.
pub fn start_chatty_connection(pod: &Pod, ip: IpAddr, port: u16) -> Process {
    spawn_until_printed(
        pod,
        &[
            "chat",
            &ip.to_string(),
            &port.to_string(),
            "--every-ms",
            "10",
            "--times",
            "100000",
        ],
        "connected",
    )
}

/// Panics unless the chatty connection `p` is still going.
pub fn assert_still_going(p: &mut Process, what: &str) {
    assert!(
        p.try_status().unwrap().is_none(),
        "{what} broke: {}",
        p.output_report()
    );
}

/// A client in `pod` opening a new connection to the echo on `ip:port`
/// every 10 ms for `secs` seconds, each checked by an exchange; it prints
/// `ok <n> failed <m>` at the end. Returns once the first one succeeded.
pub fn start_requests(pod: &Pod, ip: IpAddr, port: u16, secs: u32) -> Process {
    spawn_until_printed(
        pod,
        &[
            "echo",
            &ip.to_string(),
            &port.to_string(),
            "--line",
            "ping",
            "--shutdown",
            "--for-secs",
            &secs.to_string(),
            "--every-ms",
            "10",
            "--tally",
        ],
        "started",
    )
}

/// `pod-tool args` in `pod`, returned once its output says `marker` (it
/// prints that when its first exchange succeeded); panics with its output
/// if that does not happen within 10 s.
fn spawn_until_printed(pod: &Pod, args: &[&str], marker: &str) -> Process {
    let p = pod.spawn_tool(args).unwrap_or_else(|e| panic!("{e:#}"));
    wait_until(
        &format!("pod-tool {} to print {marker:?}", args[0]),
        Duration::from_secs(10),
        || Ok(p.stdout_so_far().contains(marker)),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.output_report()));
    p
}

/// Waits for [`start_requests`]'s client to end; panics unless every
/// request succeeded and there were more than 100. The count.
pub fn assert_every_request_succeeded(mut requests: Process, what: &str) -> u32 {
    let out = requests
        .wait_with_deadline(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("ok ") && last.ends_with(" failed 0"),
        "requests failed {what}:\n{stdout}"
    );
    let ok: u32 = last
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(ok > 100, "too few requests to mean anything: {last}");
    ok
}
