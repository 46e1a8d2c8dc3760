//! Who may have which identity: istiod's node authorizer
//! (security/pkg/server/ca/node_auth.go), plus a trust-domain check istiod
//! does not make. The caller is what TokenReview said of its token; the pods
//! are what the API says now. Every refusal has its reason, for the count
//! and the log; the caller only learns "unauthenticated", as from istiod.

use std::fmt;

use crate::identity::SpiffeId;

/// The TokenReview prefix of a service account's user name.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A service account, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The caller, as the API server vouched for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub service_account: ServiceAccount,
    /// The pod the token is bound to.
    pub pod_name: String,
    pub pod_uid: String,
}

/// A pod as the signer sees it in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; None while unscheduled.
    pub node: Option<String>,
    /// `status.phase`.
    pub phase: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// TokenReview did not authenticate the token (or named no service
    /// account, or no bound pod).
    NotAuthenticated(String),
    /// The caller's service account may not ask for others.
    NotANodeAgent(ServiceAccount),
    /// The caller's pod is not (or no longer) in the API as its token says.
    CallerPodUnknown(String),
    /// The identity is of another trust domain.
    ForeignTrustDomain(String),
    /// No pod with that service account runs on the caller's node.
    NoPodOnNode { identity: String, node: String },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAuthenticated(_) => "not_authenticated",
            Self::NotANodeAgent(_) => "not_a_node_agent",
            Self::CallerPodUnknown(_) => "caller_pod_unknown",
            Self::ForeignTrustDomain(_) => "foreign_trust_domain",
            Self::NoPodOnNode { .. } => "no_pod_on_node",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAuthenticated(why) => write!(f, "token not authenticated: {why}"),
            Self::NotANodeAgent(sa) => {
                write!(f, "caller {sa} is not allowed to ask on others' behalf")
            }
            Self::CallerPodUnknown(why) => write!(f, "the caller's pod: {why}"),
            Self::ForeignTrustDomain(id) => write!(f, "{id} is not of this mesh's trust domain"),
            Self::NoPodOnNode { identity, node } => {
                write!(f, "no pod of {identity} runs on node {node}")
            }
        }
    }
}

/// The caller from a TokenReview's `status` (authenticated, a service
/// account's user name, a bound pod's name and uid).
pub fn caller_from_review(
    status: &k8s_openapi::api::authentication::v1::TokenReviewStatus,
) -> Result<Caller, Refusal> {
    if status.authenticated != Some(true) {
        return Err(Refusal::NotAuthenticated(
            status
                .error
                .clone()
                .unwrap_or_else(|| "rejected by the API server".into()),
        ));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| Refusal::NotAuthenticated("no user in the review".into()))?;
    let name = user.username.as_deref().unwrap_or_default();
    let (namespace, account) = name
        .strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| Refusal::NotAuthenticated(format!("{name:?} is not a service account")))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .cloned()
            .ok_or_else(|| {
                Refusal::NotAuthenticated(format!(
                    "the token is not bound to a pod ({key} missing)"
                ))
            })
    };
    Ok(Caller {
        service_account: ServiceAccount {
            namespace: namespace.to_string(),
            name: account.to_string(),
        },
        pod_name: extra(POD_NAME)?,
        pod_uid: extra(POD_UID)?,
    })
}

