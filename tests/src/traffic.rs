//! Real traffic: small Python servers and clients run inside pods.

use std::time::Duration;

use crate::{Pod, Process, wait_until};
use anyhow::{Result, ensure};

/// A TCP echo server on `port` (IPv4 and IPv6, all addresses) in `pod`. Prints
/// `ready` once both sockets listen.
pub fn start_echo_server(pod: &Pod, port: u16) -> Result<Process> {
    let script = format!(
        r#"
import socket, threading, sys
def serve(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, {port}))
    s.listen(128)
    return s
def loop(s):
    while True:
        c, peer = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data:
                return
            c.sendall(data)
socks = [serve(socket.AF_INET, "0.0.0.0"), serve(socket.AF_INET6, "::")]
for s in socks:
    threading.Thread(target=loop, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#
    );
    let server = pod.spawn("python3", &["-c", &script])?;
    wait_until(
        &format!("echo server in pod {} to listen", pod.name()),
        Duration::from_secs(10),
        || Ok(server.stdout_so_far().contains("ready")),
    )?;
    Ok(server)
}

/// From `client`, opens `count` TCP connections to `host:port`, sends a line on
/// each and checks the echo. Returns after all succeeded; errors name the pod.
pub fn echo_round_trips(client: &Pod, host: &str, port: u16, count: u32) -> Result<()> {
    let script = format!(
        r#"
import socket
for i in range({count}):
    c = socket.create_connection(("{host}", {port}), timeout=5)
    msg = ("hello %d\n" % i).encode()
    c.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    c.close()
    assert got == msg, (got, msg)
print("ok", {count})
"#
    );
    let out = client.run("python3", &["-c", &script], Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains(&format!("ok {count}")),
        "client in {} printed {stdout:?}",
        client.name()
    );
    Ok(())
}
