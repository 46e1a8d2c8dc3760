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
    let p = pod
        .spawn_tool(&[
            "chat",
            &ip.to_string(),
            &port.to_string(),
            "--every-ms",
            "10",
            "--times",
            "100000",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_until("the chatty connection", Duration::from_secs(10), || {
        Ok(p.stdout_so_far().contains("connected"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.output_report()));
    p
}

/// Panics unless the chatty connection `p` is still going.
pub fn assert_still_going(p: &mut Process, what: &str) {
    assert!(
        p.try_status().unwrap().is_none(),
        "{what} broke: {}",
        p.output_report()
    );
}
