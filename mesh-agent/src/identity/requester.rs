//! Asks the certificate authority for this node's workload certificates
//! (`IdentitySource::SigningRequest`), as ztunnel does: for each identity
//! wanted, a fresh P-256 key made here and a signing request sent over gRPC
//! with TLS on the pod's behalf (`ImpersonatedIdentity`), authenticated with
//! the node agent's service-account token. Renewal at a fraction of each
//! certificate's lifetime; after a failure, exponential backoff with jitter
//! per identity, while the certificate still held keeps serving.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{
    CertificateInfo, IdentityManager, IdentitySource, SigningRequestSource, SpiffeId, ca,
    ca_api::{IstioCertificateRequest, create_certificate},
};

/// At most this many requests in flight (ztunnel's figure).
const CONCURRENT_REQUESTS: usize = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(150);
/// Each backoff is moved by up to this fraction either way, so that nodes
/// that lost the CA together do not come back together.
const JITTER: f64 = 0.2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often renewal times are looked at (the clock may also jump).
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Asks for the manager's wanted certificates until the task is dropped.
pub async fn run(manager: Arc<IdentityManager>) {
    let IdentitySource::SigningRequest(source) = manager.source().clone() else {
        return;
    };
    let mut channel = CaChannel::default();
    let mut backoff: HashMap<SpiffeId, Backoff> = HashMap::new();
    loop {
        let now = Instant::now();
        let ready: Vec<SpiffeId> = manager
            .due_for_request()
            .into_iter()
            .filter(|id| backoff.get(id).is_none_or(|b| b.next <= now))
            .take(CONCURRENT_REQUESTS)
            .collect();
        if !ready.is_empty() {
            let outcomes = match channel.get(&source) {
                Ok(ch) => ask_all(&manager, &source, ch, ready).await,
                Err(e) => ready
                    .into_iter()
                    .map(|id| (id, Err(anyhow!("{e:#}"))))
                    .collect(),
            };
            for (id, outcome) in outcomes {
                match outcome {
                    Ok(info) => {
                        tracing::info!(identity = %id, serial = %info.serial, "certificate signed by the CA");
                        backoff.remove(&id);
                        manager.record_request(Ok(()));
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        let next = backoff.entry(id.clone()).or_default().failed();
                        tracing::warn!(identity = %id, error, retry_in = ?next, "certificate request failed");
                        manager.record_request(Err(error));
                    }
                }
            }
        }
        backoff.retain(|id, _| manager.is_wanted(id));
        tokio::select! {
            _ = manager.wanted_changed() => {}
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

async fn ask_all(
    manager: &Arc<IdentityManager>,
    source: &SigningRequestSource,
    channel: Channel,
    ids: Vec<SpiffeId>,
) -> Vec<(SpiffeId, Result<CertificateInfo>)> {
    let mut asking = tokio::task::JoinSet::new();
    for id in ids {
        let (manager, source, channel) = (manager.clone(), source.clone(), channel.clone());
        asking.spawn(async move {
            let outcome = ask(&manager, &source, channel, &id).await;
            (id, outcome)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = asking.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => tracing::error!(error = %e, "certificate request task failed"),
        }
    }
    outcomes
}

/// One signing request for `id`, its answer installed.
async fn ask(
    manager: &IdentityManager,
    source: &SigningRequestSource,
    channel: Channel,
    id: &SpiffeId,
) -> Result<CertificateInfo> {
    let (chain, key) = request(source, channel, id).await?;
    manager.install_requested(id, &chain, key)
}

/// Sends one signing request for `id` as `source` says (its token, its
/// cluster id): the CA's answer (leaf first, roots last) and the key made
/// for it here.
pub async fn request(
    source: &SigningRequestSource,
    channel: Channel,
    id: &SpiffeId,
) -> Result<(Vec<String>, PrivateKeyDer<'static>)> {
    let token = std::fs::read_to_string(&source.token_file)
        .with_context(|| format!("reading the token file {}", source.token_file.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", source.token_file.display());
    }
    let (csr, key) = ca::signing_request(id)?;
    let lifetime = i64::try_from(source.lifetime.as_secs()).unwrap_or(i64::MAX);
    let request = IstioCertificateRequest::impersonating(csr, lifetime, &id.to_string());
    let answer = create_certificate(channel, token, &source.cluster_id, request)
        .await
        .map_err(|status| {
            anyhow!(
                "the CA at {} answered {:?}: {}",
                source.address,
                status.code(),
                status.message()
            )
        })?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((answer.cert_chain, key))
}

/// A channel to the CA of `source`, verifying it against `roots` (PEM);
/// it connects at first use.
pub fn channel(source: &SigningRequestSource, roots: &[u8]) -> Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots));
    if let Some(name) = &source.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Endpoint::from_shared(source.address.clone())
        .with_context(|| format!("the CA address {:?}", source.address))?
        .tls_config(tls)
        .with_context(|| format!("TLS to the CA at {}", source.address))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The channel to the CA, made again when its root file changes (tonic
/// reconnects by itself when the CA goes and comes back).
#[derive(Default)]
struct CaChannel {
    current: Option<(Vec<u8>, Channel)>,
}

impl CaChannel {
    fn get(&mut self, source: &SigningRequestSource) -> Result<Channel> {
        let roots = std::fs::read(&source.ca_roots)
            .with_context(|| format!("reading the CA roots {}", source.ca_roots.display()))?;
        if let Some((seen, channel)) = &self.current
            && *seen == roots
        {
            return Ok(channel.clone());
        }
        let channel = channel(source, &roots)?;
        self.current = Some((roots, channel.clone()));
        Ok(channel)
    }
}

/// Per-identity retry schedule after failures.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    next: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            failures: 0,
            next: Instant::now(),
        }
    }
}

impl Backoff {
    /// Counts a failure; how long until the next try.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = jittered(backoff_for(self.failures), random_unit());
        self.next = Instant::now() + wait;
        wait
    }
}

/// The wait after `failures` failures in a row, before jitter: 0.5 s,
/// doubling, at most 150 s.
fn backoff_for(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// `wait` moved by `unit` (in [0, 1)) within ±[`JITTER`].
fn jittered(wait: Duration, unit: f64) -> Duration {
    wait.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
}

fn random_unit() -> f64 {
    let mut bytes = [0u8; 4];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_at_most_150_seconds_with_jitter() {
        let waits: Vec<u64> = (1..=12)
            .map(|n| backoff_for(n).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 150000, 150000, 150000
            ]
        );
        assert_eq!(backoff_for(u32::MAX), MAX_BACKOFF);
        let wait = Duration::from_secs(10);
        assert_eq!(jittered(wait, 0.0), Duration::from_secs(8));
        assert_eq!(jittered(wait, 0.5), wait);
        assert!(jittered(wait, 0.999_999) < Duration::from_secs(12));
        let unit = random_unit();
        assert!((0.0..1.0).contains(&unit));
    }
}
