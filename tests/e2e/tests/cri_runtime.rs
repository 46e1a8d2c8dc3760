//! A real container runtime in the test bed: containerd (CRI plugin), runc
//! and the CNI plugins make pod sandboxes through the CRI API, as a kubelet
//! does; the pods land on the node's bridge, in the cgroups asked for, and
//! nothing is left once they (and the runtime) are gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_testbed::cri::{
    ContainerRuntime, PodIpRange, Sandbox, cri_enabled, kubelet_cgroup_parent,
};
use mesh_testbed::{Node, Pod, Topology, wait_until};

const PORT: u16 = 7000;

fn build(test_name: &str) -> Topology {
    Topology::builder(test_name)
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap_or_else(|e| panic!("building the test bed: {e:#}"))
}

fn start<'t>(topo: &'t Topology, node: &'t Node) -> ContainerRuntime<'t> {
    let started = Instant::now();
    let runtime = ContainerRuntime::start(topo, node, PodIpRange::default_for(node))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "containerd ready on {} in {:?}: {}",
        node.name(),
        started.elapsed(),
        runtime.version().unwrap()
    );
    runtime
}

fn run_pod(runtime: &ContainerRuntime, node: &Node, name: &str) -> Sandbox {
    let uid = format!("{name}-{}-uid", std::process::id());
    let parent = kubelet_cgroup_parent(node, "besteffort", &uid).unwrap();
    let started = Instant::now();
    let sandbox = runtime
        .run_pod(name, "shop", &uid, &parent)
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "sandbox {name} made in {:?}: {} {} pid {}",
        started.elapsed(),
        sandbox.ip,
        sandbox.netns_path.display(),
        sandbox.pause_pid
    );
    sandbox
}

/// The cgroup2 path of `pid` (`0::<path>` in /proc/<pid>/cgroup).
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup2 line in /proc/{pid}/cgroup: {text}"))
        .to_string()
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// Processes whose command line names `needle` (containerd names its
/// config and its shims the socket, both in the runtime's directory).
fn processes_naming(needle: &Path) -> Vec<u32> {
    let needle = needle.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&needle)
                .then_some(pid)
        })
        .collect()
}

