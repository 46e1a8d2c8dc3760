//! Istio `PeerAuthentication`: whether a workload accepts plaintext from
//! outside the mesh. mesh-agent's own traffic between nodes is always mutual
//! TLS (HBONE), as in Istio ambient; what a PeerAuthentication decides here
//! is only whether a plaintext connection into a pod is let in.
//!
//! Precedence, as Istio documents it: the workload's own policy (selector)
//! over its namespace's (no selector) over the mesh's (root namespace, no
//! selector); within the workload's policy, `portLevelMtls` over `mtls`;
//! `UNSET` (or no `mtls`) inherits from the level above; with nothing set
//! the mode is `PERMISSIVE`. Where Istio takes the oldest of two policies of
//! one level (creation time), mesh-agent, which has no creation time for a
//! file, takes the first by name.

// As in `load`: a load error is built at most once per load.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::compile::PolicyName;
use super::load::{DocCtx, LoadError, key};
use super::model::{RawMetadata, RawSelector};

pub(super) const KIND: &str = "PeerAuthentication";

/// `spec.mtls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit from the level above.
    Unset,
    /// Plaintext accepted. In ambient (and here) mesh traffic stays mutual
    /// TLS: the same as PERMISSIVE.
    Disable,
    /// Plaintext and mutual TLS accepted (Istio's default).
    Permissive,
    /// Plaintext refused.
    Strict,
}

