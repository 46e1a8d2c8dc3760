//! Loading and validating the configuration directory.

use std::path::Path;

use super::*;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn dir_with(node: &str, pods: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), NODE_FILE, node);
    if let Some(pods) = pods {
        write(dir.path(), PODS_FILE, pods);
    }
    dir
}

const NODE: &str = "name: node-1\n";
const POD_A: &str = "pods:\n  - name: a\n    namespace: shop\n    serviceAccount: web\n    labels: {app: web}\n    ipv4: 10.1.0.2\n    ipv6: fd00:1::2\n    netns: /run/netns/a\n    cgroup: /sys/fs/cgroup/a\n";

#[test]
fn loads_a_complete_directory() {
    let dir = dir_with(NODE, Some(POD_A));
    let cfg = load_dir(dir.path()).unwrap();
    assert_eq!(cfg.node.name, "node-1");
    assert_eq!(cfg.node.admin_address, default_admin_address());
    assert_eq!(cfg.pods.len(), 1);
    let pod = &cfg.pods[0];
    assert_eq!(pod.key(), "shop/a");
    assert_eq!(pod.service_account, "web");
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(pod.ipv4, Some("10.1.0.2".parse().unwrap()));
    assert_eq!(pod.ipv6, Some("fd00:1::2".parse().unwrap()));
}

#[test]
fn missing_pods_file_means_no_pods() {
    let dir = dir_with(NODE, None);
    assert!(load_dir(dir.path()).unwrap().pods.is_empty());
}

#[test]
fn service_account_defaults_to_default() {
    let dir = dir_with(
        NODE,
        Some("pods:\n  - name: a\n    namespace: ns\n    netns: /n\n    cgroup: /c\n"),
    );
    assert_eq!(
        load_dir(dir.path()).unwrap().pods[0].service_account,
        "default"
    );
}

#[test]
fn missing_directory_is_named() {
    let err = load_dir(Path::new("/nonexistent/mesh-config")).unwrap_err();
    assert_eq!(err.file, Path::new("/nonexistent/mesh-config"));
    assert!(err.message.contains("does not exist"), "{err}");
}

#[test]
fn missing_node_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join(NODE_FILE));
    assert!(err.message.contains("cannot read"), "{err}");
}

#[test]
fn unknown_node_field_is_rejected_with_line_and_field() {
    let dir = dir_with("name: node-1\nadminAdress: 127.0.0.1:1\n", None);
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join(NODE_FILE));
    assert_eq!(err.line, Some(2), "{err}");
    assert!(err.message.contains("unknown field `adminAdress`"), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:2:", dir.path().join(NODE_FILE).display())),
        "{shown}"
    );
}

#[test]
fn unknown_pod_field_names_the_pod_field_path() {
    let pods = "pods:\n  - name: a\n    namespace: ns\n    netns: /n\n    cgroup: /c\n    sevriceAccount: x\n";
    let dir = dir_with(NODE, Some(pods));
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join(PODS_FILE));
    assert_eq!(err.line, Some(6), "{err}");
    assert_eq!(err.field.as_deref(), Some("pods[0]"), "{err}");
    assert!(err.message.contains("sevriceAccount"), "{err}");
}

#[test]
fn bad_address_is_rejected_with_field() {
    let pods = "pods:\n  - name: a\n    namespace: ns\n    ipv4: 10.1.0.300\n    netns: /n\n    cgroup: /c\n";
    let dir = dir_with(NODE, Some(pods));
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
    assert_eq!(err.field.as_deref(), Some("pods[0].ipv4"), "{err}");
}

#[test]
fn missing_required_field_is_rejected() {
    let dir = dir_with(
        NODE,
        Some("pods:\n  - name: a\n    namespace: ns\n    netns: /n\n"),
    );
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.message.contains("missing field `cgroup`"), "{err}");
}

#[test]
fn broken_yaml_is_rejected_with_position() {
    let dir = dir_with(NODE, Some("pods:\n  - name: [unclosed\n"));
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.line.is_some(), "{err}");
}

