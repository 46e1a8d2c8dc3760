//! Building and tearing down a topology: nodes, pods, fabric.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{self, Place, Process, Shared};
use crate::reap::Doomed;
use crate::{bpffs, cgroup, naming, netns};

/// How long teardown waits for killed processes to leave the cgroups.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How long teardown waits for killed orphans to be re-parented to us.
const REAP_DEADLINE: Duration = Duration::from_secs(2);
/// Timeout of [`Node::http_get`].
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Describes the nodes and pods of a [`Topology`]; see [`Topology::builder`].
#[derive(Debug)]
pub struct TopologyBuilder {
    test_name: String,
    nodes: Vec<(String, Vec<String>)>,
}

/// A Linux bridge takes at most 1,024 ports; one pod is one port.
pub const MAX_PODS_PER_NODE: usize = 1_000;

/// The control plane's address on the fabric (see
/// [`Topology::control_plane_listener`]).
pub const CONTROL_PLANE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 254);

/// A set of simulated nodes (network namespaces) joined by a fabric, each
/// with pods (a netns plus a cgroup). Dropping it removes everything.
///
/// Addressing, for node index `i` (1-based, declaration order) and pod `k`
/// (1-based on its node):
/// - fabric: node `i` is `10.255.0.i/24` and `fd00:ff::i/64` on `fab0`;
/// - node `i` bridge `br0`: `10.i.0.1/16`, `fd00:i::1/64` (`i` in hex);
/// - pod `k` on node `i`: `eth0` = `10.i.0.(k+1)/16`, `fd00:i::(k+1)/64`;
///   beyond 253 pods the next ones are `10.i.1.2`..`10.i.1.254`, and so on
///   (at most [`MAX_PODS_PER_NODE`]); default routes via the node bridge;
///   nodes route each other's pod subnets over the fabric.
#[derive(Debug)]
pub struct Topology {
    shared: Arc<Shared>,
    nodes: Vec<Node>,
    fabric_netns: String,
    /// `<cgroup2>/mesh-testbed/<id>`.
    cgroup_root: PathBuf,
    bpffs_dir: PathBuf,
    /// Every netns we (tried to) create, for teardown.
    created_netns: Vec<String>,
    torn_down: bool,
}

/// A simulated node: a network namespace with a bridge for its pods and a
/// link to the fabric, and a parent cgroup for its pods.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    name: String,
    index: u8,
    netns_name: String,
    cgroup_dir: PathBuf,
    /// `<node cgroup>/system`, where node processes run.
    system: Place,
    pods: Vec<Pod>,
}

/// A simulated pod: a network namespace with `eth0` on its node's bridge,
/// and a cgroup under its node's cgroup.
#[derive(Debug)]
pub struct Pod {
    shared: Arc<Shared>,
    name: String,
    node_name: String,
    netns_name: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    place: Place,
}

impl Topology {
    /// Starts describing a topology. `test_name` appears in error messages.
    pub fn builder(test_name: &str) -> TopologyBuilder {
        TopologyBuilder {
            test_name: test_name.to_string(),
            nodes: Vec::new(),
        }
    }

