//! An OTLP trace receiver, as a collector would be: OTLP/gRPC (the
//! collector's `TraceService`, from the official protobuf definitions in
//! `opentelemetry-proto`) or OTLP/HTTP with protobuf bodies (`POST
//! /v1/traces`). It keeps every span it is sent, with its resource, for a
//! test to read, and can be stopped (its port closed) to play a collector
//! that went away.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc as std_mpsc},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, anyhow};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::Span,
};
use prost::Message;
use tokio::{net::TcpListener, sync::oneshot};

/// How a receiver is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpTransport {
    Grpc,
    HttpProtobuf,
}

/// One span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl ReceivedSpan {
    /// Trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Span id, 16 hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id, empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A span attribute's value as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        find(&self.span.attributes, key)
    }

    /// A resource attribute's value as text.
    pub fn resource_attribute(&self, key: &str) -> Option<String> {
        find(&self.resource, key)
    }
}

fn find(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    text(value)
}

fn text(value: &AnyValue) -> Option<String> {
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

fn keep(received: &Received, request: ExportTraceServiceRequest) -> usize {
    let mut kept = received.lock().unwrap();
    let mut count = 0;
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                count += 1;
                kept.push(ReceivedSpan {
                    span,
                    resource: resource.clone(),
                });
            }
        }
    }
    count
}

/// A running receiver; stopped (its port closed) by [`OtlpReceiver::stop`]
/// or when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Received,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Listens on `addr` in `netns` (a network namespace file; `None`: the
    /// caller's), serving `transport`. Returns once listening.
    pub fn start(
        netns: Option<&Path>,
        addr: SocketAddr,
        transport: OtlpTransport,
    ) -> anyhow::Result<Self> {
        let received = Received::default();
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
        let kept = received.clone();
        let thread = std::thread::Builder::new()
            .name(format!("otlp-receiver-{addr}"))
            .spawn(move || serve_thread(netns, addr, transport, kept, stopped, ready_tx))
            .context("spawning the receiver thread")?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self {
                addr,
                received,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow!("the receiver thread did not report: {e}")),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().unwrap().clone()
    }

    pub fn span_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Closes the port (clients get connection refused from now on) and
    /// waits for the server thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_thread(
    netns: Option<PathBuf>,
    addr: SocketAddr,
    transport: OtlpTransport,
    received: Received,
    stopped: oneshot::Receiver<()>,
    ready: std_mpsc::Sender<anyhow::Result<()>>,
) {
    let setup = || -> anyhow::Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
        // Below the agents being measured (a collector runs elsewhere in a
        // cluster): nice 10.
        // SAFETY: a plain system call on this thread's own id.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
        if let Some(netns) = &netns {
            let file = std::fs::File::open(netns)
                .with_context(|| format!("opening {}", netns.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining {}", netns.display()))?;
        }
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok((runtime, listener))
    };
    let (runtime, listener) = match setup() {
        Ok(both) => both,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        match transport {
            OtlpTransport::Grpc => serve_grpc(listener, received, stopped).await,
            OtlpTransport::HttpProtobuf => serve_http(listener, received, stopped).await,
        }
    });
    // Dropping the runtime ends every connection still open.
}

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve_grpc(listener: TcpListener, received: Received, stopped: oneshot::Receiver<()>) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let served = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Collector(received)))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        })
        .await;
    if let Err(e) = served {
        eprintln!("OTLP gRPC receiver: {e}");
    }
}

async fn serve_http(listener: TcpListener, received: Received, mut stopped: oneshot::Receiver<()>) {
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let received = received.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| export_http(received.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `POST /v1/traces` with an `ExportTraceServiceRequest` (protobuf).
async fn export_http(
    received: Received,
    request: Request<Incoming>,
) -> Result<Response<Full<bytes::Bytes>>, hyper::Error> {
    let answer = |status: StatusCode, body: Vec<u8>| {
        let mut response = Response::new(Full::new(bytes::Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        response
    };
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return Ok(answer(StatusCode::NOT_FOUND, Vec::new()));
    }
    let body = request.into_body().collect().await?.to_bytes();
    match ExportTraceServiceRequest::decode(body) {
        Ok(export) => {
            keep(&received, export);
            Ok(answer(
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            ))
        }
        Err(_) => Ok(answer(StatusCode::BAD_REQUEST, Vec::new())),
    }
}
