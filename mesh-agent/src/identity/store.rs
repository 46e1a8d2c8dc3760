//! The identity manager: holds the trust bundle and one certificate + key per local workload
//! identity, loaded from files or minted from an issuing CA, and swaps them atomically on
//! reload and renewal.

use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Serialize;
use webpki::KeyUsage;

use super::ca::Ca;
use super::spiffe::SpiffeId;
use super::verify::{TrustBundle, spiffe_id_of};

/// Minted certificates start this much in the past, so peers whose clocks lag a little do
/// not see them as not yet valid.
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(60);
/// Default fraction of a minted certificate's lifetime after which it is renewed.
pub const DEFAULT_RENEW_AT: f64 = 0.5;

/// Where certificates come from (chosen in the node config).
#[derive(Debug, Clone, PartialEq)]
pub enum IdentitySource {
    /// Files: for each identity, `<dir>/<namespace>.<service-account>.crt` (PEM chain, leaf
    /// first) and `.key` (PEM PKCS#8/SEC1/PKCS#1), and a CA bundle file (PEM, one or more
    /// roots).
    Files { dir: PathBuf, trust_bundle: PathBuf },
    /// An issuing CA given to the node: the agent mints short-lived ECDSA P-256 certificates
    /// itself, valid for `lifetime` and renewed once `renew_at` (a fraction of the lifetime,
    /// see [`DEFAULT_RENEW_AT`]) has passed. The trust bundle is the certificates in the
    /// issuer's cert file unless `trust_bundle` names a file (which may hold several roots,
    /// for rotation). The issuer key must be PKCS#8.
    Issuer {
        cert: PathBuf,
        key: PathBuf,
        trust_bundle: Option<PathBuf>,
        lifetime: Duration,
        renew_at: f64,
    },
    /// A certificate authority asked over the Istio CA API: the node makes a
    /// key per identity, sends a signing request on its pods' behalf and never
    /// holds a signing key (see `identity::requester`, which does the asking).
    /// The trust bundle is the roots the CA sends with each certificate, the
    /// CA's own root file until the first answer.
    SigningRequest(SigningRequestSource),
}

/// Where and how to ask for certificates (node.yaml `identity.signingRequest`).
#[derive(Debug, Clone, PartialEq)]
pub struct SigningRequestSource {
    /// `https://host:port` of istiod or `mesh-agent ca`.
    pub address: String,
    /// PEM roots the CA's serving certificate must chain to.
    pub ca_roots: PathBuf,
    /// The name the CA's certificate must hold (default: the address's host).
    pub server_name: Option<String>,
    /// The node agent's projected service-account token (audience `istio-ca`),
    /// re-read for every request since the kubelet rotates it.
    pub token_file: PathBuf,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
    /// Asked-for certificate lifetime.
    pub lifetime: Duration,
    /// Renew when this fraction of a certificate's lifetime has passed.
    pub renew_at: f64,
}

/// How a held certificate was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    Minted,
    File,
    /// Signed by a certificate authority on this node's request.
    Requested,
}

impl CertSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CertSource::Minted => "minted",
            CertSource::File => "file",
            CertSource::Requested => "requested",
        }
    }
}

/// A certificate held by the manager, for status and metrics (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateInfo {
    pub identity: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub source: CertSource,
    /// Serial number, lowercase hex.
    pub serial: String,
}

struct HeldCert {
    key: Arc<CertifiedKey>,
    info: CertificateInfo,
    /// Minted and requested certificates: when to renew.
    renew_after: Option<SystemTime>,
    /// File certificates: the raw (cert, key) file contents, to notice replaced files.
    file_contents: Option<(Vec<u8>, Vec<u8>)>,
}

/// The wall clock certificates are minted, renewed and judged by. The agent
/// uses the system's; tests inject their own, so certificate-time behaviour
/// is tested without moving the machine's clock.
pub trait WallClock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

struct State {
    bundle: Arc<TrustBundle>,
    /// With a `SigningRequest` source: the roots PEM the CA last sent (the
    /// bundle is made from it), to notice a rotation.
    requested_roots: Option<String>,
    issuer: Option<Arc<Ca>>,
    certs: BTreeMap<SpiffeId, Arc<HeldCert>>,
}

