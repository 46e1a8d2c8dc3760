//! `targetRef` / `targetRefs` to a Service: the policy applies to the
//! workloads the Service's selector selects (resolved against the services
//! known when compiled); one that cannot be mapped stands as a DENY-all
//! over its namespace, alone, and says why.

use super::{R, workload};
use crate::config::ServiceConfig;
use crate::policy::{DEFAULT_ROOT_NAMESPACE, load};

fn service(name: &str, namespace: &str, selector: &[(&str, &str)]) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        namespace: namespace.into(),
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..ServiceConfig::with_defaults()
    }
}

/// Istio's documented form (ambient), allowing only `sleep` into the
/// workloads of Service `productpage`.
const PRODUCTPAGE_VIEWER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/sleep
"#;

fn allowed(
    compiled: &crate::policy::CompiledPolicies,
    labels: &[(&str, &str)],
    principal: &'static str,
) -> bool {
    let r = R {
        principal: Some(principal),
        ns: Some("default"),
        http: None,
        ..R::default()
    };
    r.decide_with(&compiled.for_workload(&workload("default", labels)))
        .is_allow()
}

#[test]
fn a_policy_targeting_a_service_applies_to_the_workloads_it_selects() {
    let set = load([("p.yaml", PRODUCTPAGE_VIEWER)]).unwrap();
    let services = [service("productpage", "default", &[("app", "productpage")])];
    let compiled = set.compile_with_services(DEFAULT_ROOT_NAMESPACE, &services);
    assert!(compiled.unmapped_targets().is_empty());
    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    let other = "spiffe://cluster.local/ns/default/sa/other";
    assert!(allowed(
        &compiled,
        &[("app", "productpage"), ("version", "v1")],
        sleep
    ));
    assert!(!allowed(
        &compiled,
        &[("app", "productpage"), ("version", "v1")],
        other
    ));
    // Not selected by the Service: the policy does not apply.
    assert!(allowed(&compiled, &[("app", "reviews")], other));
}

#[test]
fn a_target_that_cannot_be_mapped_denies_its_namespace_alone_and_says_why() {
    let set = load([("p.yaml", PRODUCTPAGE_VIEWER)]).unwrap();
    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    for (services, why) in [
        (vec![], "is not known to this node"),
        (
            vec![service("productpage", "default", &[])],
            "has no selector",
        ),
        (
            vec![service(
                "productpage",
                "elsewhere",
                &[("app", "productpage")],
            )],
            "is not known to this node",
        ),
    ] {
        let compiled = set.compile_with_services(DEFAULT_ROOT_NAMESPACE, &services);
        let unmapped = compiled.unmapped_targets();
        assert_eq!(unmapped.len(), 1, "{why}");
        assert!(
            unmapped[0].contains("p.yaml")
                && unmapped[0].contains("default/productpage-viewer")
                && unmapped[0].contains(why),
            "{unmapped:?}"
        );
        // Fail closed, over the whole namespace: even sleep, even another app.
        assert!(
            !allowed(&compiled, &[("app", "productpage")], sleep),
            "{why}"
        );
        assert!(!allowed(&compiled, &[("app", "reviews")], sleep), "{why}");
        // Another namespace is untouched.
        let r = R::default();
        assert!(
            r.decide_with(&compiled.for_workload(&workload("other", &[])))
                .is_allow()
        );
    }
}

#[test]
fn what_is_refused_at_load() {
    let head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\nspec:\n";
    for (spec, want) in [
        (
            "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, group: '', name: a}]\n",
            "field spec.targetRefs: `targetRefs` cannot be set with `selector`",
        ),
        (
            "  targetRef: {kind: Service, group: '', name: a}\n  targetRefs: [{kind: Service, group: '', name: a}]\n",
            "field spec.targetRefs: set `targetRef` or `targetRefs`, not both",
        ),
        (
            "  targetRefs: [{kind: Service, group: '', name: a, namespace: other}]\n",
            "field spec.targetRefs[0].namespace: a policy can only target a Service in its own namespace",
        ),
        (
            "  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: a}]\n",
            "networking.istio.io/ServiceEntry is not supported",
        ),
        (
            "  targetRefs: [{kind: Service, name: a, sectionName: http}]\n",
            "unknown field `sectionName`",
        ),
    ] {
        let text = format!("{head}{spec}");
        let set = load([("p.yaml", text.as_str())]).unwrap();
        let errors: Vec<String> = set
            .unenforceable()
            .filter_map(|p| p.unenforceable().map(ToString::to_string))
            .collect();
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{spec}:\n got {errors:?}\nwant {want}"
        );
    }
    // The single form loads like the list.
    let text =
        format!("{head}  targetRef: {{kind: Service, group: '', name: a}}\n  rules: [{{}}]\n");
    let set = load([("p.yaml", text.as_str())]).unwrap();
    assert_eq!(set.unenforceable().count(), 0);
}
