//! Sockets inside pod namespaces: the agent's design (`PodNetns`: enter the
//! pod's namespace on the calling thread and back, setns twice per socket,
//! as ztunnel's in-pod mode does) against the one it replaced (a worker
//! thread per pod that joined the pod's namespace once; the async side asks
//! it for a socket and waits), kept here for the comparison.
//!
//! For 100 and 1,000 namespaces (each with lo up and a listener on
//! 127.0.0.1:8080): the latency of "a socket in pod N, connected to its
//! listener" (p50/p99 over 4,000 connects spread over the pods, one at a
//! time from a tokio runtime of 2 workers), and the agent-side RSS and
//! thread count each design costs. Needs root (CAP_SYS_ADMIN). Run:
//! `cargo bench -p mesh-agent --bench netns_sockets`.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use mesh_agent::capture::pod_netns::PodNetns;
use nix::sched::{CloneFlags, setns, unshare};

type Job = Box<dyn FnOnce() + Send>;

/// The design replaced: a thread per pod that lives in the pod's namespace.
struct ThreadPerPod {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl ThreadPerPod {
    fn start(ns: &OwnedFd) -> Self {
        let ns = ns.try_clone().unwrap();
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
            for job in queue {
                job();
            }
        });
        Self { jobs }
    }

    async fn tcp_socket(&self) -> tokio::net::TcpSocket {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .unwrap();
                socket.set_nonblocking(true).unwrap();
                let _ = tx.send(std::net::TcpStream::from(socket));
            }))
            .unwrap();
        tokio::net::TcpSocket::from_std_stream(rx.await.unwrap())
    }
}

/// Spread over the pods; under the listeners' backlog (128) at 100 pods for
/// both designs together, as nothing accepts.
const CONNECTS: usize = 4_000;
const PORT: u16 = 8080;

/// A network namespace of its own with lo up and a listener in it; the
/// namespace lives as long as the descriptor.
struct Namespace {
    fd: OwnedFd,
    _listener: std::net::TcpListener,
}

fn new_namespace() -> Namespace {
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        bring_lo_up();
        let listener = std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT))
            .expect("listener in the namespace");
        let fd = File::open("/proc/thread-self/ns/net").expect("the namespace's descriptor");
        Namespace {
            fd: fd.into(),
            _listener: listener,
        }
    })
    .join()
    .expect("namespace thread")
}

fn bring_lo_up() {
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS on a socket we own, with an ifreq
    // naming "lo"; a bench helper, not agent code.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req), 0);
        libc::close(fd);
    }
}

fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

fn threads() -> u64 {
    status_field("Threads:")
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(design: &str, pods: usize, mut samples: Vec<Duration>, rss: u64, threads: u64) {
    samples.sort();
    println!(
        "{design:<22} pods={pods:<5} connect p50={:>6.1} µs p99={:>7.1} µs  rss +{rss:>6} KiB  threads +{threads}",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let target = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT));
    for pods in [100, 1_000] {
        let namespaces: Vec<Namespace> = (0..pods).map(|_| new_namespace()).collect();
        let paths: Vec<String> = namespaces
            .iter()
            .map(|ns| format!("/proc/self/fd/{}", ns.fd.as_raw_fd()))
            .collect();

        // The replaced design: a worker thread per pod.
        let (rss0, threads0) = (rss_kib(), threads());
        let workers: Vec<ThreadPerPod> = namespaces
            .iter()
            .map(|ns| ThreadPerPod::start(&ns.fd))
            .collect();
        let (rss1, threads1) = (rss_kib(), threads());
        let samples = runtime.block_on(async {
            let mut samples = Vec::with_capacity(CONNECTS);
            for i in 0..CONNECTS {
                let worker = &workers[i % pods];
                let started = Instant::now();
                let socket = worker.tcp_socket().await;
                let stream = socket.connect(target).await.unwrap();
                samples.push(started.elapsed());
                drop(stream);
            }
            samples
        });
        report(
            "thread per pod",
            pods,
            samples,
            rss1.saturating_sub(rss0),
            threads1.saturating_sub(threads0),
        );
        drop(workers);

        // The agent's design: setns on the calling thread and back, measured
        // once the workers' threads are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads() > threads0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (rss0, threads0) = (rss_kib(), threads());
        let pod_namespaces: Vec<PodNetns> = paths
            .iter()
            .map(|path| PodNetns::open(path.as_ref()).unwrap())
            .collect();
        let (rss1, threads1) = (rss_kib(), threads());
        let samples = runtime.block_on(async {
            let mut samples = Vec::with_capacity(CONNECTS);
            for i in 0..CONNECTS {
                let started = Instant::now();
                let socket = pod_namespaces[i % pods].tcp_socket(false).unwrap();
                let stream = socket.connect(target).await.unwrap();
                samples.push(started.elapsed());
                drop(stream);
            }
            samples
        });
        report(
            "setns on the caller",
            pods,
            samples,
            rss1.saturating_sub(rss0),
            threads1.saturating_sub(threads0),
        );
        drop(pod_namespaces);
        drop(namespaces);
    }
}
