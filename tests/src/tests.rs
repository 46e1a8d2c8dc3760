//! End-to-end tests of the test bed itself: real namespaces, cgroups,
//! processes and TCP traffic. They need root (see `e2e_enabled`).

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::naming::{Owner, proc_start_time};
use crate::{Pod, Process, Topology, cgroup, e2e_enabled, netns, sweep_leftovers, wait_until};

const DEADLINE: Duration = Duration::from_secs(20);
const ECHO_PORT: &str = "7000";

/// `pod-tool peer-echo-server`: dual-stack; for each connection, reads until
/// EOF and answers `<peer ip>|<data>`, so tests see both the bytes and who
/// connected.
fn start_echo_server(pod: &Pod) -> Process {
    let mut server = pod.spawn_tool(&["peer-echo-server", ECHO_PORT]).unwrap();
    wait_until(
        &format!("echo server in pod {}", pod.name()),
        DEADLINE,
        || {
            if let Some(status) = server.try_status()? {
                anyhow::bail!("it exited ({status}): {}", server.stderr_so_far());
            }
            Ok(server.stdout_so_far().contains("ready"))
        },
    )
    .unwrap();
    server
}

/// Runs the echo client (`pod-tool send`) in `from` against `to` and checks
/// the answer.
fn check_echo(from: &Pod, to: &Pod, v6: bool) {
    let (client_ip, server_ip): (IpAddr, IpAddr) = if v6 {
        (from.ipv6().into(), to.ipv6().into())
    } else {
        (from.ipv4().into(), to.ipv4().into())
    };
    let msg = format!("hello {} -> {}", from.name(), to.name());
    let out = from
        .run_tool(&["send", &server_ip.to_string(), ECHO_PORT, &msg], DEADLINE)
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{client_ip}|{msg}"),
        "echo from pod {} to pod {} ({server_ip})",
        from.name(),
        to.name()
    );
}

