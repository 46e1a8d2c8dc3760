//! The signer's configuration file (`mesh-agent ca --config signer.yaml`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::authorize::ServiceAccount;
use crate::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignerConfig {
    /// The mesh's trust domain; other identities are refused.
    pub trust_domain: String,
    /// Where the Istio CA API is served (gRPC over TLS), 15012 as istiod.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP: `/metrics` and `/readyz`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// The issuing CA certificate (PEM; an intermediate may be followed by
    /// its chain) and its PKCS#8 key: a Secret only the signer mounts.
    /// Read again when they change, for a rotation.
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    /// The roots sent with every certificate (old and new during a root
    /// rotation); default the issuer certificate.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// DNS names of the signer's own serving certificate, made from the
    /// issuer at start (e.g. `mesh-ca.mesh-system.svc`).
    pub serving_names: Vec<String>,
    /// Service accounts (`namespace/name`) that may ask on behalf of the
    /// pods of their node: the node agents.
    #[serde(default = "default_trusted")]
    pub trusted_node_accounts: Vec<String>,
    /// Audiences a caller's token must be for.
    #[serde(default = "default_audiences")]
    pub token_audiences: Vec<String>,
    /// The `clusterid` callers must send (empty is accepted too).
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Certificate lifetime when a request names none.
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub default_lifetime: Duration,
    /// Longer requests are shortened to this.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A kubeconfig, for a signer outside the cluster; default in-cluster.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:15012".parse().expect("valid address")
}

fn default_admin() -> SocketAddr {
    "0.0.0.0:15014".parse().expect("valid address")
}

fn default_trusted() -> Vec<String> {
    vec!["mesh-system/mesh-agent".into()]
}

fn default_audiences() -> Vec<String> {
    vec!["istio-ca".into()]
}

fn default_cluster_id() -> String {
    "Kubernetes".into()
}

fn default_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_max_lifetime() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl SignerConfig {
    /// Reads and checks the file; errors name the file, and the line and
    /// field where serde can tell.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
        let config: Self =
            serde_yaml::from_str(&text).map_err(|e| ConfigError::from_yaml(path, &e))?;
        if config.trust_domain.is_empty() || config.trust_domain.contains(['/', ':']) {
            return Err(ConfigError::new(
                path,
                "must be a trust domain name such as cluster.local",
            )
            .with_field("trustDomain"));
        }
        if config.serving_names.is_empty() {
            return Err(ConfigError::new(
                path,
                "name at least one DNS name the node agents reach the signer by",
            )
            .with_field("servingNames"));
        }
        if let Err(bad) = config.trusted_accounts() {
            return Err(
                ConfigError::new(path, format!("{bad:?} is not `namespace/name`"))
                    .with_field("trustedNodeAccounts"),
            );
        }
        for (field, value) in [
            ("defaultLifetime", config.default_lifetime),
            ("maxLifetime", config.max_lifetime),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(path, "must be longer than zero").with_field(field));
            }
        }
        Ok(config)
    }

    /// The trusted node accounts; Err names one that is not `ns/name`.
    pub fn trusted_accounts(&self) -> Result<Vec<ServiceAccount>, String> {
        self.trusted_node_accounts
            .iter()
            .map(|entry| match entry.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(ServiceAccount {
                        namespace: ns.into(),
                        name: name.into(),
                    })
                }
                _ => Err(entry.clone()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<SignerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signer.yaml");
        std::fs::write(&path, text).unwrap();
        SignerConfig::load(&path).map_err(|e| e.to_string())
    }

    const GOOD: &str = "trustDomain: cluster.local\nissuerCert: /s/ca.crt\nissuerKey: /s/ca.key\nservingNames: [mesh-ca.mesh-system.svc]\n";

    #[test]
    fn defaults_follow_istiod_and_bad_fields_are_named() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.listen.port(), 15012);
        assert_eq!(config.token_audiences, ["istio-ca"]);
        assert_eq!(
            config.trusted_accounts().unwrap(),
            [ServiceAccount {
                namespace: "mesh-system".into(),
                name: "mesh-agent".into()
            }]
        );
        for (text, field) in [
            (
                format!("{GOOD}trustedNodeAccounts: [mesh-agent]\n"),
                "trustedNodeAccounts",
            ),
            (GOOD.replace("cluster.local", "a/b"), "trustDomain"),
            (
                GOOD.replace(
                    "servingNames: [mesh-ca.mesh-system.svc]",
                    "servingNames: []",
                ),
                "servingNames",
            ),
            (format!("{GOOD}maxLifetime: 0s\n"), "maxLifetime"),
            (format!("{GOOD}issuerKeys: /x\n"), "issuerKeys"),
        ] {
            let err = load(&text).unwrap_err();
            assert!(
                err.contains("signer.yaml") && err.contains(field),
                "{field}: {err}"
            );
        }
    }
}
