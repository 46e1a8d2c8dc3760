//! Request evaluation. Nothing here parses or allocates, except the
//! `dry_run_denies` vector when a dry-run policy would deny.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use super::compile::{
    Action, Condition, Operation, Policy, PolicyName, Rule, Source, WorkloadPolicy,
};
use super::matcher::{Field, StringMatcher, host_without_port};

/// What the agent knows about one connection (plain TCP) or HTTP request.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Peer SPIFFE ID, with or without `spiffe://`; `None` for plaintext.
    pub source_principal: Option<&'a str>,
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    /// Original client (from a trusted Forwarded/PROXY header), else `source_ip`.
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// `None` for plain TCP: HTTP-only fields follow Istio's TCP rules.
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP attributes of one request.
#[derive(Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Host / :authority as received (the port is stripped for matching).
    pub host: &'a str,
    /// Already normalised by [`normalize_path`](super::normalize_path).
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
    /// The request's valid JWT, if it carried one.
    pub auth: Option<&'a super::RequestAuth>,
}

/// Header access for `request.headers[...]` conditions.
pub trait HeaderLookup {
    /// `name` is lowercase. A header sent several times must be returned
    /// joined with `,` (what Envoy matches against).
    fn get(&self, name: &str) -> Option<&str>;
}

/// No headers at all (e.g. a request whose headers were not collected).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn get(&self, _: &str) -> Option<&str> {
        None
    }
}

/// For tests and simple callers: `(name, value)` pairs, names compared
/// case-insensitively; the first occurrence wins.
impl<K: AsRef<str>, V: AsRef<str>> HeaderLookup for Vec<(K, V)> {
    fn get(&self, name: &str) -> Option<&str> {
        lookup_pairs(self, name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> HeaderLookup for [(K, V); N] {
    fn get(&self, name: &str) -> Option<&str> {
        lookup_pairs(self, name)
    }
}

fn lookup_pairs<'s, K: AsRef<str>, V: AsRef<str>>(
    pairs: &'s [(K, V)],
    name: &str,
) -> Option<&'s str> {
    pairs
        .iter()
        .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

/// Which policy produced (or would have produced) a denial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyRef {
    /// A DENY policy's rule matched (index into `spec.rules`).
    Rule {
        policy: Arc<PolicyName>,
        rule: usize,
    },
    /// ALLOW policies apply to the workload but none of them matched.
    NoAllowMatched,
    /// A PeerAuthentication in STRICT mode refused a plaintext connection.
    StrictPeerAuthentication(Arc<PolicyName>),
    /// An HTTPLocalRateLimitPolicy refused a request over its limit.
    RateLimit(Arc<PolicyName>),
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyRef::Rule { policy, rule } => write!(f, "{policy} rule[{rule}]"),
            PolicyRef::NoAllowMatched => f.write_str("allow-nothing (no ALLOW policy matched)"),
            PolicyRef::StrictPeerAuthentication(policy) => {
                write!(f, "{policy} (PeerAuthentication STRICT: plaintext refused)")
            }
            PolicyRef::RateLimit(policy) => write!(f, "{policy} (HTTPLocalRateLimitPolicy)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The ALLOW policy rule that matched; `None` when no ALLOW policy
        /// applies to the workload (then everything not denied is allowed).
        by: Option<PolicyRef>,
        /// An AUDIT policy matched.
        audit: bool,
        /// Dry-run policies that would have denied the request.
        dry_run_denies: Vec<PolicyRef>,
    },
    Deny {
        by: PolicyRef,
        audit: bool,
        dry_run_denies: Vec<PolicyRef>,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
    pub fn audit(&self) -> bool {
        match self {
            Decision::Allow { audit, .. } | Decision::Deny { audit, .. } => *audit,
        }
    }
    pub fn dry_run_denies(&self) -> &[PolicyRef] {
        match self {
            Decision::Allow { dry_run_denies, .. } | Decision::Deny { dry_run_denies, .. } => {
                dry_run_denies
            }
        }
    }
}

impl WorkloadPolicy {
    /// Istio's evaluation: DENY first, then ALLOW; AUDIT and dry-run
    /// policies are evaluated but never change the outcome.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let i = &*self.inner;
        let audit = i.audit.iter().any(|p| first_match(p, req).is_some());

        let mut dry_run_denies = Vec::new();
        for p in &i.dry_run_deny {
            if let Some(rule) = first_match(p, req) {
                dry_run_denies.push(PolicyRef::Rule {
                    policy: p.id.clone(),
                    rule,
                });
            }
        }
        // Istio evaluates dry-run ALLOW policies as their own (shadow) set.
        if !i.dry_run_allow.is_empty()
            && !i
                .dry_run_allow
                .iter()
                .any(|p| first_match(p, req).is_some())
        {
            dry_run_denies.push(PolicyRef::NoAllowMatched);
        }

        for p in &i.deny {
            if let Some(rule) = first_match(p, req) {
                return Decision::Deny {
                    by: PolicyRef::Rule {
                        policy: p.id.clone(),
                        rule,
                    },
                    audit,
                    dry_run_denies,
                };
            }
        }
        if i.allow.is_empty() {
            return Decision::Allow {
                by: None,
                audit,
                dry_run_denies,
            };
        }
        for p in &i.allow {
            if let Some(rule) = first_match(p, req) {
                let by = Some(PolicyRef::Rule {
                    policy: p.id.clone(),
                    rule,
                });
                return Decision::Allow {
                    by,
                    audit,
                    dry_run_denies,
                };
            }
        }
        Decision::Deny {
            by: PolicyRef::NoAllowMatched,
            audit,
            dry_run_denies,
        }
    }
}

/// Index of the first rule of `p` that matches (rules are ORed).
fn first_match(p: &Policy, req: &Request<'_>) -> Option<usize> {
    p.rules.iter().position(|r| rule_matches(r, p.action, req))
}

fn rule_matches(rule: &Rule, action: Action, req: &Request<'_>) -> bool {
    // Plain TCP: an ALLOW rule with HTTP-only fields is dropped (matches
    // nothing); for DENY and AUDIT the HTTP-only fields are ignored, which
    // widens the rule. Ignoring happens below: HTTP checks need `req.http`.
    if req.http.is_none() && rule.has_http && action == Action::Allow {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req)))
        && rule.when.iter().all(|c| condition_matches(c, req))
}