/// The same exchange with std's TcpStream, for use inside `in_netns`.
fn echo_with_std(addr: SocketAddr, msg: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(msg.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn two_nodes(test: &str) -> Topology {
    Topology::builder(test)
        .node("n1", &["a", "b"])
        .node("n2", &["c"])
        .build()
        .unwrap()
}

#[test]
fn pods_reach_each_other_over_tcp_v4_and_v6() {
    if !e2e_enabled("pods_reach_each_other_over_tcp_v4_and_v6") {
        return;
    }
    let topo = two_nodes("pods_reach_each_other_over_tcp_v4_and_v6");
    let pods = [topo.pod("a"), topo.pod("b"), topo.pod("c")];
    let _servers: Vec<Process> = pods.iter().map(|p| start_echo_server(p)).collect();

    // Same node (a -> b) and across the fabric (a -> c, c -> a, ...).
    for from in pods {
        for to in pods.iter().filter(|p| p.name() != from.name()) {
            check_echo(from, to, false);
            check_echo(from, to, true);
        }
    }

    // Each node reaches its own pods, and the pods of the other node.
    for node in topo.nodes() {
        for pod in pods {
            for (node_ip, pod_ip) in [
                (IpAddr::from(node.bridge_ipv4()), IpAddr::from(pod.ipv4())),
                (node.bridge_ipv6().into(), pod.ipv6().into()),
            ] {
                let on_node = pod.node_name() == node.name();
                let addr = SocketAddr::new(pod_ip, ECHO_PORT.parse().unwrap());
                let answer = node
                    .in_netns(move || echo_with_std(addr, "from node"))
                    .unwrap();
                let (peer, rest) = answer.split_once('|').unwrap();
                assert_eq!(rest, "from node");
                if on_node {
                    assert_eq!(peer, node_ip.to_string());
                } else {
                    // Leaves through fab0: the source is the fabric address.
                    let fabric_ip: IpAddr = if pod_ip.is_ipv4() {
                        node.fabric_ipv4().into()
                    } else {
                        node.fabric_ipv6().into()
                    };
                    assert_eq!(peer, fabric_ip.to_string());
                }
            }
        }
    }
}

#[test]
fn node_http_get_and_spawn_with() {
    if !e2e_enabled("node_http_get_and_spawn_with") {
        return;
    }
    let topo = Topology::builder("node_http_get_and_spawn_with")
        .node("n1", &[])
        .build()
        .unwrap();
    let node = topo.node("n1");
    let docroot = topo.tmp_dir().join("www");
    std::fs::create_dir(&docroot).unwrap();
    std::fs::write(docroot.join("hello.txt"), "hello from n1").unwrap();

    // Serves the files of its working directory: spawn_with keeps the cwd.
    let mut cmd = crate::tool::command(&["http-server", "127.0.0.1:8000", "--files", "."]).unwrap();
    cmd.current_dir(&docroot);
    let mut server = node.spawn_with(cmd).unwrap();
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    wait_until("HTTP server in node n1", DEADLINE, || {
        if let Some(status) = server.try_status()? {
            anyhow::bail!("it exited ({status}): {}", server.stderr_so_far());
        }
        Ok(node.http_get(addr, "/hello.txt")?.0 == 200)
    })
    .unwrap();
    let (status, body) = node.http_get(addr, "/hello.txt").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from n1"));
    // Non-2xx statuses are returned, not errors.
    assert_eq!(node.http_get(addr, "/missing").unwrap().0, 404);
}

#[test]
fn spawned_processes_join_cgroup_and_netns() {
    if !e2e_enabled("spawned_processes_join_cgroup_and_netns") {
        return;
    }
    let topo = two_nodes("spawned_processes_join_cgroup_and_netns");
    let pod = topo.pod("c");
    let node = topo.node("n2");
    assert_eq!(pod.cgroup_dir(), node.cgroup_dir().join("c"));

    let in_pod = pod.spawn("sleep", &["1000"]).unwrap();
    let on_node = node.spawn("sleep", &["1000"]).unwrap();
    let host_netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    for (process, cgroup_dir, netns_path) in [
        (&in_pod, pod.cgroup_dir().to_path_buf(), pod.netns_path()),
        (
            &on_node,
            node.cgroup_dir().join("system"),
            node.netns_path(),
        ),
    ] {
        let pid = process.pid();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let expected = format!("0::{}", cgroup::relative_path(&cgroup_dir).unwrap());
        assert!(
            cgroups.lines().any(|l| l == expected),
            "pid {pid}: expected {expected:?} in /proc/{pid}/cgroup:\n{cgroups}"
        );
        // stat() follows the /proc link to the nsfs inode, as it does for
        // the bind mount under /run/netns.
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino();
        assert_eq!(ns, std::fs::metadata(&netns_path).unwrap().ino());
        assert_ne!(ns, host_netns);
    }

    // Signals go to the process; the status shows it.
    let mut in_pod = in_pod;
    in_pod.signal(Signal::SIGTERM).unwrap();
    let out = in_pod.wait_with_deadline(DEADLINE).unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGTERM));
    assert!(
        in_pod.signal(Signal::SIGTERM).is_err(),
        "reaped: no signals"
    );
    in_pod.kill(); // idempotent

    // A deadline that passes kills the process and reports it.
    let mut slow = pod
        .spawn("sh", &["-c", "echo started; exec sleep 1000"])
        .unwrap();
    let err = slow
        .wait_with_deadline(Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not finish"), "{err}");
    assert!(err.contains("pod `c`"), "{err}");
    let status = slow.try_status().unwrap().expect("killed and reaped");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

/// Creates and pins a BPF array map at `path` (bpf(2) by hand, to keep the
/// test bed free of a BPF library).
fn pin_array_map(path: &Path) -> std::io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = [0u8; 128];
    for (i, v) in [BPF_MAP_TYPE_ARRAY, 4, 8, 1].iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: bpf(2) reads `attr.len()` bytes of the buffer.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as above; `path` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a topology created, to check it is gone after drop.
struct Footprint {
    id: String,
    cgroup: PathBuf,
    bpffs: PathBuf,
    tmp: PathBuf,
    /// (pid, start time) of a process forked by a pod process.
    grandchild: (u32, u64),
}

/// Builds a topology with some state in it: a running process, a grandchild
/// it forked, a pinned map.
fn populate(topo: &Topology) -> (Footprint, Process) {
    let pod = topo.pod("a");
    let mut parent = pod
        .spawn("sh", &["-c", "sleep 1000 & echo $!; wait"])
        .unwrap();
    let mut grandchild = 0;
    wait_until("the grandchild's pid", DEADLINE, || {
        if let Some(status) = parent.try_status()? {
            anyhow::bail!("sh exited: {status}");
        }
        grandchild = parent.stdout_so_far().trim().parse().unwrap_or(0);
        Ok(grandchild != 0)
    })
    .unwrap();
    std::fs::create_dir(topo.bpffs_dir().join("maps")).unwrap();
    pin_array_map(&topo.bpffs_dir().join("maps/test_map")).unwrap();
    assert!(topo.bpffs_dir().join("maps/test_map").exists());
    let footprint = Footprint {
        id: topo.id().to_string(),
        cgroup: topo.cgroup_dir().to_path_buf(),
        bpffs: topo.bpffs_dir().to_path_buf(),
        tmp: topo.tmp_dir().to_path_buf(),
        grandchild: (grandchild, proc_start_time(grandchild).unwrap()),
    };
    (footprint, parent)
}

fn assert_gone(f: &Footprint) {
    let out = Command::new(netns::ip_binary().unwrap())
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with(&format!("{}-", f.id))),
        "netns of {} left:\n{list}",
        f.id
    );
    for dir in [&f.cgroup, &f.bpffs, &f.tmp] {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    // Killed by teardown, and reaped (not left a zombie under PID 1).
    assert_ne!(
        proc_start_time(f.grandchild.0),
        Some(f.grandchild.1),
        "grandchild {} still exists",
        f.grandchild.0
    );
}

#[test]
fn teardown_removes_everything_on_drop_and_on_panic() {
    if !e2e_enabled("teardown_removes_everything_on_drop_and_on_panic") {
        return;
    }
    // Plain drop, with the process outliving the topology.
    let topo = two_nodes("teardown_on_drop");
    let (footprint, mut parent) = populate(&topo);
    drop(topo);
    assert_gone(&footprint);
    let status = parent.try_status().unwrap().expect("reaped by teardown");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Output stays readable after the temp dir is gone.
    assert_eq!(
        parent.stdout_so_far().trim(),
        footprint.grandchild.0.to_string()
    );

    // Unwinding from a panic.
    let mut seen = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = two_nodes("teardown_on_panic");
        let (footprint, _parent) = populate(&topo);
        seen = Some(footprint);
        panic!("deliberate panic with a live topology");
    }));
    assert!(result.is_err());
    assert_gone(&seen.expect("the topology was built"));
}

