//! The kernel probe, run before anything is loaded: every program type,
//! attach type, map type, helper and socket option the agent uses is tried on
//! its own, so a kernel that lacks one is refused with the feature's name and
//! the first Linux release that has it, instead of failing later with a
//! verifier log. Features only the fast path needs switch the fast path off
//! (a fallback shown in `/status`) rather than stop the agent.
//!
//! `MESH_KERNEL_MASK` (feature ids, comma-separated) makes the probe treat
//! those features as missing: how the refusal and the fallbacks are tested on
//! kernels that have everything.

use std::{fmt, os::fd::FromRawFd as _};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};
use serde::{Deserialize, Serialize};

/// The environment variable naming features to treat as missing.
pub const MASK_ENV: &str = "MESH_KERNEL_MASK";

/// What depends on a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    /// Capture, delivery or the pinned state: without it the agent does not
    /// start.
    Always,
    /// Only the same-node fast path: without it the fast path is off.
    FastPath,
}

enum Check {
    Program(ProgramType),
    /// A program type with the attach type it is loaded for (the hook).
    Hook(bpf_prog_type, bpf_attach_type),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// getsockopt(SO_NETNS_COOKIE).
    NetnsCookieSocketOption,
    /// A cgroup v2 hierarchy: programs attach to pods' cgroups there.
    Cgroup2,
}

struct Feature {
    /// Short name, as `MESH_KERNEL_MASK` takes it.
    id: &'static str,
    what: &'static str,
    /// The first Linux release that has it.
    since: &'static str,
    needed: Needed,
    check: Check,
}