fn principal<'a>(req: &Request<'a>) -> Option<&'a str> {
    req.source_principal
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
}

fn source_matches(s: &Source, req: &Request<'_>) -> bool {
    s.ip_blocks.matches(Some(&req.source_ip))
        && s.remote_ip_blocks.matches(Some(&req.remote_ip))
        && s.namespaces.matches(req.source_namespace)
        && s.principals.matches(principal(req))
        && (!s.request_principals.is_set()
            || match &req.http {
                Some(http) => s
                    .request_principals
                    .matches(http.auth.map(|a| a.principal.as_str())),
                None => true, // only reached for DENY/AUDIT: ignored on TCP
            })
}

/// `values` match when one of the request's values does; `notValues` when
/// none does (a list claim or `aud` has several, a missing one none).
fn any_of_matches(f: &Field<StringMatcher>, items: &[&str]) -> bool {
    f.values
        .as_ref()
        .is_none_or(|m| items.iter().any(|v| m.matches(v)))
        && !f
            .not_values
            .as_ref()
            .is_some_and(|m| items.iter().any(|v| m.matches(v)))
}

fn operation_matches(o: &Operation, req: &Request<'_>) -> bool {
    if !o.ports.matches(Some(&req.destination_port)) {
        return false;
    }
    let Some(http) = &req.http else {
        return true; // HTTP-only fields ignored on TCP (see rule_matches)
    };
    o.methods.matches(Some(http.method))
        && o.paths.matches(Some(http.path))
        && (!o.hosts.is_set() || host_matches(o, http.host))
}

/// A host matches if it matches without its port (and trailing dot) or as
/// received (so a policy value that names a port still works).
fn host_matches(o: &Operation, host: &str) -> bool {
    let bare = host_without_port(host);
    let hit = |m: &super::matcher::StringMatcher| m.matches(bare) || m.matches(host);
    o.hosts.values.as_ref().is_none_or(hit) && !o.hosts.not_values.as_ref().is_some_and(hit)
}

fn condition_matches(c: &Condition, req: &Request<'_>) -> bool {
    match c {
        Condition::Header(name, f) => match &req.http {
            Some(http) => f.matches(http.headers.get(name)),
            None => true, // only reached for DENY/AUDIT: ignored on TCP
        },
        Condition::SourceIp(f) => f.matches(Some(&req.source_ip)),
        Condition::RemoteIp(f) => f.matches(Some(&req.remote_ip)),
        Condition::SourceNamespace(f) => f.matches(req.source_namespace),
        Condition::SourcePrincipal(f) => f.matches(principal(req)),
        Condition::DestinationIp(f) => f.matches(Some(&req.destination_ip)),
        Condition::DestinationPort(f) => f.matches(Some(&req.destination_port)),
        Condition::Sni(f) => f.matches(req.sni),
        Condition::RequestPrincipal(f) => match &req.http {
            Some(http) => f.matches(http.auth.map(|a| a.principal.as_str())),
            None => true,
        },
        Condition::RequestPresenter(f) => match &req.http {
            Some(http) => f.matches(http.auth.and_then(|a| a.presenter.as_deref())),
            None => true,
        },
        Condition::RequestAudiences(f) => match &req.http {
            Some(http) => {
                let audiences: Vec<&str> = http
                    .auth
                    .map(|a| a.audiences.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                any_of_matches(f, &audiences)
            }
            None => true,
        },
        Condition::RequestClaim(path, f) => match &req.http {
            Some(http) => {
                let values = http.auth.map(|a| a.claim(path)).unwrap_or_default();
                any_of_matches(f, &values)
            }
            None => true,
        },
    }
}