#[test]
fn failed_build_removes_partial_topology() {
    if !e2e_enabled("failed_build_removes_partial_topology") {
        return;
    }
    let err = Topology::builder("bad")
        .node("n1", &["a"])
        .node("n2", &["a"])
        .build()
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("pod `a` is declared twice"),
        "{err:#}"
    );
    // One pod too many for a node: fails in validation, before creating anything.
    let many: Vec<String> = (0..=crate::topology::MAX_PODS_PER_NODE)
        .map(|i| format!("p{i}"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(Topology::builder("bad").node("n1", &many).build().is_err());
}

#[test]
fn concurrent_topologies_do_not_collide() {
    if !e2e_enabled("concurrent_topologies_do_not_collide") {
        return;
    }
    let run = |test: &'static str| {
        move || {
            let topo = two_nodes(test);
            let _server = start_echo_server(topo.pod("c"));
            check_echo(topo.pod("a"), topo.pod("c"), false);
            check_echo(topo.pod("b"), topo.pod("c"), true);
            let names: Vec<String> = std::iter::once(topo.fabric_netns_name().to_string())
                .chain(topo.nodes().iter().flat_map(|n| {
                    std::iter::once(n.netns_name().to_string())
                        .chain(n.pods().iter().map(|p| p.netns_name().to_string()))
                }))
                .collect();
            (
                topo.id().to_string(),
                names,
                topo.cgroup_dir().to_path_buf(),
            )
        }
    };
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(run("concurrent_1"));
        let two = s.spawn(run("concurrent_2"));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert_ne!(one.0, two.0);
    assert_ne!(one.2, two.2);
    assert_eq!(one.1.len(), 6);
    for name in &one.1 {
        assert!(!two.1.contains(name), "{name} used twice");
    }
}

/// A PID that belongs to no process: a child that has been reaped.
fn dead_pid() -> u32 {
    loop {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return pid;
        }
    }
}

