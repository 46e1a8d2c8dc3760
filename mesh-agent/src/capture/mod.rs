//! Enrolment: turning the configured pods into captured pods, and back.
//!
//! For each pod: a worker in its network namespace, the agent's listeners there
//! (outbound 15001, inbound 15006, IPv4 and IPv6), the kernel programs attached
//! (see `ebpf`), and accept loops feeding the proxy. `reconcile` moves from the
//! running set to the configured one, touching only the pods that changed;
//! the daemon then publishes a snapshot with `pods()` and calls
//! `start_serving`, so no connection of a new pod meets a snapshot without it.

pub mod delivery_routing;
pub mod pod_netns;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use mesh_common::{DNS_PROXY_PORT, INBOUND_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    config::PodConfig,
    ebpf::{InboundListeners, KernelPrograms},
    handover::{ListenerKind, Offer, PodSockets},
    proxy::{self, PodHandle, ProxyContext, admission::Limit, tunnel_inbound},
    state::{PodCountersView, PodStatus},
};
use pod_netns::{PodNetns, dns_socket, listen};

struct PodRuntime {
    config: PodConfig,
    netns_cookie: u64,
    handle: Arc<PodHandle>,
    /// Bound but not accepted on yet: a pod is served only once the
    /// snapshot that knows it is in force (see `start_serving`).
    pending: Option<PodListeners>,
    /// The DNS proxy's sockets, not served yet (as `pending`).
    pending_dns: Vec<std::net::UdpSocket>,
    accept_loops: Vec<JoinHandle<()>>,
    /// The listeners' sockets (copies of the descriptors the accept loops
    /// own), to hand to a successor.
    sockets: Vec<(ListenerKind, OwnedFd)>,
}

