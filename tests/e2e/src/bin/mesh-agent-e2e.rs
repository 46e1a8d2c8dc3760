//! The agent binary the end-to-end tests start: the same code as `mesh-agent`.
fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
