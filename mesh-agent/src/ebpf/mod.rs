//! The kernel side: loads the programs built from `mesh-ebpf`, attaches them to
//! enrolled pods (cgroup hooks for outbound, sk_lookup on the pod's network
//! namespace for inbound), and keeps the maps they share with the agent.
//!
//! Maps and links are pinned under the node's pin directory. Pinned links stay
//! attached when the agent stops or crashes, so enrolled pods stay captured
//! (their connections are refused while no agent listens), and a restarted agent
//! takes over the same maps and replaces the links without a gap.

pub mod bpffs;
pub mod fastpath;
mod netns;
pub mod occupancy;
pub mod orig_dst;
mod pins;
pub mod probe;
mod programs;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, SockMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode,
        links::{FdLink, Link, PinnedLink},
    },
    util::nr_cpus,
};
pub use fastpath::{FastPath, FastPathOptions, FastPathStats};
use mesh_common::{
    CidrKey, DIRECTION_INBOUND, DIRECTION_OUTBOUND, MAP_CLIENTS, MAP_DNS_RESOLVERS,
    MAP_EXCLUDED_CIDRS, MAP_EXCLUDED_PORTS, MAP_INBOUND_LISTENERS, MAP_PENDING, MAP_POD_ADDRS,
    MAP_POD_COUNTERS, MAP_PODS, MAP_SOCK_STATE, MAP_SOCKS, MAP_SPLICE, MAX_PODS, PodAddr,
    PodCounters, PodInfo, PortKey,
};
pub use netns::{current_netns_cookie, netns_cookie, socket_netns_cookie};
pub use orig_dst::{DnsResolvers, OrigDstTable};
pub use pins::remove_pinned_state;
use pins::{lock_pin_dir, pin_replacing, remove_pins};
use programs::{
    sk_lookup_program, sock_addr_program, sock_ops_program, start_kernel_log_forwarding,
};

use crate::config::PodConfig;

/// The kernel object, built by mesh-agent's build script from mesh-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Programs attached to each enrolled pod's cgroup.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_getpeername4",
    "mesh_getpeername6",
    "mesh_sendmsg4",
    "mesh_sendmsg6",
    "mesh_recvmsg4",
    "mesh_recvmsg6",
];
const SOCK_OPS_PROGRAM: &str = "mesh_sockops";
/// Attached to each enrolled pod's network namespace.
const SK_LOOKUP_PROGRAM: &str = "mesh_sk_lookup";

/// How the programs are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Directory on bpffs for this agent's maps and links.
    pub pin_dir: PathBuf,
    /// Size of the captured-connection maps.
    pub max_connections: u32,
    /// Kernel log records at or above this level reach the agent's log.
    pub kernel_log_level: log::LevelFilter,
    /// How long to wait for the agent holding the pin directory to let go of
    /// it (during a handover it does so as it hands over); zero: fail at once.
    pub lock_wait: std::time::Duration,
}

/// What the kernel knows about one enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrolment {
    pub netns_cookie: u64,
    pub slot: u32,
}

/// The agent's inbound listeners of a pod, which sk_lookup hands connections to.
pub struct InboundListeners<'a> {
    pub ipv4: std::os::fd::BorrowedFd<'a>,
    pub ipv6: Option<std::os::fd::BorrowedFd<'a>>,
}

struct EnrolledPod {
    enrolment: Enrolment,
    addrs: Vec<PodAddr>,
    port_keys: Vec<PortKey>,
    cidr_keys: Vec<LpmKey<CidrKey>>,
    links: Vec<PinnedLink>,
}

/// The loaded kernel programs and the pods they are attached to.
pub struct KernelPrograms {
    ebpf: Ebpf,
    /// Exclusive lock on the pin directory: one agent per pinned state.
    /// Held while this agent owns the pinned state; let go of at a handover.
    pin_lock: Option<pins::PinLock>,
    pin_dir: PathBuf,
    pods: BTreeMap<String, EnrolledPod>,
    /// Slots of pods enrolled by an earlier agent (netns cookie -> slot), found in
    /// the pinned pod map at load: reused, with their counters, when the same pod
    /// is enrolled again.
    inherited: HashMap<u64, u32>,
    free_slots: Vec<u32>,
}