impl MtlsMode {
    fn parse(mode: Option<&str>) -> Result<Self, String> {
        match mode {
            None | Some("UNSET") => Ok(Self::Unset),
            Some("DISABLE") => Ok(Self::Disable),
            Some("PERMISSIVE") => Ok(Self::Permissive),
            Some("STRICT") => Ok(Self::Strict),
            Some(other) => Err(format!(
                "{other:?} is not a mode (expected UNSET, DISABLE, PERMISSIVE or STRICT)"
            )),
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unset => "UNSET",
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// One loaded PeerAuthentication.
#[derive(Debug)]
pub struct PeerAuthentication {
    pub(crate) id: Arc<PolicyName>,
    /// `None`: namespace-wide (mesh-wide in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) mode: MtlsMode,
    pub(crate) port_modes: BTreeMap<u16, MtlsMode>,
    pub(crate) source: Arc<std::path::Path>,
}

impl PeerAuthentication {
    pub fn name(&self) -> &PolicyName {
        &self.id
    }
    pub fn source(&self) -> &std::path::Path {
        &self.source
    }
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }
    pub fn mode(&self) -> MtlsMode {
        self.mode
    }
    pub fn port_modes(&self) -> &BTreeMap<u16, MtlsMode> {
        &self.port_modes
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|sel| {
            sel.iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPeerAuthentication {
    #[allow(dead_code)] // checked on the lenient first pass
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    spec: Option<RawSpec>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Option<RawSelector>,
    mtls: Option<RawMtls>,
    /// Keys are port numbers; YAML may write them as integers or strings.
    port_level_mtls: Option<serde_yaml::Mapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    mode: Option<String>,
}

pub(super) fn convert(
    ctx: &DocCtx<'_>,
    raw: RawPeerAuthentication,
) -> Result<PeerAuthentication, LoadError> {
    let meta = &raw.metadata;
    let Some(namespace) = meta.namespace.clone().filter(|n| !n.is_empty()) else {
        return Err(ctx.semantic(&[key("metadata")], "missing field `namespace`".into()));
    };
    if meta.name.is_empty() {
        return Err(ctx.semantic(&[key("metadata"), key("name")], "empty name".into()));
    }
    let spec = raw.spec.unwrap_or_default();
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .filter(|labels| !labels.is_empty());
    let mode = MtlsMode::parse(spec.mtls.as_ref().and_then(|m| m.mode.as_deref()))
        .map_err(|e| ctx.semantic(&[key("spec"), key("mtls"), key("mode")], e))?;
    let mut port_modes = BTreeMap::new();
    if let Some(ports) = spec.port_level_mtls {
        let at = [key("spec"), key("portLevelMtls")];
        if selector.is_none() {
            // Istio: "portLevelMtls can only be used with a workload selector".
            return Err(ctx.semantic(
                &at,
                "portLevelMtls needs a workload selector (spec.selector.matchLabels)".into(),
            ));
        }
        for (port, mtls) in ports {
            let shown = match &port {
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::String(s) => format!("{s:?}"),
                other => format!("{other:?}"),
            };
            let mtls: RawMtls = serde_yaml::from_value(mtls)
                .map_err(|e| ctx.semantic(&at, format!("port {shown}: {e}")))?;
            let number = match &port {
                serde_yaml::Value::Number(n) => n.as_u64(),
                serde_yaml::Value::String(s) => s.parse::<u64>().ok(),
                _ => None,
            }
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| ctx.semantic(&at, format!("{shown} is not a port (1-65535)")))?;
            let port_mode = MtlsMode::parse(mtls.mode.as_deref())
                .map_err(|e| ctx.semantic(&at, format!("port {number}: {e}")))?;
            port_modes.insert(number, port_mode);
        }
    }
    Ok(PeerAuthentication {
        id: Arc::new(PolicyName {
            namespace,
            name: meta.name.clone(),
        }),
        selector,
        mode,
        port_modes,
        source: Arc::from(ctx.file),
    })
}

/// Every PeerAuthentication, indexed by namespace (each level's candidates
/// in name order).
#[derive(Debug, Default)]
pub(crate) struct PeerAuthIndex {
    root_namespace: String,
    by_namespace: HashMap<String, Vec<Arc<PeerAuthentication>>>,
}

/// What plaintext into one workload meets: the mode of each level, resolved.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkloadPeerAuth {
    /// The mode without a port-level override, and the policy that set it.
    mode: Option<(MtlsMode, Arc<PolicyName>)>,
    /// Port-level modes of the workload's own policy.
    ports: BTreeMap<u16, (MtlsMode, Arc<PolicyName>)>,
}

impl PeerAuthIndex {
    pub(crate) fn new(all: &[Arc<PeerAuthentication>], root_namespace: &str) -> Self {
        let mut by_namespace: HashMap<String, Vec<Arc<PeerAuthentication>>> = HashMap::new();
        for p in all {
            by_namespace
                .entry(p.id.namespace.clone())
                .or_default()
                .push(p.clone());
        }
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
        }
    }

    pub(crate) fn resolve(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> WorkloadPeerAuth {
        let in_namespace = |ns: &str| {
            self.by_namespace
                .get(ns)
                .map(Vec::as_slice)
                .unwrap_or_default()
        };
        let wide = |ns: &str| {
            in_namespace(ns)
                .iter()
                .find(|p| p.selector.is_none())
                .cloned()
        };
        let mut out = WorkloadPeerAuth::default();
        let set = |p: &Arc<PeerAuthentication>, out: &mut WorkloadPeerAuth| {
            if p.mode != MtlsMode::Unset {
                out.mode = Some((p.mode, p.id.clone()));
            }
        };
        if let Some(mesh) = wide(&self.root_namespace) {
            set(&mesh, &mut out);
        }
        if namespace != self.root_namespace
            && let Some(ns) = wide(namespace)
        {
            set(&ns, &mut out);
        }
        if let Some(own) = in_namespace(namespace).iter().find(|p| p.selects(labels)) {
            set(own, &mut out);
            for (port, mode) in &own.port_modes {
                if *mode != MtlsMode::Unset {
                    out.ports.insert(*port, (*mode, own.id.clone()));
                }
            }
        }
        out
    }
}

impl WorkloadPeerAuth {
    /// The policy that refuses plaintext on `port`, if one does (STRICT).
    pub(crate) fn refusing_plaintext(&self, port: u16) -> Option<&Arc<PolicyName>> {
        match self.ports.get(&port).or(self.mode.as_ref()) {
            Some((MtlsMode::Strict, by)) => Some(by),
            _ => None,
        }
    }

    /// The mode in force on `port` (PERMISSIVE when nothing is set).
    #[cfg(test)]
    pub(crate) fn mode_on(&self, port: u16) -> MtlsMode {
        self.ports
            .get(&port)
            .or(self.mode.as_ref())
            .map_or(MtlsMode::Permissive, |(mode, _)| *mode)
    }
}
