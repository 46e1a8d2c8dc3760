//! The kernel side: loads the programs built from `mesh-ebpf`, attaches them to
//! the cgroups of enrolled pods, and reads their per-pod counters.

pub mod bpffs;
mod netns;

use std::{collections::BTreeMap, fs::File, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, PerCpuArray, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr, cgroup_sock_addr::CgroupSockAddrLinkId},
    util::nr_cpus,
};
use mesh_common::{MAP_POD_COUNTERS, MAP_PODS, MAX_PODS, PodCounters, PodInfo};

pub use netns::netns_cookie;

use crate::config::PodConfig;

/// The kernel object, built by mesh-agent's build script from mesh-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Programs attached to every enrolled pod's cgroup.
const POD_PROGRAMS: [&str; 2] = ["mesh_connect4", "mesh_connect6"];

/// What the kernel knows about one enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrolment {
    pub netns_cookie: u64,
    pub slot: u32,
}

struct EnrolledPod {
    enrolment: Enrolment,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

/// The loaded kernel programs and the pods they are attached to. Dropping it
/// detaches every program (the links belong to this process).
pub struct KernelPrograms {
    ebpf: Ebpf,
    pods: BTreeMap<String, EnrolledPod>,
    free_slots: Vec<u32>,
}

impl KernelPrograms {
    /// Loads and verifies the programs; kernel log records at or above
    /// `kernel_log_level` are forwarded into the agent's log.
    pub fn load(kernel_log_level: log::LevelFilter) -> Result<Self> {
        let level = kernel_log_level as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .context("loading the kernel programs (needs root: CAP_BPF, CAP_SYS_ADMIN)")?;
        start_kernel_log_forwarding(&mut ebpf);
        for name in POD_PROGRAMS {
            cgroup_program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel rejected program {name}"))?;
        }
        Ok(Self {
            ebpf,
            pods: BTreeMap::new(),
            free_slots: (0..MAX_PODS).rev().collect(),
        })
    }

    /// Names of the loaded programs.
    pub fn program_names(&self) -> Vec<&'static str> {
        POD_PROGRAMS.to_vec()
    }

