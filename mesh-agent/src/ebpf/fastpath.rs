//! The same-node fast path, userspace side (the kernel side is
//! `mesh-ebpf/src/fastpath.rs`): switches it on or off, attaches the sk_msg
//! program to the socket map and sock_ops to the agent's own cgroup (its relay
//! sockets are one end of every loopback leg), arms splices of authorized
//! flows, tells the kernel how far the agent's relay got, and reads counters.

use parking_lot::Mutex;
use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, links::FdLink},
};
use mesh_common::{
    FASTPATH_LOOPBACK, FASTPATH_SPLICE, FP_INSERT_FAILED, FP_PASSED_BYTES, FP_PASSED_MSGS,
    FP_REDIRECTED_BYTES, FP_REDIRECTED_MSGS, FP_SOCKETS_ADDED, FP_SPLICED_BYTES, FP_SPLICED_MSGS,
    FP_SPLICES_ACTIVE, FP_STATS, MAP_FASTPATH_CONFIG, MAP_FASTPATH_STATS, MAP_SOCK_STATE,
    MAP_SOCKS, MAP_SPLICE, SockKey, SockState, Splice,
};

use super::orig_dst::ip_to_pod_addr;

const SK_MSG_PROGRAM: &str = "mesh_sk_msg";
/// `BPF_EXIST`: update an existing element only.
const BPF_EXIST: u64 = 2;

/// Which parts of the fast path are on (node.yaml `fastPath`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathOptions {
    /// Loopback legs (application <-> agent, agent <-> local pod).
    pub loopback: bool,
    /// Splicing authorized L4 flows between two pods of this node.
    pub splice: bool,
}

/// Fast-path counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FastPathStats {
    pub sockets_added: u64,
    pub insert_failed: u64,
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    pub spliced_msgs: u64,
    pub spliced_bytes: u64,
    pub splices_active: u64,
}

/// The kernel's name for one TCP socket: its namespace and its own and
/// peer addresses.
pub fn sock_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SockKey {
    let addr = |ip: IpAddr| ip_to_pod_addr(ip);
    SockKey {
        netns_cookie,
        local: addr(local.ip()),
        remote: addr(remote.ip()),
        local_port: local.port(),
        remote_port: remote.port(),
        _pad: 0,
    }
}

pub struct FastPath {
    options: FastPathOptions,
    splices: Mutex<BpfHashMap<MapData, SockKey, Splice>>,
    states: BpfHashMap<MapData, SockKey, SockState>,
    stats: PerCpuArray<MapData, u64>,
    /// sock_ops on the agent's own cgroup; detached when the agent exits.
    _agent_link: Option<FdLink>,
    /// Why the agent's relay sockets are not accelerated, if they are not.
    pub agent_cgroup_problem: Option<String>,
    /// Why this kernel cannot run the fast path at all (it is then off,
    /// whatever node.yaml asks).
    pub kernel_problem: Option<String>,
}

