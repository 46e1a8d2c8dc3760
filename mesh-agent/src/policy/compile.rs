//! Validated policies, their grouping per workload, and the per-workload cache.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

use super::matcher::{Field, IpMatcher, PortMatcher, StringMatcher};

/// Istio's default root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The cache is keyed by (namespace, labels); pods of one deployment share
/// a key, so this bound is only reached by label churn. It is then emptied.
const CACHE_LIMIT: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// `namespace/name` of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One loaded, validated policy with its values already parsed.
#[derive(Debug)]
pub struct Policy {
    pub(crate) id: Arc<PolicyName>,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    /// `None`: no selector, every workload of the namespace (or the mesh).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// `targetRef(s)`: the Services (in its namespace) whose selected
    /// workloads it applies to, resolved when compiled against the
    /// services known then (in place of `selector`).
    pub(crate) target_services: Option<Vec<String>>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) has_http: bool,
    /// The file it was loaded from (for operators: `/config_dump`, logs).
    pub(crate) source: Arc<std::path::Path>,
    /// Set when the document could not be enforced as written (an
    /// unsupported or malformed field): it then stands in the set as a
    /// DENY-all over the workloads it selects, until it is fixed.
    pub(crate) unenforceable: Option<Arc<super::LoadError>>,
}

impl Policy {
    /// `p` as a DENY-all over its whole namespace, standing for it while
    /// what it applies to cannot be known (an AUDIT policy audits it all;
    /// a dry-run one stays dry-run).
    fn deny_all_over_namespace(p: &Policy) -> Policy {
        Policy {
            id: p.id.clone(),
            action: if p.action == Action::Audit {
                Action::Audit
            } else {
                Action::Deny
            },
            dry_run: p.dry_run,
            selector: None,
            target_services: None,
            rules: vec![Rule::default()],
            has_http: false,
            source: p.source.clone(),
            unenforceable: p.unenforceable.clone(),
        }
    }

    /// Why this policy is enforced as a DENY-all (see
    /// [`load`](super::load)), if it is.
    pub fn unenforceable(&self) -> Option<&super::LoadError> {
        self.unenforceable.as_deref()
    }
    pub fn source(&self) -> &std::path::Path {
        &self.source
    }
    pub fn name(&self) -> &PolicyName {
        &self.id
    }
    pub fn action(&self) -> Action {
        self.action
    }
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }
    /// The workload labels it selects (`None`: every workload in scope).
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    /// Whether the policy uses HTTP-only fields anywhere.
    pub fn has_http_rules(&self) -> bool {
        self.has_http
    }
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_none_or(|sel| {
            sel.iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct Rule {
    pub(crate) from: Vec<Source>,
    pub(crate) to: Vec<Operation>,
    pub(crate) when: Vec<Condition>,
    /// Uses hosts/methods/paths (or their notX), requestPrincipals, or a
    /// request.headers or request.auth condition.
    pub(crate) has_http: bool,
}

impl Rule {
    /// Whether deciding this rule for a connection to `port` may need the
    /// HTTP request: it uses HTTP fields and nothing in it rules the port out
    /// (its operations' `ports`, a `destination.port` condition). A rule
    /// that rules the port out matches the same with or without HTTP.
    pub(crate) fn may_need_http_on(&self, port: u16) -> bool {
        self.has_http
            && (self.to.is_empty() || self.to.iter().any(|o| o.ports.matches(Some(&port))))
            && self.when.iter().all(|c| match c {
                Condition::DestinationPort(ports) => ports.matches(Some(&port)),
                _ => true,
            })
    }
}

#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) principals: Field<StringMatcher>,
    /// `<iss>/<sub>` of the request's valid JWT (HTTP only).
    pub(crate) request_principals: Field<StringMatcher>,
    pub(crate) namespaces: Field<StringMatcher>,
    pub(crate) ip_blocks: Field<IpMatcher>,
    pub(crate) remote_ip_blocks: Field<IpMatcher>,
}

#[derive(Debug)]
pub(crate) struct Operation {
    pub(crate) hosts: Field<StringMatcher>,
    pub(crate) ports: Field<PortMatcher>,
    pub(crate) methods: Field<StringMatcher>,
    pub(crate) paths: Field<StringMatcher>,
}

#[derive(Debug)]
pub(crate) enum Condition {
    /// Header name stored lowercase.
    Header(Box<str>, Field<StringMatcher>),
    SourceIp(Field<IpMatcher>),
    RemoteIp(Field<IpMatcher>),
    SourceNamespace(Field<StringMatcher>),
    SourcePrincipal(Field<StringMatcher>),
    DestinationIp(Field<IpMatcher>),
    DestinationPort(Field<PortMatcher>),
    Sni(Field<StringMatcher>),
    // The request's valid JWT (HTTP only).
    RequestPrincipal(Field<StringMatcher>),
    RequestAudiences(Field<StringMatcher>),
    RequestPresenter(Field<StringMatcher>),
    /// `request.auth.claims[a][b]`: the path of names.
    RequestClaim(Box<[Box<str>]>, Field<StringMatcher>),
}

impl Condition {
    /// Needs the HTTP request to be decided.
    pub(crate) fn is_http(&self) -> bool {
        matches!(
            self,
            Condition::Header(..)
                | Condition::RequestPrincipal(_)
                | Condition::RequestAudiences(_)
                | Condition::RequestPresenter(_)
                | Condition::RequestClaim(..)
        )
    }
}

pub(crate) fn ip_field(values: Option<Vec<IpNet>>, not: Option<Vec<IpNet>>) -> Field<IpMatcher> {
    Field {
        values: values.map(|v| IpMatcher::new(&v)),
        not_values: not.map(|v| IpMatcher::new(&v)),
    }
}

/// Every policy of a successful [`load`](super::load), in load order.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    pub(crate) policies: Vec<Arc<Policy>>,
    pub(crate) peer_authentications: Vec<Arc<super::PeerAuthentication>>,
    pub(crate) request_authentications: Vec<Arc<super::RequestAuthentication>>,
    pub(crate) rate_limits: Vec<Arc<super::RateLimit>>,
}

