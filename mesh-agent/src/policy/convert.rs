//! Converting a parsed `AuthorizationPolicy` document (the strict model)
//! into a compiled [`Policy`]: values parsed once, every semantic error
//! named with its field path (its line is found by `load`).

#![allow(clippy::result_large_err)]

use std::sync::Arc;

use ipnet::IpNet;

use super::compile::{Action, Condition, Operation, Policy, PolicyName, Rule, Source, ip_field};
use super::load::{DRY_RUN_ANNOTATION, DocCtx, LoadError, Seg, key};
use super::matcher::{
    Field, Pattern, PortMatcher, StringMatcher, parse_cidr, parse_pattern, parse_port,
};
use super::model::{RawCondition, RawOperation, RawPolicy, RawRule, RawSource};
use super::normalize::{PathError, canonical_escapes, normalize_path};

/// Collects semantic errors with their path while converting.
struct Conv<'c, 'a> {
    ctx: &'c DocCtx<'a>,
    path: Vec<Seg>,
    /// The policy's namespace (a bare `serviceAccounts` entry is in it).
    namespace: String,
}

impl Conv<'_, '_> {
    fn err(&self, extra: &[Seg], message: String) -> LoadError {
        let mut p = self.path.clone();
        p.extend_from_slice(extra);
        self.ctx.semantic(&p, message)
    }

    fn unsupported(&self, field: &'static str, present: bool, why: &str) -> Result<(), LoadError> {
        if present {
            Err(self.err(&[key(field)], format!("`{field}` is not supported: {why}")))
        } else {
            Ok(())
        }
    }

    fn enter<T>(
        &mut self,
        seg: Seg,
        f: impl FnOnce(&mut Self) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        self.path.push(seg);
        let r = f(self);
        self.path.pop();
        r
    }

    /// Parses each element of a list with `parse`, reporting `field[i]`.
    fn list<T>(
        &self,
        field: &'static str,
        values: &Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<T>>, LoadError> {
        let Some(values) = values else {
            return Ok(None);
        };
        if values.is_empty() {
            return Ok(None); // Istio: an empty list is the same as unset
        }
        values
            .iter()
            .enumerate()
            .map(|(i, v)| parse(v).map_err(|m| self.err(&[key(field), Seg::Index(i)], m)))
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    fn strings(
        &self,
        field: &'static str,
        values: &Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<Pattern, String>,
        ignore_case: bool,
    ) -> Result<Option<StringMatcher>, LoadError> {
        let parsed = self.list(field, values, parse)?;
        Ok(parsed.map(|p| StringMatcher::new(p, ignore_case)))
    }

    fn string_field(
        &self,
        field: &'static str,
        not_field: &'static str,
        values: &Option<Vec<String>>,
        not_values: &Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<Pattern, String> + Copy,
        ignore_case: bool,
    ) -> Result<Field<StringMatcher>, LoadError> {
        Ok(Field {
            values: self.strings(field, values, parse, ignore_case)?,
            not_values: self.strings(not_field, not_values, parse, ignore_case)?,
        })
    }

    fn ip_field(
        &self,
        field: &'static str,
        not_field: &'static str,
        values: &Option<Vec<String>>,
        not_values: &Option<Vec<String>>,
    ) -> Result<Field<super::matcher::IpMatcher>, LoadError> {
        let v: Option<Vec<IpNet>> = self.list(field, values, parse_cidr)?;
        let n: Option<Vec<IpNet>> = self.list(not_field, not_values, parse_cidr)?;
        Ok(ip_field(v, n))
    }

    fn port_field(
        &self,
        field: &'static str,
        not_field: &'static str,
        values: &Option<Vec<String>>,
        not_values: &Option<Vec<String>>,
    ) -> Result<Field<PortMatcher>, LoadError> {
        Ok(Field {
            values: self.list(field, values, parse_port)?.map(PortMatcher::new),
            not_values: self
                .list(not_field, not_values, parse_port)?
                .map(PortMatcher::new),
        })
    }
}

fn any_value(v: &str) -> Result<Pattern, String> {
    parse_pattern(v)
}

/// Principals: `spiffe://` is accepted and stripped (Istio's own form has no
/// scheme; both are matched against the peer ID without `spiffe://`).
fn principal_values(values: &Option<Vec<String>>) -> Option<Vec<String>> {
    values.as_ref().map(|v| {
        v.iter()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_owned())
            .collect()
    })
}

/// A `serviceAccounts` entry as the peers it stands for: `<ns>/<sa>`, or
/// `<sa>` in the policy's own `namespace`, matched as "any trust domain,
/// that namespace and service account" (Istio's `source.serviceaccount`,
/// derived from the peer certificate). A peer ID has exactly the shape
/// `<td>/ns/<ns>/sa/<sa>`, so the suffix cannot match anything else.
fn service_account_value(namespace: &str, v: &str) -> Result<Pattern, String> {
    let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
    let part_ok =
        |p: &str| !p.is_empty() && !p.contains(['/', '*']) && !p.contains(char::is_whitespace);
    if !part_ok(ns) || !part_ok(sa) {
        return Err(format!(
            "{v:?}: expected <namespace>/<serviceaccount> or <serviceaccount>, without wildcards"
        ));
    }
    Ok(Pattern::Suffix(format!("/ns/{ns}/sa/{sa}").into()))
}

/// Paths in a policy must already be in normalised form, or they could never
/// match a normalised request path (a silent hole in a DENY rule).
fn path_value(v: &str) -> Result<Pattern, String> {
    if v.contains(['{', '}']) {
        return Err(format!(
            "{v:?}: path templates ({{*}}, {{**}}) are not supported"
        ));
    }
    if v.contains(['?', '#']) {
        return Err(format!(
            "{v:?}: paths are matched without query or fragment"
        ));
    }
    let p = parse_pattern(v)?;
    let describe = |e: PathError| format!("{v:?}: not a valid path: {e}");
    let (text, anchored) = match &p {
        Pattern::Presence => return Ok(p),
        Pattern::Exact(s) | Pattern::Prefix(s) => (&**s, true),
        Pattern::Suffix(s) => (&**s, false),
    };
    if anchored {
        let n = normalize_path(text).map_err(describe)?;
        if n != text {
            return Err(format!(
                "{v:?}: not in normalised form (requests are matched as {n:?})"
            ));
        }
    } else {
        let n = canonical_escapes(text).map_err(describe)?;
        let has_dot_seg = text.split('/').skip(1).any(|s| s == "." || s == "..");
        if n != text || text.contains("//") || has_dot_seg {
            return Err(format!("{v:?}: not in normalised form"));
        }
    }
    Ok(p)
}

fn method_value(v: &str) -> Result<Pattern, String> {
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{v:?} is not an HTTP method"));
    }
    parse_pattern(v)
}