/// Holds workload certificates and the trust bundle; `Send + Sync`, used behind `Arc`.
///
/// Handshakes only take a read lock briefly to clone an `Arc` out of the current state, so
/// rotating material never blocks or breaks them. All methods do blocking file I/O; call
/// them from `spawn_blocking` if that matters.
pub struct IdentityManager {
    trust_domain: String,
    source: IdentitySource,
    provider: Arc<CryptoProvider>,
    clock: Arc<dyn WallClock>,
    state: RwLock<State>,
    /// Serialises ensure/reload/renew so that none undoes another's work.
    update: Mutex<()>,
    /// The identities last asked for, so missing ones can be tried again
    /// when the files change.
    wanted: Mutex<Vec<SpiffeId>>,
    /// Woken when the wanted identities change (the requester waits on it).
    wanted_changed: tokio::sync::Notify,
    /// How asking the CA goes (`SigningRequest` source only).
    requests: Mutex<RequestHealth>,
}

/// How asking the certificate authority goes, for `/status`, readiness and
/// metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestHealth {
    pub succeeded: u64,
    pub failed: u64,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("IdentityManager")
            .field("trust_domain", &self.trust_domain)
            .field("source", &self.source)
            .field("bundle", &state.bundle)
            .field("certs", &state.certs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl IdentityManager {
    /// Loads the trust bundle (and, for `Issuer`, the issuing CA) now.
    pub fn new(trust_domain: &str, source: IdentitySource) -> Result<Self> {
        Self::with_clock(trust_domain, source, Arc::new(SystemClock))
    }

    /// As [`Self::new`], on `clock` instead of the system's.
    pub fn with_clock(
        trust_domain: &str,
        source: IdentitySource,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self> {
        // Validates the trust domain with the same rules as IDs.
        SpiffeId::new(trust_domain, "x", "x")
            .with_context(|| format!("invalid trust domain {trust_domain:?}"))?;
        let schedule = match &source {
            IdentitySource::Issuer {
                lifetime, renew_at, ..
            } => Some((lifetime, renew_at)),
            IdentitySource::SigningRequest(asked) => Some((&asked.lifetime, &asked.renew_at)),
            IdentitySource::Files { .. } => None,
        };
        if let Some((lifetime, renew_at)) = schedule {
            if lifetime.is_zero() {
                bail!("certificate lifetime must be positive");
            }
            if !(*renew_at > 0.0 && *renew_at <= 1.0) {
                bail!("renew_at must be a fraction in (0, 1], got {renew_at}");
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (bundle, issuer) = load_roots(&source)?;
        let manager = IdentityManager {
            trust_domain: trust_domain.to_owned(),
            source,
            provider,
            clock,
            state: RwLock::new(State {
                bundle,
                requested_roots: None,
                issuer,
                certs: BTreeMap::new(),
            }),
            update: Mutex::new(()),
            wanted: Mutex::default(),
            wanted_changed: tokio::sync::Notify::new(),
            requests: Mutex::default(),
        };
        Ok(manager)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn source(&self) -> &IdentitySource {
        &self.source
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The bundle in force now.
    pub(crate) fn bundle(&self) -> Arc<TrustBundle> {
        self.read().bundle.clone()
    }

    /// Number of roots in the bundle in force now.
    pub fn trust_bundle_len(&self) -> usize {
        self.read().bundle.len()
    }

    /// The certificate and key held for `id` now, if any.
    pub(crate) fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.read().certs.get(id).map(|h| h.key.clone())
    }

    pub(crate) fn check_trust_domain(&self, id: &SpiffeId) -> Result<()> {
        if id.trust_domain() != self.trust_domain {
            bail!(
                "{id} is not in this node's trust domain {}",
                self.trust_domain
            );
        }
        Ok(())
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    fn lock_updates(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.update.lock()
    }

    /// Makes sure certificates are held for exactly these identities: loads or mints missing
    /// ones and forgets the others. Best effort: identities that fail (other trust domain,
    /// missing files) are skipped and reported in the error, the rest are applied.
    pub fn ensure(&self, ids: &[SpiffeId]) -> Result<()> {
        let _guard = self.lock_updates();
        *self.wanted.lock() = ids.to_vec();
        self.wanted_changed.notify_one();
        let requested = matches!(self.source, IdentitySource::SigningRequest(_));
        let (bundle, issuer, held) = {
            let s = self.read();
            (s.bundle.clone(), s.issuer.clone(), s.certs.clone())
        };
        let mut next = BTreeMap::new();
        let mut failures = Vec::new();
        for id in ids {
            if next.contains_key(id) {
                continue;
            }
            if let Err(e) = self.check_trust_domain(id) {
                failures.push(e);
                continue;
            }
            if let Some(h) = held.get(id) {
                next.insert(id.clone(), h.clone());
                continue;
            }
            if requested {
                // The requester asks the CA for it, off this path.
                continue;
            }
            match self.obtain(id, issuer.as_deref(), &bundle) {
                Ok(h) => {
                    tracing::info!(identity = %id, source = h.info.source.as_str(), "certificate loaded");
                    next.insert(id.clone(), Arc::new(h));
                }
                Err(e) => failures.push(e),
            }
        }
        for gone in held.keys().filter(|id| !next.contains_key(*id)) {
            tracing::info!(identity = %gone, "certificate dropped");
        }
        self.write().certs = next;
        combine(failures)
    }

    /// Tries again to obtain the wanted certificates not held (e.g. a file
    /// that was missing has appeared); how many were missing.
    pub fn retry_missing(&self) -> Result<usize> {
        let wanted = self.wanted.lock().clone();
        let missing = {
            let s = self.read();
            wanted
                .iter()
                .filter(|id| !s.certs.contains_key(*id))
                .count()
        };
        if missing > 0 {
            self.ensure(&wanted)?;
        }
        Ok(missing)
    }

    /// Re-reads the bundle, and the certificate files or the issuer, from disk. All or
    /// nothing: on any error the previous state stays in force. New material applies to new
    /// handshakes; established connections are untouched. With an `Issuer` source, held
    /// certificates are re-minted only if the issuing certificate changed.
    pub fn reload(&self) -> Result<()> {
        let _guard = self.lock_updates();
        if matches!(self.source, IdentitySource::SigningRequest(_)) {
            // Certificates and roots come from the CA's answers; the CA root
            // file is re-read by the requester at its next connection.
            return Ok(());
        }
        let (bundle, issuer) = load_roots(&self.source)?;
        let (old_issuer, held) = {
            let s = self.read();
            (s.issuer.clone(), s.certs.clone())
        };
        let issuer_changed = match (&old_issuer, &issuer) {
            (Some(old), Some(new)) => old.cert_der() != new.cert_der(),
            _ => false,
        };
        let mut certs = BTreeMap::new();
        for (id, h) in &held {
            let refreshed = match h.info.source {
                CertSource::File => Some(self.obtain(id, None, &bundle)?),
                CertSource::Minted if issuer_changed => {
                    Some(self.obtain(id, issuer.as_deref(), &bundle)?)
                }
                CertSource::Minted | CertSource::Requested => None,
            };
            certs.insert(id.clone(), refreshed.map_or_else(|| h.clone(), Arc::new));
        }
        let mut s = self.write();
        tracing::info!(
            roots = bundle.len(),
            issuer_changed,
            certs = certs.len(),
            "identity material reloaded"
        );
        *s = State {
            bundle,
            requested_roots: None,
            issuer,
            certs,
        };
        Ok(())
    }

    /// Renews minted certificates whose renewal time has come and reloads certificate files
    /// that changed on disk; returns how many were replaced. Replacements that succeed are
    /// applied even if others fail (the error then lists the failures).
    pub fn renew_due(&self) -> Result<usize> {
        let _guard = self.lock_updates();
        let (bundle, issuer, held) = {
            let s = self.read();
            (s.bundle.clone(), s.issuer.clone(), s.certs.clone())
        };
        let now = self.clock.now();
        let mut replaced = Vec::new();
        let mut failures = Vec::new();
        for (id, h) in &held {
            let result = match (h.info.source, h.renew_after) {
                // Also when the clock went back before the certificate's
                // start: peers would take it for one not yet valid.
                (CertSource::Minted, Some(at)) if now >= at || now < h.info.not_before => {
                    self.obtain(id, issuer.as_deref(), &bundle).map(Some)
                }
                (CertSource::File, _) => self.reload_file_if_changed(id, h, &bundle),
                _ => Ok(None),
            };
            match result {
                Ok(Some(new)) => {
                    tracing::info!(identity = %id, serial = %new.info.serial, "certificate renewed");
                    replaced.push((id.clone(), Arc::new(new)));
                }
                Ok(None) => {}
                Err(e) => failures.push(e),
            }
        }
        let count = replaced.len();
        if count > 0 {
            let mut s = self.write();
            for (id, new) in replaced {
                // Only replace what is still wanted.
                if let Some(slot) = s.certs.get_mut(&id) {
                    *slot = new;
                }
            }
        }
        combine(failures)?;
        Ok(count)
    }

    /// Earliest time a minted certificate is due for renewal (`None` if nothing is minted:
    /// file certificates have no schedule, the agent should poll [`Self::renew_due`]).
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.read()
            .certs
            .values()
            .filter_map(|h| h.renew_after)
            .min()
    }

    /// Certificates held, ordered by identity.
    pub fn certificates(&self) -> Vec<CertificateInfo> {
        self.read().certs.values().map(|h| h.info.clone()).collect()
    }

    /// When the certificate held for `id` expires (a lookup, no copies: it
    /// is asked on every tunnelled connection).
    pub fn expiry_of(&self, id: &SpiffeId) -> Option<SystemTime> {
        self.read().certs.get(id).map(|h| h.info.not_after)
    }

    /// Wanted identities the CA must be asked for now: not held, due for
    /// renewal, or held with times the clock no longer fits.
    pub fn due_for_request(&self) -> Vec<SpiffeId> {
        let now = self.clock.now();
        let wanted = self.wanted.lock().clone();
        let state = self.read();
        let mut due: Vec<SpiffeId> = wanted
            .into_iter()
            .filter(|id| match state.certs.get(id) {
                None => true,
                Some(h) => {
                    h.renew_after.is_some_and(|at| now >= at)
                        || now < h.info.not_before
                        || now >= h.info.not_after
                }
            })
            .collect();
        due.sort();
        due.dedup();
        due
    }

    /// Whether `id` is among the identities wanted now.
    pub fn is_wanted(&self, id: &SpiffeId) -> bool {
        self.wanted.lock().contains(id)
    }

    /// Resolves when the wanted identities may have changed.
    pub async fn wanted_changed(&self) {
        self.wanted_changed.notified().await
    }

    /// Takes a certificate the CA signed for `id` over `key` (made here):
    /// `chain` is the CA's answer, the leaf first, the roots (one or more
    /// PEM certificates) last, intermediates between. The leaf must be for
    /// `id`, over `key`, and chain to the roots sent with it; those roots
    /// become the trust bundle. Nothing changes on any error.
    pub fn install_requested(
        &self,
        id: &SpiffeId,
        chain: &[String],
        key: PrivateKeyDer<'static>,
    ) -> Result<CertificateInfo> {
        let IdentitySource::SigningRequest(asked) = &self.source else {
            bail!("this node does not ask a CA for certificates");
        };
        let (roots_pem, certs) = match chain {
            [leaf, between @ .., roots] => (roots, std::iter::once(leaf).chain(between)),
            _ => bail!(
                "the CA answered {} certificate(s); expected the leaf and the roots",
                chain.len()
            ),
        };
        let mut ders = Vec::new();
        for (i, pem) in certs.enumerate() {
            let mut found = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("the CA's certificate {i} is not PEM"))?;
            if found.len() != 1 {
                bail!(
                    "the CA's certificate {i} holds {} certificates, expected one",
                    found.len()
                );
            }
            ders.push(found.remove(0));
        }
        let bundle = TrustBundle::from_pem(roots_pem.as_bytes(), Path::new("the CA's roots"))?;
        let presented = spiffe_id_of(&ders[0]).map_err(|e| anyhow!("the CA's leaf: {e}"))?;
        if &presented != id {
            bail!("the CA signed {presented}, asked for {id}");
        }
        let certified = CertifiedKey::from_der(ders, key, &self.provider)
            .with_context(|| format!("the CA's certificate for {id} is not over the key sent"))?;
        let now = self.clock.now();
        bundle
            .verify(
                &self.provider,
                &certified.cert[0],
                &certified.cert[1..],
                unix_time(now),
                KeyUsage::server_auth(),
            )
            .map_err(|e| {
                anyhow!(
                    "the CA's certificate for {id} does not verify against the roots it sent: {e}"
                )
            })?;
        let info = cert_info(id, &certified.cert[0], CertSource::Requested)?;
        // From now, not from the certificate's start: CAs backdate it (istiod
        // by two minutes), which would eat a short lifetime's renewal margin.
        let left = info.not_after.duration_since(now).unwrap_or_default();
        let held = HeldCert {
            key: Arc::new(certified),
            info: info.clone(),
            renew_after: Some(now + left.mul_f64(asked.renew_at)),
            file_contents: None,
        };
        let _guard = self.lock_updates();
        let mut state = self.write();
        if state.requested_roots.as_deref() != Some(roots_pem.as_str()) {
            tracing::info!(
                roots = bundle.len(),
                "trust bundle taken from the CA's answer"
            );
            state.bundle = Arc::new(bundle);
            state.requested_roots = Some(roots_pem.clone());
        }
        if self.wanted.lock().contains(id) {
            state.certs.insert(id.clone(), Arc::new(held));
        }
        Ok(info)
    }

    /// Counts one request to the CA.
    pub fn record_request(&self, outcome: Result<(), String>) {
        let mut health = self.requests.lock();
        match outcome {
            Ok(()) => {
                health.succeeded += 1;
                health.consecutive_failures = 0;
                health.last_success = Some(self.clock.now());
                health.last_error = None;
            }
            Err(error) => {
                health.failed += 1;
                health.consecutive_failures += 1;
                health.last_error = Some(error);
            }
        }
    }

    /// How asking the CA goes; None unless certificates are requested.
    pub fn request_health(&self) -> Option<RequestHealth> {
        matches!(self.source, IdentitySource::SigningRequest(_))
            .then(|| self.requests.lock().clone())
    }

    fn obtain(&self, id: &SpiffeId, issuer: Option<&Ca>, bundle: &TrustBundle) -> Result<HeldCert> {
        let held = match (&self.source, issuer) {
            (IdentitySource::Files { dir, .. }, _) => {
                let (crt_path, key_path) = file_paths(dir, id);
                let crt = read_file(&crt_path, "certificate")?;
                let key = read_file(&key_path, "key")?;
                self.held_from_files(id, &crt_path, &key_path, crt, key)?
            }
            (
                IdentitySource::Issuer {
                    lifetime, renew_at, ..
                },
                Some(ca),
            ) => self.mint(id, ca, *lifetime, *renew_at)?,
            (IdentitySource::Issuer { .. }, None) => bail!("no issuer loaded"),
            (IdentitySource::SigningRequest(_), _) => {
                bail!("certificates for {id} are asked from the CA, not made here")
            }
        };
        self.warn_if_untrusted(id, &held, bundle);
        Ok(held)
    }

    /// A certificate our own bundle rejects would be refused by peers sharing it; that is
    /// legitimate mid-rotation (new issuer before new bundle), so only warn.
    fn warn_if_untrusted(&self, id: &SpiffeId, held: &HeldCert, bundle: &TrustBundle) {
        if let Err(e) = bundle.verify(
            &self.provider,
            &held.key.cert[0],
            &held.key.cert[1..],
            unix_time(self.clock.now()),
            KeyUsage::server_auth(),
        ) {
            tracing::warn!(identity = %id, error = %e, "certificate does not verify against the current trust bundle");
        }
    }

    fn mint(&self, id: &SpiffeId, ca: &Ca, lifetime: Duration, renew_at: f64) -> Result<HeldCert> {
        let now = self.clock.now();
        let issued = ca.issue_der(id, now - NOT_BEFORE_BACKDATE, now + lifetime)?;
        let key = CertifiedKey::from_der(issued.chain, issued.key, &self.provider)
            .with_context(|| format!("loading minted key for {id}"))?;
        let info = cert_info(id, &key.cert[0], CertSource::Minted)?;
        Ok(HeldCert {
            key: Arc::new(key),
            info,
            renew_after: Some(now + lifetime.mul_f64(renew_at)),
            file_contents: None,
        })
    }

    fn held_from_files(
        &self,
        id: &SpiffeId,
        crt_path: &Path,
        key_path: &Path,
        crt: Vec<u8>,
        key: Vec<u8>,
    ) -> Result<HeldCert> {
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &crt[..])
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", crt_path.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificates", crt_path.display());
        }
        let private: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key[..])
            .with_context(|| format!("parsing {}", key_path.display()))?
            .ok_or_else(|| anyhow!("{} holds no private key", key_path.display()))?;
        let presented =
            spiffe_id_of(&chain[0]).map_err(|e| anyhow!("{}: {e}", crt_path.display()))?;
        if &presented != id {
            bail!("{} is for {presented}, expected {id}", crt_path.display());
        }
        let certified =
            CertifiedKey::from_der(chain, private, &self.provider).with_context(|| {
                format!(
                    "{} does not match {}",
                    key_path.display(),
                    crt_path.display()
                )
            })?;
        let info = cert_info(id, &certified.cert[0], CertSource::File)?;
        if info.not_after <= self.clock.now() {
            tracing::warn!(identity = %id, path = %crt_path.display(), "certificate file has expired");
        }
        Ok(HeldCert {
            key: Arc::new(certified),
            info,
            renew_after: None,
            file_contents: Some((crt, key)),
        })
    }

    fn reload_file_if_changed(
        &self,
        id: &SpiffeId,
        held: &HeldCert,
        bundle: &TrustBundle,
    ) -> Result<Option<HeldCert>> {
        let IdentitySource::Files { dir, .. } = &self.source else {
            return Ok(None);
        };
        let (crt_path, key_path) = file_paths(dir, id);
        let crt = read_file(&crt_path, "certificate")?;
        let key = read_file(&key_path, "key")?;
        if held
            .file_contents
            .as_ref()
            .is_some_and(|(c, k)| *c == crt && *k == key)
        {
            return Ok(None);
        }
        let new = self.held_from_files(id, &crt_path, &key_path, crt, key)?;
        self.warn_if_untrusted(id, &new, bundle);
        Ok(Some(new))
    }
}