impl Drop for PodRuntime {
    fn drop(&mut self) {
        // Closing the listeners also takes the inbound ones out of the kernel's
        // listener map: sk_lookup then refuses instead of delivering around us.
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

pub struct Enroller {
    pub programs: KernelPrograms,
    proxy: Arc<ProxyContext>,
    running: BTreeMap<String, PodRuntime>,
    /// Last outcome per configured pod (errors included), in config order.
    statuses: Vec<PodStatus>,
    /// Listeners taken over from the agent this one replaces, not used yet.
    inherited: HashMap<String, PodSockets>,
    /// Deliveries into pods come from the client's address (node.yaml
    /// `preserveSourceAddress`).
    pub preserve_source_address: bool,
}

impl Enroller {
    pub fn new(programs: KernelPrograms, proxy: Arc<ProxyContext>) -> Self {
        Self {
            programs,
            proxy,
            running: BTreeMap::new(),
            statuses: Vec::new(),
            inherited: HashMap::new(),
            preserve_source_address: true,
        }
    }

    /// Listeners handed over by the agent this one replaces: pods enrolled
    /// from now on serve on them instead of binding new ones.
    pub fn adopt(&mut self, pods: HashMap<String, PodSockets>) {
        self.inherited = pods;
    }

    /// Closes the handed-over listeners no configured pod took (the pod left
    /// the configuration, or moved to another namespace); their number.
    pub fn close_unadopted(&mut self) -> usize {
        std::mem::take(&mut self.inherited).len()
    }

    /// Copies of every pod's listeners, for a successor.
    pub fn offer(&self) -> Offer {
        let mut offer = Offer::default();
        for (key, runtime) in &self.running {
            let listeners = runtime
                .sockets
                .iter()
                .filter_map(|(kind, fd)| Some((*kind, fd.try_clone().ok()?)))
                .collect();
            offer.pods.insert(
                key.clone(),
                PodSockets {
                    netns_cookie: runtime.netns_cookie,
                    listeners,
                },
            );
        }
        offer
    }

    /// Enrols configured pods that are not running (or changed), releases running
    /// pods that are no longer configured. A pod that cannot be enrolled is
    /// reported and does not stop the others. Must run inside the tokio runtime.
    pub fn reconcile(&mut self, desired: &[PodConfig]) {
        let wanted: BTreeMap<String, &PodConfig> = desired.iter().map(|p| (p.key(), p)).collect();
        let obsolete: Vec<String> = self
            .running
            .iter()
            .filter(|(key, rt)| wanted.get(*key).is_none_or(|cfg| **cfg != rt.config))
            .map(|(key, _)| key.clone())
            .collect();
        let mut carried_over = Vec::new();
        for key in obsolete {
            // Changed, not gone (new labels, ports, ...): its listeners carry
            // over to the new enrolment, as in a handover. Binding new ones
            // would race the old accept loops, which close theirs only
            // once their tasks are dropped: "address in use".
            if wanted.contains_key(&key)
                && let Some(runtime) = self.running.get_mut(&key)
            {
                let listeners = std::mem::take(&mut runtime.sockets);
                let netns_cookie = runtime.netns_cookie;
                self.inherited.insert(
                    key.clone(),
                    PodSockets {
                        netns_cookie,
                        listeners,
                    },
                );
                carried_over.push(key.clone());
            }
            self.release(&key);
        }
        let identities: Vec<_> = desired
            .iter()
            .filter_map(|p| {
                self.proxy
                    .mtls
                    .workload_identity(&p.namespace, &p.service_account)
                    .ok()
            })
            .collect();
        if let Err(err) = self.proxy.mtls.ensure_identities(&identities) {
            tracing::error!(
                error = format!("{err:#}"),
                "some workload certificates are missing"
            );
        }
        let mut statuses = Vec::with_capacity(desired.len());
        for pod in desired {
            let key = pod.key();
            let result = match self.running.get(&key) {
                Some(rt) => Ok(rt.netns_cookie),
                None => self.enrol(pod),
            };
            statuses.push(match result {
                Ok(netns_cookie) => PodStatus {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    enrolled: true,
                    error: None,
                    netns_cookie: Some(netns_cookie),
                    counters: None,
                    source_address: None,
                },
                Err(err) => {
                    tracing::error!(pod = %key, error = format!("{err:#}"), "pod NOT enrolled: its traffic is not captured");
                    PodStatus {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        enrolled: false,
                        error: Some(format!("{err:#}")),
                        netns_cookie: None,
                        counters: None,
                        source_address: None,
                    }
                }
            });
        }
        self.statuses = statuses;
        // Listeners carried over for a pod that could not be enrolled again
        // are closed now.
        for key in carried_over {
            self.inherited.remove(&key);
        }
    }

    fn enrol(&mut self, pod: &PodConfig) -> Result<u64> {
        let key = pod.key();
        let netns = PodNetns::open(&pod.netns)?;
        let netns_cookie = netns
            .run(crate::ebpf::current_netns_cookie)
            .and_then(|r| r)
            .context("reading the pod's netns cookie")?;
        let tunnel = self.proxy.mtls.identities.is_some();
        let listeners = match self.inherited.remove(&key) {
            Some(sockets) if sockets.netns_cookie == netns_cookie => {
                adopt_listeners(sockets, tunnel)
                    .context("checking the listeners handed over by the previous agent")?
            }
            // Another namespace (the pod was recreated): its listeners go.
            _ => netns.run(move || bind_listeners(tunnel))?.with_context(|| {
                format!("binding the agent's listeners in the pod (ports {OUTBOUND_PORT} and {INBOUND_PORT} are reserved in enrolled pods; {TUNNEL_PORT} too with mutual TLS)")
            })?,
        };
        let dns_sockets = netns.run(bind_dns_sockets)?.with_context(|| {
            format!("binding the agent's DNS proxy in the pod (UDP port {DNS_PROXY_PORT} is reserved in enrolled pods)")
        })?;
        let inbound = |kind| {
            listeners
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, l)| l.as_fd())
        };
        let enrolment = self.programs.enrol(
            pod,
            netns_cookie,
            InboundListeners {
                ipv4: inbound(ListenerKind::InboundV4).context("no IPv4 inbound listener")?,
                ipv6: inbound(ListenerKind::InboundV6),
            },
        )?;
        let identity = self
            .proxy
            .mtls
            .workload_identity(&pod.namespace, &pod.service_account)?;
        let addrs: Vec<IpAddr> = pod
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(pod.ipv6.map(IpAddr::V6))
            .collect();
        let workload = crate::policy::Workload {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
        };
        let source_address = self.set_up_source_address(&netns, pod, &key);
        let handle = Arc::new(PodHandle {
            key: key.clone(),
            netns_cookie,
            netns,
            identity,
            addrs,
            workload,
            open_connections: Arc::default(),
            opaque_ports: {
                let mut ports = pod.opaque_ports.clone();
                ports.sort_unstable();
                ports.dedup();
                ports
            },
            kubelet_probes: pod.kubelet_probes.clone(),
            source_address,
        });
        let sockets = listeners
            .iter()
            .map(|(kind, l)| Ok((*kind, l.as_fd().try_clone_to_owned()?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        tracing::info!(pod = %key, netns_cookie, slot = enrolment.slot, cgroup = %pod.cgroup.display(), "pod enrolled");
        self.running.insert(
            key,
            PodRuntime {
                config: pod.clone(),
                netns_cookie,
                handle,
                pending: Some(listeners),
                pending_dns: dns_sockets,
                accept_loops: Vec::new(),
                sockets,
            },
        );
        Ok(netns_cookie)
    }

    /// Whether deliveries into the pod can come from clients' addresses:
    /// its routing for them set up, or why not (the pod is served either
    /// way, from the agent's address).
    fn set_up_source_address(
        &self,
        netns: &PodNetns,
        pod: &PodConfig,
        key: &str,
    ) -> proxy::source_address::SourceAddress {
        use proxy::source_address::SourceAddress;
        if !self.preserve_source_address {
            return SourceAddress::unavailable("preserveSourceAddress is off".into());
        }
        match delivery_routing::install(netns, pod.ipv6.is_some()) {
            Ok(()) => SourceAddress::preserved(),
            Err(err) => {
                let reason = format!("{err:#}");
                tracing::warn!(pod = %key, error = %reason, "deliveries into the pod come from the agent's address: its routing for clients' addresses could not be set up");
                SourceAddress::unavailable(reason)
            }
        }
    }

    /// The pods enrolled now, for the next snapshot.
    pub fn pods(&self) -> Vec<Arc<PodHandle>> {
        self.running.values().map(|rt| rt.handle.clone()).collect()
    }

    /// Starts accepting on the listeners of pods enrolled since the last
    /// call. Until then the kernel queues their connections in the
    /// listeners' backlogs.
    pub fn start_serving(&mut self) {
        for (key, runtime) in &mut self.running {
            let Some(listeners) = runtime.pending.take() else {
                continue;
            };
            match spawn_accept_loops(listeners, &self.proxy, &runtime.handle) {
                Ok(loops) => runtime.accept_loops = loops,
                Err(err) => {
                    tracing::error!(pod = %key, error = format!("{err:#}"), "the pod's listeners cannot be served")
                }
            }
        }
        self.start_dns();
    }

    /// Starts the DNS proxy on the sockets of pods enrolled since the last
    /// call (with `start_serving`).
    fn start_dns(&mut self) {
        for (key, runtime) in &mut self.running {
            for socket in std::mem::take(&mut runtime.pending_dns) {
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(socket) => {
                        runtime
                            .accept_loops
                            .push(tokio::spawn(crate::dns::proxy::serve_udp(
                                socket,
                                self.proxy.clone(),
                                runtime.handle.clone(),
                            )))
                    }
                    Err(err) => {
                        tracing::error!(pod = %key, error = %err, "the pod's DNS proxy cannot be served")
                    }
                }
            }
        }
    }

    /// Detaches the kernel programs first, then closes the listeners: open
    /// connections of the pod carry on.
    fn release(&mut self, key: &str) {
        if let Err(err) = self.programs.release(key) {
            tracing::warn!(pod = %key, error = %err, "releasing the kernel side failed");
        }
        self.running.remove(key);
        tracing::info!(pod = %key, "pod released");
    }

    /// The network namespace the pod `key` is enrolled in, if it is.
    pub fn enrolled_netns(&self, key: &str) -> Option<&std::path::Path> {
        self.running.get(key).map(|rt| rt.config.netns.as_path())
    }

    /// Why the pod `key` could not be enrolled at the last change, if so.
    pub fn enrolment_error(&self, key: &str) -> Option<String> {
        self.statuses
            .iter()
            .find(|s| format!("{}/{}", s.namespace, s.name) == key)
            .and_then(|s| s.error.clone())
    }

    /// Pods served now.
    pub fn enrolled_count(&self) -> usize {
        self.running.len()
    }

    /// Pod statuses with fresh counters.
    pub fn statuses(&self) -> Vec<PodStatus> {
        let mut statuses = self.statuses.clone();
        for pod in statuses.iter_mut().filter(|p| p.enrolled) {
            let key = format!("{}/{}", pod.namespace, pod.name);
            match self.programs.counters(&key) {
                Ok(c) => pod.counters = Some(PodCountersView::from(c)),
                Err(err) => tracing::warn!(pod = %key, error = %err, "reading pod counters failed"),
            }
            pod.source_address = self
                .running
                .get(&key)
                .map(|rt| rt.handle.source_address.view());
        }
        statuses
    }

    /// Stops serving every pod (listeners closed); the kernel side is left as is.
    pub fn stop_serving(&mut self) {
        self.running.clear();
    }
}

/// The agent's listeners in one pod's namespace.
type PodListeners = Vec<(ListenerKind, std::net::TcpListener)>;

impl ListenerKind {
    fn port(self) -> u16 {
        match self {
            Self::OutboundV4 | Self::OutboundV6 => OUTBOUND_PORT,
            Self::InboundV4 | Self::InboundV6 => INBOUND_PORT,
            Self::TunnelV4 | Self::TunnelV6 => TUNNEL_PORT,
        }
    }
}

/// The DNS proxy's sockets (run in the pod's namespace): 127.0.0.1:15053,
/// and [::1]:15053 where the pod has IPv6. Without one of a family the
/// kernel programs refuse that family's queries (fail-closed).
fn bind_dns_sockets() -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = vec![dns_socket(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        DNS_PROXY_PORT,
    ))?];
    sockets.extend(
        dns_socket(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            DNS_PROXY_PORT,
        ))
        .ok(),
    );
    Ok(sockets)
}