impl KernelPrograms {
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let maps_dir = options.pin_dir.join("maps");
        std::fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating the pin directory {}", maps_dir.display()))?;
        std::fs::create_dir_all(options.pin_dir.join("links"))?;
        let pin_lock = lock_pin_dir(&options.pin_dir, options.lock_wait)?;
        let level = options.kernel_log_level as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(MAP_PENDING, options.max_connections)
            .map_max_entries(MAP_CLIENTS, options.max_connections)
            // Four sockets per proxied flow at most, two spliced directions.
            .map_max_entries(MAP_SOCKS, options.max_connections.saturating_mul(4))
            .map_max_entries(MAP_SOCK_STATE, options.max_connections.saturating_mul(4))
            .map_max_entries(MAP_SPLICE, options.max_connections.saturating_mul(2))
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the kernel programs (needs root: CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN); \
                     if the maps pinned in {} come from an incompatible agent version, remove them",
                    maps_dir.display()
                )
            })?;
        start_kernel_log_forwarding(&mut ebpf);
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel rejected program {name}"))?;
        }
        sock_ops_program(&mut ebpf)?
            .load()
            .context("the kernel rejected program mesh_sockops")?;
        sk_lookup_program(&mut ebpf)?
            .load()
            .context("the kernel rejected program mesh_sk_lookup")?;

        let inherited = read_pod_map(&mut ebpf)?;
        let used: std::collections::HashSet<u32> = inherited.values().copied().collect();
        let free_slots = (0..MAX_PODS).rev().filter(|s| !used.contains(s)).collect();
        Ok(Self {
            ebpf,
            pin_lock: Some(pin_lock),
            pin_dir: options.pin_dir.clone(),
            pods: BTreeMap::new(),
            inherited,
            free_slots,
        })
    }

    /// Moves the captured-connection maps out for the data path.
    /// Gauges of the hash maps that can fill up, each on its own descriptor
    /// of the pinned map.
    pub fn map_gauges(&self) -> Result<Vec<occupancy::MapGauge>> {
        let maps_dir = self.pin_dir.join("maps");
        [
            MAP_PENDING,
            MAP_CLIENTS,
            MAP_PODS,
            MAP_POD_ADDRS,
            MAP_EXCLUDED_PORTS,
            MAP_SOCKS,
            MAP_SOCK_STATE,
            MAP_SPLICE,
        ]
        .into_iter()
        .map(|name| occupancy::MapGauge::open(name, &maps_dir.join(name)))
        .collect()
    }

    pub fn orig_dst_table(&mut self) -> Result<OrigDstTable> {
        let pending = self
            .ebpf
            .take_map(MAP_PENDING)
            .ok_or_else(|| anyhow!("map {MAP_PENDING} missing"))?;
        let clients = self
            .ebpf
            .take_map(MAP_CLIENTS)
            .ok_or_else(|| anyhow!("map {MAP_CLIENTS} missing"))?;
        OrigDstTable::new(pending, clients)
    }

    /// Moves the map of the DNS servers pods addressed out for the DNS proxy.
    pub fn dns_resolvers(&mut self) -> Result<DnsResolvers> {
        let map = self
            .ebpf
            .take_map(MAP_DNS_RESOLVERS)
            .ok_or_else(|| anyhow!("map {MAP_DNS_RESOLVERS} missing"))?;
        DnsResolvers::new(map)
    }

    /// Starts the same-node fast path (or switches it off) and moves its maps
    /// out for the data path.
    /// `unavailable`: why this kernel cannot run it (the probe's finding).
    pub fn fast_path(
        &mut self,
        options: FastPathOptions,
        unavailable: Option<String>,
    ) -> Result<FastPath> {
        FastPath::start(&mut self.ebpf, options, unavailable)
    }

    pub fn program_names(&self) -> Vec<&'static str> {
        let mut names = CGROUP_SOCK_ADDR_PROGRAMS.to_vec();
        names.extend([SOCK_OPS_PROGRAM, SK_LOOKUP_PROGRAM]);
        names
    }

    /// Enrols a pod whose network namespace has cookie `netns_cookie` and whose
    /// inbound listeners exist. On error nothing of it is left behind.
    pub fn enrol(
        &mut self,
        pod: &PodConfig,
        netns_cookie: u64,
        listeners: InboundListeners<'_>,
    ) -> Result<Enrolment> {
        let key = pod.key();
        if self.pods.contains_key(&key) {
            bail!("pod {key} is already enrolled");
        }
        let cgroup = File::open(&pod.cgroup)
            .with_context(|| format!("opening the pod's cgroup {}", pod.cgroup.display()))?;
        if !cgroup.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!("{} is not a cgroup directory", pod.cgroup.display());
        }
        let netns = File::open(&pod.netns).with_context(|| {
            format!(
                "opening the pod's network namespace {}",
                pod.netns.display()
            )
        })?;
        let (slot, inherited) = match self.inherited.remove(&netns_cookie) {
            Some(slot) => (slot, true),
            None => (
                self.free_slots
                    .pop()
                    .ok_or_else(|| anyhow!("all {MAX_PODS} pod slots are in use"))?,
                false,
            ),
        };
        let enrolment = Enrolment { netns_cookie, slot };
        let mut pod_state = EnrolledPod {
            enrolment,
            addrs: Vec::new(),
            port_keys: Vec::new(),
            cidr_keys: Vec::new(),
            links: Vec::new(),
        };
        match self.install(pod, &mut pod_state, inherited, &cgroup, &netns, &listeners) {
            Ok(()) => {
                self.pods.insert(key, pod_state);
                Ok(enrolment)
            }
            Err(err) => {
                self.uninstall(pod_state);
                Err(err)
            }
        }
    }

    /// Map entries first, links last: a program never runs for a pod it does not
    /// fully know.
    fn install(
        &mut self,
        pod: &PodConfig,
        state: &mut EnrolledPod,
        inherited: bool,
        cgroup: &File,
        netns: &File,
        listeners: &InboundListeners<'_>,
    ) -> Result<()> {
        let slot = state.enrolment.slot;
        if !inherited {
            self.reset_counters(slot)?;
        }
        let mut listener_map: SockMap<_> = SockMap::try_from(self.map_mut(MAP_INBOUND_LISTENERS)?)?;
        listener_map
            .set(slot * 2, &listeners.ipv4, 0)
            .context("registering the IPv4 inbound listener")?;
        if let Some(v6) = listeners.ipv6 {
            listener_map
                .set(slot * 2 + 1, &v6, 0)
                .context("registering the IPv6 inbound listener")?;
        }

        let exclusions = &pod.capture_exclusions;
        let mut ports: BpfHashMap<_, PortKey, u8> =
            BpfHashMap::try_from(self.map_mut(MAP_EXCLUDED_PORTS)?)?;
        let port_entries = exclusions
            .outbound_ports
            .iter()
            .map(|&p| (p, DIRECTION_OUTBOUND))
            .chain(
                exclusions
                    .inbound_ports
                    .iter()
                    .map(|&p| (p, DIRECTION_INBOUND)),
            );
        for (port, direction) in port_entries {
            let key = PortKey {
                slot,
                port,
                direction,
                _pad: 0,
            };
            ports.insert(key, 1, 0).context("adding a port exclusion")?;
            state.port_keys.push(key);
        }
        let mut cidrs: LpmTrie<_, CidrKey, u8> =
            LpmTrie::try_from(self.map_mut(MAP_EXCLUDED_CIDRS)?)?;
        for net in &exclusions.outbound_cidrs {
            let (addr, prefix) = match net {
                ipnet::IpNet::V4(n) => (
                    PodAddr::from_ipv4(n.network().octets()),
                    96 + u32::from(n.prefix_len()),
                ),
                ipnet::IpNet::V6(n) => (
                    PodAddr::from_ipv6(n.network().octets()),
                    u32::from(n.prefix_len()),
                ),
            };
            let key = LpmKey::new(
                32 + prefix,
                CidrKey {
                    slot_be: slot.to_be_bytes(),
                    addr,
                },
            );
            cidrs
                .insert(&key, 1, 0)
                .with_context(|| format!("adding the CIDR exclusion {net}"))?;
            state.cidr_keys.push(key);
        }

        let mut addrs: BpfHashMap<_, PodAddr, u32> =
            BpfHashMap::try_from(self.map_mut(MAP_POD_ADDRS)?)?;
        let pod_ips = pod
            .ipv4
            .map(std::net::IpAddr::V4)
            .into_iter()
            .chain(pod.ipv6.map(std::net::IpAddr::V6));
        for ip in pod_ips {
            let addr = orig_dst::ip_to_pod_addr(ip);
            addrs
                .insert(addr, slot, 0)
                .with_context(|| format!("adding pod address {ip}"))?;
            state.addrs.push(addr);
        }
        self.pods_map()?
            .insert(state.enrolment.netns_cookie, PodInfo { slot, flags: 0 }, 0)
            .context("adding the pod to the kernel's pod map")?;

        let link_dir = self.link_dir(slot);
        std::fs::create_dir_all(&link_dir)?;
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            // bpf_link attachments coexist with other tools' programs on the same
            // cgroup by themselves; the kernel wants no flags (`Single`) there.
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", pod.cgroup.display()))?;
            let link: FdLink = program.take_link(id)?.try_into()?;
            state.links.push(pin_replacing(link, &link_dir.join(name))?);
        }
        let program = sock_ops_program(&mut self.ebpf)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| {
                format!(
                    "attaching {SOCK_OPS_PROGRAM} to cgroup {}",
                    pod.cgroup.display()
                )
            })?;
        let link: FdLink = program.take_link(id)?.try_into()?;
        state
            .links
            .push(pin_replacing(link, &link_dir.join(SOCK_OPS_PROGRAM))?);
        let program = sk_lookup_program(&mut self.ebpf)?;
        let id = program.attach(netns.as_fd()).with_context(|| {
            format!(
                "attaching {SK_LOOKUP_PROGRAM} to netns {}",
                pod.netns.display()
            )
        })?;
        let link: FdLink = program.take_link(id)?.into();
        state
            .links
            .push(pin_replacing(link, &link_dir.join(SK_LOOKUP_PROGRAM))?);
        Ok(())
    }

    /// Lets go of the pinned state for a successor (handover): this agent
    /// changes nothing in the kernel from now on.
    pub fn release_pin_lock(&mut self) {
        self.pin_lock = None;
    }

    /// Takes the pinned state back after a handover that did not complete.
    pub fn retake_pin_lock(&mut self) -> Result<()> {
        if self.pin_lock.is_none() {
            self.pin_lock = Some(lock_pin_dir(&self.pin_dir, std::time::Duration::ZERO)?);
        }
        Ok(())
    }

    /// Releases a pod: detaches its programs and removes its map entries.
    pub fn release(&mut self, pod_key: &str) -> Result<()> {
        let pod = self
            .pods
            .remove(pod_key)
            .ok_or_else(|| anyhow!("pod {pod_key} is not enrolled"))?;
        self.uninstall(pod);
        Ok(())
    }

    /// Links first (so nothing runs against half-removed entries), then entries.
    fn uninstall(&mut self, pod: EnrolledPod) {
        for link in pod.links {
            match link.unpin() {
                Ok(fd_link) => drop(fd_link),
                Err(err) => tracing::warn!(error = %err, "unpinning a link failed"),
            }
        }
        let _ = std::fs::remove_dir(self.link_dir(pod.enrolment.slot));
        let slot = pod.enrolment.slot;
        self.forget_slot(
            pod.enrolment.netns_cookie,
            slot,
            &pod.addrs,
            &pod.port_keys,
            &pod.cidr_keys,
        );
    }

    fn forget_slot(
        &mut self,
        netns_cookie: u64,
        slot: u32,
        addrs: &[PodAddr],
        port_keys: &[PortKey],
        cidr_keys: &[LpmKey<CidrKey>],
    ) {
        if let Ok(mut m) = self.pods_map() {
            let _ = m.remove(&netns_cookie);
        }
        if let Ok(map) = self.map_mut(MAP_POD_ADDRS)
            && let Ok(mut m) = BpfHashMap::<_, PodAddr, u32>::try_from(map)
        {
            for addr in addrs {
                let _ = m.remove(addr);
            }
        }
        if let Ok(map) = self.map_mut(MAP_EXCLUDED_PORTS)
            && let Ok(mut m) = BpfHashMap::<_, PortKey, u8>::try_from(map)
        {
            for key in port_keys {
                let _ = m.remove(key);
            }
        }
        if let Ok(map) = self.map_mut(MAP_EXCLUDED_CIDRS)
            && let Ok(mut m) = LpmTrie::<_, CidrKey, u8>::try_from(map)
        {
            for key in cidr_keys {
                let _ = m.remove(key);
            }
        }
        if let Ok(map) = self.map_mut(MAP_INBOUND_LISTENERS)
            && let Ok(mut m) = SockMap::try_from(map)
        {
            let _ = m.clear_index(&(slot * 2));
            let _ = m.clear_index(&(slot * 2 + 1));
        }
        self.free_slots.push(slot);
    }

    /// Pods an earlier agent enrolled that are not enrolled now: detaches their
    /// pinned links and removes their entries. Call after enrolling the
    /// configured pods.
    pub fn release_inherited(&mut self) -> usize {
        let stale: Vec<(u64, u32)> = self.inherited.drain().collect();
        for &(netns_cookie, slot) in &stale {
            let dir = self.link_dir(slot);
            remove_pins(&dir);
            // Address and exclusion entries of that pod are not known any more;
            // without its pod-map entry none of them is reachable, and enrolling
            // the slot again overwrites them.
            self.forget_slot(netns_cookie, slot, &[], &[], &[]);
            tracing::info!(
                slot,
                netns_cookie,
                "released a pod enrolled by an earlier agent"
            );
        }
        stale.len()
    }

    /// Orderly stop with `onStop: release`: detach everything.
    pub fn release_all(&mut self) {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            let _ = self.release(&key);
        }
        self.release_inherited();
    }

    /// Orderly stop with `onStop: keepCapture`: leave the pinned links attached.
    pub fn keep_capture(self) {
        // Dropping a PinnedLink closes our fd; the pin keeps the link attached.
        drop(self);
    }

    pub fn enrolment(&self, pod_key: &str) -> Option<Enrolment> {
        self.pods.get(pod_key).map(|p| p.enrolment)
    }

    pub fn attachment_count(&self) -> usize {
        self.pods.values().map(|p| p.links.len()).sum()
    }

    /// A pod's counters, summed over all CPUs.
    pub fn counters(&self, pod_key: &str) -> Result<PodCounters> {
        let pod = self
            .pods
            .get(pod_key)
            .ok_or_else(|| anyhow!("pod {pod_key} is not enrolled"))?;
        self.slot_counters(pod.enrolment.slot)
    }

    pub fn slot_counters(&self, slot: u32) -> Result<PodCounters> {
        let map = self
            .ebpf
            .map(MAP_POD_COUNTERS)
            .ok_or_else(|| anyhow!("map {MAP_POD_COUNTERS} missing"))?;
        let array: PerCpuArray<_, PodCounters> = PerCpuArray::try_from(map)?;
        let mut total = PodCounters::default();
        for cpu in array.get(&slot, 0)?.iter() {
            total.accumulate(cpu);
        }
        Ok(total)
    }

    fn reset_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let mut array: PerCpuArray<_, PodCounters> =
            PerCpuArray::try_from(self.map_mut(MAP_POD_COUNTERS)?)?;
        let zeros = PerCpuValues::try_from(vec![PodCounters::default(); cpus])?;
        array
            .set(slot, zeros, 0)
            .context("resetting the pod's counters")?;
        Ok(())
    }

    fn link_dir(&self, slot: u32) -> PathBuf {
        self.pin_dir.join("links").join(format!("pod-{slot}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the kernel object"))
    }

    fn pods_map(&mut self) -> Result<BpfHashMap<&mut MapData, u64, PodInfo>> {
        Ok(BpfHashMap::try_from(self.map_mut(MAP_PODS)?)?)
    }
}

fn read_pod_map(ebpf: &mut Ebpf) -> Result<HashMap<u64, u32>> {
    let map = ebpf
        .map_mut(MAP_PODS)
        .ok_or_else(|| anyhow!("map {MAP_PODS} missing"))?;
    let pods: BpfHashMap<_, u64, PodInfo> = BpfHashMap::try_from(map)?;
    Ok(pods
        .iter()
        .filter_map(|e| e.ok())
        .map(|(cookie, info)| (cookie, info.slot))
        .collect())
}

#[allow(dead_code)]
fn _assert_link_trait<L: Link>() {}