#[test]
fn duplicate_pod_is_rejected() {
    let pods = "pods:\n  - name: a\n    namespace: ns\n    netns: /n1\n    cgroup: /c1\n  - name: a\n    namespace: ns\n    netns: /n2\n    cgroup: /c2\n";
    let dir = dir_with(NODE, Some(pods));
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("pods[1].name"), "{err}");
    assert!(err.message.contains("ns/a is listed twice"), "{err}");
}

#[test]
fn shared_address_is_rejected() {
    let pods = "pods:\n  - name: a\n    namespace: ns\n    ipv4: 10.0.0.1\n    netns: /n1\n    cgroup: /c1\n  - name: b\n    namespace: ns\n    ipv4: 10.0.0.1\n    netns: /n2\n    cgroup: /c2\n";
    let dir = dir_with(NODE, Some(pods));
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("pods[1].ipv4"), "{err}");
}

#[test]
fn relative_paths_are_rejected_with_line() {
    let pods = "pods:\n  - name: a\n    namespace: ns\n    netns: run/netns/a\n    cgroup: /c\n";
    let dir = dir_with(NODE, Some(pods));
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("pods[0].netns"), "{err}");
    assert_eq!(err.line, Some(4), "{err}");
}

#[test]
fn empty_node_name_is_rejected() {
    let dir = dir_with("name: \"\"\n", None);
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("name"), "{err}");
}

#[test]
fn find_line_needs_exactly_one_match() {
    let text = "pods:\n  - name: a\n    netns: /x\n  - name: b\n    netns: \"/x\"\n";
    assert_eq!(error::find_line(text, "name", "b"), Some(4));
    assert_eq!(
        error::find_line(text, "netns", "/x"),
        None,
        "two matches: ambiguous"
    );
    assert_eq!(error::find_line(text, "name", "zzz"), None);
}

#[test]
fn identity_issuer_and_tunnel_settings_load_with_defaults() {
    let node = "name: n1\ntrustDomain: example.org\nidentity:\n  issuer:\n    cert: /ca/ca.crt\n    key: /ca/ca.key\n    lifetime: 1h\ntunnel:\n  idleTimeout: 30s\n";
    let dir = dir_with(node, None);
    let cfg = load_dir(dir.path()).unwrap();
    assert_eq!(cfg.node.trust_domain, "example.org");
    let issuer = cfg
        .node
        .identity
        .as_ref()
        .and_then(|i| i.issuer.as_ref())
        .expect("issuer");
    assert_eq!(issuer.lifetime, std::time::Duration::from_secs(3600));
    assert_eq!(issuer.renew_at, 0.5);
    assert_eq!(issuer.trust_bundle, None);
    assert_eq!(
        cfg.node.tunnel.idle_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        cfg.node.tunnel.handshake_timeout,
        std::time::Duration::from_secs(10)
    );
}

#[test]
fn trust_domain_defaults_and_identity_is_optional() {
    let cfg = load_dir(dir_with(NODE, None).path()).unwrap();
    assert_eq!(cfg.node.trust_domain, "cluster.local");
    assert!(cfg.node.identity.is_none());
}

#[test]
fn a_bad_renewal_fraction_is_rejected() {
    let node = "name: n1\nidentity:\n  issuer:\n    cert: /c\n    key: /k\n    renewAt: 1.5\n";
    let err = load_dir(dir_with(node, None).path()).unwrap_err();
    assert_eq!(
        err.field.as_deref(),
        Some("identity.issuer.renewAt"),
        "{err}"
    );
    assert_eq!(err.line, Some(6), "{err}");
}

