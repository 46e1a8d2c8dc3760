//! `cargo xtask <task>`: the project's developer tasks.
//!
//! Nothing here needs the agent to be built first: the agent's build script needs
//! the kernel toolchain that `build-ebpf` sets up.

mod agents;
mod bench;
mod demo;
mod demo_kubernetes;
mod ebpf_build;
mod fuzz;
mod kernels;
mod kube_validate;
mod pki;
mod setup;
mod signer;
mod soak;
mod test;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks of the mesh workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Set up what is needed, build everything and run a demo mesh in the test bed:
    /// two nodes, an agent on each, real traffic between pods, and a summary of
    /// what the agents saw. Needs root.
    Demo {
        /// Kubernetes mode: pods made through a real containerd (CRI), their
        /// objects served by a model of the API server, agents with
        /// `discovery: kubernetes` and no pods.yaml.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Measure the data paths against direct connections in the same run (release
    /// build, test bed). Needs root.
    Bench {
        /// A short sanity run (about a minute).
        #[arg(long)]
        quick: bool,
        /// Instead: this tree's agent against the agent of this git
        /// revision, interleaved round by round in one sitting (agent paths
        /// only; target/bench/compare.md).
        #[arg(long, value_name = "REVISION")]
        compare: Option<String>,
        /// Rounds of `--compare` (each runs both agents).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
    },
    /// Build the kernel programs (mesh-ebpf), first installing what is missing: the
    /// nightly rust-src component and a project-local bpf-linker in .tools/.
    BuildEbpf,
    /// Build everything and run the whole test suite: unit tests and the end-to-end
    /// tests that load real kernel programs (those need root; with CI=true a missing
    /// privilege or kernel feature fails the run instead of skipping).
    Test {
        /// Instead of the suite: its kernel-facing part (the smoke set) on
        /// these kernels, Debian's under QEMU, `host` this machine's; `all`:
        /// 6.1, 6.12 and host. Without it, the suite ends with 6.1 and 6.12.
        #[arg(long, value_enum, value_delimiter = ',')]
        kernel: Vec<kernels::KernelChoice>,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The demo's mesh under a steady mixed load (HTTP and TCP, cross-node and
    /// same-node) with policy reloads and certificate rotations every minute,
    /// sampling the agents' RSS and descriptors; fails on any failure or
    /// growth. Needs root; not part of `test`.
    Soak {
        /// How long the load runs.
        #[arg(long, default_value_t = 10)]
        minutes: u32,
    },
    /// Run the fuzz targets (fuzz/, cargo-fuzz with libFuzzer and
    /// AddressSanitizer; nightly). `cargo xtask test` runs each for 20 s.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workspace = workspace_root();
    let result = match cli.task {
        Task::Demo { kubernetes: false } => demo::run(&workspace),
        Task::Demo { kubernetes: true } => demo_kubernetes::run(&workspace),
        Task::Bench {
            compare: Some(revision),
            rounds,
            ..
        } => bench::compare(&workspace, &revision, rounds),
        Task::Bench { quick, .. } => bench::run(&workspace, quick),
        Task::BuildEbpf => setup::build_ebpf(&workspace).map(|_| ()),
        Task::Test {
            kernel,
            cargo_test_args,
        } => match (kernel.is_empty(), cargo_test_args.is_empty()) {
            (true, _) => test::run(&workspace, &cargo_test_args),
            (false, true) => kernels::run(&workspace, &kernel),
            (false, false) => Err(anyhow::anyhow!(
                "--kernel runs the kernel matrix's fixed smoke set: it takes no cargo test arguments"
            )),
        },
        Task::Fuzz { seconds, targets } => fuzz::run(&workspace, seconds, &targets),
        Task::Soak { minutes } => soak::run(&workspace, minutes),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Prints a progress line that stands out from cargo's own output.
fn step(msg: impl std::fmt::Display) {
    eprintln!("==> {msg}");
}
