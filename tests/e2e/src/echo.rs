//! Clients of the traffic server's echo (`ECHO\n`, then every line back),
//! run in pods with python3: one exchange, or a connection that keeps
//! exchanging so a test can tell whether it survived something.

use std::{net::IpAddr, time::Duration};

use mesh_testbed::{Pod, Process, wait_until};

/// One connection to the echo on `ip:port`: `Ok` if the line came back.
pub fn echo_once(pod: &Pod, ip: IpAddr, port: u16) -> anyhow::Result<()> {
    let script = format!(
        r#"
import socket
c = socket.create_connection(("{ip}", {port}), timeout=5)
c.settimeout(5)
c.sendall(b"ECHO\nping\n")
got = b""
while len(got) < 5:
    k = c.recv(64)
    if not k:
        break
    got += k
assert got == b"ping\n", got
"#
    );
    pod.run("python3", &["-c", &script], Duration::from_secs(10))
        .map(|_| ())
}

/// A connection to the echo on `ip:port` that exchanges a line every 10 ms;
/// the process exits non-zero once the connection breaks. Returns once it
/// is connected.
pub fn start_chatty_connection(pod: &Pod, ip: IpAddr, port: u16) -> Process {
    let script = format!(
        r#"
import socket, sys, time
s = socket.create_connection(("{ip}", {port}), timeout=5)
s.settimeout(5)
s.sendall(b"ECHO\n")
print("connected", flush=True)
for i in range(100000):
    try:
        s.sendall(b"x\n")
        if s.recv(2) != b"x\n":
            sys.exit("broken after %d" % i)
    except OSError as e:
        sys.exit("broken after %d: %s" % (i, e))
    time.sleep(0.01)
"#
    );
    let p = pod.spawn("python3", &["-c", &script]).unwrap();
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