#[test]
fn a_signing_request_source_loads_with_defaults_and_bad_values_are_named_by_line_and_field() {
    let head = "name: n1\nidentity:\n  signingRequest:\n    tokenFile: /var/run/secrets/tokens/istio-ca-token\n    caRoots: /etc/mesh-ca/root-cert.pem\n";
    let node = format!("{head}    address: https://mesh-ca.mesh-system.svc:15012\n");
    let cfg = load_dir(dir_with(&node, None).path()).unwrap();
    let asked = cfg
        .node
        .identity
        .as_ref()
        .and_then(|i| i.signing_request.as_ref())
        .expect("signingRequest");
    assert_eq!(asked.address, "https://mesh-ca.mesh-system.svc:15012");
    assert_eq!(asked.cluster_id, "Kubernetes");
    assert_eq!(asked.lifetime, std::time::Duration::from_secs(24 * 3600));
    assert_eq!(asked.renew_at, 0.5);
    assert_eq!(asked.server_name, None);
    for (tail, field, line) in [
        (
            "    address: https://ca:15012\n    renewAt: 1.0\n",
            "identity.signingRequest.renewAt",
            7,
        ),
        (
            "    address: https://ca:15012\n    renewAt: 0\n",
            "identity.signingRequest.renewAt",
            7,
        ),
        (
            "    address: https://ca:15012\n    lifetime: 0s\n",
            "identity.signingRequest.lifetime",
            7,
        ),
        (
            "    address: http://ca:15012\n",
            "identity.signingRequest.address",
            6,
        ),
    ] {
        let err = load_dir(dir_with(&format!("{head}{tail}"), None).path()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(field), "{err}");
        assert_eq!(err.line, Some(line), "{err}");
    }
    let err = load_dir(dir_with(head, None).path()).unwrap_err();
    assert!(err.message.contains("missing field `address`"), "{err}");
}

#[test]
fn tracing_settings_load_with_defaults_and_bad_ones_are_named_by_line_and_field() {
    let node = "name: n1\ntracing:\n  endpoint: http://otel-collector.observability:4318\n  protocol: http/protobuf\n";
    let cfg = load_dir(dir_with(node, None).path()).unwrap();
    let tracing = cfg.node.tracing.expect("tracing");
    assert_eq!(tracing.protocol, crate::config::OtlpProtocol::HttpProtobuf);
    assert_eq!(tracing.random_sampling_percentage, 1.0);
    assert_eq!(tracing.max_queued_spans, 2048);
    assert_eq!(
        tracing.traces_url(),
        "http://otel-collector.observability:4318/v1/traces"
    );
    for (yaml, field, line) in [
        (
            "name: n1\ntracing:\n  endpoint: otel-collector:4317\n",
            "tracing.endpoint",
            3,
        ),
        (
            "name: n1\ntracing:\n  endpoint: http://c:4317\n  randomSamplingPercentage: 150\n",
            "tracing.randomSamplingPercentage",
            4,
        ),
        (
            "name: n1\ntracing:\n  endpoint: http://c:4317\n  maxQueuedSpans: 0\n",
            "tracing.maxQueuedSpans",
            4,
        ),
    ] {
        let err = load_dir(dir_with(yaml, None).path()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(field), "{err}");
        assert_eq!(err.line, Some(line), "{err}");
    }
    let err = load_dir(
        dir_with(
            "name: n1\ntracing:\n  endpoint: http://c:4317\n  protocol: zipkin\n",
            None,
        )
        .path(),
    )
    .unwrap_err();
    assert!(err.message.contains("unknown variant `zipkin`"), "{err}");
}

#[test]
fn an_unknown_identity_source_is_rejected() {
    let node = "name: n1\nidentity:\n  vault:\n    url: x\n";
    let err = load_dir(dir_with(node, None).path()).unwrap_err();
    assert!(err.message.contains("unknown field `vault`"), "{err}");
    let both =
        "name: n1\nidentity:\n  issuer: {cert: /c, key: /k}\n  files: {dir: /d, trustBundle: /b}\n";
    let err = load_dir(dir_with(both, None).path()).unwrap_err();
    assert!(err.message.contains("exactly one source"), "{err}");
}

