//! Checks that the Kubernetes manifests and the Containerfile in `deploy/`
//! agree with the agent they install: its command line, its admin API paths
//! and port, its configuration loader, the paths it opens. The checks are the
//! integration tests in `tests/manifests.rs` (`cargo test -p mesh-deploy-check`);
//! this library is empty.
