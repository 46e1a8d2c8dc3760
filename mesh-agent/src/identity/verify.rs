//! Certificate verification for SPIFFE mutual TLS: chains are checked with webpki against the
//! manager's *current* trust bundle on every handshake, then the peer's SPIFFE ID is read from
//! its URI SAN and checked (exact ID for servers, trust domain for clients).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::KeyUsage;
use x509_parser::extensions::GeneralName;

use super::spiffe::SpiffeId;
use super::store::IdentityManager;

/// Why a peer's certificate does not carry an acceptable SPIFFE ID. Carried inside
/// `rustls::CertificateError::Other` so that [`super::classify_tls_error`] can recover it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("peer certificate has no valid SPIFFE ID: {0}")]
    Missing(String),
    #[error("peer presented {presented}, expected {expected}")]
    WrongIdentity {
        expected: SpiffeId,
        presented: SpiffeId,
    },
    #[error("peer {presented} is not in trust domain {expected}")]
    WrongTrustDomain {
        expected: String,
        presented: SpiffeId,
    },
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(e: PeerIdentityError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The roots peers' chains must lead to.
pub(crate) struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    len: usize,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.len)
    }
}

impl TrustBundle {
    /// Parses one or more PEM certificates; `path` is only used in error messages.
    pub(crate) fn from_pem(pem: &[u8], path: &Path) -> Result<Self> {
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing trust bundle {}", path.display()))?;
        if certs.is_empty() {
            bail!("trust bundle {} holds no certificates", path.display());
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "trust bundle {}: certificate #{} is not usable as a root: {e}",
                            path.display(),
                            i + 1
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TrustBundle {
            len: anchors.len(),
            anchors,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Verifies `end_entity` (with `intermediates`) up to a root of this bundle, for `usage`,
    /// at `now`, and returns its SPIFFE ID.
    pub(crate) fn verify(
        &self,
        provider: &CryptoProvider,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        Ok(spiffe_id_of(end_entity).map_err(PeerIdentityError::Missing)?)
    }
}

/// The SPIFFE ID in a certificate: exactly one URI SAN, which must parse as a workload ID.
/// The error says what is wrong.
/// The SPIFFE ID of a certificate (its single URI SAN).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|e| format!("URI SAN {uri:?}: {e}")),
        [] => Err("no URI SAN".into()),
        _ => Err("more than one URI SAN".into()),
    }
}

/// The peer's SPIFFE ID after a handshake (from its end-entity certificate's URI SAN).
/// The certificate was verified during the handshake by this module's verifiers.
pub fn peer_spiffe_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

/// Like rustls's own mapping of webpki errors, keeping the variants we classify on.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn tls12_sig(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn tls13_sig(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Server side: requires a client certificate chaining to the current bundle whose SPIFFE
/// ID is in our trust domain.
pub(crate) struct SpiffeClientVerifier {
    pub(crate) manager: Arc<IdentityManager>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.manager.trust_domain())
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to borrow from a bundle that can change under us; they are optional.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.manager.bundle().verify(
            self.manager.provider(),
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
        )?;
        if id.trust_domain() != self.manager.trust_domain() {
            return Err(PeerIdentityError::WrongTrustDomain {
                expected: self.manager.trust_domain().to_owned(),
                presented: id,
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_sig(self.manager.provider(), message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_sig(self.manager.provider(), message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.manager
            .provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server's chain must lead to the current bundle and its SPIFFE ID must be
/// exactly `expected`. The TLS server name is not used: SPIFFE certificates carry no DNS names.
pub(crate) struct SpiffeServerVerifier {
    pub(crate) manager: Arc<IdentityManager>,
    pub(crate) expected: SpiffeId,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.manager.bundle().verify(
            self.manager.provider(),
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
        )?;
        if id != self.expected {
            return Err(PeerIdentityError::WrongIdentity {
                expected: self.expected.clone(),
                presented: id,
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_sig(self.manager.provider(), message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_sig(self.manager.provider(), message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.manager
            .provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
