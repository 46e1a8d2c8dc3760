//! The mesh-facing parts of `node.yaml`: trust domain, where workload
//! certificates come from, and the tunnel between nodes.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Where the agent gets the certificates of the workloads on its node: exactly
/// one of the two sources.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityConfig {
    /// An issuing CA given to the node: the agent mints short-lived workload
    /// certificates itself (ECDSA P-256) and renews them.
    #[serde(default)]
    pub issuer: Option<IssuerConfig>,
    /// Certificates provided as files: `<dir>/<namespace>.<serviceAccount>.crt`
    /// and `.key`, plus a trust bundle.
    #[serde(default)]
    pub files: Option<FilesConfig>,
    /// A certificate authority (istiod, or `mesh-agent ca`) asked over the
    /// Istio CA API for each local identity: the node holds no signing key.
    #[serde(default)]
    pub signing_request: Option<SigningRequestConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SigningRequestConfig {
    /// `https://host:port` of the CA.
    pub address: String,
    /// PEM roots the CA's serving certificate must chain to (istiod's
    /// `istio-ca-root-cert` ConfigMap, or the signer's).
    pub ca_roots: PathBuf,
    /// The name the CA's certificate must hold; default the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The node agent's projected service-account token (audience `istio-ca`).
    pub token_file: PathBuf,
    /// Sent as `clusterid`, as ztunnel does.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Asked-for certificate lifetime, e.g. `24h`.
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// Renew when this fraction of a certificate's lifetime has passed.
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
}

fn default_cluster_id() -> String {
    "Kubernetes".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuerConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Roots peers are verified against (may hold several, for rotation).
    /// Default: the issuer certificate.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// Lifetime of minted certificates, e.g. `24h`.
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// Renew when this fraction of the lifetime has passed.
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilesConfig {
    pub dir: PathBuf,
    pub trust_bundle: PathBuf,
}

/// The HBONE tunnel between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TunnelConfig {
    /// Pooled tunnel connections idle this long are closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A TLS handshake on the tunnel port must finish within this.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            idle_timeout: default_idle_timeout(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

pub fn default_trust_domain() -> String {
    "cluster.local".to_string()
}

fn default_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_renew_at() -> f64 {
    0.5
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
