//! `cargo xtask demo`: builds what is needed, brings up a small shop in the
//! test bed and shows the mesh at work, then tears everything down.
//!
//! The mesh: node1 {frontend, backend-1}, node2 {backend-2, database}; an
//! agent on each node with certificates minted from a demo CA. The service
//! `shop/backend` (a VIP on an HTTP port) is balanced per request over
//! backend-1 and backend-2 by node1's agent; policies on the destinations'
//! nodes let the frontend GET `/api/*` on the backend and only the backend
//! reach the database. Real clients in the pods make the calls; what was
//! allowed or denied, by which policy, and whether it crossed nodes over
//! mTLS is read back from the agents (`/metrics`, `/debug/connections`),
//! never assumed. An outcome other than the expected one fails the demo, so
//! it doubles as a smoke test.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::{Node, Pod, Process, Topology, e2e_preflight, traffic::start_echo_server};
use serde_json::Value;

use crate::{
    agents::{self, ADMIN},
    setup, step,
};

pub(crate) const NAMESPACE: &str = "shop";
const TRUST_DOMAIN: &str = "cluster.local";
/// The backend service: its VIP and port, and the backends' own port.
pub(crate) const BACKEND_VIP: &str = "10.96.0.10";
pub(crate) const BACKEND_VIP_PORT: u16 = 80;
pub(crate) const HTTP_PORT: u16 = 8080;
pub(crate) const DB_PORT: u16 = 5432;
/// GET /api/... requests the frontend sends through the service.
const API_REQUESTS: usize = 20;
/// ... over this many connections at the same time.
const API_CONNECTIONS: usize = 4;

/// A pod of the demo: its name in the test bed (no dashes allowed there)
/// and in the mesh, its `app` label and service account.
struct Workload {
    bed: &'static str,
    name: &'static str,
    app: &'static str,
    service_account: &'static str,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        bed: "frontend",
        name: "frontend",
        app: "frontend",
        service_account: "frontend",
    },
    Workload {
        bed: "backend1",
        name: "backend-1",
        app: "backend",
        service_account: "backend",
    },
    Workload {
        bed: "backend2",
        name: "backend-2",
        app: "backend",
        service_account: "backend",
    },
    Workload {
        bed: "database",
        name: "database",
        app: "database",
        service_account: "database",
    },
];

fn workload(bed: &str) -> &'static Workload {
    WORKLOADS
        .iter()
        .find(|w| w.bed == bed)
        .expect("every pod of the demo is a workload")
}

/// The pod's name in the mesh (`backend-1`, not the test bed's `backend1`).
fn mesh_name(pod: &Pod) -> &'static str {
    workload(pod.name()).name
}