#[test]
fn workloads_load_and_must_not_reuse_pod_addresses() {
    let dir = dir_with(NODE, Some(POD_A));
    write(
        dir.path(),
        WORKLOADS_FILE,
        "workloads:\n  - name: db\n    namespace: shop\n    serviceAccount: db\n    node: n2\n    ipv4: 10.2.0.2\n",
    );
    let cfg = load_dir(dir.path()).unwrap();
    assert_eq!(cfg.workloads.len(), 1);
    assert_eq!(cfg.workloads[0].key(), "shop/db");

    write(
        dir.path(),
        WORKLOADS_FILE,
        "workloads:\n  - name: db\n    namespace: shop\n    node: n2\n    ipv4: 10.1.0.2\n",
    );
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join(WORKLOADS_FILE));
    assert_eq!(err.field.as_deref(), Some("workloads[0].ipv4"), "{err}");
    assert!(err.message.contains("already a pod"), "{err}");

    write(
        dir.path(),
        WORKLOADS_FILE,
        "workloads:\n  - name: db\n    namespace: shop\n    node: n2\n",
    );
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.message.contains("needs an ipv4 or ipv6"), "{err}");
}

#[test]
fn a_policy_typo_loads_as_a_deny_all_reported_with_file_line_column_and_field() {
    let dir = dir_with(NODE, None);
    std::fs::create_dir(dir.path().join(POLICIES_DIR)).unwrap();
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\nspec:\n  acton: DENY\n";
    write(&dir.path().join(POLICIES_DIR), "p.yaml", policy);
    // It loads, as a DENY-all over what it selects, carrying its error.
    let desired = load_dir(dir.path()).unwrap();
    let broken = desired
        .policies
        .set
        .unenforceable()
        .next()
        .expect("unenforceable");
    let err = broken.unenforceable().unwrap();
    assert_eq!(err.file, dir.path().join(POLICIES_DIR).join("p.yaml"));
    assert_eq!((err.line, err.column), (Some(7), Some(3)), "{err}");
    assert_eq!(err.policy, "ns/p", "{err}");
    assert!(err.message.contains("unknown field `acton`"), "{err}");
    // Invalid YAML still rejects the whole configuration.
    write(
        &dir.path().join(POLICIES_DIR),
        "q.yaml",
        "kind: [AuthorizationPolicy\n",
    );
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join(POLICIES_DIR).join("q.yaml"));
    std::fs::remove_file(dir.path().join(POLICIES_DIR).join("q.yaml")).unwrap();
    // Hidden entries (Kubernetes' ..data machinery) and other extensions are skipped.
    std::fs::write(
        dir.path().join(POLICIES_DIR).join("p.yaml"),
        policy.replace("acton", "action"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(POLICIES_DIR).join(".hidden.yaml"),
        "not: [valid",
    )
    .unwrap();
    std::fs::write(dir.path().join(POLICIES_DIR).join("notes.txt"), "not yaml").unwrap();
    assert_eq!(load_dir(dir.path()).unwrap().policies.files.len(), 1);
}

const HTTP_SERVICE: &str = "services:
  - name: web
    namespace: shop
    vips: [10.96.0.1]
    ports:
      - port: 80
        targetPort: 8080
        protocol: http
    requestTimeout: 2s
    connectTimeout: 250ms
    routes:
      - pathPrefix: /reports/
        timeout: 30s
    retries:
      attempts: 1
    outlierDetection:
      consecutiveFailures: 3
      baseEjectionTime: 2s
    endpoints:
      - {name: e1, address: 10.1.0.2, node: node-1}
";

#[test]
fn http_service_settings_load_with_defaults_for_what_is_left_out() {
    let dir = dir_with(NODE, None);
    write(dir.path(), SERVICES_FILE, HTTP_SERVICE);
    let cfg = load_dir(dir.path()).unwrap();
    let svc = &cfg.services[0];
    assert_eq!(svc.connect_timeout, std::time::Duration::from_millis(250));
    assert_eq!(svc.retries.attempts, 1);
    assert_eq!(svc.retries.budget_percent, 20, "default");
    assert_eq!(svc.outlier_detection.consecutive_failures, 3);
    assert_eq!(svc.outlier_detection.max_ejection_percent, 50, "default");
    // Per-route timeouts: the first matching prefix, else the service's.
    assert_eq!(
        svc.timeout_for("/reports/q1"),
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(
        svc.timeout_for("/"),
        Some(std::time::Duration::from_secs(2))
    );
}

#[test]
fn bad_http_service_settings_name_the_field_and_line() {
    let cases = [
        (
            HTTP_SERVICE.replace("pathPrefix: /reports/", "pathPrefix: reports"),
            "services[0].routes[0].pathPrefix",
            Some(12),
        ),
        (
            HTTP_SERVICE.replace("consecutiveFailures: 3", "consecutiveFailures: 0"),
            "services[0].outlierDetection.consecutiveFailures",
            Some(17),
        ),
        (
            HTTP_SERVICE.replace("connectTimeout: 250ms", "connectTimeout: 0s"),
            "services[0].connectTimeout",
            Some(10),
        ),
    ];
    for (text, field, line) in cases {
        let dir = dir_with(NODE, None);
        write(dir.path(), SERVICES_FILE, &text);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(field), "{err}");
        assert_eq!(err.line, line, "{err}");
    }
    // Unknown fields are rejected, with their line.
    let dir = dir_with(NODE, None);
    write(
        dir.path(),
        SERVICES_FILE,
        &HTTP_SERVICE.replace("attempts: 1", "attempts: 1\n      perTryTimeout: 1s"),
    );
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.message.contains("perTryTimeout"), "{err}");
    assert_eq!(err.line, Some(16), "{err}");
}