pub(super) fn convert(ctx: &DocCtx<'_>, raw: RawPolicy) -> Result<Policy, LoadError> {
    let mut c = Conv {
        ctx,
        path: Vec::new(),
        namespace: String::new(),
    };
    let meta = &raw.metadata;
    let Some(namespace) = meta.namespace.clone().filter(|n| !n.is_empty()) else {
        return Err(c.err(&[key("metadata")], "missing field `namespace`".into()));
    };
    c.namespace = namespace.clone();
    if meta.name.is_empty() {
        return Err(c.err(&[key("metadata"), key("name")], "empty name".into()));
    }
    let dry_run = match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
    {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            return Err(c.err(
                &[key("metadata"), key("annotations")],
                format!("{DRY_RUN_ANNOTATION}: {v:?} must be \"true\" or \"false\""),
            ));
        }
    };

    let spec = raw.spec.unwrap_or_default();
    c.path.push(key("spec"));
    let target_services = target_services(&c, &spec)?;
    c.unsupported(
        "provider",
        spec.provider.is_some(),
        "CUSTOM (external authorization) policies are not supported",
    )?;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            return Err(c.err(
                &[key("action")],
                "action CUSTOM is not supported (external authorization providers are not available in mesh-agent)"
                    .into(),
            ));
        }
        Some(other) => {
            return Err(c.err(
                &[key("action")],
                format!("{other:?} is not an action (expected ALLOW, DENY or AUDIT)"),
            ));
        }
    };
    if dry_run && action == Action::Audit {
        // Istio: "The dry-run annotation currently only supports ALLOW and DENY policies".
        return Err(c.err(
            &[],
            format!("{DRY_RUN_ANNOTATION} is only supported on ALLOW and DENY policies"),
        ));
    }
    // An empty matchLabels selects every workload, like no selector.
    let selector = spec
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .filter(|labels| !labels.is_empty());
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        c.path.push(key("rules"));
        let rule = c.enter(Seg::Index(i), |c| convert_rule(c, r))?;
        c.path.pop();
        rules.push(rule);
    }
    let has_http = rules.iter().any(|r| r.has_http);
    Ok(Policy {
        id: Arc::new(PolicyName {
            namespace,
            name: meta.name.clone(),
        }),
        action,
        dry_run,
        selector,
        target_services,
        rules,
        has_http,
        source: Arc::from(ctx.file),
        unenforceable: None,
    })
}