/// Whether `caller` may have a certificate for `requested`: it is a trusted
/// node agent; its pod is in the API with the token's uid and service
/// account; `requested` is of `trust_domain`; and a pod of `requested`'s
/// service account, not failed or finished, is scheduled on the caller's
/// node. `pods` are the API's pods (the caller's and those of its node).
pub fn authorize(
    caller: &Caller,
    trusted: &[ServiceAccount],
    trust_domain: &str,
    requested: &SpiffeId,
    pods: &[PodFacts],
) -> Result<(), Refusal> {
    if !trusted.contains(&caller.service_account) {
        return Err(Refusal::NotANodeAgent(caller.service_account.clone()));
    }
    let own = pods
        .iter()
        .find(|p| p.namespace == caller.service_account.namespace && p.name == caller.pod_name)
        .ok_or_else(|| {
            Refusal::CallerPodUnknown(format!(
                "pod {}/{} not found",
                caller.service_account.namespace, caller.pod_name
            ))
        })?;
    if own.uid != caller.pod_uid {
        return Err(Refusal::CallerPodUnknown(format!(
            "pod {}/{} has uid {}, the token {}",
            own.namespace, own.name, own.uid, caller.pod_uid
        )));
    }
    if own.service_account != caller.service_account.name {
        return Err(Refusal::CallerPodUnknown(format!(
            "pod {}/{} runs as {}, the token is {}'s",
            own.namespace, own.name, own.service_account, caller.service_account
        )));
    }
    let node = own
        .node
        .clone()
        .ok_or_else(|| Refusal::CallerPodUnknown("the caller's pod is not scheduled".into()))?;
    if requested.trust_domain() != trust_domain {
        return Err(Refusal::ForeignTrustDomain(requested.to_string()));
    }
    let runs_here = pods.iter().any(|p| {
        p.node.as_deref() == Some(node.as_str())
            && p.namespace == requested.namespace()
            && p.service_account == requested.service_account()
            && !matches!(p.phase.as_str(), "Failed" | "Succeeded")
    });
    if !runs_here {
        return Err(Refusal::NoPodOnNode {
            identity: requested.to_string(),
            node,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn sa(ns: &str, name: &str) -> ServiceAccount {
        ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn pod(ns: &str, name: &str, account: &str, node: &str, phase: &str) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: account.into(),
            node: Some(node.into()),
            phase: phase.into(),
        }
    }

    fn agent_on_n1() -> Caller {
        Caller {
            service_account: sa("mesh-system", "mesh-agent"),
            pod_name: "agent-n1".into(),
            pod_uid: "uid-agent-n1".into(),
        }
    }

    fn cluster() -> Vec<PodFacts> {
        vec![
            pod("mesh-system", "agent-n1", "mesh-agent", "n1", "Running"),
            pod("mesh-system", "agent-n2", "mesh-agent", "n2", "Running"),
            pod("shop", "frontend-1", "frontend", "n1", "Running"),
            pod("shop", "backend-1", "backend", "n2", "Running"),
            pod("shop", "batch-1", "batch", "n1", "Succeeded"),
        ]
    }

    fn check(caller: &Caller, identity: &str) -> Result<(), Refusal> {
        authorize(
            caller,
            &[sa("mesh-system", "mesh-agent")],
            "cluster.local",
            &identity.parse().unwrap(),
            &cluster(),
        )
    }

    #[test]
    fn a_node_agent_gets_the_identities_of_its_own_nodes_pods_only() {
        let n1 = agent_on_n1();
        assert_eq!(
            check(&n1, "spiffe://cluster.local/ns/shop/sa/frontend"),
            Ok(())
        );
        for (identity, reason) in [
            // On the other node.
            (
                "spiffe://cluster.local/ns/shop/sa/backend",
                "no_pod_on_node",
            ),
            // No such service account anywhere.
            ("spiffe://cluster.local/ns/shop/sa/ghost", "no_pod_on_node"),
            // Its only pod here has finished.
            ("spiffe://cluster.local/ns/shop/sa/batch", "no_pod_on_node"),
            // Another mesh.
            (
                "spiffe://other.mesh/ns/shop/sa/frontend",
                "foreign_trust_domain",
            ),
        ] {
            let refusal = check(&n1, identity).unwrap_err();
            assert_eq!(refusal.reason(), reason, "{identity}: {refusal}");
        }
    }

    #[test]
    fn only_a_trusted_agent_whose_pod_is_as_its_token_says_may_ask() {
        // A workload's own token.
        let workload = Caller {
            service_account: sa("shop", "frontend"),
            pod_name: "frontend-1".into(),
            pod_uid: "uid-frontend-1".into(),
        };
        let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
        assert_eq!(
            check(&workload, frontend).unwrap_err().reason(),
            "not_a_node_agent"
        );
        // A token of a pod since re-created (uid differs), or gone.
        let mut stale = agent_on_n1();
        stale.pod_uid = "uid-old".into();
        assert_eq!(
            check(&stale, frontend).unwrap_err().reason(),
            "caller_pod_unknown"
        );
        let mut gone = agent_on_n1();
        gone.pod_name = "agent-n9".into();
        assert_eq!(
            check(&gone, frontend).unwrap_err().reason(),
            "caller_pod_unknown"
        );
        // n2's agent cannot have n1's frontend.
        let n2 = Caller {
            pod_name: "agent-n2".into(),
            pod_uid: "uid-agent-n2".into(),
            ..agent_on_n1()
        };
        assert_eq!(check(&n2, frontend).unwrap_err().reason(), "no_pod_on_node");
    }

    #[test]
    fn the_caller_comes_from_an_authenticated_review_of_a_pod_bound_token() {
        let extra = BTreeMap::from([
            (POD_NAME.to_string(), vec!["agent-n1".to_string()]),
            (POD_UID.to_string(), vec!["uid-agent-n1".to_string()]),
        ]);
        let mut status = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:mesh-system:mesh-agent".into()),
                extra: Some(extra),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(caller_from_review(&status), Ok(agent_on_n1()));
        // Not bound to a pod.
        let mut unbound = status.clone();
        unbound.user.as_mut().unwrap().extra = None;
        assert_eq!(
            caller_from_review(&unbound).unwrap_err().reason(),
            "not_authenticated"
        );
        // Not a service account.
        let mut person = status.clone();
        person.user.as_mut().unwrap().username = Some("alice".into());
        assert_eq!(
            caller_from_review(&person).unwrap_err().reason(),
            "not_authenticated"
        );
        // Not authenticated at all.
        status.authenticated = Some(false);
        status.error = Some("token expired".into());
        let refusal = caller_from_review(&status).unwrap_err();
        assert!(refusal.to_string().contains("token expired"), "{refusal}");
    }
}