/// The `yaml` blocks of a document, in order.
fn yaml_blocks(doc: &str) -> Vec<String> {
    doc.split("```yaml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_services_reference_example_loads() {
    let blocks = yaml_blocks(include_str!("../../../docs/services.md"));
    assert_eq!(blocks.len(), 1, "docs/services.md has one example");
    let dir = dir_with(NODE, None);
    write(dir.path(), SERVICES_FILE, &blocks[0]);
    let cfg = load_dir(dir.path()).unwrap_or_else(|e| panic!("docs/services.md example: {e}"));
    let svc = &cfg.services[0];
    assert_eq!(svc.endpoints[0].service_account.as_deref(), Some("web"));
    assert_eq!(svc.subsets.len(), 2);
}

#[test]
fn the_readme_services_example_loads() {
    let readme = include_str!("../../../README.md");
    let block = yaml_blocks(readme)
        .into_iter()
        .find(|b| b.starts_with("services:"))
        .expect("README has a services.yaml example");
    let dir = dir_with(NODE, None);
    write(dir.path(), SERVICES_FILE, &block);
    load_dir(dir.path()).unwrap_or_else(|e| panic!("README services.yaml example: {e}"));
}

/// The configuration reference's examples are one configuration directory:
/// each block names its file on its first line.
fn reference_dir() -> tempfile::TempDir {
    let doc = include_str!("../../../docs/configuration.md");
    let dir = tempfile::tempdir().unwrap();
    let blocks = yaml_blocks(doc);
    assert_eq!(
        blocks.len(),
        5,
        "node, pods, workloads, services and one policy"
    );
    for block in blocks.iter().filter(|b| b.starts_with("# ")) {
        let file = block
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .trim();
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, block).unwrap();
    }
    dir
}

#[test]
fn the_configuration_reference_examples_load_together() {
    let dir = reference_dir();
    let cfg =
        load_dir(dir.path()).unwrap_or_else(|e| panic!("docs/configuration.md examples: {e}"));
    assert_eq!(cfg.node.name, "node-1");
    assert_eq!(cfg.pods.len(), 1);
    assert_eq!(cfg.workloads.len(), 1);
    assert_eq!(cfg.services.len(), 1);
    assert_eq!(cfg.policies.set.len(), 1);
}