#[test]
fn sweeper_removes_dead_owners_leftovers_only() {
    if !e2e_enabled("sweeper_removes_dead_owners_leftovers_only") {
        return;
    }
    let me = Owner::current();
    let cgroup_base = cgroup::base_dir().unwrap();
    let bpffs_base = crate::bpffs::base_dir();
    let tmp_base = std::env::temp_dir().join("mesh-testbed");
    for dir in [&cgroup_base, &bpffs_base, &tmp_base] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let create_all = |id: &str| {
        netns::add(&format!("{id}-x")).unwrap();
        std::fs::create_dir_all(cgroup_base.join(id).join("n1/a")).unwrap();
        std::fs::create_dir_all(bpffs_base.join(id).join("maps")).unwrap();
        std::fs::create_dir_all(tmp_base.join(id)).unwrap();
        std::fs::write(tmp_base.join(id).join("0-sleep.stdout"), "x").unwrap();
    };
    let exists = |id: &str| {
        [
            netns::netns_path(&format!("{id}-x")),
            cgroup_base.join(id),
            bpffs_base.join(id),
            tmp_base.join(id),
        ]
        .map(|p| p.exists())
    };

    // No sweeps (from tests building topologies) while the fakes are made.
    let gate = crate::sweep::tests_gate::SWEEPS.write().unwrap();
    // Dead owner: the PID is gone. A stray process in its cgroup must die.
    let dead = format!("mtb-{}-0-0", dead_pid());
    create_all(&dead);
    let mut stray = Command::new("sleep").arg("1000").spawn().unwrap();
    std::fs::write(
        cgroup_base.join(&dead).join("n1/a/cgroup.procs"),
        stray.id().to_string(),
    )
    .unwrap();
    // Dead owner whose PID was reused: our PID, another start time.
    let reused = format!("mtb-{}-{}-0", me.pid, me.start_time + 1);
    create_all(&reused);
    // Live owners: another running process, and this one.
    let mut other = Command::new("sleep").arg("1000").spawn().unwrap();
    let other_start = proc_start_time(other.id()).unwrap();
    let live_other = format!("mtb-{}-{other_start}-0", other.id());
    create_all(&live_other);
    let live_self = format!("mtb-{}-{}-sweeptest", me.pid, me.start_time);
    create_all(&live_self);

    drop(gate);
    sweep_leftovers();

    assert_eq!(exists(&dead), [false; 4], "{dead}");
    assert_eq!(exists(&reused), [false; 4], "{reused}");
    assert_eq!(exists(&live_other), [true; 4], "{live_other}");
    assert_eq!(exists(&live_self), [true; 4], "{live_self}");
    wait_until("the stray process to be killed", DEADLINE, || {
        Ok(stray.try_wait()?.is_some())
    })
    .unwrap();

    // Clean up the live ones by hand (`other` still alive, so that no
    // concurrent sweep takes them meanwhile).
    for id in [&live_other, &live_self] {
        netns::delete(&format!("{id}-x")).unwrap();
        cgroup::remove_tree(&cgroup_base.join(id), DEADLINE).unwrap();
        std::fs::remove_dir_all(bpffs_base.join(id)).unwrap();
        std::fs::remove_dir_all(tmp_base.join(id)).unwrap();
        assert_eq!(exists(id), [false; 4]);
    }
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn run_failure_messages_are_readable() {
    if !e2e_enabled("run_failure_messages_are_readable") {
        return;
    }
    let topo = Topology::builder("run_failure_messages_are_readable")
        .node("n1", &["a"])
        .build()
        .unwrap();
    let err = topo
        .pod("a")
        .run("sh", &["-c", "echo oops >&2; exit 3"], DEADLINE)
        .unwrap_err()
        .to_string();
    for needle in [
        "pod `a`",
        "node `n1`",
        "run_failure_messages_are_readable",
        "sh -c 'echo oops >&2; exit 3'",
        "exit status: 3",
        "oops",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in:\n{err}");
    }

    let err = topo
        .node("n1")
        .run("no-such-program-mtb", &[], DEADLINE)
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("node `n1`") && err.contains("no-such-program-mtb"),
        "{err}"
    );

    let ok = topo
        .node("n1")
        .run("sh", &["-c", "echo fine"], DEADLINE)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "fine\n");
}

#[test]
#[should_panic(expected = "has no pod `nope`")]
fn unknown_pod_panics_readably() {
    if !e2e_enabled("unknown_pod_panics_readably") {
        panic!("has no pod `nope` (skipped)");
    }
    let topo = Topology::builder("unknown_pod_panics_readably")
        .node("n1", &["a"])
        .build()
        .unwrap();
    topo.pod("nope");
}
