//! The signer's part of the bench (MESH_BENCH_MODES=ca runs only this): the
//! real `mesh-agent ca` on the test bed's control plane, asked by `ca-load`
//! from node n1 as n1's agent, for a pod of n1. Its TokenReviews and pod
//! reads are answered by the API MODEL (mesh_testbed::kube_api) with 30 pods
//! per node, so a figure includes the signer's two API calls over HTTP on the
//! fabric, but not a real API server's own time.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_testbed::{CONTROL_PLANE_IPV4, Topology, kube_api::StandInApi};
use serde_json::Value;

use crate::{
    pki::BenchCa,
    signer::{self, CA_PORT, SERVING_NAME},
    step,
};

const PODS_PER_NODE: usize = 30;
/// (concurrent requests, seconds).
const RUNS: [(usize, u64); 2] = [(1, 5), (16, 5)];

/// One run's figures, from ca-load.
pub struct Sample {
    pub concurrency: usize,
    pub signed: u64,
    pub failed: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_sec: f64,
}

/// Starts the model and the signer, runs [`RUNS`]; the samples.
pub fn measure(agent: &Path, ca_load: &Path, topo: &Topology) -> Result<Vec<Sample>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let api = runtime.block_on(StandInApi::start_with(topo.control_plane_binder()))?;
    for node in topo.nodes() {
        for i in 0..PODS_PER_NODE {
            api.put_running_pod(
                "bench",
                &format!("w-{}-{i}", node.name()),
                &format!("sa-{}", i % 10),
                node.name(),
            );
        }
    }
    let n1 = &topo.nodes()[0];
    let token = signer::register_agent(&api, n1)?;
    let dir = topo.tmp_dir().join("ca-bench");
    let ca = BenchCa::new()?;
    let mut signer = signer::start(agent, topo, &api, &dir, &ca, "warn")?;
    std::fs::write(dir.join("token"), token)?;
    // sa-3 has pods on every node, n1's among them.
    let identity = "spiffe://cluster.local/ns/bench/sa/sa-3".to_string();
    let mut samples = Vec::new();
    for (concurrency, secs) in RUNS {
        let args = [
            "--address".to_string(),
            format!("https://{CONTROL_PLANE_IPV4}:{CA_PORT}"),
            "--server-name".into(),
            SERVING_NAME.into(),
            "--roots".into(),
            dir.join("ca.crt").display().to_string(),
            "--token".into(),
            dir.join("token").display().to_string(),
            "--identity".into(),
            identity.clone(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--duration-secs".into(),
            secs.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = n1
            .spawn(ca_load, &args)?
            .wait_success(Duration::from_secs(secs + 60))?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("ca-load's output: {}", String::from_utf8_lossy(&out.stdout))
        })?;
        let sample = Sample {
            concurrency,
            signed: v["signed"].as_u64().unwrap_or(0),
            failed: v["failed"].as_u64().unwrap_or(0),
            p50_us: v["p50_us"].as_f64().unwrap_or(f64::NAN),
            p99_us: v["p99_us"].as_f64().unwrap_or(f64::NAN),
            per_sec: v["per_sec"].as_f64().unwrap_or(0.0),
        };
        step(format!(
            "signer, {concurrency} at a time: {:.0} certificates/s, p50 {:.0} µs, p99 {:.0} µs, {} failed",
            sample.per_sec, sample.p50_us, sample.p99_us, sample.failed
        ));
        if sample.failed > 0 {
            bail!(
                "{} signing requests failed:\n{}",
                sample.failed,
                signer.output_report()
            );
        }
        samples.push(sample);
    }
    signer.kill();
    Ok(samples)
}

/// The report's section.
pub fn markdown(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nThe signer (`mesh-agent ca`, MESH_BENCH_MODES=ca): signing requests from node n1's netns as its agent for a pod of n1, over one gRPC channel (TLS), CSRs made beforehand; each request is a TokenReview and two pod reads against the API MODEL ({PODS_PER_NODE} pods per node) and an ECDSA P-256 signature:\n\n| at a time | signed | certificates/s | p50 | p99 | failed |\n|---|---|---|---|---|---|\n"
    );
    for s in samples {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |\n",
            s.concurrency,
            s.signed,
            s.per_sec,
            s.p50_us / 1000.0,
            s.p99_us / 1000.0,
            s.failed
        ));
    }
    out
}