pub(crate) const BACKEND_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/shop/sa/frontend\"]}}]
    to: [{operation: {methods: [\"GET\"], paths: [\"/api/*\"]}}]
";

const DATABASE_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: database-from-backend, namespace: shop}
spec:
  selector: {matchLabels: {app: database}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/shop/sa/backend\"]}}]
";

pub fn run(workspace: &Path) -> Result<()> {
    let started = Instant::now();
    e2e_preflight().map_err(|why| {
        anyhow::anyhow!("the demo builds network namespaces and loads kernel programs: {why}")
    })?;
    step("[1/6] kernel toolchain and programs");
    setup::build_ebpf(workspace)?;
    step("[2/6] building mesh-agent (release) and pod-tool (the servers and clients in the pods)");
    let agent_bin = setup::build_agent_release(workspace)?;
    setup::build_pod_tool(workspace)?;
    let mesh_started = Instant::now();

    step("[3/6] test bed: node1 {frontend, backend-1}, node2 {backend-2, database}");
    let topo = Topology::builder("demo")
        .node("node1", &["frontend", "backend1"])
        .node("node2", &["backend2", "database"])
        .build()?;
    let mut servers = Vec::new();
    for node in topo.nodes() {
        for pod in node.pods() {
            let w = workload(pod.name());
            let serves = if w.app == "database" {
                servers.push(start_echo_server(pod, DB_PORT)?);
                format!("TCP echo on :{DB_PORT}")
            } else if w.app == "backend" {
                servers.push(start_http_server(pod)?);
                format!("HTTP on :{HTTP_PORT}, answers with its name")
            } else {
                "client".to_string()
            };
            println!(
                "    {:<6} {:<10} {:<15} sa {:<9} {serves}",
                node.name(),
                w.name,
                pod.ipv4(),
                w.service_account,
            );
        }
    }

    step("[4/6] an agent on each node: mTLS (certificates from a demo CA), services, policies");
    let pki = topo.tmp_dir().join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = crate::pki::BenchCa::new()?;
    std::fs::write(pki.join("ca.crt"), &ca.cert_pem)?;
    std::fs::write(pki.join("ca.key"), &ca.key_pem)?;
    let (backend1, backend2) = (topo.pod("backend1"), topo.pod("backend2"));
    println!(
        "    service shop/backend  {BACKEND_VIP}:{BACKEND_VIP_PORT} (http: node1's agent balances every request)"
    );
    println!(
        "                          -> backend-1 {}:{HTTP_PORT} (node1), backend-2 {}:{HTTP_PORT} (node2)",
        backend1.ipv4(),
        backend2.ipv4()
    );
    println!(
        "    policy  shop/backend-from-frontend  on node1, node2: ALLOW GET /api/* from sa frontend"
    );
    println!("    policy  shop/database-from-backend  on node2:        ALLOW from sa backend (L4)");
    let mut agents = Vec::new();
    for node in topo.nodes() {
        let agent_started = Instant::now();
        let agent = start_agent(&agent_bin, node, &topo, &pki, "")?;
        println!(
            "    agent on {} ready in {} ms (pid {})",
            node.name(),
            agent_started.elapsed().as_millis(),
            agent.pid()
        );
        agents.push(agent);
    }

    let demo = Demo {
        topo: &topo,
        bin: &agent_bin,
    };
    let result = demo.traffic_and_summary();
    if result.is_err() {
        for (node, agent) in topo.nodes().iter().zip(&agents) {
            let log = agent.stderr_so_far();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the agent log on {} ---\n{}",
                node.name(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }

    step("tearing down: agents stop (detaching their programs); namespaces and cgroups removed");
    stop_agents(&topo, &mut agents);
    drop(servers);
    drop(agents);
    drop(topo);
    result.context("the demo did not go as expected")?;
    step(format!(
        "demo done in {:.1}s ({:.1}s after the build)",
        started.elapsed().as_secs_f64(),
        mesh_started.elapsed().as_secs_f64()
    ));
    Ok(())
}

struct Demo<'a> {
    topo: &'a Topology,
    bin: &'a Path,
}

/// One call of the demo, as the summary shows it.
struct Row {
    /// Who called whom, and what: `frontend -> backend GET /admin`.
    call: Call,
    /// `ALLOWED` or `DENIED`.
    verdict: &'static str,
    result: String,
    decided_by: String,
    path: String,
}

struct Call {
    from: &'static str,
    to: &'static str,
    what: String,
}

impl Call {
    fn new(from: &'static str, to: &'static str, what: impl Into<String>) -> Call {
        Call {
            from,
            to,
            what: what.into(),
        }
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} {}", self.from, self.to, self.what)
    }
}

impl Demo<'_> {
    fn traffic_and_summary(&self) -> Result<()> {
        let topo = self.topo;
        let (frontend, backend1, database) = (
            topo.pod("frontend"),
            topo.pod("backend1"),
            topo.pod("database"),
        );
        let db = database.ipv4().to_string();
        step("[5/6] real traffic from inside the pods");
        let mut rows = Vec::new();

        // 1. The frontend calls the backend service: GET /api/... through
        //    the VIP, every request balanced on its own.
        let call = Call::new(
            "frontend",
            "backend",
            format!("GET /api/items x{API_REQUESTS}"),
        );
        let before = Snapshot::take(topo)?;
        let answers = http_calls(
            frontend,
            "GET",
            "/api/items/{i}",
            API_REQUESTS,
            API_CONNECTIONS,
        )?;
        let after = Snapshot::wait_for_decisions(topo, &before, API_REQUESTS)?;
        let mut served: BTreeMap<&str, usize> = BTreeMap::new();
        for (status, body) in &answers {
            ensure!(
                *status == 200,
                "{call}: expected 200 (allowed by shop/backend-from-frontend), got {status} {body:?}"
            );
            *served.entry(body.as_str()).or_default() += 1;
        }
        ensure!(
            served.len() == 2,
            "{call}: expected the requests spread over backend-1 and backend-2, got {served:?}"
        );
        let spread = served
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let result = format!("200 x{}: {spread}", answers.len());
        println!("    {call} ({API_CONNECTIONS} connections at once): {result}");
        rows.push(Row {
            decided_by: decided_by(&before, &after, "allow", "shop/backend-from-frontend ")?,
            path: http_path(topo, &before, &after, "200", &served)?,
            call,
            verdict: "ALLOWED",
            result,
        });

        // 2. The frontend calls a path the policy does not allow.
        let call = Call::new("frontend", "backend", "GET /admin");
        let before = Snapshot::take(topo)?;
        let answers = http_calls(frontend, "GET", "/admin", 1, 1)?;
        let after = Snapshot::wait_for_decisions(topo, &before, 1)?;
        let (status, body) = &answers[0];
        ensure!(
            *status == 403,
            "{call}: expected 403 (no ALLOW rule matches), got {status} {body:?}"
        );
        let result = format!("{status} {body:?}");
        println!("    {call}: {result}");
        rows.push(Row {
            decided_by: decided_by(&before, &after, "deny", "allow-nothing")?,
            path: http_path(topo, &before, &after, "403", &BTreeMap::new())?,
            call,
            verdict: "DENIED",
            result,
        });

        // 3. The frontend tries the database directly: denied at L4.
        let call = Call::new("frontend", "database", format!("TCP :{DB_PORT}"));
        let before = Snapshot::take(topo)?;
        let outcome = tcp_call(frontend, &db)?;
        let after = Snapshot::wait_for_decisions(topo, &before, 1)?;
        ensure!(
            outcome != "echo",
            "{call}: expected the connection to be refused (only the backend may connect), but the database answered"
        );
        let result = format!("connection {outcome}, no data");
        println!("    {call}: {result}");
        rows.push(Row {
            decided_by: decided_by(&before, &after, "deny", "allow-nothing")?,
            path: tcp_path(topo, "frontend", "denied")?,
            call,
            verdict: "DENIED",
            result,
        });

        // 4. The backend (on node1) calls the database (on node2): allowed.
        let call = Call::new("backend-1", "database", format!("TCP :{DB_PORT}"));
        let before = Snapshot::take(topo)?;
        let outcome = tcp_call(backend1, &db)?;
        let after = Snapshot::wait_for_decisions(topo, &before, 1)?;
        ensure!(
            outcome == "echo",
            "{call}: expected the echo (allowed by shop/database-from-backend), got: {outcome}"
        );
        let result = "echo received".to_string();
        println!("    {call}: {result}");
        rows.push(Row {
            decided_by: decided_by(&before, &after, "allow", "shop/database-from-backend ")?,
            path: tcp_path(topo, "backend-1", "closed")?,
            call,
            verdict: "ALLOWED",
            result,
        });

        step("[6/6] what the agents recorded");
        println!();
        println!("Summary (decisions and paths as the agents counted them):");
        print_rows(&rows);
        println!();
        println!("A few metric lines (labels trimmed):");
        for node in topo.nodes() {
            let samples = parse_metrics(&admin_get(node, "/metrics")?);
            for s in &samples {
                let keep: &[&str] = match s.name.as_str() {
                    "istio_requests_total" => &[
                        "reporter",
                        "source_workload",
                        "destination_workload",
                        "response_code",
                        "connection_security_policy",
                    ],
                    "istio_tcp_connections_opened_total"
                        if s.label("destination_workload") == "database" =>
                    {
                        &[
                            "reporter",
                            "source_workload",
                            "destination_workload",
                            "connection_security_policy",
                        ]
                    }
                    "mesh_authorization_decisions_total" => &["policy", "decision"],
                    "mesh_service_endpoint_picks_total" => &["endpoint"],
                    _ => continue,
                };
                println!("    {}  {}", node.name(), s.trimmed(keep));
            }
        }
        println!();
        println!("`mesh-agent status` on node1:");
        let out = topo.node("node1").run(
            self.bin,
            &["status", "--admin", ADMIN],
            Duration::from_secs(10),
        )?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {line}");
        }
        println!();
        Ok(())
    }
}

/// An HTTP/1.1 server (keep-alive, `pod-tool http-server`) in `pod` that
/// answers every request with its own name.
pub(crate) fn start_http_server(pod: &Pod) -> Result<Process> {
    let server = pod.spawn_tool(&[
        "http-server",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--body",
        &format!("{}\n", mesh_name(pod)),
    ])?;
    mesh_testbed::wait_until(
        &format!("the HTTP server in {}", mesh_name(pod)),
        Duration::from_secs(10),
        || Ok(server.stdout_so_far().contains("ready")),
    )
    .with_context(|| server.output_report())?;
    Ok(server)
}

/// `count` requests from `client` to the backend service on one keep-alive
/// connection: (status, body) of each.
fn http_calls(
    client: &Pod,
    method: &str,
    path: &str,
    count: usize,
    conns: usize,
) -> Result<Vec<(u16, String)>> {
    let (port, count_arg, conns_arg) = (
        BACKEND_VIP_PORT.to_string(),
        count.to_string(),
        conns.to_string(),
    );
    // Prints `<status> <body>` per request; request i on connection i mod conns.
    let out = client.run_tool(
        &[
            "http-client",
            BACKEND_VIP,
            &port,
            path,
            "--method",
            method,
            "--count",
            &count_arg,
            "--connections",
            &conns_arg,
        ],
        Duration::from_secs(30),
    )?;
    let answers: Vec<(u16, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (status, body) = line.split_once(' ').unwrap_or((line, ""));
            Some((status.parse().ok()?, body.to_string()))
        })
        .collect();
    ensure!(
        answers.len() == count,
        "{} -> backend: {count} requests, {} answers",
        mesh_name(client),
        answers.len()
    );
    Ok(answers)
}

/// One TCP connection from `client` to the database, sending a line and
/// expecting it echoed: how it went, `echo`, or `refused`, `reset`, `eof`,
/// `timeout`, `garbled` or `error`.
fn tcp_call(client: &Pod, host: &str) -> Result<String> {
    let port = DB_PORT.to_string();
    let out = client.run_tool(
        &[
            "echo",
            host,
            &port,
            "--plain",
            "--line",
            "SELECT 1;",
            "--tally",
        ],
        Duration::from_secs(20),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.lines().any(|l| l == "ok 1 failed 0") {
        return Ok("echo".to_string());
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("FAILED 0 "))
        .and_then(|rest| rest.split(':').next())
        .map(str::to_string)
        .with_context(|| format!("the TCP client's output: {stdout:?}"))
}

/// The policies that decided a call, from the agents' decision counters
/// (what grew between the two snapshots), with the nodes whose agents
/// decided. Fails unless every decision was `expected` (allow or deny) by
/// a policy whose name starts with `policy`.
fn decided_by(before: &Snapshot, after: &Snapshot, expected: &str, policy: &str) -> Result<String> {
    let mut by_policy: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (node, sample, n) in after.delta(before, "mesh_authorization_decisions_total", &[]) {
        let (by, decision) = (sample.label("policy"), sample.label("decision"));
        ensure!(
            decision == expected && by.starts_with(policy),
            "expected {expected} by {}, but {node}'s agent counted {n} x {decision} by {by:?}",
            policy.trim_end()
        );
        by_policy.entry(by).or_default().push(if n > 1.0 {
            format!("{node} x{n}")
        } else {
            node.to_string()
        });
    }
    ensure!(
        !by_policy.is_empty(),
        "the agents counted no authorization decision (expected {expected} by {})",
        policy.trim_end()
    );
    Ok(by_policy
        .into_iter()
        .map(|(policy, nodes)| {
            let agents = if nodes.len() == 1 && !nodes[0].contains(' ') {
                format!("agent on {}", nodes[0])
            } else {
                format!("agents on {}", nodes.join(", "))
            };
            format!("{policy}  ({agents})")
        })
        .collect::<Vec<_>>()
        .join("; "))
}

/// Where a call's requests (answered with `code`) went: the endpoints
/// node1's balancer picked (`mesh_service_endpoint_picks_total`, checked
/// against what the client saw in `served` when given) and, for an
/// endpoint on node2, that node2's agent received as many over mutual TLS
/// (its `istio_requests_total` as the destination).
fn http_path(
    topo: &Topology,
    before: &Snapshot,
    after: &Snapshot,
    code: &str,
    served: &BTreeMap<&str, usize>,
) -> Result<String> {
    let mut legs = Vec::new();
    for (node, sample, n) in after.delta(
        before,
        "mesh_service_endpoint_picks_total",
        &[("service", "shop/backend:80")],
    ) {
        let endpoint = sample.label("endpoint");
        if let Some(&seen) = served.get(endpoint) {
            ensure!(
                seen as f64 == n,
                "the client got {seen} answers from {endpoint}, {node}'s balancer picked it {n} times"
            );
        }
        let pod = topo.pod(workload_by_name(endpoint)?.bed);
        if pod.node_name() == node {
            legs.push(format!("{endpoint} same node ({node})"));
            continue;
        }
        let arrived: BTreeMap<&str, f64> = after
            .delta(
                before,
                "istio_requests_total",
                &[
                    ("reporter", "destination"),
                    ("response_code", code),
                    ("source_workload", "frontend"),
                ],
            )
            .into_iter()
            .filter(|(at, _, _)| *at == pod.node_name())
            .map(|(_, s, n)| (s.label("connection_security_policy"), n))
            .collect();
        ensure!(
            arrived.get("mutual_tls") == Some(&n) && arrived.len() == 1,
            "{node} sent {n} requests to {endpoint} on {}; its agent counted {arrived:?} (by connection_security_policy)",
            pod.node_name()
        );
        legs.push(format!(
            "{endpoint} {node} -> {} over mTLS",
            pod.node_name()
        ));
    }
    ensure!(
        !legs.is_empty(),
        "node1's balancer counted no pick for the {code} request(s)"
    );
    Ok(legs.join("; "))
}

/// The path of the latest connection from `source` to the database, from
/// both agents' `/debug/connections`: node1's outbound record (where it
/// went, over what) and node2's inbound one (how it ended).
fn tcp_path(topo: &Topology, source: &str, outcome: &str) -> Result<String> {
    let identity = format!("/sa/{}", workload_by_name(source)?.service_account);
    let find = |node: &str, direction: &str| -> Result<Value> {
        let records: Value =
            serde_json::from_str(&admin_get(topo.node(node), "/debug/connections")?)?;
        let found = records
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|r| {
                r["direction"] == direction
                    && r["originalDst"]
                        .as_str()
                        .is_some_and(|d| d.ends_with(&format!(":{DB_PORT}")))
                    && r["sourceIdentity"]
                        .as_str()
                        .is_some_and(|id| id.ends_with(&identity))
            })
            .cloned();
        found.with_context(|| {
            format!("{node}'s agent has no {direction} record of {source} -> database")
        })
    };
    let (out, inb) = (find("node1", "outbound")?, find("node2", "inbound")?);
    let security = out["security"].as_str().unwrap_or("?");
    ensure!(
        security == "mutual_tls" && inb["security"] == "mutual_tls",
        "{source} -> database crossed nodes without mTLS: node1 says {security}, node2 says {}",
        inb["security"]
    );
    let ended = inb["outcome"].as_str().unwrap_or("?");
    ensure!(
        ended.starts_with(outcome),
        "{source} -> database: node2's agent recorded {ended:?}, expected {outcome}"
    );
    Ok(if outcome == "denied" {
        "node1 -> node2 over mTLS, stopped by node2's agent".to_string()
    } else {
        format!(
            "node1 -> node2 over mTLS ({} -> {})",
            short_identity(inb["sourceIdentity"].as_str().unwrap_or("?")),
            short_identity(out["peerIdentity"].as_str().unwrap_or("?"))
        )
    })
}

fn workload_by_name(name: &str) -> Result<&'static Workload> {
    WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .with_context(|| format!("{name} is not a workload of the demo"))
}