/// Every node.yaml field is in the reference (by its dotted path).
#[test]
fn the_configuration_reference_names_every_node_field() {
    let doc = include_str!("../../../docs/configuration.md");
    let dir = reference_dir();
    let cfg = load_dir(dir.path()).unwrap();
    let mut node = serde_yaml::to_value(&cfg.node).unwrap();
    // The example sets `issuer`; `files` is the other source.
    node["identity"]["files"] = serde_yaml::from_str("{dir: x, trustBundle: y}").unwrap();
    fn paths(value: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_yaml::Value::Mapping(map) = value {
            for (key, value) in map {
                let key = key.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                paths(value, &path, out);
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    paths(&node, "", &mut all);
    assert!(all.len() > 20, "{all:?}");
    let missing: Vec<&String> = all
        .iter()
        .filter(|path| !doc.contains(&format!("| `{path}")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md's table: {missing:?}"
    );
}

/// Lays `files` out as Kubernetes' AtomicWriter does for a ConfigMap
/// volume: the files in a new hidden version directory, `..data` swapped to
/// it in one rename, and each top-level name a symlink through `..data`.
fn publish_configmap_version(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let version_dir = dir.join(version);
    for (name, text) in files {
        let path = version_dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(CONFIGMAP_VERSION_LINK)).unwrap();
    for (name, _) in files {
        let top = name.split('/').next().unwrap();
        let link = dir.join(top);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new(CONFIGMAP_VERSION_LINK).join(top), link).unwrap();
        }
    }
}

#[test]
fn a_read_that_spans_a_configmap_update_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    publish_configmap_version(
        dir.path(),
        "..v1",
        &[(NODE_FILE, "name: old\n"), ("policies/p.yaml", "")],
    );
    assert_eq!(load_dir(dir.path()).unwrap().node.name, "old");

    // The ConfigMap changes while a read is under way: that read's result
    // (old, or a mix) is not returned; the new version is.
    let mut reads = 0;
    let name = read_one_version(dir.path(), |d| {
        reads += 1;
        let read = load_dir_once(d, None).map(|(desired, _)| desired.node.name);
        if reads == 1 {
            publish_configmap_version(d, "..v2", &[(NODE_FILE, "name: new\n")]);
        }
        read
    });
    assert_eq!(name.unwrap(), "new");
    assert_eq!(reads, 2);

    // No ConfigMap (plain files): read once.
    let plain = dir_with(NODE, None);
    let mut reads = 0;
    read_one_version(plain.path(), |_| reads += 1);
    assert_eq!(reads, 1);
}

#[test]
fn a_policy_file_that_does_not_load_keeps_its_last_good_version_and_the_others_apply() {
    let policy = |name: &str, action: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{action: {action}, rules: [{{}}]}}\n"
        )
    };
    let dir = dir_with(NODE, None);
    std::fs::create_dir(dir.path().join(POLICIES_DIR)).unwrap();
    let policies = dir.path().join(POLICIES_DIR);
    write(&policies, "a.yaml", &policy("a", "DENY"));
    write(&policies, "b.yaml", &policy("b", "ALLOW"));
    let good = load_dir(dir.path()).unwrap();
    let last_good = good.policies.files.clone();

    // a.yaml breaks, b.yaml changes, c.yaml is new and broken.
    write(
        &policies,
        "a.yaml",
        "apiVersion: security.istio.io/v1\nkind: [AuthorizationPolicy\n",
    );
    write(&policies, "b.yaml", &policy("b", "AUDIT"));
    write(&policies, "c.yaml", "kind: Sidecar\n");
    // Strictly (at start, or `mesh-agent check`): rejected whole.
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("a.yaml"), "{err}");

    let (desired, kept_back) = load_dir_keeping_policies(dir.path(), &last_good).unwrap();
    let names: Vec<String> = desired
        .policies
        .set
        .iter()
        .map(|p| format!("{} {:?}", p.name(), p.action()))
        .collect();
    // a keeps its last good DENY, b's change applies, c stays out.
    assert_eq!(names, ["shop/a Deny", "shop/b Audit"]);
    let a_text = &desired.policies.files[0].1;
    assert!(a_text.contains("action: DENY"), "{a_text}");
    let errors: Vec<String> = kept_back.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("a.yaml:3") && errors[0].contains("invalid YAML"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("c.yaml") && errors[1].contains("apiVersion"),
        "{errors:?}"
    );
    let reason = kept_back_reason(&kept_back);
    assert!(reason.contains("last good version"), "{reason}");

    // Fixed: loads as written, nothing kept back.
    write(&policies, "a.yaml", &policy("a", "ALLOW"));
    std::fs::remove_file(policies.join("c.yaml")).unwrap();
    let (desired, kept_back) =
        load_dir_keeping_policies(dir.path(), &desired.policies.files).unwrap();
    assert!(kept_back.is_empty());
    assert_eq!(desired.policies.set.len(), 2);
}