    /// The node called `name`; panics (naming the known nodes) if unknown.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| {
                let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                panic!(
                    "topology of test `{}` ({}) has no node `{name}`; nodes: {known:?}",
                    self.shared.test_name, self.shared.id
                )
            })
    }

    /// The pod called `name` (pod names are unique in a topology); panics
    /// (naming the known pods) if unknown.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods().find(|p| p.name == name).unwrap_or_else(|| {
            let known: Vec<&str> = self.pods().map(|p| p.name.as_str()).collect();
            panic!(
                "topology of test `{}` ({}) has no pod `{name}`; pods: {known:?}",
                self.shared.test_name, self.shared.id
            )
        })
    }

    fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The unique id (`mtb-<pid>-<starttime>-<n>`) all names start with.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn test_name(&self) -> &str {
        &self.shared.test_name
    }

    /// Name of the fabric netns (a bridge joining the nodes' `fab0`).
    pub fn fabric_netns_name(&self) -> &str {
        &self.fabric_netns
    }

    /// Binds TCP listeners on the control plane's address
    /// ([`CONTROL_PLANE_IPV4`], on the fabric, reachable from every node):
    /// where a test serves what the cluster's control plane would (the
    /// stand-in API server, [`crate::kube_api`]). Port 0 picks one.
    pub fn control_plane_binder(
        &self,
    ) -> impl Fn(u16) -> std::io::Result<std::net::TcpListener> + Send + Sync + 'static {
        let fabric = netns::netns_path(&self.fabric_netns);
        move |port| {
            netns::try_in_netns(&fabric, move || {
                std::net::TcpListener::bind((CONTROL_PLANE_IPV4, port))
            })
            .map_err(std::io::Error::other)?
        }
    }

    /// Starts a process on the control plane: in the fabric netns (so it
    /// listens on [`CONTROL_PLANE_IPV4`], reachable from every node) and a
    /// cgroup of its own under the topology's, so teardown ends it. For
    /// what a cluster runs off the nodes (the mesh's signer).
    pub fn spawn_on_control_plane(&self, what: &str, cmd: Command) -> anyhow::Result<Process> {
        let cgroup = self.cgroup_root.join("control-plane");
        if !cgroup.is_dir() {
            std::fs::create_dir(&cgroup)
                .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        }
        self.spawn_in(what, &netns::netns_path(&self.fabric_netns), &cgroup, cmd)
    }

    /// Starts a process in `netns` and `cgroup` (for pods the test bed did
    /// not make, e.g. sandboxes of a container runtime); `what` names it in
    /// messages. Its output is captured as for [`Pod::spawn`].
    pub fn spawn_in(
        &self,
        what: &str,
        netns: &Path,
        cgroup: &Path,
        cmd: Command,
    ) -> anyhow::Result<Process> {
        let place = Place {
            what: format!(
                "{what} (test `{}`, {})",
                self.shared.test_name, self.shared.id
            ),
            netns: netns.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        };
        process::spawn(&self.shared, &place, cmd)
    }

    /// `<cgroup2 mount>/mesh-testbed/<id>`: parent of the node cgroups.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_root
    }

    /// A per-topology directory on bpffs (`/sys/fs/bpf/mesh-testbed/<id>`),
    /// removed with everything in it (pins included) on drop.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Directory where process output is captured (removed on drop).
    pub fn tmp_dir(&self) -> &Path {
        &self.shared.tmp_dir
    }

    fn setup(&mut self, specs: &[(String, Vec<String>)]) -> anyhow::Result<()> {
        let id = self.shared.id.clone();
        let tmp = &self.shared.tmp_dir;
        std::fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

        // cgroups: <base>/<id>/<node>/{system,<pod>...}
        let base = self.cgroup_root.parent().expect("cgroup root has a parent");
        std::fs::create_dir_all(base)
            .with_context(|| format!("cannot create {}", base.display()))?;
        cgroup::create(&self.cgroup_root)?;

        bpffs::ensure_mounted()?;
        let bpf_base = bpffs::base_dir();
        std::fs::create_dir_all(&bpf_base)
            .with_context(|| format!("cannot create {}", bpf_base.display()))?;
        std::fs::create_dir(&self.bpffs_dir)
            .with_context(|| format!("cannot create {}", self.bpffs_dir.display()))?;

        // Namespaces. DAD is switched off before any interface exists so
        // that IPv6 addresses (link-local too) are usable at once.
        let no_dad = [
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ];
        let routing = [
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ];
        self.add_netns(&self.fabric_netns.clone(), &no_dad)?;
        for (i, (node_name, pods)) in specs.iter().enumerate() {
            let index = u8::try_from(i + 1).expect("checked by build");
            let node_ns = format!("{id}-{node_name}");
            self.add_netns(&node_ns, &[&no_dad[..], &routing[..]].concat())?;
            let cgroup_dir = self.cgroup_root.join(node_name);
            cgroup::create(&cgroup_dir)?;
            let system_dir = cgroup_dir.join("system");
            cgroup::create(&system_dir)?;
            let mut node = Node {
                shared: self.shared.clone(),
                name: node_name.clone(),
                index,
                system: Place {
                    what: format!("node `{node_name}` ({})", self.describe()),
                    netns: netns::netns_path(&node_ns),
                    cgroup: system_dir,
                },
                netns_name: node_ns,
                cgroup_dir,
                pods: Vec::new(),
            };
            for (k, pod_name) in pods.iter().enumerate() {
                let (block, host) = (
                    u8::try_from(k / 253).expect("checked by build"),
                    u8::try_from(k % 253 + 2).expect("below 255"),
                );
                let pod_ns = format!("{id}-{node_name}-{pod_name}");
                self.add_netns(&pod_ns, &no_dad)?;
                let pod_cgroup = node.cgroup_dir.join(pod_name);
                cgroup::create(&pod_cgroup)?;
                node.pods.push(Pod {
                    shared: self.shared.clone(),
                    name: pod_name.clone(),
                    node_name: node_name.clone(),
                    ipv4: Ipv4Addr::new(10, index, block, host),
                    ipv6: Ipv6Addr::new(
                        0xfd00,
                        index.into(),
                        0,
                        0,
                        0,
                        0,
                        0,
                        u16::try_from(k + 2).expect("checked by build"),
                    ),
                    place: Place {
                        what: format!(
                            "pod `{pod_name}` on node `{node_name}` ({})",
                            self.describe()
                        ),
                        netns: netns::netns_path(&pod_ns),
                        cgroup: pod_cgroup,
                    },
                    netns_name: pod_ns,
                });
            }
            self.nodes.push(node);
        }

        // Links and addresses, one `ip -batch` per namespace. Each veth is
        // created with both ends directly in their target namespaces, so its
        // names only need to be unique there, never in the root netns.
        // Bridges get a MAC of their own: a bridge without one takes its
        // lowest port's, and changes it when that port goes (a pod deleted),
        // which strands every pod's ARP entry for its gateway.
        let mut fabric = String::from(
            "link set lo up\nlink add br0 address 02:00:00:00:ff:01 type bridge mcast_snooping 0\nlink set br0 up\n",
        );
        // The control plane's address (a stand-in API server listens there).
        let _ = writeln!(fabric, "addr add {CONTROL_PLANE_IPV4}/24 dev br0");
        for node in &self.nodes {
            let i = node.index;
            let _ = writeln!(
                fabric,
                "link add n{i} type veth peer name fab0 netns {}",
                node.netns_name
            );
            let _ = writeln!(fabric, "link set n{i} master br0 up");
        }
        netns::ip_batch(&self.fabric_netns, &fabric)?;

        for node in &self.nodes {
            let i = node.index;
            let mut s = String::new();
            let _ = writeln!(s, "link set lo up");
            let _ = writeln!(s, "addr add {}/24 dev fab0", node.fabric_ipv4());
            let _ = writeln!(s, "addr add {}/64 dev fab0 nodad", node.fabric_ipv6());
            let _ = writeln!(s, "link set fab0 up");
            let _ = writeln!(
                s,
                "link add br0 address 02:00:00:00:{i:02x}:01 type bridge mcast_snooping 0"
            );
            let _ = writeln!(s, "addr add {}/16 dev br0", node.bridge_ipv4());
            let _ = writeln!(s, "addr add {}/64 dev br0 nodad", node.bridge_ipv6());
            let _ = writeln!(s, "link set br0 up");
            for (k, pod) in node.pods.iter().enumerate() {
                let k = k + 1;
                let _ = writeln!(
                    s,
                    "link add p{k} type veth peer name eth0 netns {}",
                    pod.netns_name
                );
                let _ = writeln!(s, "link set p{k} master br0 up");
            }
            for other in self.nodes.iter().filter(|o| o.index != i) {
                let j = other.index;
                let _ = writeln!(s, "route add 10.{j}.0.0/16 via {}", other.fabric_ipv4());
                let _ = writeln!(s, "route add fd00:{j:x}::/64 via {}", other.fabric_ipv6());
            }
            netns::ip_batch(&node.netns_name, &s)?;

            for pod in &node.pods {
                let mut s = String::new();
                let _ = writeln!(s, "link set lo up");
                let _ = writeln!(s, "addr add {}/16 dev eth0", pod.ipv4);
                let _ = writeln!(s, "addr add {}/64 dev eth0 nodad", pod.ipv6);
                let _ = writeln!(s, "link set eth0 up");
                let _ = writeln!(s, "route add default via {}", node.bridge_ipv4());
                let _ = writeln!(s, "route add ::/0 via {}", node.bridge_ipv6());
                netns::ip_batch(&pod.netns_name, &s)?;
            }
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str, sysctls: &[(&str, &str)]) -> anyhow::Result<()> {
        // Recorded first: teardown copes with a half-created netns.
        self.created_netns.push(name.to_string());
        netns::add(name)?;
        netns::set_sysctls(&netns::netns_path(name), sysctls)
            .with_context(|| format!("configuring netns {name}"))
    }

    fn describe(&self) -> String {
        format!("test `{}`, {}", self.shared.test_name, self.shared.id)
    }

    /// Removes everything, best-effort: processes, namespaces, cgroups,
    /// bpffs dir, temp dir. Failures are printed, never panicked on.
    fn teardown(&mut self) {
        if std::mem::replace(&mut self.torn_down, true) {
            return;
        }
        let report = |what: &str, e: anyhow::Error| {
            eprintln!(
                "mesh-testbed: teardown of {} ({}): {what}: {e:#}",
                self.shared.id, self.shared.test_name
            );
        };
        // Our own children first, by PID; then whatever else is left in our
        // cgroups (their children, or processes tests moved there), reaping
        // the orphans that were re-parented to us.
        let doomed = Doomed::snapshot(&self.cgroup_root, &self.shared.unreaped_pids());
        self.shared.kill_all();
        if let Err(e) = cgroup::kill_all(&self.cgroup_root, TEARDOWN_DEADLINE) {
            report("killing processes", e);
        }
        doomed.reap(REAP_DEADLINE);
        for name in self.created_netns.iter().rev() {
            if let Err(e) = netns::delete(name) {
                report("deleting netns", e);
            }
        }
        if let Err(e) = cgroup::remove_tree(&self.cgroup_root, TEARDOWN_DEADLINE) {
            report("removing cgroups", e);
        }
        for dir in [&self.bpffs_dir, &self.shared.tmp_dir] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report(&format!("removing {}", dir.display()), e.into()),
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl TopologyBuilder {
    /// Adds a node with the given pods. Nodes get indexes 1, 2, ... in the
    /// order they are declared.
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        self.nodes.push((
            name.to_string(),
            pods.iter().map(|p| p.to_string()).collect(),
        ));
        self
    }

    /// Creates everything. On error, whatever was created is removed again.
    pub fn build(self) -> anyhow::Result<Topology> {
        self.validate()
            .with_context(|| format!("invalid topology for test `{}`", self.test_name))?;
        crate::sweep::sweep_leftovers();
        crate::reap::become_subreaper();

        let id = naming::next_id("");
        let tmp_dir = std::env::temp_dir().join("mesh-testbed").join(&id);
        let cgroup_root = cgroup::base_dir()?.join(&id);
        let mut topology = Topology {
            fabric_netns: format!("{id}-fabric"),
            bpffs_dir: bpffs::base_dir().join(&id),
            cgroup_root,
            shared: Arc::new(Shared::new(id, self.test_name, tmp_dir)),
            nodes: Vec::new(),
            created_netns: Vec::new(),
            torn_down: false,
        };
        // On error `topology` is dropped here, which removes the partial build.
        topology.setup(&self.nodes).with_context(|| {
            format!(
                "cannot build topology for test `{}` ({})",
                topology.shared.test_name, topology.shared.id
            )
        })?;
        Ok(topology)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.nodes.is_empty() {
            bail!("a topology needs at least one node");
        }
        // Index 255 would clash with the fabric subnets 10.255.0.0/24 and fd00:ff::/64.
        if self.nodes.len() > 254 {
            bail!("at most 254 nodes are supported");
        }
        let mut node_names = HashSet::new();
        let mut pod_names = HashSet::new();
        for (node, pods) in &self.nodes {
            naming::check_name("node", node)?;
            if node == "fabric" {
                bail!("`fabric` is reserved (it names the fabric netns)");
            }
            if !node_names.insert(node) {
                bail!("node `{node}` is declared twice");
            }
            if pods.len() > MAX_PODS_PER_NODE {
                bail!("node `{node}`: at most {MAX_PODS_PER_NODE} pods per node are supported");
            }
            for pod in pods {
                naming::check_name("pod", pod)?;
                if pod == "system" {
                    bail!("pod name `system` is reserved (node processes run in that cgroup)");
                }
                if !pod_names.insert(pod) {
                    bail!("pod `{pod}` is declared twice (pod names are unique per topology)");
                }
            }
        }
        Ok(())
    }
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 1-based, in declaration order.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The netns name as in /run/netns and `ip netns list`.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns_name)
    }

    /// The node's parent cgroup (pods are children of it).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// `<node cgroup>/system`, where [`Node::spawn`] puts processes.
    pub fn system_cgroup_dir(&self) -> &Path {
        &self.system.cgroup
    }

    /// The node's address on the fabric (`fab0`): `10.255.0.<index>`.
    pub fn fabric_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, self.index)
    }

    /// The node's address on the fabric (`fab0`): `fd00:ff::<index>`.
    pub fn fabric_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, self.index.into())
    }

    /// The pods' gateway on the node bridge `br0`: `10.<index>.0.1`.
    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.index, 0, 1)
    }

    /// The pods' gateway on the node bridge `br0`: `fd00:<index>::1`.
    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, self.index.into(), 0, 0, 0, 0, 0, 1)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod `name` on this node; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{} has no pod `{name}`", self.system.what))
    }

    /// Starts a process in the node's netns, in the cgroup
    /// `<node cgroup>/system` (not a pod cgroup).
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn_with(cmd)
    }

    /// Like [`Node::spawn`], for a caller-built command (env vars, cwd...).
    /// Its stdin, stdout and stderr are replaced.
    pub fn spawn_with(&self, cmd: Command) -> anyhow::Result<Process> {
        process::spawn(&self.shared, &self.system, cmd)
    }

    /// Starts `pod-tool` (see [`crate::tool`]) with `args` in the node, as
    /// [`Node::spawn`] does.
    pub fn spawn_tool(&self, args: &[&str]) -> anyhow::Result<Process> {
        self.spawn_with(crate::tool::command(args)?)
    }

    /// Runs `pod-tool` with `args` in the node to completion, as [`Node::run`].
    pub fn run_tool(&self, args: &[&str], deadline: Duration) -> anyhow::Result<Output> {
        self.spawn_tool(args)?.wait_success(deadline)
    }

    /// Runs a command in the node to completion within `deadline`; an error
    /// (naming node, command, exit status, stdout and stderr) if it fails.
    pub fn run(
        &self,
        program: impl AsRef<OsStr>,
        args: &[&str],
        deadline: Duration,
    ) -> anyhow::Result<Output> {
        self.spawn(program, args)?.wait_success(deadline)
    }

    /// Runs `f` on a fresh thread that has joined the node's netns (not its
    /// cgroup) and returns its result; panics if the netns cannot be joined.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::try_in_netns(&self.netns_path(), f)
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.system.what))
    }

    /// HTTP GET `http://{addr}{path}` from inside the node's netns; returns
    /// the status (any status, not only 2xx) and body. Times out after 10 s.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("http://{addr}{path}");
        let target = url.clone();
        self.in_netns(move || -> anyhow::Result<(u16, String)> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(HTTP_TIMEOUT))
                .http_status_as_error(false)
                // Never send test traffic to a proxy from the environment.
                .proxy(None)
                .build()
                .into();
            let mut response = agent.get(&target).call()?;
            let status = response.status().as_u16();
            let body = response.body_mut().read_to_string()?;
            Ok((status, body))
        })
        .with_context(|| format!("{}: GET {url}", self.system.what))
    }
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The netns name as in /run/netns and `ip netns list`.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns_name)
    }

    /// `<node cgroup>/<pod>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.place.cgroup
    }

    /// Address of the pod's `eth0`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// Address of the pod's `eth0`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// Starts a process in the pod: in its cgroup and its netns.
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn_with(cmd)
    }

    /// Like [`Pod::spawn`], for a caller-built command (env vars, cwd...).
    /// Its stdin, stdout and stderr are replaced.
    pub fn spawn_with(&self, cmd: Command) -> anyhow::Result<Process> {
        process::spawn(&self.shared, &self.place, cmd)
    }

    /// Starts `pod-tool` (see [`crate::tool`]) with `args` in the pod, as
    /// [`Pod::spawn`] does.
    pub fn spawn_tool(&self, args: &[&str]) -> anyhow::Result<Process> {
        self.spawn_with(crate::tool::command(args)?)
    }

    /// Runs `pod-tool` with `args` in the pod to completion, as [`Pod::run`].
    pub fn run_tool(&self, args: &[&str], deadline: Duration) -> anyhow::Result<Output> {
        self.spawn_tool(args)?.wait_success(deadline)
    }

    /// Runs a command in the pod to completion within `deadline`; an error
    /// (naming pod, node, command, exit status, stdout and stderr) if it fails.
    pub fn run(
        &self,
        program: impl AsRef<OsStr>,
        args: &[&str],
        deadline: Duration,
    ) -> anyhow::Result<Output> {
        self.spawn(program, args)?.wait_success(deadline)
    }

    /// Runs `f` on a fresh thread that has joined the pod's netns (not its
    /// cgroup) and returns its result; panics if the netns cannot be joined.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::try_in_netns(&self.netns_path(), f)
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.place.what))
    }
}