/// `spiffe://cluster.local/ns/shop/sa/backend` -> `sa/backend`.
fn short_identity(id: &str) -> &str {
    id.find("/sa/").map(|i| &id[i + 1..]).unwrap_or(id)
}

fn print_rows(rows: &[Row]) {
    let width = |f: fn(&Call) -> usize| rows.iter().map(|r| f(&r.call)).max().unwrap_or(0);
    let (w_from, w_to, w_what) = (
        width(|c| c.from.len()),
        width(|c| c.to.len()),
        width(|c| c.what.len()),
    );
    for row in rows {
        let Call { from, to, what } = &row.call;
        println!(
            "  {from:<w_from$} -> {to:<w_to$}  {what:<w_what$}  {:<7}  {}",
            row.verdict, row.result
        );
        println!("      decided by  {}", row.decided_by);
        println!("      path        {}", row.path);
    }
}

/// Starts the agent of `node`, enrolling its pods; the other nodes' pods are
/// mesh workloads, reached through mTLS. node1 also gets the backend service;
/// each node gets the policies of its own pods.
pub(crate) fn start_agent(
    bin: &Path,
    node: &Node,
    topo: &Topology,
    pki: &Path,
    issuer_extra: &str,
) -> Result<Process> {
    let mut pods = String::from("pods:\n");
    for pod in node.pods() {
        let w = workload(pod.name());
        let _ = write!(
            pods,
            "  - name: {}\n    namespace: {NAMESPACE}\n    serviceAccount: {}\n    labels: {{app: {}}}\n    ipv4: {}\n    ipv6: \"{}\"\n    netns: {}\n    cgroup: {}\n",
            w.name,
            w.service_account,
            w.app,
            pod.ipv4(),
            pod.ipv6(),
            pod.netns_path().display(),
            pod.cgroup_dir().display(),
        );
    }
    let mut workloads = String::from("workloads:\n");
    for pod in topo
        .nodes()
        .iter()
        .filter(|n| n.name() != node.name())
        .flat_map(|n| n.pods())
    {
        let w = workload(pod.name());
        let _ = write!(
            workloads,
            "  - name: {}\n    namespace: {NAMESPACE}\n    serviceAccount: {}\n    node: {}\n    ipv4: {}\n    ipv6: \"{}\"\n",
            w.name,
            w.service_account,
            pod.node_name(),
            pod.ipv4(),
            pod.ipv6(),
        );
    }
    let mut extra = vec![("workloads.yaml", workloads)];
    let apps: Vec<&str> = node.pods().iter().map(|p| workload(p.name()).app).collect();
    if apps.contains(&"frontend") {
        let endpoint = |pod: &Pod| {
            format!(
                "      - {{name: {}, address: {}, node: {}, serviceAccount: {}}}\n",
                mesh_name(pod),
                pod.ipv4(),
                pod.node_name(),
                workload(pod.name()).service_account
            )
        };
        extra.push((
            "services.yaml",
            format!(
                "services:\n  - name: backend\n    namespace: {NAMESPACE}\n    vips: [{BACKEND_VIP}]\n    ports: [{{port: {BACKEND_VIP_PORT}, targetPort: {HTTP_PORT}, protocol: http}}]\n    locality: none\n    endpoints:\n{}{}",
                endpoint(topo.pod("backend1")),
                endpoint(topo.pod("backend2")),
            ),
        ));
    }
    if apps.contains(&"backend") {
        extra.push(("policies/backend.yaml", BACKEND_POLICY.to_string()));
    }
    if apps.contains(&"database") {
        extra.push(("policies/database.yaml", DATABASE_POLICY.to_string()));
    }
    let dir = topo.tmp_dir().join(format!("config-{}", node.name()));
    std::fs::create_dir_all(dir.join("policies"))?;
    let config = agents::AgentConfig {
        dir: &dir,
        pods_yaml: &pods,
        extra_files: &extra,
        log: "info",
        node_extra: &format!("trustDomain: {TRUST_DOMAIN}\ndrainTimeout: 2s\n"),
        issuer_extra,
        identity: None,
    };
    agents::start(bin, topo, node, pki, &config)
}