/// Runs in the pod's namespace. IPv6 listeners are optional (a pod may
/// have IPv6 off); without one, IPv6 connections of the pod are refused by the
/// kernel programs, never let through. The tunnel listener (on all of the
/// pod's addresses: its namespace has only the pod's own) exists only where
/// mutual TLS can be done; without it, connections to the tunnel port are
/// refused.
fn bind_listeners(tunnel: bool) -> std::io::Result<PodListeners> {
    let v4 = |port| listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    let v6 = |port| listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)).ok();
    let mut listeners = vec![
        (ListenerKind::OutboundV4, v4(OUTBOUND_PORT)?),
        (ListenerKind::InboundV4, v4(INBOUND_PORT)?),
    ];
    listeners.extend(v6(OUTBOUND_PORT).map(|l| (ListenerKind::OutboundV6, l)));
    listeners.extend(v6(INBOUND_PORT).map(|l| (ListenerKind::InboundV6, l)));
    if tunnel {
        let any_v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), TUNNEL_PORT);
        listeners.push((ListenerKind::TunnelV4, listen(any_v4)?));
        let any_v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), TUNNEL_PORT);
        listeners.extend(listen(any_v6).ok().map(|l| (ListenerKind::TunnelV6, l)));
    }
    Ok(listeners)
}