impl FastPath {
    /// Sets the switches, attaches the programs, and takes the maps. With
    /// `kernel_problem` (a feature it needs is missing) the switches stay off
    /// and mesh_sk_msg is not loaded.
    pub(super) fn start(
        ebpf: &mut Ebpf,
        requested: FastPathOptions,
        kernel_problem: Option<String>,
    ) -> Result<Self> {
        let options = match &kernel_problem {
            Some(why) => {
                if requested.loopback {
                    tracing::warn!(reason = %why, "the same-node fast path is asked for but this kernel cannot run it: it is off");
                }
                FastPathOptions {
                    loopback: false,
                    splice: false,
                }
            }
            None => requested,
        };
        let mut config: Array<MapData, u32> = Array::try_from(
            ebpf.take_map(MAP_FASTPATH_CONFIG)
                .ok_or_else(|| anyhow!("map {MAP_FASTPATH_CONFIG} missing"))?,
        )?;
        let mut flags = 0;
        if options.loopback {
            flags |= FASTPATH_LOOPBACK;
            if options.splice {
                flags |= FASTPATH_SPLICE;
            }
        }
        config
            .set(0, flags, 0)
            .context("writing the fast-path switches")?;
        let socks: SockHash<MapData, SockKey> = SockHash::try_from(
            ebpf.take_map(MAP_SOCKS)
                .ok_or_else(|| anyhow!("map {MAP_SOCKS} missing"))?,
        )?;
        if kernel_problem.is_none() {
            let program: &mut SkMsg = ebpf
                .program_mut(SK_MSG_PROGRAM)
                .ok_or_else(|| anyhow!("program {SK_MSG_PROGRAM} missing"))?
                .try_into()?;
            program
                .load()
                .context("the kernel rejected program mesh_sk_msg")?;
            // Attached to the (pinned) map itself, so it stays with the map; a
            // restarted agent attaches again, which replaces it.
            program
                .attach(socks.fd())
                .context("attaching mesh_sk_msg to the socket map")?;
        }
        let (agent_link, agent_cgroup_problem) = if options.loopback {
            match attach_to_own_cgroup(ebpf) {
                Ok(link) => (Some(link), None),
                Err(err) => {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "the agent's own sockets are not accelerated; the fast path only covers what the pods send"
                    );
                    (None, Some(format!("{err:#}")))
                }
            }
        } else {
            (None, None)
        };
        let splices = BpfHashMap::try_from(
            ebpf.take_map(MAP_SPLICE)
                .ok_or_else(|| anyhow!("map {MAP_SPLICE} missing"))?,
        )?;
        let states = BpfHashMap::try_from(
            ebpf.take_map(MAP_SOCK_STATE)
                .ok_or_else(|| anyhow!("map {MAP_SOCK_STATE} missing"))?,
        )?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map(MAP_FASTPATH_STATS)
                .ok_or_else(|| anyhow!("map {MAP_FASTPATH_STATS} missing"))?,
        )?;
        Ok(Self {
            options,
            splices: Mutex::new(splices),
            states,
            stats,
            _agent_link: agent_link,
            agent_cgroup_problem,
            kernel_problem,
        })
    }

    pub fn options(&self) -> FastPathOptions {
        self.options
    }

    /// Whether authorized same-node flows may be spliced.
    pub fn splicing(&self) -> bool {
        self.options.loopback && self.options.splice && self.agent_cgroup_problem.is_none()
    }

    /// Asks the kernel to splice one direction: `app`'s sends go straight to
    /// `peer` once the agent has relayed, through `via`, all `app` sent before.
    pub fn arm(&self, app: SockKey, peer: SockKey, via: SockKey) -> Result<()> {
        self.splices
            .lock()
            .insert(
                app,
                Splice {
                    peer,
                    via,
                    forwarded: 0,
                },
                0,
            )
            .context("arming a splice")
    }

    /// The agent has relayed `total` bytes of `app`'s direction so far.
    pub fn forwarded(&self, app: &SockKey, peer: SockKey, via: SockKey, total: u64) {
        let result = self.splices.lock().insert(
            app,
            Splice {
                peer,
                via,
                forwarded: total,
            },
            // Only while armed: the kernel forgets it when the socket closes.
            BPF_EXIST,
        );
        if let Err(error) = result {
            tracing::trace!(%error, "splice progress not recorded (socket gone)");
        }
    }

    /// Forgets a direction's splice request (the flow ended).
    pub fn disarm(&self, app: &SockKey) {
        let _ = self.splices.lock().remove(app);
    }

    /// What the kernel knows of a socket's sends, while it is open.
    pub fn state(&self, key: &SockKey) -> Option<SockState> {
        self.states.get(key, 0).ok()
    }

    pub fn stats(&self) -> FastPathStats {
        let sum = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        };
        FastPathStats {
            sockets_added: sum(FP_SOCKETS_ADDED),
            insert_failed: sum(FP_INSERT_FAILED),
            redirected_msgs: sum(FP_REDIRECTED_MSGS),
            redirected_bytes: sum(FP_REDIRECTED_BYTES),
            passed_msgs: sum(FP_PASSED_MSGS),
            passed_bytes: sum(FP_PASSED_BYTES),
            spliced_msgs: sum(FP_SPLICED_MSGS),
            spliced_bytes: sum(FP_SPLICED_BYTES),
            splices_active: sum(FP_SPLICES_ACTIVE),
        }
    }
}

const _: () = assert!(FP_SPLICES_ACTIVE < FP_STATS);

/// sock_ops on the cgroup the agent runs in, so its relay sockets join the
/// socket map as they connect and are accepted. Refused in the root cgroup,
/// where it would see every socket of the machine.
fn attach_to_own_cgroup(ebpf: &mut Ebpf) -> Result<FdLink> {
    let path = own_cgroup_dir()?;
    let cgroup = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let program = super::sock_ops_program(ebpf)?;
    let id = program
        .attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| {
            format!(
                "attaching mesh_sockops to the agent's cgroup {}",
                path.display()
            )
        })?;
    Ok(program.take_link(id)?.try_into()?)
}

/// The agent's cgroup v2 directory, from /proc/self/cgroup.
fn own_cgroup_dir() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("no cgroup v2 entry in /proc/self/cgroup"))?;
    if relative == "/" {
        anyhow::bail!(
            "the agent runs in the root cgroup; run it in a cgroup of its own (as a container does)"
        );
    }
    Ok(crate::kubernetes::cgroup::cgroup2_mount()?.join(relative.trim_start_matches('/')))
}