/// Whether none of `pids` exists any more, not even as a zombie waiting
/// for the test process (a subreaper: containerd's shims are re-parented
/// to it) to reap it.
fn all_gone(pids: &[u32]) -> bool {
    pids.iter()
        .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// `pod` sends `hello` to the listener in the sandbox and gets back the
/// address the sandbox saw it come from (its own: no NAT on the way).
fn expect_reachable(from: &Pod, sandbox: &Sandbox) {
    let ip = sandbox.ip.to_string();
    let port = PORT.to_string();
    let mut answer = String::new();
    wait_until(
        &format!(
            "pod {} to reach sandbox {} at {ip}",
            from.name(),
            sandbox.name
        ),
        Duration::from_secs(10),
        || {
            let out = from.run_tool(&["send", &ip, &port, "hello"], Duration::from_secs(5))?;
            answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(true)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(answer, format!("{}|hello", from.ipv4()));
}

#[test]
fn pod_sandboxes_made_through_cri_join_the_node_network_and_cgroups() {
    if !cri_enabled("pod_sandboxes_made_through_cri_join_the_node_network_and_cgroups") {
        return;
    }
    let topo = build("cri_sandboxes");
    let n1 = topo.node("n1");
    let runtime = start(&topo, n1);
    let dir = runtime.dir().to_path_buf();
    assert!(runtime.socket().starts_with(&dir));

    let web = run_pod(&runtime, n1, "web");
    let db = run_pod(&runtime, n1, "db");
    assert_ne!(web.ip, db.ip);
    for sandbox in [&web, &db] {
        // An address from the configured range, on node n1's /16.
        let range = PodIpRange::default_for(n1);
        assert!(
            (range.first..=range.last).contains(&sandbox.ip),
            "{} outside {range:?}",
            sandbox.ip
        );
        // The netns containerd made, and the pause process lives in it.
        assert!(
            sandbox.netns_path.starts_with("/var/run/netns")
                && sandbox
                    .netns_path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("cni-"),
            "{}",
            sandbox.netns_path.display()
        );
        assert_eq!(
            inode(&sandbox.netns_path),
            inode(&PathBuf::from(format!(
                "/proc/{}/ns/net",
                sandbox.pause_pid
            )))
        );
        // The pause process is in <cgroup_parent>/<sandbox id>, below the
        // node's cgroup of the test bed.
        let cgroup = cgroup_of(sandbox.pause_pid);
        assert_eq!(cgroup, sandbox.cgroup());
        // The same path in every cgroup v1 hierarchy of a hybrid host.
        let all = std::fs::read_to_string(format!("/proc/{}/cgroup", sandbox.pause_pid)).unwrap();
        for line in all.lines() {
            assert!(line.ends_with(&format!(":{cgroup}")), "{all}");
        }
        assert!(cgroup.starts_with(&format!("{}/", sandbox.cgroup_parent)));
        let cgroup_dir = sandbox.cgroup_dir().unwrap();
        assert!(cgroup_dir.starts_with(n1.cgroup_dir()), "{cgroup_dir:?}");
        let procs = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == sandbox.pause_pid.to_string()),
            "{procs}"
        );
    }
    let mut listed: Vec<(String, String, bool)> = runtime
        .list_pods()
        .unwrap()
        .into_iter()
        .map(|p| (p.id, p.name, p.ready))
        .collect();
    listed.sort();
    let mut expected = vec![
        (web.id.clone(), "web".to_string(), true),
        (db.id.clone(), "db".to_string(), true),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    // Reachable from a test-bed pod on the same node and from one on the
    // other node, which sees the client's own address: the sandboxes share
    // the node bridge, and the test bed's routes carry them across nodes.
    let tool = mesh_testbed::tool::path().unwrap();
    for sandbox in [&web, &db] {
        let mut listener = n1
            .spawn(
                "nsenter",
                &[
                    &format!("--net={}", sandbox.netns_path.display()),
                    tool.to_str().unwrap(),
                    "peer-echo-server",
                    &PORT.to_string(),
                ],
            )
            .unwrap();
        expect_reachable(topo.pod("a"), sandbox);
        expect_reachable(topo.pod("c"), sandbox);
        listener.kill();
    }

    for sandbox in [&web, &db] {
        runtime.stop_and_remove_pod(&sandbox.id).unwrap();
        assert!(
            !sandbox.netns_path.exists(),
            "{} is left after RemovePodSandbox",
            sandbox.netns_path.display()
        );
        assert!(!Path::new(&format!("/proc/{}", sandbox.pause_pid)).exists());
        let pod_cgroup = mesh_testbed_cgroup(&sandbox.cgroup_parent);
        assert!(!pod_cgroup.exists(), "{pod_cgroup:?} is left");
    }
    assert_eq!(runtime.list_pods().unwrap(), vec![]);

    let processes = processes_naming(&dir);
    assert!(processes.contains(&runtime.containerd_pid()));
    let stopping = Instant::now();
    drop(runtime);
    eprintln!(
        "containerd stopped and cleaned up in {:?}",
        stopping.elapsed()
    );
    assert!(all_gone(&processes), "{processes:?}");
    assert_eq!(processes_naming(&dir), Vec::<u32>::new());
    assert!(!dir.exists(), "{} is left", dir.display());
    assert_eq!(v1_cgroups_of(&topo), Vec::<PathBuf>::new());
}

/// Mount points of the cgroup hierarchies of type `fstype`.
fn cgroup_mounts(fstype: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .filter(|l| l.contains(&format!(" - {fstype} ")))
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .collect()
}

/// `<cgroup2 mount>/<cgroup path>`.
fn mesh_testbed_cgroup(path: &str) -> PathBuf {
    let mount = cgroup_mounts("cgroup2").pop().expect("a cgroup2 mount");
    mount.join(path.trim_start_matches('/'))
}

/// The topology's cgroup path in the cgroup v1 hierarchies of a hybrid host
/// (runc makes the pods' cgroups there too), where it exists.
fn v1_cgroups_of(topo: &Topology) -> Vec<PathBuf> {
    let v2 = cgroup_mounts("cgroup2").pop().expect("a cgroup2 mount");
    let relative = topo.cgroup_dir().strip_prefix(&v2).unwrap();
    cgroup_mounts("cgroup")
        .into_iter()
        .map(|m| m.join(relative))
        .filter(|d| d.exists())
        .collect()
}

#[test]
fn a_panicking_test_leaves_no_sandbox_netns_process_or_mount_behind() {
    if !cri_enabled("a_panicking_test_leaves_no_sandbox_netns_process_or_mount_behind") {
        return;
    }
    let topo = build("cri_panic");
    let n1 = topo.node("n1");
    let mut seen: Option<(Sandbox, PathBuf, Vec<u32>)> = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let runtime = start(&topo, n1);
        let sandbox = run_pod(&runtime, n1, "doomed");
        // containerd and the sandbox's shim.
        let processes = processes_naming(runtime.dir());
        assert!(processes.len() >= 2, "{processes:?}");
        seen = Some((sandbox, runtime.dir().to_path_buf(), processes));
        panic!("deliberate panic: the test fails with a sandbox running");
    }));
    assert!(outcome.is_err());
    let (sandbox, dir, processes) = seen.expect("the sandbox was made");
    assert!(all_gone(&processes), "{processes:?}");
    assert!(!sandbox.netns_path.exists(), "{:?}", sandbox.netns_path);
    assert!(!Path::new(&format!("/proc/{}", sandbox.pause_pid)).exists());
    assert_eq!(processes_naming(&dir), Vec::<u32>::new());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under {}",
        dir.display()
    );
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!mesh_testbed_cgroup(&sandbox.cgroup_parent).exists());
    assert_eq!(v1_cgroups_of(&topo), Vec::<PathBuf>::new());
}