fn convert_rule(c: &mut Conv<'_, '_>, r: &RawRule) -> Result<Rule, LoadError> {
    let mut rule = Rule::default();
    for (i, from) in r.from.iter().flatten().enumerate() {
        let src = c.enter(key("from"), |c| {
            c.enter(Seg::Index(i), |c| {
                c.enter(key("source"), |c| {
                    convert_source(c, from.source.as_ref().unwrap_or(&RawSource::default()))
                })
            })
        })?;
        rule.has_http |= src.request_principals.is_set();
        rule.from.push(src);
    }
    for (i, to) in r.to.iter().flatten().enumerate() {
        let op = c.enter(key("to"), |c| {
            c.enter(Seg::Index(i), |c| {
                c.enter(key("operation"), |c| {
                    convert_operation(c, to.operation.as_ref().unwrap_or(&RawOperation::default()))
                })
            })
        })?;
        rule.has_http |= op.hosts.is_set() || op.methods.is_set() || op.paths.is_set();
        rule.to.push(op);
    }
    for (i, w) in r.when.iter().flatten().enumerate() {
        let cond = c.enter(key("when"), |c| {
            c.enter(Seg::Index(i), |c| convert_condition(c, w))
        })?;
        rule.has_http |= cond.is_http();
        rule.when.push(cond);
    }
    Ok(rule)
}

fn convert_source(c: &Conv<'_, '_>, s: &RawSource) -> Result<Source, LoadError> {
    let by_service_account = s.service_accounts.is_some() || s.not_service_accounts.is_some();
    let principals = if by_service_account {
        // Istio's CRD validation: "Cannot set serviceAccounts with
        // namespaces or principals".
        for (field, set) in [
            ("principals", s.principals.is_some()),
            ("notPrincipals", s.not_principals.is_some()),
            ("namespaces", s.namespaces.is_some()),
            ("notNamespaces", s.not_namespaces.is_some()),
        ] {
            if set {
                return Err(c.err(
                    &[key(field)],
                    format!(
                        "`{field}` cannot be set with `serviceAccounts` or `notServiceAccounts`"
                    ),
                ));
            }
        }
        let namespace = c.namespace.as_str();
        c.string_field(
            "serviceAccounts",
            "notServiceAccounts",
            &s.service_accounts,
            &s.not_service_accounts,
            |v| service_account_value(namespace, v),
            false,
        )?
    } else {
        c.string_field(
            "principals",
            "notPrincipals",
            &principal_values(&s.principals),
            &principal_values(&s.not_principals),
            any_value,
            false,
        )?
    };
    Ok(Source {
        principals,
        request_principals: c.string_field(
            "requestPrincipals",
            "notRequestPrincipals",
            &s.request_principals,
            &s.not_request_principals,
            any_value,
            false,
        )?,
        namespaces: c.string_field(
            "namespaces",
            "notNamespaces",
            &s.namespaces,
            &s.not_namespaces,
            any_value,
            false,
        )?,
        ip_blocks: c.ip_field("ipBlocks", "notIpBlocks", &s.ip_blocks, &s.not_ip_blocks)?,
        remote_ip_blocks: c.ip_field(
            "remoteIpBlocks",
            "notRemoteIpBlocks",
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        )?,
    })
}

fn convert_operation(c: &Conv<'_, '_>, o: &RawOperation) -> Result<Operation, LoadError> {
    Ok(Operation {
        hosts: c.string_field("hosts", "notHosts", &o.hosts, &o.not_hosts, any_value, true)?,
        ports: c.port_field("ports", "notPorts", &o.ports, &o.not_ports)?,
        methods: c.string_field(
            "methods",
            "notMethods",
            &o.methods,
            &o.not_methods,
            method_value,
            false,
        )?,
        paths: c.string_field(
            "paths",
            "notPaths",
            &o.paths,
            &o.not_paths,
            path_value,
            false,
        )?,
    })
}