fn file_paths(dir: &Path, id: &SpiffeId) -> (PathBuf, PathBuf) {
    let stem = format!("{}.{}", id.namespace(), id.service_account());
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} file {}", path.display()))
}

/// Loads the trust bundle and issuer named by `source`.
fn load_roots(source: &IdentitySource) -> Result<(Arc<TrustBundle>, Option<Arc<Ca>>)> {
    match source {
        IdentitySource::Files { trust_bundle, .. } => {
            let pem = read_file(trust_bundle, "trust bundle")?;
            Ok((Arc::new(TrustBundle::from_pem(&pem, trust_bundle)?), None))
        }
        IdentitySource::SigningRequest(asked) => {
            let pem = read_file(&asked.ca_roots, "CA root")?;
            Ok((
                Arc::new(TrustBundle::from_pem(&pem, &asked.ca_roots)?),
                None,
            ))
        }
        IdentitySource::Issuer {
            cert,
            key,
            trust_bundle,
            ..
        } => {
            let cert_pem = read_file(cert, "issuer certificate")?;
            let key_pem = read_file(key, "issuer key")?;
            let ca = Ca::from_pem(
                std::str::from_utf8(&cert_pem)
                    .with_context(|| format!("{} is not PEM text", cert.display()))?,
                std::str::from_utf8(&key_pem)
                    .with_context(|| format!("{} is not PEM text", key.display()))?,
            )
            .with_context(|| {
                format!(
                    "loading issuer from {} and {}",
                    cert.display(),
                    key.display()
                )
            })?;
            let bundle = match trust_bundle {
                Some(path) => TrustBundle::from_pem(&read_file(path, "trust bundle")?, path)?,
                None => TrustBundle::from_pem(&cert_pem, cert)?,
            };
            Ok((Arc::new(bundle), Some(Arc::new(ca))))
        }
    }
}

fn cert_info(id: &SpiffeId, der: &[u8], source: CertSource) -> Result<CertificateInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("parsing certificate for {id}: {e}"))?;
    let validity = cert.validity();
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(CertificateInfo {
        identity: id.clone(),
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
        source,
        serial,
    })
}

/// When a DER certificate stops being valid; `None` if it does not parse.
pub fn not_after_of(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(to_system_time(cert.validity().not_after.timestamp()))
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

fn combine(failures: Vec<anyhow::Error>) -> Result<()> {
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.into_iter().next().expect("one failure")),
        n => {
            let all: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!("{n} identities failed: {}", all.join("; ")))
        }
    }
}

fn unix_time(at: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}