/// Everything the kernel object and the agent use, oldest first. Program
/// types' links (cgroup links: 5.7; netns links for sk_lookup: 5.9) came
/// with or before the helpers below that need 5.7 and 5.9.
const FEATURES: &[Feature] = &[
    Feature {
        id: "cgroup2",
        what: "a mounted cgroup v2 hierarchy (programs attach to pods' cgroups)",
        since: "4.5",
        needed: Needed::Always,
        check: Check::Cgroup2,
    },
    Feature {
        id: "sock_ops",
        what: "sock_ops programs",
        since: "4.13",
        needed: Needed::Always,
        check: Check::Program(ProgramType::SockOps),
    },
    Feature {
        id: "lpm_trie",
        what: "LPM trie maps (captureExclusions CIDRs)",
        since: "4.11",
        needed: Needed::Always,
        check: Check::Map(MapType::LpmTrie),
    },
    Feature {
        id: "lru_hash",
        what: "LRU hash maps",
        since: "4.10",
        needed: Needed::Always,
        check: Check::Map(MapType::LruHash),
    },
    Feature {
        id: "sockmap",
        what: "socket maps (sk_lookup's listeners)",
        since: "4.14",
        needed: Needed::Always,
        check: Check::Map(MapType::SockMap),
    },
    Feature {
        id: "connect_hook",
        what: "cgroup connect4/connect6 hooks (outbound capture)",
        since: "4.17",
        needed: Needed::Always,
        check: Check::Hook(
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        ),
    },
    Feature {
        id: "sendmsg_hook",
        what: "cgroup sendmsg4/sendmsg6 hooks (DNS capture)",
        since: "4.18",
        needed: Needed::Always,
        check: Check::Hook(
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        ),
    },
    Feature {
        id: "sockhash",
        what: "socket hash maps",
        since: "4.18",
        needed: Needed::Always,
        check: Check::Map(MapType::SockHash),
    },
    Feature {
        id: "socket_cookie_in_sock_addr",
        what: "bpf_get_socket_cookie from cgroup sock_addr programs",
        since: "4.19",
        needed: Needed::Always,
        check: Check::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
    },
    Feature {
        id: "socket_cookie_in_sock_ops",
        what: "bpf_get_socket_cookie from sock_ops programs",
        since: "4.19",
        needed: Needed::Always,
        check: Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    },
    Feature {
        id: "recvmsg_hook",
        what: "cgroup recvmsg4/recvmsg6 hooks (DNS answers' source)",
        since: "5.2",
        needed: Needed::Always,
        check: Check::Hook(
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
        ),
    },
    Feature {
        id: "sk_lookup_tcp_in_sock_addr",
        what: "bpf_sk_lookup_tcp/udp from cgroup sock_addr programs (is the agent listening)",
        since: "5.2",
        needed: Needed::Always,
        check: Check::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_lookup_tcp,
        ),
    },
    Feature {
        id: "netns_cookie_in_sock_addr",
        what: "bpf_get_netns_cookie from cgroup sock_addr programs",
        since: "5.7",
        needed: Needed::Always,
        check: Check::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    },
    Feature {
        id: "getpeername_hook",
        what: "cgroup getpeername4/getpeername6 hooks (applications see the address they dialled)",
        since: "5.8",
        needed: Needed::Always,
        check: Check::Hook(
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        ),
    },
    Feature {
        id: "ringbuf",
        what: "ring buffer maps (the kernel programs' log)",
        since: "5.8",
        needed: Needed::Always,
        check: Check::Map(MapType::RingBuf),
    },
    Feature {
        id: "sk_lookup",
        what: "sk_lookup programs (inbound capture)",
        since: "5.9",
        needed: Needed::Always,
        check: Check::Program(ProgramType::SkLookup),
    },
    Feature {
        id: "so_netns_cookie",
        what: "the SO_NETNS_COOKIE socket option (which pod a socket is in)",
        since: "5.14",
        needed: Needed::Always,
        check: Check::NetnsCookieSocketOption,
    },
    Feature {
        id: "netns_cookie_in_sock_ops",
        what: "bpf_get_netns_cookie from sock_ops programs",
        since: "5.15",
        needed: Needed::Always,
        check: Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
    Feature {
        id: "sk_msg",
        what: "sk_msg programs",
        since: "4.17",
        needed: Needed::FastPath,
        check: Check::Program(ProgramType::SkMsg),
    },
    Feature {
        id: "msg_redirect_hash",
        what: "bpf_msg_redirect_hash from sk_msg programs",
        since: "4.18",
        needed: Needed::FastPath,
        check: Check::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    },
    Feature {
        id: "netns_cookie_in_sk_msg",
        what: "bpf_get_netns_cookie from sk_msg programs",
        since: "5.15",
        needed: Needed::FastPath,
        check: Check::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
];

/// A feature the kernel lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MissingFeature {
    pub id: String,
    pub feature: String,
    /// The first Linux release that has it.
    pub since: String,
    /// Whether it was only treated as missing (`MESH_KERNEL_MASK`).
    pub masked: bool,
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] (Linux {}", self.feature, self.id, self.since)?;
        if self.masked {
            write!(f, "; masked by {MASK_ENV}")?;
        }
        write!(f, ")")
    }
}

/// What the probe found: `/status`'s `kernel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelSupport {
    /// `uname -r`.
    pub release: String,
    pub features_checked: usize,
    /// Missing features the agent cannot start without.
    pub missing: Vec<MissingFeature>,
    /// Missing features with a fallback: (feature, the fallback taken).
    pub fallbacks: Vec<Fallback>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    pub missing: MissingFeature,
    pub fallback: String,
}

/// Why the probe could not run at all.
#[derive(Debug)]
pub struct ProbeError(String);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

/// The fallback taken when the fast path's features are missing.
const FAST_PATH_OFF: &str = "the same-node fast path is off (connections are relayed by the agent)";

