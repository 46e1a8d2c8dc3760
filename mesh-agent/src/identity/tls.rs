//! rustls configurations for node-to-node mutual TLS 1.3 (ALPN "h2"), and classification of
//! handshake failures.
//!
//! The configs are dynamic: certificates are resolved and peers verified against the
//! manager's state at handshake time, so a config can be built once and kept across
//! reloads and renewals.

use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, PeerIncompatible, ServerConfig};

use super::spiffe::SpiffeId;
use super::store::IdentityManager;
use super::verify::{PeerIdentityError, SpiffeClientVerifier, SpiffeServerVerifier};

/// The only application protocol spoken between nodes.
pub const ALPN_H2: &[u8] = b"h2";

impl IdentityManager {
    /// TLS server config presenting `local`'s certificate: TLS 1.3 only, ALPN `h2`, client
    /// certificate required, verified against the current trust bundle and required to carry
    /// a SPIFFE ID of our trust domain. Reads the manager's current state per handshake, so
    /// one config can be kept across reloads and renewals.
    ///
    /// Session resumption is disabled: a resumed session would skip verification against the
    /// current bundle, defeating rotation.
    pub fn server_config(self: &Arc<Self>, local: &SpiffeId) -> Result<Arc<ServerConfig>> {
        self.check_local(local)?;
        let mut config = ServerConfig::builder_with_provider(self.provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                manager: self.clone(),
            }))
            .with_cert_resolver(Arc::new(LocalCert {
                manager: self.clone(),
                local: local.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// TLS client config presenting `local`'s certificate: TLS 1.3 only, ALPN `h2`; the
    /// server's chain must verify against the current bundle and its SPIFFE ID must be
    /// exactly `expected_peer`.
    ///
    /// SPIFFE certificates have no DNS names, so the `ServerName` given to `connect` plays no
    /// part in verification; pass the peer's address (`ServerName::IpAddress(ip.into())`).
    /// SNI is not sent and resumption is disabled (see [`Self::server_config`]).
    pub fn client_config(
        self: &Arc<Self>,
        local: &SpiffeId,
        expected_peer: &SpiffeId,
    ) -> Result<Arc<ClientConfig>> {
        self.check_local(local)?;
        let mut config = ClientConfig::builder_with_provider(self.provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                manager: self.clone(),
                expected: expected_peer.clone(),
            }))
            .with_client_cert_resolver(Arc::new(LocalCert {
                manager: self.clone(),
                local: local.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// Configs are only built for identities we hold, to catch wiring mistakes early. (If the
    /// identity is later dropped, handshakes fail rather than present something else.)
    fn check_local(&self, local: &SpiffeId) -> Result<()> {
        self.check_trust_domain(local)?;
        if self.certified_key(local).is_none() {
            bail!("no certificate held for {local}; call ensure() first");
        }
        Ok(())
    }
}

/// Presents the current certificate for one local identity.
struct LocalCert {
    manager: Arc<IdentityManager>,
    local: SpiffeId,
}

impl LocalCert {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.manager.certified_key(&self.local);
        if key.is_none() {
            tracing::warn!(identity = %self.local, "no certificate held for local identity");
        }
        key
    }
}

impl fmt::Debug for LocalCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCert")
            .field("local", &self.local)
            .finish()
    }
}

impl ResolvesServerCert for LocalCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for LocalCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a handshake was refused, for counters and logs. Covers both our own refusals and
/// alerts from a peer that refused us (classified by the alert's meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeRejection {
    /// The client presented no certificate.
    NoClientCertificate,
    /// The chain does not lead to a root in the trust bundle (another CA).
    UnknownIssuer,
    Expired,
    NotYetValid,
    /// The server's SPIFFE ID is not the one expected.
    WrongIdentity,
    /// The peer's SPIFFE ID is in another trust domain.
    WrongTrustDomain,
    /// The certificate has no (or a malformed, or more than one) SPIFFE URI SAN.
    InvalidIdentity,
    /// Any other certificate fault (encoding, signature, key usage, or a peer's
    /// generic certificate alert).
    BadCertificate,
    /// No common TLS version (we speak TLS 1.3 only).
    ProtocolVersion,
    /// What arrived was not TLS at all (plaintext, garbage).
    NotTls,
    /// A handshake message beyond what TLS allows (e.g. a huge certificate
    /// chain): refused before it is buffered whole.
    TooLarge,
    Other(String),
}

impl HandshakeRejection {
    pub fn as_label(&self) -> &'static str {
        match self {
            HandshakeRejection::NoClientCertificate => "no_client_certificate",
            HandshakeRejection::UnknownIssuer => "unknown_issuer",
            HandshakeRejection::Expired => "expired",
            HandshakeRejection::NotYetValid => "not_yet_valid",
            HandshakeRejection::WrongIdentity => "wrong_identity",
            HandshakeRejection::WrongTrustDomain => "wrong_trust_domain",
            HandshakeRejection::InvalidIdentity => "invalid_identity",
            HandshakeRejection::BadCertificate => "bad_certificate",
            HandshakeRejection::ProtocolVersion => "protocol_version",
            HandshakeRejection::NotTls => "not_tls",
            HandshakeRejection::TooLarge => "too_large",
            HandshakeRejection::Other(_) => "other",
        }
    }
}

impl fmt::Display for HandshakeRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeRejection::Other(detail) => write!(f, "other: {detail}"),
            other => f.write_str(other.as_label()),
        }
    }
}

/// Classifies a handshake error from rustls.
pub fn classify_tls_error(err: &rustls::Error) -> HandshakeRejection {
    use HandshakeRejection as R;
    match err {
        rustls::Error::NoCertificatesPresented => R::NoClientCertificate,
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => R::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => R::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                R::NotYetValid
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<PeerIdentityError>() {
                Some(PeerIdentityError::WrongIdentity { .. }) => R::WrongIdentity,
                Some(PeerIdentityError::WrongTrustDomain { .. }) => R::WrongTrustDomain,
                Some(PeerIdentityError::Missing(_)) => R::InvalidIdentity,
                None => R::BadCertificate,
            },
            _ => R::BadCertificate,
        },
        rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13,
        ) => R::ProtocolVersion,
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => R::NoClientCertificate,
            AlertDescription::UnknownCA => R::UnknownIssuer,
            // rustls sends this alert for not-yet-valid certificates too.
            AlertDescription::CertificateExpired => R::Expired,
            AlertDescription::ProtocolVersion => R::ProtocolVersion,
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => R::BadCertificate,
            other => R::Other(format!("received alert {other:?}")),
        },
        rustls::Error::InvalidMessage(
            rustls::InvalidMessage::HandshakePayloadTooLarge
            | rustls::InvalidMessage::MessageTooLarge,
        ) => R::TooLarge,
        rustls::Error::InvalidMessage(_) => R::NotTls,
        other => R::Other(other.to_string()),
    }
}

/// Classifies an I/O error from tokio-rustls, which wraps the rustls error.
pub fn classify_io_error(err: &std::io::Error) -> HandshakeRejection {
    let mut source: Option<&(dyn std::error::Error + 'static)> = err
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify_tls_error(tls);
        }
        source = e.source();
    }
    HandshakeRejection::Other(err.to_string())
}
