//! An HTTP backend the test process runs inside a pod's netns, with knobs a test
//! turns while traffic flows (delay, status, refusing connections) and counters
//! it reads afterwards. Being in-process, a test can fail a backend and bring it
//! back at a precise moment, which a separate server process cannot offer.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, anyhow};
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::HeaderValue,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use mesh_testbed::Pod;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle as TaskHandle,
};

/// How long `start`, `refuse` and `resume` wait for the server thread.
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// How long a new connection may take to show whether it speaks HTTP/2.
const SNIFF_DEADLINE: Duration = Duration::from_secs(5);
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/1.1 + h2c server on one port of a pod; see [`HttpBackend::start`].
pub struct HttpBackend {
    name: String,
    state: Arc<State>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected once the server thread has returned.
    exited: std_mpsc::Receiver<()>,
}

/// Knobs and counters, shared with the server thread.
struct State {
    name: HeaderValue,
    delay_us: AtomicU64,
    status: AtomicU16,
    served: AtomicU64,
    connections: AtomicU64,
    /// Requests being answered now, and the most at once so far.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    served_by_status: Mutex<HashMap<u16, u64>>,
    /// The first requests, as the application saw them.
    seen: Mutex<Vec<SeenRequest>>,
}

/// Requests kept for [`HttpBackend::seen_requests`], at most.
const SEEN_KEPT: usize = 10_000;

/// One request as the application saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The `Host` header, or the HTTP/2 authority.
    pub host: Option<String>,
    pub traceparent: Option<String>,
    pub b3: Option<String>,
    /// Every header (names in lower case), in order.
    pub headers: Vec<(String, String)>,
    /// The body's length.
    pub body_len: usize,
}

impl SeenRequest {
    /// The values of header `name` (lower case).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type Reply = std_mpsc::Sender<Result<(), String>>;

enum Command {
    Refuse(Reply),
    Resume(Reply),
    Stop,
}

impl HttpBackend {
    /// Serves HTTP/1.1 and HTTP/2 prior-knowledge (h2c) on `0.0.0.0:port` and
    /// `[::]:port` (when the netns has IPv6) in `pod`'s netns. Every response has
    /// the header `x-served-by: <name>` and the body `<name>`. Returns once
    /// listening.
    pub fn start(pod: &Pod, port: u16, name: &str) -> anyhow::Result<HttpBackend> {
        Self::start_in(Some(pod.netns_path()), port, name).with_context(|| {
            format!(
                "HTTP backend `{name}` on port {port} in pod `{}`",
                pod.name()
            )
        })
    }

    /// Like [`HttpBackend::start`], in `netns` or, without one, in the caller's
    /// netns.
    pub(crate) fn start_in(
        netns: Option<PathBuf>,
        port: u16,
        name: &str,
    ) -> anyhow::Result<HttpBackend> {
        let state = Arc::new(State {
            name: HeaderValue::from_str(name).context("the name must fit in a header")?,
            delay_us: AtomicU64::new(0),
            status: AtomicU16::new(200),
            served: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            served_by_status: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (exited_tx, exited) = std_mpsc::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("http-backend-{name}"))
            .spawn(move || {
                let _exited = exited_tx;
                serve_thread(netns, port, thread_state, commands_rx, ready_tx);
            })
            .context("spawning the server thread")?;
        let backend = HttpBackend {
            name: name.to_string(),
            state,
            commands,
            thread: Some(thread),
            exited,
        };
        match ready_rx.recv_timeout(CONTROL_DEADLINE) {
            Ok(Ok(())) => Ok(backend),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow!(
                "the server thread did not report (listening?): {e}"
            )),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Added before answering each request (after its body was read).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::Relaxed);
    }

    /// The status of every answer from now on (default 200); panics unless it is
    /// a valid status code.
    pub fn set_status(&self, status: u16) {
        StatusCode::from_u16(status).unwrap_or_else(|e| panic!("status {status}: {e}"));
        self.state.status.store(status, Ordering::Relaxed);
    }

    /// Stops listening (new connects are refused with a RST) and resets every
    /// open connection; requests in flight are never answered. Done when it
    /// returns; panics if the server thread does not answer.
    pub fn refuse(&self) {
        self.control(Command::Refuse, "refuse");
    }

