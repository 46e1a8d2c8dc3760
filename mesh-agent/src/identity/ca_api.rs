//! The Istio CA API, `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! (istio/api `security/v1alpha1/ca.proto`, as istiod serves it on 15012 and
//! ztunnel calls it): the messages, written out with their field numbers
//! (no protoc), a client call, and a tonic service over a [`CertificateSigner`].

use std::{pin::Pin, sync::Arc};

use tonic::codegen::http;

pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key naming the identity a node asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The request header with the caller's service-account token.
pub const AUTHORIZATION: &str = "authorization";
/// The request header naming the caller's cluster.
pub const CLUSTER_ID: &str = "clusterid";

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM PKCS#10.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM: the leaf first, the trust bundle (one or more roots) last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// A request on behalf of `identity` (a SPIFFE URI), as ztunnel makes
    /// them in node mode.
    pub fn impersonating(csr: String, validity_seconds: i64, identity: &str) -> Self {
        let value = prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
        };
        Self {
            csr,
            validity_duration: validity_seconds,
            metadata: Some(prost_types::Struct {
                fields: [(IMPERSONATED_IDENTITY.to_string(), value)].into(),
            }),
        }
    }

    /// The identity asked for on someone's behalf, if any.
    pub fn impersonated_identity(&self) -> Option<&str> {
        match self
            .metadata
            .as_ref()?
            .fields
            .get(IMPERSONATED_IDENTITY)?
            .kind
            .as_ref()?
        {
            prost_types::value::Kind::StringValue(id) => Some(id),
            _ => None,
        }
    }
}

/// Calls CreateCertificate with the caller's token and cluster id.
pub async fn create_certificate(
    channel: tonic::transport::Channel,
    token: &str,
    cluster_id: &str,
    request: IstioCertificateRequest,
) -> Result<IstioCertificateResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the CA is not reachable: {e}")))?;
    let mut request = tonic::Request::new(request);
    let header = |value: String| {
        value
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("a header value that is not ASCII"))
    };
    request
        .metadata_mut()
        .insert(AUTHORIZATION, header(format!("Bearer {token}"))?);
    request
        .metadata_mut()
        .insert(CLUSTER_ID, header(cluster_id.to_string())?);
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What answers CreateCertificate (the signer decides, authenticates and
/// signs).
pub trait CertificateSigner: Send + Sync + 'static {
    fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> BoxFuture<Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>;
}

/// The gRPC service of a [`CertificateSigner`], for tonic's server (what
/// tonic's code generator would write for ca.proto).
pub struct CertificateService<S>(Arc<S>);

impl<S> CertificateService<S> {
    pub fn new(signer: Arc<S>) -> Self {
        Self(signer)
    }
}

impl<S> Clone for CertificateService<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: CertificateSigner> tonic::server::NamedService for CertificateService<S> {
    const NAME: &'static str = SERVICE;
}

struct CreateCertificate<S>(Arc<S>);

impl<S: CertificateSigner> tonic::server::UnaryService<IstioCertificateRequest>
    for CreateCertificate<S>
{
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        self.0.create_certificate(request)
    }
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for CertificateService<S>
where
    S: CertificateSigner,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("only CreateCertificate is served").into_http())
            });
        }
        let signer = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(CreateCertificate(signer), request).await)
        })
    }
}
