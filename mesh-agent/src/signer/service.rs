//! The signer's answer to CreateCertificate: who is asking (TokenReview),
//! whether it may have the identity (istiod's node authorizer, from the pods
//! in the API now), and the certificate over the requester's key.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, ListParams, PostParams};
use parking_lot::Mutex;

use super::{
    authorize::{self, Caller, PodFacts, Refusal, ServiceAccount},
    config::SignerConfig,
    metrics::SignerMetrics,
};
use crate::identity::{
    SpiffeId,
    ca::{Ca, SigningRequest},
    ca_api::{
        AUTHORIZATION, CLUSTER_ID, CertificateSigner, IstioCertificateRequest,
        IstioCertificateResponse,
    },
    not_after_of,
};

/// Certificates start this much in the past (istiod's figure), for peers
/// whose clocks lag.
const BACKDATE: Duration = Duration::from_secs(120);

/// Why a request got no certificate.
#[derive(Debug)]
enum Failure {
    /// Not allowed: UNAUTHENTICATED with an opaque message, as istiod.
    Refused(Refusal),
    /// A request that is not well formed: INVALID_ARGUMENT.
    Invalid(String),
    /// The API server could not be asked: UNAVAILABLE (the agent retries).
    ApiUnavailable(String),
    /// The issuer could not sign: INTERNAL.
    Internal(String),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Refused(refusal) => refusal.reason(),
            Failure::Invalid(_) => "invalid_request",
            Failure::ApiUnavailable(_) => "api_unavailable",
            Failure::Internal(_) => "internal",
        }
    }

    fn status(&self) -> tonic::Status {
        match self {
            Failure::Refused(_) => tonic::Status::unauthenticated("request authenticate failure"),
            Failure::Invalid(why) => tonic::Status::invalid_argument(why.clone()),
            Failure::ApiUnavailable(_) => {
                tonic::Status::unavailable("the signer cannot reach the Kubernetes API")
            }
            Failure::Internal(_) => tonic::Status::internal("CSR signing error"),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(refusal) => write!(f, "{refusal}"),
            Failure::Invalid(why) | Failure::ApiUnavailable(why) | Failure::Internal(why) => {
                write!(f, "{why}")
            }
        }
    }
}

/// The issuer and the roots sent, as last read from their files.
struct Issuer {
    files: Vec<Vec<u8>>,
    ca: Ca,
    not_after: SystemTime,
    /// Between the leaf and the roots in every answer (empty when the
    /// issuer is itself one of the roots).
    intermediates: Vec<String>,
    /// All roots, one PEM text: the answer's last element.
    roots_pem: String,
}

pub struct Signer(Arc<Inner>);

struct Inner {
    config: SignerConfig,
    trusted: Vec<ServiceAccount>,
    kube: kube::Client,
    issuer: Mutex<Arc<Issuer>>,
    metrics: Arc<SignerMetrics>,
}

impl Signer {
    /// Loads the issuer now (a signer without one does not start).
    pub fn new(
        config: SignerConfig,
        kube: kube::Client,
        metrics: Arc<SignerMetrics>,
    ) -> Result<Self> {
        let trusted = config
            .trusted_accounts()
            .map_err(|bad| anyhow!("trustedNodeAccounts: {bad:?} is not namespace/name"))?;
        let issuer = load_issuer(&config)?;
        Ok(Self(Arc::new(Inner {
            config,
            trusted,
            kube,
            issuer: Mutex::new(Arc::new(issuer)),
            metrics,
        })))
    }

    /// The signer's own serving certificate for its DNS names, from the
    /// issuer: (chain PEM, key PEM).
    pub fn serving_certificate(&self) -> Result<(String, String)> {
        let issuer = self.0.issuer.lock().clone();
        let now = SystemTime::now();
        let until = (now + Duration::from_secs(365 * 24 * 3600)).min(issuer.not_after);
        issuer
            .ca
            .issue_server(&self.0.config.serving_names, now - BACKDATE, until)
    }
}

impl CertificateSigner for Signer {
    fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>
                + Send
                + 'static,
        >,
    > {
        let inner = self.0.clone();
        Box::pin(async move {
            let started = Instant::now();
            match inner.answer(request).await {
                Ok((identity, response)) => {
                    inner.metrics.signed(started.elapsed());
                    tracing::info!(%identity, "certificate signed");
                    Ok(tonic::Response::new(response))
                }
                Err(failure) => {
                    inner.metrics.failed(failure.label());
                    tracing::warn!(reason = failure.label(), error = %failure, "certificate request refused");
                    Err(failure.status())
                }
            }
        })
    }
}