/// Stops the agents as a node would (SIGTERM: they drain and detach their
/// programs, `onStop: release`) and says how that went; one that does not
/// exit in time is killed when dropped (teardown removes its pins anyway).
pub(crate) fn stop_agents(topo: &Topology, agents: &mut [Process]) {
    let started = Instant::now();
    for agent in agents.iter_mut() {
        // Only while it runs (`try_status` reaps it otherwise), by its own pid.
        if let Ok(None) = agent.try_status() {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe {
                libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = started + Duration::from_secs(5);
    for (node, agent) in topo.nodes().iter().zip(agents.iter_mut()) {
        let status = loop {
            match agent.try_status() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => break other,
            }
        };
        match status {
            Ok(Some(status)) if status.success() => println!(
                "    agent on {} stopped after {} ms",
                node.name(),
                started.elapsed().as_millis()
            ),
            Ok(Some(status)) => println!("    agent on {} exited with {status}", node.name()),
            Ok(None) => println!(
                "    agent on {} still running after 5 s: killed",
                node.name()
            ),
            Err(err) => println!("    agent on {}: {err:#}", node.name()),
        }
    }
}

pub(crate) fn admin_get(node: &Node, path: &str) -> Result<String> {
    let (code, body) = node.http_get(ADMIN.parse()?, path)?;
    if code != 200 {
        bail!("{path} on {} answered {code}: {body}", node.name());
    }
    Ok(body)
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    fn key(&self) -> (String, Vec<(String, String)>) {
        (self.name.clone(), self.labels.clone())
    }

    /// The sample with only the `keep` labels, as a metric line.
    fn trimmed(&self, keep: &[&str]) -> String {
        let labels: Vec<String> = keep
            .iter()
            .filter_map(|k| self.labels.iter().find(|(name, _)| name == k))
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        format!("{}{{{}}} {}", self.name, labels.join(","), self.value)
    }
}

/// Parses the samples of a Prometheus text exposition (comments skipped).
fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    chars.next().filter(|(_, q)| *q == '"')?;
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Every agent's `/metrics`, at one moment.
struct Snapshot {
    nodes: Vec<(String, Vec<Sample>)>,
}

impl Snapshot {
    fn take(topo: &Topology) -> Result<Snapshot> {
        let nodes = topo
            .nodes()
            .iter()
            .map(|node| {
                Ok((
                    node.name().to_string(),
                    parse_metrics(&admin_get(node, "/metrics")?),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Snapshot { nodes })
    }

    /// A snapshot once the agents have counted at least `decisions` more
    /// authorization decisions than in `before` (within 5 s).
    fn wait_for_decisions(
        topo: &Topology,
        before: &Snapshot,
        decisions: usize,
    ) -> Result<Snapshot> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let now = Snapshot::take(topo)?;
            let counted: f64 = now
                .delta(before, "mesh_authorization_decisions_total", &[])
                .iter()
                .map(|(_, _, n)| n)
                .sum();
            if counted >= decisions as f64 || Instant::now() >= until {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The series of `name` matching `filter` that grew since `before`:
    /// (node, sample, growth).
    fn delta(
        &self,
        before: &Snapshot,
        name: &str,
        filter: &[(&str, &str)],
    ) -> Vec<(&str, &Sample, f64)> {
        let mut grown = Vec::new();
        for (node, samples) in &self.nodes {
            let old: BTreeMap<_, f64> = before
                .nodes
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, s)| s.iter().map(|s| (s.key(), s.value)).collect())
                .unwrap_or_default();
            for sample in samples
                .iter()
                .filter(|s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == *v))
            {
                let n = sample.value - old.get(&sample.key()).copied().unwrap_or(0.0);
                if n > 0.0 {
                    grown.push((node.as_str(), sample, n));
                }
            }
        }
        grown
    }
}