/// The listeners of a pod handed over by the previous agent, each checked
/// (listening, on its port, in the pod's namespace). The tunnel listeners go
/// if this agent does no mutual TLS.
fn adopt_listeners(sockets: PodSockets, tunnel: bool) -> Result<PodListeners> {
    let mut listeners = Vec::new();
    for (kind, fd) in sockets.listeners {
        if matches!(kind, ListenerKind::TunnelV4 | ListenerKind::TunnelV6) && !tunnel {
            continue;
        }
        crate::handover::check_listener(&fd, kind.port(), sockets.netns_cookie)
            .with_context(|| format!("the {kind:?} listener"))?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        listeners.push((kind, listener));
    }
    if !listeners
        .iter()
        .any(|(k, _)| *k == ListenerKind::OutboundV4)
        || !listeners.iter().any(|(k, _)| *k == ListenerKind::InboundV4)
    {
        bail!("the IPv4 outbound or inbound listener is missing");
    }
    if tunnel && !listeners.iter().any(|(k, _)| *k == ListenerKind::TunnelV4) {
        bail!("the tunnel listener is missing");
    }
    Ok(listeners)
}

fn spawn_accept_loops(
    listeners: PodListeners,
    proxy: &Arc<ProxyContext>,
    pod: &Arc<PodHandle>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut loops = Vec::new();
    for (kind, listener) in listeners {
        let listener = TcpListener::from_std(listener)?;
        let (proxy, pod) = (proxy.clone(), pod.clone());
        loops.push(match kind {
            ListenerKind::OutboundV4 | ListenerKind::OutboundV6 => {
                tokio::spawn(accept_loop(listener, true, proxy, pod))
            }
            ListenerKind::InboundV4 | ListenerKind::InboundV6 => {
                tokio::spawn(accept_loop(listener, false, proxy, pod))
            }
            ListenerKind::TunnelV4 | ListenerKind::TunnelV6 => {
                tokio::spawn(tunnel_accept_loop(listener, proxy, pod))
            }
        });
    }
    Ok(loops)
}