    /// Enrols a pod: records it in the pod map, then attaches the programs to its
    /// cgroup. On error nothing of it is left behind.
    pub fn enrol(&mut self, pod: &PodConfig) -> Result<Enrolment> {
        let key = pod.key();
        if let Some(existing) = self.pods.get(&key) {
            return Ok(existing.enrolment);
        }
        let netns_cookie = netns_cookie(&pod.netns)?;
        let cgroup = File::open(&pod.cgroup)
            .with_context(|| format!("opening the pod's cgroup {}", pod.cgroup.display()))?;
        if !cgroup.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(anyhow!(
                "{} is not a cgroup directory",
                pod.cgroup.display()
            ));
        }
        let slot = self
            .free_slots
            .pop()
            .ok_or_else(|| anyhow!("all {MAX_PODS} pod slots are in use"))?;
        let enrolment = Enrolment { netns_cookie, slot };
        let result = self.attach(enrolment, &cgroup, &pod.cgroup);
        match result {
            Ok(links) => {
                self.pods.insert(key, EnrolledPod { enrolment, links });
                Ok(enrolment)
            }
            Err(err) => {
                self.pods_map()
                    .and_then(|mut m| m.remove(&netns_cookie).map_err(Into::into))
                    .ok();
                self.free_slots.push(slot);
                Err(err)
            }
        }
    }

    fn attach(
        &mut self,
        enrolment: Enrolment,
        cgroup: &File,
        cgroup_path: &Path,
    ) -> Result<Vec<(&'static str, CgroupSockAddrLinkId)>> {
        self.reset_counters(enrolment.slot)?;
        // The map entry goes first, so the programs never see an attached pod
        // they do not know.
        self.pods_map()?
            .insert(
                enrolment.netns_cookie,
                PodInfo {
                    slot: enrolment.slot,
                    flags: 0,
                },
                0,
            )
            .context("adding the pod to the kernel's pod map")?;
        let mut links = Vec::new();
        for name in POD_PROGRAMS {
            // Attached through bpf_link, which coexists with other tools' programs on
            // the same cgroup by itself; the kernel wants no flags (`Single`) there
            // and rejects ALLOW_MULTI.
            match cgroup_program(&mut self.ebpf, name)?.attach(cgroup, CgroupAttachMode::Single) {
                Ok(link) => links.push((name, link)),
                Err(err) => {
                    self.detach(links);
                    return Err(anyhow!(err)).with_context(|| {
                        format!("attaching {name} to cgroup {}", cgroup_path.display())
                    });
                }
            }
        }
        Ok(links)
    }

    /// Releases a pod: detaches the programs from its cgroup and forgets it.
    pub fn release(&mut self, pod_key: &str) -> Result<()> {
        let Some(pod) = self.pods.remove(pod_key) else {
            return Ok(());
        };
        self.detach(pod.links);
        self.pods_map()?
            .remove(&pod.enrolment.netns_cookie)
            .context("removing the pod from the kernel's pod map")?;
        self.free_slots.push(pod.enrolment.slot);
        Ok(())
    }

    fn detach(&mut self, links: Vec<(&'static str, CgroupSockAddrLinkId)>) {
        for (name, link) in links {
            let detached = cgroup_program(&mut self.ebpf, name)
                .and_then(|p| p.detach(link).map_err(Into::into));
            if let Err(err) = detached {
                tracing::warn!(program = name, error = %err, "detaching failed");
            }
        }
    }

    /// The enrolment of a pod, if it is enrolled.
    pub fn enrolment(&self, pod_key: &str) -> Option<Enrolment> {
        self.pods.get(pod_key).map(|p| p.enrolment)
    }

    /// Number of program attachments in place.
    pub fn attachment_count(&self) -> usize {
        self.pods.values().map(|p| p.links.len()).sum()
    }

    /// A pod's counters, summed over all CPUs.
    pub fn counters(&self, pod_key: &str) -> Result<PodCounters> {
        let pod = self
            .pods
            .get(pod_key)
            .ok_or_else(|| anyhow!("pod {pod_key} is not enrolled"))?;
        let map = self
            .ebpf
            .map(MAP_POD_COUNTERS)
            .ok_or_else(|| anyhow!("map {MAP_POD_COUNTERS} missing"))?;
        let array: PerCpuArray<_, PodCounters> = PerCpuArray::try_from(map)?;
        let per_cpu = array.get(&pod.enrolment.slot, 0)?;
        let mut total = PodCounters::default();
        for cpu in per_cpu.iter() {
            total.accumulate(cpu);
        }
        Ok(total)
    }

    fn reset_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let map = self
            .ebpf
            .map_mut(MAP_POD_COUNTERS)
            .ok_or_else(|| anyhow!("map {MAP_POD_COUNTERS} missing"))?;
        let mut array: PerCpuArray<_, PodCounters> = PerCpuArray::try_from(map)?;
        let zeros = PerCpuValues::try_from(vec![PodCounters::default(); cpus])?;
        array
            .set(slot, zeros, 0)
            .context("resetting the pod's counters")?;
        Ok(())
    }

    fn pods_map(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, u64, PodInfo>> {
        let map = self
            .ebpf
            .map_mut(MAP_PODS)
            .ok_or_else(|| anyhow!("map {MAP_PODS} missing"))?;
        Ok(BpfHashMap::try_from(map)?)
    }
}

fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} is missing from the kernel object"))?;
    Ok(program.try_into()?)
}

/// Forwards records of aya-log-ebpf into the agent's log (through the `log` facade,
/// which tracing-subscriber picks up).
fn start_kernel_log_forwarding(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::warn!(error = %err, "kernel log forwarding is off");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer fd, which stays open and the same for
    // as long as the logger lives inside the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(error = %err, "kernel log forwarding is off");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(err) => {
                    tracing::warn!(error = %err, "kernel log forwarding stopped");
                    return;
                }
            }
        }
    });
}