impl PolicySet {
    pub fn len(&self) -> usize {
        self.policies.len()
    }
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter().map(|p| &**p)
    }

    /// The RequestAuthentications, in load order.
    pub fn request_authentications(&self) -> impl Iterator<Item = &super::RequestAuthentication> {
        self.request_authentications.iter().map(|r| &**r)
    }

    /// The PeerAuthentications, in load order.
    pub fn peer_authentications(&self) -> impl Iterator<Item = &super::PeerAuthentication> {
        self.peer_authentications.iter().map(|p| &**p)
    }

    /// The policies that could not be enforced as written, each standing in
    /// as a DENY-all over what it selects.
    pub fn unenforceable(&self) -> impl Iterator<Item = &Policy> {
        self.iter().filter(|p| p.unenforceable.is_some())
    }

    /// Indexes the policies by namespace; `root_namespace` policies apply to
    /// every workload of the mesh (subject to their selector).
    pub fn compile(&self, root_namespace: &str) -> CompiledPolicies {
        self.compile_with_services(root_namespace, &[])
    }

    /// [`PolicySet::compile`], with `targetRef(s)` resolved against
    /// `services`: a policy targeting Services applies to the workloads
    /// their selectors select. One whose Service is not known here, or has
    /// no selector, cannot be mapped: it stands as a DENY-all over its
    /// namespace until it can (fail closed, alone), reported in
    /// [`CompiledPolicies::unmapped_targets`].
    pub fn compile_with_services(
        &self,
        root_namespace: &str,
        services: &[crate::config::ServiceConfig],
    ) -> CompiledPolicies {
        self.compile_with(root_namespace, services, &[])
    }

    /// As [`Self::compile_with_services`], with the routes rate limits may
    /// target.
    pub fn compile_with(
        &self,
        root_namespace: &str,
        services: &[crate::config::ServiceConfig],
        routes: &[Arc<crate::routes::HttpRoute>],
    ) -> CompiledPolicies {
        let mut targets = HashMap::new();
        let mut unmapped = Vec::new();
        let policies: Vec<Arc<Policy>> = self
            .policies
            .iter()
            .map(|p| {
                let Some(names) = &p.target_services else {
                    return p.clone();
                };
                let mut selectors = Vec::new();
                for name in names {
                    let service = services
                        .iter()
                        .find(|s| s.name == *name && s.namespace == p.id.namespace);
                    match service {
                        Some(s) if !s.selector.is_empty() => selectors.push(s.selector.clone()),
                        found => {
                            let why = if found.is_some() {
                                "has no selector"
                            } else {
                                "is not known to this node"
                            };
                            let error = format!(
                                "{}: {}: targetRefs: Service {}/{name} {why}, so the workloads it stands for cannot be known: the policy denies all traffic in namespace {} until it can be mapped",
                                p.source.display(),
                                p.id,
                                p.id.namespace,
                                p.id.namespace
                            );
                            unmapped.push(error);
                            return Arc::new(Policy::deny_all_over_namespace(p));
                        }
                    }
                }
                targets.insert(p.id.clone(), selectors);
                p.clone()
            })
            .collect();
        // Rate limits apply to the pods and target ports of their Service,
        // or of their route's parent Services. One whose Service or route
        // is not known (or has no selector) limits nothing until it is, and
        // is reported: a limit is about load, not access, and limiting more
        // than written would refuse requests the author meant to serve.
        let mut rate_limits: HashMap<String, Vec<MappedRateLimit>> = HashMap::new();
        for limit in &self.rate_limits {
            let namespace = &limit.id.namespace;
            // (the Service, its port limited (None: all), the route's scope)
            let mut parents: Vec<(&str, &str, Option<u16>, Option<RouteScope>)> = Vec::new();
            match &limit.target {
                super::rate_limit::LimitTarget::Service(name) => {
                    parents.push((namespace, name, None, None));
                }
                super::rate_limit::LimitTarget::Route { kind, name } => {
                    let route = routes.iter().find(|r| {
                        r.kind.as_str() == *kind
                            && r.id.namespace == *namespace
                            && r.id.name == *name
                    });
                    match route {
                        Some(route) => {
                            for (parent, port) in &route.parents {
                                let scope = RouteScope {
                                    route: route.clone(),
                                    consumer: (parent.namespace != route.id.namespace)
                                        .then(|| route.id.namespace.clone()),
                                };
                                parents.push((
                                    &parent.namespace,
                                    &parent.name,
                                    *port,
                                    Some(scope),
                                ));
                            }
                        }
                        None => unmapped.push(format!(
                            "{}: {}: targetRef: {kind} {namespace}/{name} is not known to this node: the rate limit limits nothing until it can be mapped",
                            limit.source.display(),
                            limit.id,
                        )),
                    }
                }
            }
            for (ns, name, port, scope) in parents {
                let service = services
                    .iter()
                    .find(|s| s.name == name && s.namespace == ns && s.subset.is_none());
                match service {
                    Some(s) if !s.selector.is_empty() => {
                        rate_limits
                            .entry(s.namespace.clone())
                            .or_default()
                            .push(MappedRateLimit {
                                limit: limit.clone(),
                                selector: s.selector.clone(),
                                ports: s
                                    .ports
                                    .iter()
                                    .filter(|p| port.is_none_or(|want| p.port == want))
                                    .map(|p| p.target_port.unwrap_or(p.port))
                                    .collect(),
                                scope,
                            });
                    }
                    found => {
                        let why = if found.is_some() {
                            "has no selector"
                        } else {
                            "is not known to this node"
                        };
                        unmapped.push(format!(
                            "{}: {}: targetRef: {}: Service {ns}/{name} {why}: the rate limit limits nothing until it can be mapped",
                            limit.source.display(),
                            limit.id,
                            limit.target,
                        ));
                    }
                }
            }
        }
        let mut by_namespace: HashMap<String, Vec<Arc<Policy>>> = HashMap::new();
        let mut root = Vec::new();
        for p in &policies {
            if p.id.namespace == root_namespace {
                root.push(p.clone());
            } else {
                by_namespace
                    .entry(p.id.namespace.clone())
                    .or_default()
                    .push(p.clone());
            }
        }
        // Stable order (root first, then by name) so "denied by" is deterministic.
        root.sort_by(|a, b| a.id.cmp(&b.id));
        for v in by_namespace.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        CompiledPolicies {
            targets,
            unmapped,
            root_namespace: root_namespace.to_owned(),
            root,
            by_namespace,
            rate_limits,
            request_authn: super::request_authn::RequestAuthnIndex::new(
                &self.request_authentications,
                root_namespace,
            ),
            peer_auth: super::peer_auth::PeerAuthIndex::new(
                &self.peer_authentications,
                root_namespace,
            ),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// A rate limit with its Service's selector and target ports.
#[derive(Debug, Clone)]
struct MappedRateLimit {
    limit: Arc<super::RateLimit>,
    selector: BTreeMap<String, String>,
    ports: Vec<u16>,
    scope: Option<RouteScope>,
}

/// The requests a rate limit on a route counts: those matching one of the
/// route's rules, from its namespace's clients only for a consumer route.
#[derive(Debug, Clone)]
pub struct RouteScope {
    route: Arc<crate::routes::HttpRoute>,
    consumer: Option<String>,
}

impl RouteScope {
    /// Whether the request is the route's.
    pub fn applies(
        &self,
        request: &crate::l7::RequestInfo<'_>,
        client_namespace: Option<&str>,
    ) -> bool {
        if let Some(consumer) = &self.consumer
            && client_namespace != Some(consumer.as_str())
        {
            return false;
        }
        let Ok(method) = http::Method::from_bytes(request.method.as_bytes()) else {
            return false;
        };
        let uri = match request.query {
            Some(query) => format!("{}?{query}", request.path).parse(),
            None => request.path.parse(),
        };
        uri.is_ok_and(|uri| {
            crate::routes::route_matches(&self.route, &method, &uri, request.headers)
        })
    }
}

/// What the agent knows about the destination workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// All policies indexed for lookup; build a new one on every reload.
#[derive(Debug)]
pub struct CompiledPolicies {
    /// The selectors of each policy's targeted Services.
    targets: HashMap<Arc<PolicyName>, Vec<BTreeMap<String, String>>>,
    /// Why policies' targets could not be mapped.
    unmapped: Vec<String>,
    root_namespace: String,
    root: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    /// Rate limits by namespace, mapped to their Service's pods and ports.
    rate_limits: HashMap<String, Vec<MappedRateLimit>>,
    peer_auth: super::peer_auth::PeerAuthIndex,
    request_authn: super::request_authn::RequestAuthnIndex,
    cache: Mutex<HashMap<Workload, WorkloadPolicy>>,
}

impl CompiledPolicies {
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Policies whose `targetRefs` could not be mapped to workloads (each
    /// stands as a DENY-all over its namespace), with why.
    pub fn unmapped_targets(&self) -> &[String] {
        &self.unmapped
    }

    /// The policies that apply to `workload`, selected once and cached.
    pub fn for_workload(&self, workload: &Workload) -> WorkloadPolicy {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still consistent.
        let mut cache = self.cache.lock();
        if let Some(wp) = cache.get(workload) {
            return wp.clone();
        }
        let wp = self.select(workload);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(workload.clone(), wp.clone());
        wp
    }

    fn select(&self, workload: &Workload) -> WorkloadPolicy {
        let mut inner = WorkloadInner {
            peer_auth: self
                .peer_auth
                .resolve(&workload.namespace, &workload.labels),
            jwt_rules: self
                .request_authn
                .rules_for(&workload.namespace, &workload.labels),
            ..WorkloadInner::default()
        };
        let local = self
            .by_namespace
            .get(&workload.namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in self.root.iter().chain(local) {
            let selected = match &p.target_services {
                None => p.selects(&workload.labels),
                Some(_) => self.targets.get(&p.id).is_some_and(|selectors| {
                    selectors.iter().any(|sel| {
                        sel.iter()
                            .all(|(k, v)| workload.labels.get(k).is_some_and(|have| have == v))
                    })
                }),
            };
            if !selected {
                continue;
            }
            inner.has_http |= p.has_http;
            let list = match (p.action, p.dry_run) {
                (Action::Deny, false) => &mut inner.deny,
                (Action::Allow, false) => &mut inner.allow,
                (Action::Audit, _) => &mut inner.audit,
                (Action::Deny, true) => &mut inner.dry_run_deny,
                (Action::Allow, true) => &mut inner.dry_run_allow,
            };
            list.push(p.clone());
        }
        if let Some(limits) = self.rate_limits.get(&workload.namespace) {
            inner.rate_limits = limits
                .iter()
                .filter(|m| {
                    m.selector
                        .iter()
                        .all(|(k, v)| workload.labels.get(k).is_some_and(|have| have == v))
                })
                .map(|m| (m.limit.clone(), m.ports.clone(), m.scope.clone()))
                .collect();
        }
        WorkloadPolicy {
            inner: Arc::new(inner),
        }
    }
}

/// The policies applicable to one workload; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicy {
    pub(crate) inner: Arc<WorkloadInner>,
}

#[derive(Debug, Default)]
pub(crate) struct WorkloadInner {
    pub(crate) deny: Vec<Arc<Policy>>,
    pub(crate) allow: Vec<Arc<Policy>>,
    pub(crate) audit: Vec<Arc<Policy>>,
    pub(crate) dry_run_deny: Vec<Arc<Policy>>,
    pub(crate) dry_run_allow: Vec<Arc<Policy>>,
    pub(crate) has_http: bool,
    pub(crate) peer_auth: super::peer_auth::WorkloadPeerAuth,
    /// Of every RequestAuthentication applying to the workload.
    pub(crate) jwt_rules: Vec<Arc<super::JwtRule>>,
    /// The rate limits of the workload, with the ports they limit and, for
    /// a route's, the requests they count.
    pub(crate) rate_limits: Vec<(Arc<super::RateLimit>, Vec<u16>, Option<RouteScope>)>,
}

impl WorkloadPolicy {
    /// The PeerAuthentication that refuses plaintext (from outside the
    /// mesh) into this workload on `port`, if one does (STRICT).
    pub fn refusing_plaintext(&self, port: u16) -> Option<super::PolicyRef> {
        self.inner
            .peer_auth
            .refusing_plaintext(port)
            .map(|by| super::PolicyRef::StrictPeerAuthentication(by.clone()))
    }

    /// Whether any applicable policy (enforced, dry-run or audit) uses
    /// HTTP-only fields, or a RequestAuthentication applies, i.e. whether
    /// the agent must parse HTTP to decide.
    pub fn has_http_rules(&self) -> bool {
        self.inner.has_http || !self.inner.jwt_rules.is_empty()
    }

    /// Whether a RequestAuthentication applies (tokens are checked).
    pub fn checks_jwt(&self) -> bool {
        !self.inner.jwt_rules.is_empty()
    }

    /// Checks the request's JWT, if any, by the workload's
    /// RequestAuthentications (headers edited in place on success).
    pub fn authenticate(
        &self,
        headers: &mut http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Arc<super::RequestAuth>>, super::Unauthenticated> {
        if self.inner.jwt_rules.is_empty() {
            return Ok(None);
        }
        super::jwt::authenticate(&self.inner.jwt_rules, headers, query)
    }

    /// The rate limits on requests to `port`, each with the requests it
    /// counts if it is a route's.
    pub fn rate_limits_on(
        &self,
        port: u16,
    ) -> impl Iterator<Item = (&Arc<super::RateLimit>, Option<&RouteScope>)> {
        self.inner
            .rate_limits
            .iter()
            .filter(move |(_, ports, _)| ports.contains(&port))
            .map(|(limit, _, scope)| (limit, scope.as_ref()))
    }

    /// Whether a connection to `port` must be parsed as HTTP to be decided:
    /// some applicable rule with HTTP fields may apply on that port. When
    /// none can, the connection's decision is the same for every request on
    /// it, so it is decided once, at once (no protocol detection, no wait for
    /// the client's first bytes).
    pub fn has_http_rules_on(&self, port: u16) -> bool {
        let i = &self.inner;
        // Tokens are checked on every port (Istio: a RequestAuthentication
        // has no port).
        if !i.jwt_rules.is_empty() {
            return true;
        }
        // A rate limit counts requests.
        if i.rate_limits
            .iter()
            .any(|(_, ports, _)| ports.contains(&port))
        {
            return true;
        }
        i.has_http
            && i.deny
                .iter()
                .chain(&i.allow)
                .chain(&i.audit)
                .chain(&i.dry_run_deny)
                .chain(&i.dry_run_allow)
                .flat_map(|p| &p.rules)
                .any(|rule| rule.may_need_http_on(port))
    }

    /// Names of the applicable policies (for status pages and logs).
    pub fn policy_names(&self) -> impl Iterator<Item = &PolicyName> {
        let i = &self.inner;
        i.deny
            .iter()
            .chain(&i.allow)
            .chain(&i.audit)
            .chain(&i.dry_run_deny)
            .chain(&i.dry_run_allow)
            .map(|p| &*p.id)
    }
}