fn convert_condition(c: &Conv<'_, '_>, w: &RawCondition) -> Result<Condition, LoadError> {
    if w.values.as_ref().is_none_or(Vec::is_empty)
        && w.not_values.as_ref().is_none_or(Vec::is_empty)
    {
        return Err(c.err(&[], "a condition needs `values` or `notValues`".into()));
    }
    let strings = || {
        c.string_field(
            "values",
            "notValues",
            &w.values,
            &w.not_values,
            any_value,
            false,
        )
    };
    let ips = || c.ip_field("values", "notValues", &w.values, &w.not_values);
    let ports = || c.port_field("values", "notValues", &w.values, &w.not_values);
    let principals = || {
        c.string_field(
            "values",
            "notValues",
            &principal_values(&w.values),
            &principal_values(&w.not_values),
            any_value,
            false,
        )
    };
    let k = w.key.as_str();
    Ok(match k {
        "source.ip" => Condition::SourceIp(ips()?),
        "remote.ip" => Condition::RemoteIp(ips()?),
        "destination.ip" => Condition::DestinationIp(ips()?),
        "destination.port" => Condition::DestinationPort(ports()?),
        "source.namespace" => Condition::SourceNamespace(strings()?),
        "source.principal" => Condition::SourcePrincipal(principals()?),
        "connection.sni" => Condition::Sni(strings()?),
        _ if k.starts_with("request.headers[") => {
            let name = k
                .strip_prefix("request.headers[")
                .and_then(|n| n.strip_suffix(']'))
                .filter(|n| {
                    !n.is_empty()
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                })
                .ok_or_else(|| {
                    c.err(
                        &[key("key")],
                        format!("{k:?}: expected request.headers[<header-name>] (pseudo-headers: use hosts, methods, paths)"),
                    )
                })?;
            let f = strings()?;
            let present = |m: StringMatcher| m.with_presence_including_empty();
            let f = Field {
                values: f.values.map(present),
                not_values: f.not_values.map(present),
            };
            Condition::Header(name.to_ascii_lowercase().into(), f)
        }
        "request.auth.principal" => Condition::RequestPrincipal(strings()?),
        "request.auth.audiences" => Condition::RequestAudiences(strings()?),
        "request.auth.presenter" => Condition::RequestPresenter(strings()?),
        _ if k.starts_with("request.auth.claims[") => {
            let path = claim_path(k).ok_or_else(|| {
                c.err(
                    &[key("key")],
                    format!("{k:?}: expected request.auth.claims[<name>] or request.auth.claims[<name>][<nested name>]..."),
                )
            })?;
            Condition::RequestClaim(path, strings()?)
        }
        _ => {
            return Err(c.err(
                &[key("key")],
                format!(
                    "{k:?} is not a supported condition key (supported: request.headers[<name>], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni)"
                ),
            ));
        }
    })
}

/// `request.auth.claims[a][b]` as `["a", "b"]`.
fn claim_path(key: &str) -> Option<Box<[Box<str>]>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() || name.contains('[') {
            return None;
        }
        path.push(name.into());
        rest = &inner[end + 1..];
    }
    (!path.is_empty()).then(|| path.into_boxed_slice())
}

/// One `targetRef(s)` entry, as the Gateway API's PolicyTargetReference.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetRef {
    #[serde(default)]
    group: Option<String>,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// `targetRef` / `targetRefs`: the names of the Services (in the policy's
/// namespace) whose selected workloads the policy applies to. Other kinds
/// (a waypoint `Gateway`, a `ServiceEntry`) have no workloads mesh-agent
/// could map them to, and are refused.
fn target_services(
    c: &Conv<'_, '_>,
    spec: &super::model::RawSpec,
) -> Result<Option<Vec<String>>, LoadError> {
    let (field, raw): (&'static str, Vec<serde_yaml::Value>) =
        match (&spec.target_ref, &spec.target_refs) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(c.err(
                    &[key("targetRefs")],
                    "set `targetRef` or `targetRefs`, not both".into(),
                ));
            }
            (Some(one), None) => ("targetRef", vec![one.clone()]),
            (None, Some(list)) => (
                "targetRefs",
                serde_yaml::from_value(list.clone())
                    .map_err(|e| c.err(&[key("targetRefs")], format!("expected a list: {e}")))?,
            ),
        };
    if spec.selector.is_some() {
        // Istio's CRD: "only one of targetRefs and workloadSelector can be set".
        return Err(c.err(
            &[key(field)],
            format!("`{field}` cannot be set with `selector`"),
        ));
    }
    let mut names = Vec::new();
    for (i, value) in raw.into_iter().enumerate() {
        let at = |extra: Option<&'static str>| {
            let mut path = vec![key(field)];
            if field == "targetRefs" {
                path.push(Seg::Index(i));
            }
            path.extend(extra.map(key));
            path
        };
        let target: RawTargetRef =
            serde_yaml::from_value(value).map_err(|e| c.err(&at(None), e.to_string()))?;
        let group = target.group.as_deref().unwrap_or("");
        if target.kind != "Service" || !(group.is_empty() || group == "core") {
            return Err(c.err(
                &at(Some("kind")),
                format!(
                    "{}/{} is not supported: mesh-agent applies a policy to the workloads of a Service (`group: \"\"`, `kind: Service`), not to a waypoint or another kind",
                    if group.is_empty() { "core" } else { group },
                    target.kind
                ),
            ));
        }
        if target
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != c.namespace)
        {
            return Err(c.err(
                &at(Some("namespace")),
                "a policy can only target a Service in its own namespace".into(),
            ));
        }
        if target.name.is_empty() {
            return Err(c.err(&at(Some("name")), "empty name".into()));
        }
        names.push(target.name);
    }
    if names.is_empty() {
        return Err(c.err(&[key(field)], "no target".into()));
    }
    Ok(Some(names))
}