impl Inner {
    async fn answer(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<(SpiffeId, IstioCertificateResponse), Failure> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let token = header(AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::Refused(Refusal::NotAuthenticated("no bearer token".into())))?;
        let cluster = header(CLUSTER_ID).unwrap_or_default();
        if !cluster.is_empty() && cluster != self.config.cluster_id {
            return Err(Failure::Refused(Refusal::NotAuthenticated(format!(
                "cluster {cluster:?} is not this signer's ({:?})",
                self.config.cluster_id
            ))));
        }
        let request = request.into_inner();
        let requested: SpiffeId = request
            .impersonated_identity()
            .ok_or_else(|| {
                Failure::Invalid(
                    "only requests on a pod's behalf (ImpersonatedIdentity) are signed".into(),
                )
            })?
            .parse()
            .map_err(|e| Failure::Invalid(format!("ImpersonatedIdentity: {e}")))?;
        let csr = SigningRequest::from_pem(&request.csr)
            .map_err(|e| Failure::Invalid(format!("{e:#}")))?;
        let caller = self.review(token).await?;
        let pods = self.pods_of(&caller).await?;
        authorize::authorize(
            &caller,
            &self.trusted,
            &self.config.trust_domain,
            &requested,
            &pods,
        )
        .map_err(Failure::Refused)?;
        let issuer = self.issuer();
        let lifetime = match request.validity_duration {
            secs if secs <= 0 => self.config.default_lifetime,
            secs => Duration::from_secs(secs.unsigned_abs()).min(self.config.max_lifetime),
        };
        let now = SystemTime::now();
        let not_after = (now + lifetime).min(issuer.not_after);
        let leaf = issuer
            .ca
            .sign_request(&csr, &requested, now - BACKDATE, not_after)
            .map_err(|e| Failure::Internal(format!("{e:#}")))?;
        let mut cert_chain = vec![leaf];
        cert_chain.extend(issuer.intermediates.iter().cloned());
        cert_chain.push(issuer.roots_pem.clone());
        Ok((requested, IstioCertificateResponse { cert_chain }))
    }

    /// Who the token is, by the API server's TokenReview: a service
    /// account's token bound to a pod, for one of our audiences.
    async fn review(&self, token: String) -> Result<Caller, Failure> {
        let reviews: Api<TokenReview> = Api::all(self.kube.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(self.config.token_audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Failure::ApiUnavailable(format!("TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let caller = authorize::caller_from_review(&status).map_err(Failure::Refused)?;
        // An API server that did not check the audience says none back.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences
            .iter()
            .any(|a| self.config.token_audiences.contains(a))
        {
            return Err(Failure::Refused(Refusal::NotAuthenticated(format!(
                "the token is not for {:?} (the review's audiences: {audiences:?})",
                self.config.token_audiences
            ))));
        }
        Ok(caller)
    }

    /// The caller's pod and the pods of its node, from the API now.
    async fn pods_of(&self, caller: &Caller) -> Result<Vec<PodFacts>, Failure> {
        let namespace = &caller.service_account.namespace;
        let own = Api::<Pod>::namespaced(self.kube.clone(), namespace)
            .get_opt(&caller.pod_name)
            .await
            .map_err(|e| Failure::ApiUnavailable(format!("reading the caller's pod: {e}")))?;
        let Some(own) = own.as_ref().map(pod_facts) else {
            return Err(Failure::Refused(Refusal::CallerPodUnknown(format!(
                "pod {namespace}/{} not found",
                caller.pod_name
            ))));
        };
        let mut pods = vec![own.clone()];
        if let Some(node) = &own.node {
            let listed = Api::<Pod>::all(self.kube.clone())
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .map_err(|e| Failure::ApiUnavailable(format!("listing the node's pods: {e}")))?;
            pods.extend(
                listed
                    .items
                    .iter()
                    .map(pod_facts)
                    // The API filters; a pod on another node must never count.
                    .filter(|p| p.node.as_deref() == Some(node.as_str())),
            );
        }
        Ok(pods)
    }

    /// The issuer, read again if its files changed; a broken change keeps
    /// the last good one (and says so).
    fn issuer(&self) -> Arc<Issuer> {
        let mut current = self.issuer.lock();
        match read_issuer_files(&self.config) {
            Ok(files) if files == current.files => {}
            Ok(_) => match load_issuer(&self.config) {
                Ok(new) => {
                    tracing::info!("issuer or trust bundle changed on disk: now in use");
                    *current = Arc::new(new);
                }
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "the changed issuer files are not usable; the previous issuer keeps signing"
                ),
            },
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "the issuer files cannot be read; the previous issuer keeps signing"
            ),
        }
        current.clone()
    }
}

fn pod_facts(pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
        phase: pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
    }
}

fn read_issuer_files(config: &SignerConfig) -> Result<Vec<Vec<u8>>> {
    let mut paths = vec![&config.issuer_cert, &config.issuer_key];
    paths.extend(config.trust_bundle.as_ref());
    paths
        .into_iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

fn load_issuer(config: &SignerConfig) -> Result<Issuer> {
    let files = read_issuer_files(config)?;
    let text = |i: usize, path: &std::path::Path| {
        std::str::from_utf8(&files[i])
            .with_context(|| format!("{} is not PEM text", path.display()))
    };
    let ca = Ca::from_pem(text(0, &config.issuer_cert)?, text(1, &config.issuer_key)?)
        .with_context(|| {
            format!(
                "loading the issuer from {} and {}",
                config.issuer_cert.display(),
                config.issuer_key.display()
            )
        })?;
    let roots_pem = match &config.trust_bundle {
        Some(path) => text(2, path)?.to_string(),
        None => ca.own_cert_pem(),
    };
    let roots: Vec<_> = rustls_pemfile::certs(&mut roots_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the trust bundle")?;
    if roots.is_empty() {
        anyhow::bail!("the trust bundle holds no certificates");
    }
    let intermediates = if roots.contains(ca.cert_der()) {
        Vec::new()
    } else {
        let mut between = vec![ca.own_cert_pem()];
        between.extend(ca.chain_above_pem());
        between
    };
    let not_after =
        not_after_of(ca.cert_der()).ok_or_else(|| anyhow!("the issuer certificate's validity"))?;
    if not_after <= SystemTime::now() {
        anyhow::bail!("the issuer certificate has expired");
    }
    Ok(Issuer {
        files,
        ca,
        not_after,
        intermediates,
        roots_pem,
    })
}