    /// Listens again on the same port; listening when it returns. Panics if the
    /// port cannot be bound again.
    pub fn resume(&self) {
        self.control(Command::Resume, "resume");
    }

    /// Requests answered (any status) since start.
    /// The most requests this backend was answering at once so far.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Requests answered with `status` since start.
    pub fn served_with(&self, status: u16) -> u64 {
        let by_status = self.state.served_by_status.lock().expect("counters");
        by_status.get(&status).copied().unwrap_or(0)
    }

    /// The requests served so far (the first 10,000), as the application
    /// saw them.
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().expect("seen requests").clone()
    }

    /// TCP connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    fn control(&self, command: fn(Reply) -> Command, what: &str) {
        let (reply, answer) = std_mpsc::channel();
        let outcome = self
            .commands
            .send(command(reply))
            .map_err(|_| "the server thread is gone".to_string())
            .and_then(|()| {
                answer
                    .recv_timeout(CONTROL_DEADLINE)
                    .map_err(|e| format!("no answer from the server thread: {e}"))?
            });
        if let Err(e) = outcome {
            panic!("HTTP backend `{}`: {what}: {e}", self.name);
        }
    }
}

impl Drop for HttpBackend {
    /// Stops the server; waits for its thread a bounded time, then leaves it be
    /// rather than hang the test.
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Err(std_mpsc::RecvTimeoutError::Disconnected) =
            self.exited.recv_timeout(Duration::from_secs(5))
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

/// The server thread: joins the netns, then runs everything on a current-thread
/// runtime so every socket is created in that netns (namespaces are per thread).
fn serve_thread(
    netns: Option<PathBuf>,
    port: u16,
    state: Arc<State>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    ready: std_mpsc::Sender<anyhow::Result<()>>,
) {
    let setup = || -> anyhow::Result<tokio::runtime::Runtime> {
        if let Some(netns) = &netns {
            let file = std::fs::File::open(netns)
                .with_context(|| format!("opening {}", netns.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining {}", netns.display()))?;
        }
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    };
    let runtime = match setup() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let mut server = Server {
            port,
            state,
            accept: Vec::new(),
            live: Arc::new(Mutex::new(HashMap::new())),
            next_id: 0,
        };
        let listening = server.listen().await;
        let ok = listening.is_ok();
        let _ = ready.send(listening);
        if !ok {
            return;
        }
        while let Some(command) = commands.recv().await {
            match command {
                Command::Refuse(reply) => {
                    server.refuse().await;
                    let _ = reply.send(Ok(()));
                }
                Command::Resume(reply) => {
                    let _ = reply.send(server.listen().await.map_err(|e| format!("{e:#}")));
                }
                Command::Stop => break,
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// An open connection: its task, and a duplicate of its socket so `refuse` can
/// set a zero linger (close = RST) on a socket the task owns.
struct Live {
    socket: Option<OwnedFd>,
    task: Option<TaskHandle<()>>,
}

type LiveMap = Arc<Mutex<HashMap<u64, Live>>>;

struct Server {
    port: u16,
    state: Arc<State>,
    /// Accept loops; empty while refusing.
    accept: Vec<TaskHandle<()>>,
    live: LiveMap,
    next_id: u64,
}

impl Server {
    /// Binds `0.0.0.0:port`, and `[::]:port` (v6 only) unless the netns has no
    /// IPv6, then accepts on both. Nothing to do when already listening.
    async fn listen(&mut self) -> anyhow::Result<()> {
        if !self.accept.is_empty() {
            return Ok(());
        }
        let mut listeners = vec![bind_v4(self.port).context("binding 0.0.0.0")?];
        match bind_v6(self.port) {
            Ok(listener) => listeners.push(listener),
            Err(e)
                if e.raw_os_error() == Some(libc::EAFNOSUPPORT)
                    || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => return Err(e).context("binding [::]"),
        }
        for listener in listeners {
            let (state, live) = (self.state.clone(), self.live.clone());
            let mut next_id = self.next_id;
            // Ids only need to be unique: each loop takes its own range.
            self.next_id += 1 << 40;
            self.accept.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((tcp, _)) => {
                            next_id += 1;
                            accepted(tcp, next_id, &state, &live);
                        }
                        // Out of descriptors or an aborted handshake: try again later.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
        Ok(())
    }

    /// Closes the listeners, then resets every open connection.
    async fn refuse(&mut self) {
        for task in self.accept.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let live: Vec<Live> = self
            .live
            .lock()
            .expect("live connections")
            .drain()
            .map(|(_, live)| live)
            .collect();
        let reset = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        for conn in &live {
            if let Some(socket) = &conn.socket {
                let _ = setsockopt(socket, sockopt::Linger, &reset);
            }
            if let Some(task) = &conn.task {
                task.abort();
            }
        }
        // Once a task is gone, dropping our duplicate is the socket's last close.
        for conn in live {
            if let Some(task) = conn.task {
                let _ = task.await;
            }
        }
    }
}

fn bind_v4(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    socket.listen(1024)
}

fn bind_v6(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    // Its own socket next to the IPv4 one, as the test bed's other servers do.
    socket2::SockRef::from(&socket).set_only_v6(true)?;
    socket.bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
    socket.listen(1024)
}

/// Registers and serves one accepted connection.
fn accepted(tcp: TcpStream, id: u64, state: &Arc<State>, live: &LiveMap) {
    state.connections.fetch_add(1, Ordering::Relaxed);
    // Answers go out as written: no Nagle delay behind the client's delayed ACK.
    let _ = tcp.set_nodelay(true);
    let socket = tcp.as_fd().try_clone_to_owned().ok();
    // Registered before the task exists, so its own removal can never come first.
    live.lock()
        .expect("live connections")
        .insert(id, Live { socket, task: None });
    let (state, registry) = (state.clone(), live.clone());
    let task = tokio::spawn(async move {
        serve_connection(tcp, state).await;
        registry.lock().expect("live connections").remove(&id);
    });
    if let Some(conn) = live.lock().expect("live connections").get_mut(&id) {
        conn.task = Some(task);
    }
}

async fn serve_connection(tcp: TcpStream, state: Arc<State>) {
    let Some(h2) = speaks_h2(&tcp).await else {
        return;
    };
    let service = service_fn(move |req| answer(req, state.clone()));
    let io = TokioIo::new(tcp);
    if h2 {
        // hyper runs each stream as a task of its own; tie them to this
        // connection so a reset connection cannot still count answers.
        let (gone, gone_rx) = watch::channel(());
        let _ = http2::Builder::new(StreamExecutor(gone_rx))
            .serve_connection(io, service)
            .await;
        drop(gone);
    } else {
        let _ = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service)
            .await;
    }
}

/// Whether the client opened with the HTTP/2 preface; `None` if it closed or
/// said nothing conclusive in time. (Also used by the `http-serve` tool.)
pub async fn speaks_h2(tcp: &TcpStream) -> Option<bool> {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = tcp.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface so far: peeking again would return at once.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(SNIFF_DEADLINE, sniff)
        .await
        .ok()
        .flatten()
}

/// Reads the whole request body, waits the configured delay, answers.
async fn answer(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    /// Counts the request out however its answer ends (a client that
    /// goes away drops it).
    struct Counted<'a>(&'a AtomicU64);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _counted = Counted(&state.in_flight);
    answer_counted(req, &state).await
}

/// [`answer`], between the in-flight counts.
async fn answer_counted(
    req: Request<Incoming>,
    state: &Arc<State>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (head, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    {
        let mut kept = state.seen.lock().expect("seen requests");
        if kept.len() < SEEN_KEPT {
            let header = |name: &str| {
                head.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            kept.push(SeenRequest {
                method: head.method.to_string(),
                path: head
                    .uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned(),
                host: header("host").or_else(|| head.uri.authority().map(|a| a.to_string())),
                traceparent: header("traceparent"),
                b3: header("b3"),
                headers: head
                    .headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body_len: body.len(),
            });
        }
    }
    let delay = state.delay_us.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    let status = state.status.load(Ordering::Relaxed);
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(state.name.as_bytes())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response
        .headers_mut()
        .insert("x-served-by", state.name.clone());
    state.served.fetch_add(1, Ordering::Relaxed);
    *state
        .served_by_status
        .lock()
        .expect("counters")
        .entry(status)
        .or_default() += 1;
    Ok(response)
}

/// Spawns hyper's HTTP/2 stream tasks so that they end with their connection:
/// each is dropped once the connection's sender of `gone` is.
#[derive(Clone)]
struct StreamExecutor(watch::Receiver<()>);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut gone = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = gone.changed() => {}
            }
        });
    }
}
