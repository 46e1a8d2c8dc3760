//! Making CAs and workload certificates with rcgen. Used by the `Issuer` identity source, and
//! by tests and the e2e suite to build PKI fixtures.

use std::fmt;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::spiffe::SpiffeId;

/// Root CAs made by [`Ca::new_root`] are valid for ten years (backdated an hour for clock skew).
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate authority that can sign workload certificates.
pub struct Ca {
    /// The CA certificate (PEM). For an intermediate, the chain above it may follow.
    pub cert_pem: String,
    /// The CA private key (PEM, PKCS#8).
    pub key_pem: String,
    /// DER of the CA cert and anything after it in `cert_pem`, appended to issued chains.
    chain: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A freshly issued workload certificate in DER form.
pub(crate) struct Issued {
    /// Leaf first, then the issuing CA (and its chain, if any).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub leaf_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A self-signed ECDSA P-256 root CA, valid for ten years.
    pub fn new_root(common_name: &str) -> Result<Ca> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - ROOT_BACKDATE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).context("self-signing CA")?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate (first PEM block; any further blocks are its chain up to,
    /// but normally excluding, the root) and its PKCS#8 private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing CA certificate PEM")?;
        let Some(ca_der) = chain.first() else {
            bail!("no CERTIFICATE block in the CA certificate PEM");
        };
        let key_der = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .context("parsing CA key PEM")?
            .context("no private key block in the CA key PEM")?;
        // ring can only load PKCS#8 keys for signing.
        let key = KeyPair::try_from(&key_der)
            .context("unsupported CA key: expected a PKCS#8 (\"PRIVATE KEY\") EC or RSA key")?;

        let (_, x509) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| anyhow::anyhow!("parsing CA certificate: {e}"))?;
        let is_ca = x509
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            bail!("the CA certificate is not a CA (basicConstraints CA:true missing)");
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!("the CA key does not match the CA certificate");
        }
        let issuer = Issuer::from_ca_cert_der(ca_der, key).context("loading CA certificate")?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            chain,
            issuer,
        })
    }

    /// DER of the CA certificate itself.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A workload certificate for `id`, valid from `not_before` to `not_after`.
    /// Returns (chain PEM: leaf then this CA, key PEM).
    pub fn issue(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String)> {
        let issued = self.issue_der(id, not_before, not_after)?;
        // cert_pem already holds the CA and its chain as PEM, in order.
        let mut chain_pem = issued.leaf_pem;
        if !chain_pem.ends_with('\n') {
            chain_pem.push('\n');
        }
        chain_pem.push_str(&self.cert_pem);
        Ok((chain_pem, issued.key_pem))
    }

    pub(crate) fn issue_der(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating key")?;
        let cert = workload_params(id, not_before, not_after)?
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing certificate for {id}"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            leaf_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a workload certificate for `id` over the key of `request`
    /// (leaf PEM). Whether the requester may have `id` is the caller's
    /// decision.
    pub fn sign_request(
        &self,
        request: &SigningRequest,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String> {
        let cert = workload_params(id, not_before, not_after)?
            .signed_by(&request.public_key, &self.issuer)
            .with_context(|| format!("signing certificate for {id}"))?;
        Ok(cert.pem())
    }

    /// A TLS server certificate for `names` (DNS), e.g. the signer's own:
    /// (chain PEM: leaf then this CA's, key PEM).
    pub fn issue_server(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating key")?;
        let mut params = CertificateParams::new(names.to_vec()).context("server names")?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the server certificate")?;
        let mut chain = cert.pem();
        if !chain.ends_with('\n') {
            chain.push('\n');
        }
        chain.push_str(&self.cert_pem);
        Ok((chain, key.serialize_pem()))
    }

    /// The certificates above the CA's own in its PEM (its intermediates'
    /// chain), one PEM each.
    pub fn chain_above_pem(&self) -> Vec<String> {
        self.chain[1..].iter().map(|der| pem_of(der)).collect()
    }

    /// The CA certificate itself as PEM.
    pub fn own_cert_pem(&self) -> String {
        pem_of(&self.chain[0])
    }
}

/// What a signing request proved: the public key its holder has.
pub struct SigningRequest {
    public_key: SubjectPublicKeyInfo,
}

impl SigningRequest {
    /// Parses a PEM PKCS#10 request and checks its signature (the requester
    /// holds the key). Everything else in it (subject, SANs, extensions) is
    /// ignored: the signer decides the identity, as istiod does.
    pub fn from_pem(csr_pem: &str) -> Result<Self> {
        use x509_parser::prelude::FromDer as _;
        let (_, block) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("the signing request is not PEM: {e}"))?;
        if block.label != "CERTIFICATE REQUEST" {
            bail!(
                "expected a CERTIFICATE REQUEST PEM block, found {}",
                block.label
            );
        }
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .map_err(|e| anyhow::anyhow!("parsing the signing request: {e}"))?;
        csr.verify_signature()
            .map_err(|e| anyhow::anyhow!("the signing request's signature does not verify: {e}"))?;
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .context("the signing request's public key")?;
        Ok(Self { public_key })
    }
}

/// A new ECDSA P-256 key, made on this node and never sent, and a signing
/// request for `id` with it (empty subject, the SPIFFE ID as the one URI
/// SAN, as ztunnel sends): (request PEM, key).
pub fn signing_request(id: &SpiffeId) -> Result<(String, KeyPair)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(id)?];
    let request = params
        .serialize_request(&key)
        .with_context(|| format!("making the signing request for {id}"))?;
    Ok((request.pem().context("signing request as PEM")?, key))
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A workload certificate's fields: the identity as the URI SAN alone
/// (rcgen marks the SAN critical when the subject is empty, as RFC 5280
/// requires), for both directions of mutual TLS.
fn workload_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams> {
    if not_after <= not_before {
        bail!("certificate for {id} would end before it starts");
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(id)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn spiffe_san(id: &SpiffeId) -> Result<SanType> {
    Ok(SanType::URI(
        id.to_string()
            .try_into()
            .context("SPIFFE ID as IA5String")?,
    ))
}

/// 128 random bits, positive (RFC 5280 wants positive serials of at most 20 bytes).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a serial number"))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}
