//! The part of the CRI gRPC API (`runtime.v1.RuntimeService`) the test bed
//! speaks, and a blocking client for it over containerd's unix socket.
//!
//! The messages are written out here with the field numbers of the CRI's
//! `api.proto` (k8s.io/cri-api, `runtime/v1`, as shipped in the `k8s-cri`
//! crate 0.11) instead of depending on `k8s-cri`: its build script needs
//! `protoc`, and `xtask` (which installs what the tests need) depends on this
//! crate, so a fresh machine could not build the tool that installs protoc.
//! Only the fields the test bed sets or reads are declared; protobuf skips
//! the others on decoding, and leaving a field out when encoding is the same
//! as sending its default.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StatusRequest {
    #[prost(bool, tag = "1")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RuntimeStatus>,
    /// With `verbose`: containerd's `cniconfig` (the networks it loaded), ...
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RuntimeStatus {
    #[prost(message, repeated, tag = "1")]
    pub conditions: Vec<RuntimeCondition>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RuntimeCondition {
    /// `RuntimeReady` or `NetworkReady`.
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(bool, tag = "2")]
    pub status: bool,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(string, tag = "4")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
}

/// `NamespaceMode` values.
pub(crate) const NAMESPACE_POD: i32 = 0;
pub(crate) const NAMESPACE_CONTAINER: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
    /// With `verbose`: containerd's `info` key holds JSON with the pause
    /// `pid` and the `runtimeSpec` (namespaces, cgroups path).
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

/// `PodSandboxState` values.
pub(crate) const SANDBOX_READY: i32 = 0;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
}

const SERVICE: &str = "/runtime.v1.RuntimeService/";

/// A blocking CRI client: a current-thread tokio runtime of its own drives
/// one gRPC channel over the unix socket. Not for use inside another tokio
/// runtime (the test bed is synchronous).
pub(crate) struct CriClient {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<Channel>,
}

impl CriClient {
    /// A client for the socket at `socket`. Connects lazily: the first call
    /// fails if nothing listens there yet.
    pub(crate) fn new(socket: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a tokio runtime for the CRI client")?;
        let path = socket.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The channel's worker task is spawned on our runtime.
        let _guard = rt.enter();
        // The URI is required but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(connector);
        Ok(CriClient {
            rt,
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// One unary call of `RuntimeService/<method>`, failing after `timeout`.
    pub(crate) fn call<Req, Resp>(
        &mut self,
        method: &str,
        request: Req,
        timeout: Duration,
    ) -> anyhow::Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let path = PathAndQuery::try_from(format!("{SERVICE}{method}"))
            .with_context(|| format!("bad CRI method {method}"))?;
        let grpc = &mut self.grpc;
        let result = self.rt.block_on(async move {
            let mut request = tonic::Request::new(request);
            // The runtime gives up too (grpc-timeout), not only we.
            request.set_timeout(timeout);
            let call = async {
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                grpc.unary(request, path, tonic_prost::ProstCodec::default())
                    .await
            };
            tokio::time::timeout(timeout, call).await
        });
        match result {
            Err(_) => anyhow::bail!("CRI {method}: no answer within {timeout:?}"),
            Ok(Err(status)) => anyhow::bail!(
                "CRI {method} failed: {:?}: {}",
                status.code(),
                status.message()
            ),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Field numbers against bytes encoded by hand from api.proto.
    #[test]
    fn encodes_with_the_cri_field_numbers() {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: "ab".into(),
            verbose: true,
        };
        // field 1, length-delimited: 0x0a; field 2, varint: 0x10.
        assert_eq!(request.encode_to_vec(), [0x0a, 2, b'a', b'b', 0x10, 1]);

        let config = LinuxPodSandboxConfig {
            cgroup_parent: "/p".into(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NAMESPACE_POD,
                    pid: NAMESPACE_CONTAINER,
                    ipc: NAMESPACE_POD,
                }),
            }),
        };
        assert_eq!(
            config.encode_to_vec(),
            // 1: "/p"; 2: { 1: { 2: 1 } } (defaults are not sent)
            [0x0a, 2, b'/', b'p', 0x12, 4, 0x0a, 2, 0x10, 1]
        );

        // PodSandboxStatus{id: "x", state: 1, network: {ip: "10.1.200.1"}},
        // with an unknown field 4 (created_at) that must be skipped.
        let mut bytes = vec![0x0a, 1, b'x', 0x18, 1, 0x20, 0x7f, 0x2a, 12, 0x0a, 10];
        bytes.extend_from_slice(b"10.1.200.1");
        let status = PodSandboxStatus::decode(bytes.as_slice()).unwrap();
        assert_eq!(status.id, "x");
        assert_eq!(status.state, 1);
        assert_eq!(status.network.unwrap().ip, "10.1.200.1");
    }
}
