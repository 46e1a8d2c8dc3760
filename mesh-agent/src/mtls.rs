//! mTLS between nodes: the identities of this node's workloads, the remote mesh
//! workloads (from workloads.yaml) and the identity each must prove, and the
//! tunnel to them. Same-node traffic never needs it (it does not leave the
//! node); it keeps the source identity for policy.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};

use crate::{
    config::mesh::IdentityConfig,
    identity::{IdentityManager, IdentitySource, SigningRequestSource, SpiffeId},
    tunnel::TunnelClient,
};

/// A mesh workload on another node, reached through its node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// `namespace/name`.
    pub key: String,
    pub node: String,
    /// What its agent must prove in the TLS handshake.
    pub identity: SpiffeId,
}

pub struct Mtls {
    pub trust_domain: String,
    /// None when the node has no identity source: then nothing goes through the
    /// tunnel, and traffic to remote mesh workloads is refused.
    pub identities: Option<Arc<IdentityManager>>,
    pub tunnel: TunnelClient,
    pub handshake_timeout: Duration,
    client_configs: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<rustls::ClientConfig>>>,
    server_configs: Mutex<HashMap<SpiffeId, Arc<rustls::ServerConfig>>>,
    /// Refused tunnel handshakes and requests, by reason (both directions).
    rejections: Mutex<BTreeMap<String, u64>>,
}

impl Mtls {
    pub fn new(
        trust_domain: &str,
        identity: Option<&IdentityConfig>,
        idle_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<Self> {
        let identities = match identity {
            None => None,
            Some(cfg) => Some(Arc::new(
                IdentityManager::new(trust_domain, identity_source(cfg)?)
                    .context("loading workload identities")?,
            )),
        };
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            identities,
            tunnel: TunnelClient::new(idle_timeout),
            handshake_timeout,
            client_configs: Mutex::default(),
            server_configs: Mutex::default(),
            rejections: Mutex::default(),
        })
    }

    pub fn workload_identity(&self, namespace: &str, service_account: &str) -> Result<SpiffeId> {
        SpiffeId::new(&self.trust_domain, namespace, service_account)
            .map_err(|e| anyhow!("no valid SPIFFE ID for {namespace}/{service_account}: {e}"))
    }

    /// Makes sure certificates are held for these local identities.
    pub fn ensure_identities(&self, ids: &[SpiffeId]) -> Result<()> {
        match &self.identities {
            Some(manager) => manager.ensure(ids),
            None => Ok(()),
        }
    }

    /// TLS client config for `local` talking to `peer` (cached: the configs
    /// follow certificate and bundle changes by themselves).
    pub fn client_config(
        &self,
        local: &SpiffeId,
        peer: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let manager = self.identities.as_ref().ok_or_else(no_identity_source)?;
        let key = (local.clone(), peer.clone());
        let mut cache = self.client_configs.lock();
        if let Some(cfg) = cache.get(&key) {
            return Ok(cfg.clone());
        }
        let cfg = manager.client_config(local, peer)?;
        cache.insert(key, cfg.clone());
        Ok(cfg)
    }

    /// When `local`'s certificate in use now expires.
    pub fn certificate_expiry(&self, local: &SpiffeId) -> Option<std::time::SystemTime> {
        self.identities.as_ref()?.expiry_of(local)
    }

    pub fn server_config(&self, local: &SpiffeId) -> Result<Arc<rustls::ServerConfig>> {
        let manager = self.identities.as_ref().ok_or_else(no_identity_source)?;
        let mut cache = self.server_configs.lock();
        if let Some(cfg) = cache.get(local) {
            return Ok(cfg.clone());
        }
        let cfg = manager.server_config(local)?;
        cache.insert(local.clone(), cfg.clone());
        Ok(cfg)
    }

    pub fn count_rejection(&self, reason: &str) {
        *self
            .rejections
            .lock()
            .entry(reason.to_string())
            .or_default() += 1;
    }

    pub fn rejections(&self) -> BTreeMap<String, u64> {
        self.rejections.lock().clone()
    }
}

fn no_identity_source() -> anyhow::Error {
    anyhow!("this node has no identity source (node.yaml `identity`), so it cannot use mutual TLS")
}

fn identity_source(cfg: &IdentityConfig) -> Result<IdentitySource> {
    if let Some(issuer) = &cfg.issuer {
        return Ok(IdentitySource::Issuer {
            cert: issuer.cert.clone(),
            key: issuer.key.clone(),
            trust_bundle: issuer.trust_bundle.clone(),
            lifetime: issuer.lifetime,
            renew_at: issuer.renew_at,
        });
    }
    if let Some(files) = &cfg.files {
        return Ok(IdentitySource::Files {
            dir: files.dir.clone(),
            trust_bundle: files.trust_bundle.clone(),
        });
    }
    if let Some(asked) = &cfg.signing_request {
        return Ok(IdentitySource::SigningRequest(SigningRequestSource {
            address: asked.address.clone(),
            ca_roots: asked.ca_roots.clone(),
            server_name: asked.server_name.clone(),
            token_file: asked.token_file.clone(),
            cluster_id: asked.cluster_id.clone(),
            lifetime: asked.lifetime,
            renew_at: asked.renew_at,
        }));
    }
    Err(anyhow!(
        "identity: give `signingRequest`, `issuer` or `files`"
    ))
}
