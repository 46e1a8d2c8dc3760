//! `ca-load`: signing requests to a CA over the Istio CA API, for the
//! benchmark (`cargo xtask bench`, mode `ca`). `--concurrency` workers send
//! requests back to back over one gRPC channel (HTTP/2 over TLS) for
//! `--duration-secs`; each request is a CSR on an identity's behalf with the
//! token read from `--token`. The CSRs are made before the clock starts (key
//! generation is the client's cost, not the signer's) and reused. Prints one
//! JSON line: requests signed, failures, latency percentiles, signed per
//! second.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mesh_agent::identity::{
    SigningRequestSource, SpiffeId, ca,
    ca_api::{IstioCertificateRequest, create_certificate},
    requester,
};

#[derive(Parser, Debug)]
#[command(name = "ca-load")]
struct Args {
    /// `https://host:port` of the CA.
    #[arg(long)]
    address: String,
    /// The name on the CA's serving certificate.
    #[arg(long)]
    server_name: String,
    /// PEM roots the CA's certificate chains to.
    #[arg(long)]
    roots: PathBuf,
    /// A file holding the bearer token.
    #[arg(long)]
    token: PathBuf,
    /// The identity asked for (`spiffe://…`).
    #[arg(long)]
    identity: String,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ca-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ca-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let id: SpiffeId = args.identity.parse().context("--identity")?;
    let token = std::fs::read_to_string(&args.token)
        .with_context(|| format!("reading {}", args.token.display()))?
        .trim()
        .to_string();
    let roots = std::fs::read(&args.roots)?;
    let source = SigningRequestSource {
        address: args.address.clone(),
        ca_roots: args.roots.clone(),
        server_name: Some(args.server_name.clone()),
        token_file: args.token.clone(),
        cluster_id: "Kubernetes".into(),
        lifetime: Duration::from_secs(3600),
        renew_at: 0.5,
    };
    let channel = requester::channel(&source, &roots)?;
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..64)
            .map(|_| ca::signing_request(&id).map(|(csr, _)| csr))
            .collect::<Result<_>>()?,
    );
    // One request first: the connection and TLS are not what is measured.
    let warm = IstioCertificateRequest::impersonating(csrs[0].clone(), 3600, &args.identity);
    create_certificate(channel.clone(), &token, "Kubernetes", warm)
        .await
        .map_err(|s| anyhow::anyhow!("the first request: {:?} {}", s.code(), s.message()))?;
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency.max(1) {
        let (channel, token, csrs, identity) = (
            channel.clone(),
            token.clone(),
            csrs.clone(),
            args.identity.clone(),
        );
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            let mut n = worker;
            while Instant::now() < deadline {
                let csr = csrs[n % csrs.len()].clone();
                n += 1;
                let request = IstioCertificateRequest::impersonating(csr, 3600, &identity);
                let sent = Instant::now();
                match create_certificate(channel.clone(), &token, "Kubernetes", request).await {
                    Ok(answer) if answer.cert_chain.len() >= 2 => {
                        latencies.push(sent.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (latencies, failed)
        });
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    while let Some(done) = workers.join_next().await {
        let (mine, lost) = done?;
        latencies.extend(mine);
        failed += lost;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if latencies.is_empty() {
        bail!("no request was signed ({failed} failed)");
    }
    latencies.sort();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1e6
    };
    println!(
        "{}",
        serde_json::json!({
            "signed": latencies.len(),
            "failed": failed,
            "p50_us": at(0.50),
            "p99_us": at(0.99),
            "per_sec": latencies.len() as f64 / elapsed,
        })
    );
    Ok(())
}