/// Probes the running kernel, treating the features `MESH_KERNEL_MASK` names
/// as missing. Needs the privileges the agent runs with (CAP_BPF,
/// CAP_SYS_ADMIN): without them it fails with why.
pub fn probe() -> Result<KernelSupport, ProbeError> {
    let mask = std::env::var(MASK_ENV).unwrap_or_default();
    let mask: Vec<&str> = mask
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(unknown) = mask
        .iter()
        .find(|id| !FEATURES.iter().any(|f| f.id == **id))
    {
        return Err(ProbeError(format!(
            "{MASK_ENV} names {unknown:?}, which is not a feature the probe checks (known: {})",
            FEATURES.iter().map(|f| f.id).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut results = Vec::with_capacity(FEATURES.len());
    for feature in FEATURES {
        let present = present(&feature.check)
            .map_err(|e| ProbeError(format!("probing {}: {e}", feature.what)))?;
        let masked = mask.contains(&feature.id);
        results.push((feature, present && !masked, masked));
    }
    Ok(support_from(release(), &results))
}

/// The report from each feature's outcome: (feature, present, masked).
fn support_from(release: String, results: &[(&Feature, bool, bool)]) -> KernelSupport {
    let missing = |needed: Needed| {
        results
            .iter()
            .filter(move |(f, present, _)| f.needed == needed && !present)
            .map(|(f, _, masked)| MissingFeature {
                id: f.id.to_string(),
                feature: f.what.to_string(),
                since: f.since.to_string(),
                masked: *masked,
            })
    };
    KernelSupport {
        release,
        features_checked: results.len(),
        missing: missing(Needed::Always).collect(),
        fallbacks: missing(Needed::FastPath)
            .map(|missing| Fallback {
                missing,
                fallback: FAST_PATH_OFF.to_string(),
            })
            .collect(),
    }
}

impl KernelSupport {
    /// Ok when nothing the agent cannot do without is missing; else an error
    /// naming each missing feature with the release that brought it.
    pub fn require_all(&self) -> anyhow::Result<()> {
        if self.missing.is_empty() {
            return Ok(());
        }
        let newest = self
            .missing
            .iter()
            .map(|m| m.since.as_str())
            .max_by_key(|v| release_key(v))
            .unwrap_or_default();
        anyhow::bail!(
            "this kernel ({}) lacks what the agent needs: {}. It needs Linux {newest} or later \
             for these; the oldest kernel tested is {MINIMUM_TESTED} (docs/kernels.md)",
            self.release,
            self.missing
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    /// Whether the fast path can run here; else why not.
    pub fn fast_path_unavailable(&self) -> Option<String> {
        if self.fallbacks.is_empty() {
            return None;
        }
        Some(format!(
            "the kernel lacks {}",
            self.fallbacks
                .iter()
                .map(|f| f.missing.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }
}

/// The oldest kernel the kernel matrix (`cargo xtask test --kernel`) runs.
pub const MINIMUM_TESTED: &str = "6.1";

/// "5.15" -> (5, 15) for comparing releases.
fn release_key(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

fn present(check: &Check) -> Result<bool, String> {
    match check {
        Check::Program(program) => is_program_supported(*program).map_err(|e| e.to_string()),
        Check::Map(map) => is_map_supported(*map).map_err(|e| e.to_string()),
        Check::Helper(program, helper) => {
            is_helper_supported(*program, *helper).map_err(|e| e.to_string())
        }
        Check::Hook(program, attach) => hook_supported(*program, *attach),
        Check::NetnsCookieSocketOption => {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            Ok(super::socket_netns_cookie(std::os::fd::AsFd::as_fd(&socket)).is_ok())
        }
        Check::Cgroup2 => Ok(std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| e.to_string())?
            .lines()
            .any(|line| {
                line.split(" - ")
                    .nth(1)
                    .is_some_and(|f| f.starts_with("cgroup2 "))
            })),
    }
}

/// Loads `r0 = 1; exit` as `program` for the hook `attach` (aya probes
/// program types with one attach type only). EINVAL/E2BIG with no verifier
/// output: the kernel does not know the pair; EPERM: not privileged.
fn hook_supported(program: bpf_prog_type, attach: bpf_attach_type) -> Result<bool, String> {
    let mut insns: [bpf_insn; 2] = unsafe { std::mem::zeroed() };
    // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 1.
    insns[0].code = 0xb7;
    insns[0].imm = 1;
    // BPF_JMP | BPF_EXIT.
    insns[1].code = 0x95;
    let license = c"GPL";
    // SAFETY: an all-zero bpf_attr is valid; the union's prog-load member is
    // the one BPF_PROG_LOAD reads.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = program as u32;
    load.expected_attach_type = attach as u32;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    // SAFETY: bpf(2) with a valid attr of its full size; the instructions and
    // license outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_LOAD as libc::c_int,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::E2BIG) => Ok(false),
        _ => Err(format!("bpf(BPF_PROG_LOAD): {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(missing: &[&str]) -> KernelSupport {
        let results: Vec<(&Feature, bool, bool)> = FEATURES
            .iter()
            .map(|f| (f, !missing.contains(&f.id), false))
            .collect();
        support_from("5.10.0-test".to_string(), &results)
    }

    #[test]
    fn a_kernel_with_everything_is_accepted_with_no_fallback() {
        let support = outcome(&[]);
        assert!(support.require_all().is_ok());
        assert_eq!(support.fast_path_unavailable(), None);
        assert_eq!(support.features_checked, FEATURES.len());
    }

    #[test]
    fn a_missing_required_feature_is_refused_naming_it_and_the_release_that_has_it() {
        let support = outcome(&["sk_lookup", "netns_cookie_in_sock_ops"]);
        let err = support.require_all().unwrap_err().to_string();
        assert!(err.contains("5.10.0-test"), "{err}");
        assert!(
            err.contains("sk_lookup programs (inbound capture) [sk_lookup] (Linux 5.9)"),
            "{err}"
        );
        assert!(
            err.contains("[netns_cookie_in_sock_ops] (Linux 5.15)"),
            "{err}"
        );
        assert!(err.contains("needs Linux 5.15 or later"), "{err}");
    }

    #[test]
    fn a_missing_fast_path_feature_turns_the_fast_path_off_and_the_agent_still_starts() {
        let support = outcome(&["netns_cookie_in_sk_msg"]);
        assert!(support.require_all().is_ok());
        let why = support.fast_path_unavailable().expect("fast path off");
        assert!(
            why.contains("bpf_get_netns_cookie from sk_msg programs"),
            "{why}"
        );
        assert_eq!(support.fallbacks[0].fallback, FAST_PATH_OFF);
    }

    /// The probes themselves, on this kernel: a pair it has is found, pairs
    /// no kernel has are not (so a missing feature would be seen). Loading
    /// test programs needs root: under CI a non-root run fails.
    #[test]
    fn the_probes_tell_a_pair_the_kernel_has_from_one_it_has_not() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").is_err(),
                "CI=true: the kernel probe test needs root"
            );
            eprintln!(
                "SKIPPED the_probes_tell_a_pair_the_kernel_has_from_one_it_has_not: not root"
            );
            return;
        }
        let sock_addr = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
        assert_eq!(
            hook_supported(sock_addr, bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME),
            Ok(true)
        );
        // A sock_addr program for a packet hook: no kernel has the pair.
        assert_eq!(
            hook_supported(sock_addr, bpf_attach_type::BPF_CGROUP_INET_INGRESS),
            Ok(false)
        );
        // bpf_sk_assign is for sk_lookup (and tc), never for sock_ops.
        assert_eq!(
            present(&Check::Helper(
                ProgramType::SockOps,
                BpfHelper::BPF_FUNC_sk_assign
            )),
            Ok(false)
        );
        assert_eq!(
            present(&Check::Helper(
                ProgramType::SkLookup,
                BpfHelper::BPF_FUNC_sk_assign
            )),
            Ok(true)
        );
        // The agent's own features, all present on the kernels it is tested on.
        let mut missing = Vec::new();
        for feature in FEATURES {
            if present(&feature.check) != Ok(true) {
                missing.push(feature.id);
            }
        }
        assert!(missing.is_empty(), "missing here: {missing:?}");
    }

    /// docs/kernels.md has a row for every feature, with its release.
    #[test]
    fn every_feature_is_documented_with_its_release() {
        let doc = include_str!("../../../docs/kernels.md");
        for f in FEATURES {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", f.id)))
                .unwrap_or_else(|| panic!("{} has no row in docs/kernels.md", f.id));
            assert!(row.contains(&format!("| {} |", f.since)), "{row}");
        }
    }

    #[test]
    fn every_feature_id_is_unique_and_every_release_parses() {
        for (i, f) in FEATURES.iter().enumerate() {
            assert!(
                FEATURES[i + 1..].iter().all(|g| g.id != f.id),
                "{} twice",
                f.id
            );
            assert_ne!(release_key(f.since), (0, 0), "{}", f.since);
        }
        assert!(release_key("5.15") > release_key("5.9"));
    }
}
