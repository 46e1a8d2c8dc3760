//! The command line as an operator uses it (no privileges needed).

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent-e2e");

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(AGENT)
        .args(args)
        .env_remove("MESH_CONFIG")
        .output()
        .expect("run the agent binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_dir(node: &str, pods: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.yaml"), node).unwrap();
    std::fs::write(dir.path().join("pods.yaml"), pods).unwrap();
    dir
}

#[test]
fn help_explains_every_command() {
    let (code, out, _) = agent(&["--help"]);
    assert_eq!(code, 0);
    for command in ["run", "check", "status", "version"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(command)),
            "--help lacks {command}:\n{out}"
        );
    }
    let (code, out, _) = agent(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--config") && out.contains("SIGTERM"), "{out}");
}

#[test]
fn version_prints_the_package_version() {
    let (code, out, _) = agent(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("mesh-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_a_valid_directory() {
    let dir = config_dir(
        "name: n1\n",
        "pods:\n  - name: a\n    namespace: ns\n    netns: /run/netns/a\n    cgroup: /sys/fs/cgroup/a\n",
    );
    let (code, out, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node n1, 1 pods"), "{out}");
}

#[test]
fn check_rejects_an_unknown_field_naming_file_line_and_field() {
    let dir = config_dir(
        "name: n1\n",
        "pods:\n  - name: a\n    namespace: ns\n    netns: /run/netns/a\n    cgroup: /c\n    lables: {}\n",
    );
    let (code, _, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    let file = dir.path().join("pods.yaml");
    assert!(
        err.contains(&format!("{}:6:", file.display())),
        "no file:line in {err:?}"
    );
    assert!(err.contains("unknown field `lables`"), "{err}");
}

#[test]
fn run_with_a_bad_config_fails_before_touching_the_kernel() {
    let dir = config_dir("name: n1\nport: 1\n", "");
    let (code, _, err) = agent(&["run", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid configuration") && err.contains("node.yaml:2"),
        "{err}"
    );
}

#[test]
fn status_without_an_agent_says_so() {
    // Port 9 on loopback (discard) has no listener here.
    let (code, _, err) = agent(&["status", "--admin", "127.0.0.1:9"]);
    assert_eq!(code, 1);
    assert!(err.contains("is the agent running?"), "{err}");
}

#[test]
fn check_validates_policy_files_and_names_file_line_and_field() {
    let dir = config_dir("name: n1\n", "");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n";
    std::fs::write(dir.path().join("policies/p.yaml"), policy).unwrap();
    let (code, _, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let file = dir.path().join("policies/p.yaml");
    assert!(
        err.contains(&format!("{}:11", file.display())),
        "no file:line in {err:?}"
    );
    assert!(err.contains("ipBlocks"), "{err}");

    std::fs::write(
        dir.path().join("policies/p.yaml"),
        policy.replace("/33", "/24"),
    )
    .unwrap();
    let (code, out, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok"), "{out}");
}

#[test]
fn check_names_a_policy_whose_target_service_cannot_be_mapped() {
    let dir = config_dir("name: n1\n", "");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  targetRefs: [{kind: Service, group: '', name: web}]\n  rules: [{}]\n";
    std::fs::write(dir.path().join("policies/p.yaml"), policy).unwrap();
    let (code, _, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("p.yaml") && err.contains("Service ns/web is not known"),
        "{err}"
    );
    // With the Service and its selector in services.yaml: it maps.
    std::fs::write(
        dir.path().join("services.yaml"),
        "services:\n  - {name: web, namespace: ns, vips: [10.96.0.9], ports: [{port: 80}], selector: {app: web}}\n",
    )
    .unwrap();
    let (code, out, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok"), "{out}");
}

#[test]
fn check_names_a_route_whose_service_or_backend_is_not_known() {
    let dir = config_dir("name: n1\n", "");
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web-v2, port: 80}]}]\n";
    std::fs::write(dir.path().join("routes/r.yaml"), route).unwrap();
    let (code, _, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ns/r") && err.contains("r.yaml") && err.contains("no such Service"),
        "{err}"
    );
    // The parent known, the backend not: still named.
    std::fs::write(
        dir.path().join("services.yaml"),
        "services:\n  - {name: web, namespace: ns, vips: [10.96.0.9], ports: [{port: 80, protocol: http}]}\n",
    )
    .unwrap();
    let (code, _, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("backend ns/web-v2:80"), "{err}");
    // Both known: ok.
    std::fs::write(
        dir.path().join("services.yaml"),
        "services:\n  - {name: web, namespace: ns, vips: [10.96.0.9], ports: [{port: 80, protocol: http}]}\n  - {name: web-v2, namespace: ns, vips: [10.96.0.10], ports: [{port: 80, protocol: http}]}\n",
    )
    .unwrap();
    let (code, out, err) = agent(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok"), "{out}");
}