async fn tunnel_accept_loop(listener: TcpListener, proxy: Arc<ProxyContext>, pod: Arc<PodHandle>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(admitted) = proxy
                    .admission
                    .admit(Limit::TunnelConnections, &proxy.tunnel_connections)
                else {
                    tracing::debug!(pod = %pod.key, %peer, "tunnel connection limit reached: reset");
                    crate::proxy::reset(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let handle = tunnel_inbound::handle(proxy.clone(), pod.clone(), stream, peer);
                tokio::spawn(async move {
                    handle.await;
                    drop(admitted);
                });
            }
            Err(err) => {
                let pod = pod.key.to_string();
                proxy.admission.accept_failed(&listener, &err, &pod).await;
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    outbound: bool,
    proxy: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let Some(admitted) = proxy
                    .admission
                    .admit(Limit::ConnectionsPerPod, &pod.open_connections)
                else {
                    tracing::debug!(pod = %pod.key, %client, outbound, "the pod's connection limit is reached: reset");
                    crate::proxy::reset(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (proxy, pod) = (proxy.clone(), pod.clone());
                tokio::spawn(async move {
                    if outbound {
                        proxy::outbound::handle(proxy, pod, stream, client).await;
                    } else {
                        proxy::inbound::handle(proxy, pod, stream, client).await;
                    }
                    drop(admitted);
                });
            }
            Err(err) => {
                let pod = pod.key.to_string();
                proxy.admission.accept_failed(&listener, &err, &pod).await;
            }
        }
    }
}

impl From<mesh_common::PodCounters> for PodCountersView {
    fn from(c: mesh_common::PodCounters) -> Self {
        Self {
            connect4: c.connect4,
            connect6: c.connect6,
            captured_outbound: c.captured_outbound,
            captured_inbound: c.captured_inbound,
            excluded: c.excluded,
            refused_agent_absent: c.refused_agent_absent,
            refused_map_full: c.refused_map_full,
        }
    }
}
