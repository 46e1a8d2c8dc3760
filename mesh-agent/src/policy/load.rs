//! Loading `AuthorizationPolicy` YAML: parse, validate, pre-compile.
//!
//! Two passes per file: a lenient one (`serde_yaml::Value`) that checks
//! `apiVersion`/`kind` and learns the policy name for error messages, then a
//! strict one into the `deny_unknown_fields` model. Semantic errors carry a
//! field path; their line is found by re-reading the document with a probe
//! that stops at that path (serde_yaml stamps the location on the error).

// A load error is built at most once per load, and carries everything an
// operator needs (file, line, column, document, field): its size is no cost.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use super::compile::{
    Action, Condition, Operation, Policy, PolicyName, PolicySet, Rule, Source, ip_field,
};
use super::matcher::{
    Field, Pattern, PortMatcher, StringMatcher, parse_cidr, parse_pattern, parse_port,
};
use super::model::{RawCondition, RawOperation, RawPolicy, RawRule, RawSource};
use super::normalize::{PathError, canonical_escapes, normalize_path};

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
const KIND: &str = "AuthorizationPolicy";
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// A policy file that could not be loaded. Display:
/// `policies/deny.yaml:12: document 2 (ns1/deny-admin): field spec.rules[0].to[0].operation.ports[1]: "80x" is not a port`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// 1-based line, when it could be determined.
    pub line: Option<usize>,
    /// 1-based column, when the YAML parser gave one.
    pub column: Option<usize>,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `namespace/name` as far as known, `?` for unknown parts.
    pub policy: String,
    /// Field path such as `spec.rules[0].to[0].operation.ports[1]`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": document {} ({})", self.document, self.policy)?;
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for LoadError {}

/// Loads every policy of every `(path, text)` file. All-or-nothing: the
/// first error aborts the whole load.
pub fn load<'a, I, P>(files: I) -> Result<PolicySet, LoadError>
where
    I: IntoIterator<Item = (P, &'a str)>,
    P: AsRef<Path>,
{
    let mut policies = Vec::new();
    // (namespace, name) -> where it was first defined, to reject duplicates.
    let mut seen: HashMap<PolicyName, (PathBuf, usize)> = HashMap::new();
    for (path, text) in files {
        let path = path.as_ref();
        for (doc, policy) in load_file(path, text)? {
            if let Some((first_file, first_doc)) = seen.get(&policy.id) {
                let ctx = DocCtx {
                    file: path,
                    text,
                    index: doc,
                    label: policy.id.to_string(),
                };
                return Err(ctx.semantic(
                    &[key("metadata"), key("name")],
                    format!(
                        "duplicate policy {}: already defined in {} document {}",
                        policy.id,
                        first_file.display(),
                        first_doc + 1
                    ),
                ));
            }
            seen.insert((*policy.id).clone(), (path.to_path_buf(), doc));
            policies.push(Arc::new(policy));
        }
    }
    Ok(PolicySet { policies })
}

/// Returns (0-based document index, policy) pairs.
fn load_file(path: &Path, text: &str) -> Result<Vec<(usize, Policy)>, LoadError> {
    // Pass 1: lenient, for syntax errors, apiVersion/kind and the name.
    let mut headers = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| LoadError {
            file: path.to_path_buf(),
            line: e.location().map(|l| l.line()),
            column: e.location().map(|l| l.column()),
            document: index + 1,
            policy: "?".into(),
            field: None,
            message: format!("invalid YAML: {}", strip_location(&e.to_string())),
        })?;
        headers.push(value);
    }

    let mut out = Vec::new();
    for (index, (de, value)) in serde_yaml::Deserializer::from_str(text)
        .zip(headers)
        .enumerate()
    {
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let ctx = DocCtx {
            file: path,
            text,
            index,
            label: label_of(&value),
        };
        check_header(&ctx, &value)?;
        let raw = RawPolicy::deserialize(de).map_err(|e| ctx.serde(&e))?;
        out.push((index, convert(&ctx, raw)?));
    }
    Ok(out)
}

fn label_of(v: &Value) -> String {
    let get = |k: &str| {
        v.get("metadata")
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    format!("{}/{}", get("namespace"), get("name"))
}

fn check_header(ctx: &DocCtx<'_>, v: &Value) -> Result<(), LoadError> {
    if !v.is_mapping() {
        return Err(ctx.semantic(&[], "document is not a mapping".into()));
    }
    match v.get("apiVersion") {
        None => return Err(ctx.semantic(&[], "missing field `apiVersion`".into())),
        Some(a) if a.as_str().is_some_and(|a| API_VERSIONS.contains(&a)) => {}
        Some(a) => {
            return Err(ctx.semantic(
                &[key("apiVersion")],
                format!(
                    "{} is not supported (expected {} or {})",
                    show(a),
                    API_VERSIONS[0],
                    API_VERSIONS[1]
                ),
            ));
        }
    }
    match v.get("kind") {
        None => Err(ctx.semantic(&[], "missing field `kind`".into())),
        Some(k) if k.as_str() == Some(KIND) => Ok(()),
        Some(k) => Err(ctx.semantic(
            &[key("kind")],
            format!("{} is not supported (expected {KIND})", show(k)),
        )),
    }
}

fn show(v: &Value) -> String {
    match v.as_str() {
        Some(s) => format!("{s:?}"),
        None => serde_yaml::to_string(v)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_else(|_| "value".into()),
    }
}

/// One segment of a field path.
#[derive(Debug, Clone)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

fn key(k: &'static str) -> Seg {
    Seg::Key(k)
}

fn format_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

struct DocCtx<'a> {
    file: &'a Path,
    text: &'a str,
    index: usize,
    label: String,
}

impl DocCtx<'_> {
    fn error(&self, line: Option<usize>, field: Option<String>, message: String) -> LoadError {
        LoadError {
            file: self.file.to_path_buf(),
            line,
            column: None,
            document: self.index + 1,
            policy: self.label.clone(),
            field,
            message,
        }
    }

    /// A serde error: serde_yaml renders `path: message at line L column C`.
    fn serde(&self, e: &serde_yaml::Error) -> LoadError {
        let text = strip_location(&e.to_string());
        let (field, message) = match text.split_once(": ") {
            Some((p, m)) if !p.is_empty() && !p.contains(char::is_whitespace) && p != "." => {
                (Some(p.to_owned()), m.to_owned())
            }
            _ => (None, text),
        };
        let mut error = self.error(e.location().map(|l| l.line()), field, message);
        error.column = e.location().map(|l| l.column());
        error
    }

    /// A semantic error at `path`, with the line found by probing.
    fn semantic(&self, path: &[Seg], message: String) -> LoadError {
        let field = (!path.is_empty()).then(|| format_path(path));
        self.error(self.line_of(path), field, message)
    }

    fn line_of(&self, path: &[Seg]) -> Option<usize> {
        // Try the full path, then its ancestors (the value may be absent).
        (0..=path.len()).rev().find_map(|n| {
            let de = serde_yaml::Deserializer::from_str(self.text).nth(self.index)?;
            match Probe(&path[..n]).deserialize(de) {
                Err(e) if e.to_string().contains(PROBE_HIT) => e.location().map(|l| l.line()),
                _ => None,
            }
        })
    }
}

fn strip_location(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) if s[i..].contains(" column ") => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}

const PROBE_HIT: &str = "mesh-agent-probe-hit";

/// Walks a document down `path` and fails on the value found there, so that
/// serde_yaml reports that value's location.
struct Probe<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.0.split_first() else {
            return self.leaf();
        };
        while let Some(k) = map.next_key::<Value>()? {
            if k.as_str() == Some(want) {
                return map.next_value_seed(Probe(rest));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(want), rest)) = self.0.split_first() else {
            return self.leaf();
        };
        let mut i = 0;
        loop {
            if i == *want {
                return seq.next_element_seed(Probe(rest)).map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

impl Probe<'_> {
    fn leaf<E: de::Error>(self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(PROBE_HIT))
        } else {
            Ok(())
        }
    }
}

/// Collects semantic errors with their path while converting.
struct Conv<'c, 'a> {
    ctx: &'c DocCtx<'a>,
    path: Vec<Seg>,
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

fn convert(ctx: &DocCtx<'_>, raw: RawPolicy) -> Result<Policy, LoadError> {
    let mut c = Conv {
        ctx,
        path: Vec::new(),
    };
    let meta = &raw.metadata;
    let Some(namespace) = meta.namespace.clone().filter(|n| !n.is_empty()) else {
        return Err(c.err(&[key("metadata")], "missing field `namespace`".into()));
    };
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
    c.unsupported(
        "targetRef",
        spec.target_ref.is_some(),
        "mesh-agent applies policies by namespace and selector only",
    )?;
    c.unsupported(
        "targetRefs",
        spec.target_refs.is_some(),
        "mesh-agent applies policies by namespace and selector only",
    )?;
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
        rules,
        has_http,
        source: Arc::from(ctx.file),
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
        rule.has_http |= matches!(cond, Condition::Header(..));
        rule.when.push(cond);
    }
    Ok(rule)
}

fn convert_source(c: &Conv<'_, '_>, s: &RawSource) -> Result<Source, LoadError> {
    let no_jwt = "request authentication (JWT) is not available in mesh-agent";
    c.unsupported("requestPrincipals", s.request_principals.is_some(), no_jwt)?;
    c.unsupported(
        "notRequestPrincipals",
        s.not_request_principals.is_some(),
        no_jwt,
    )?;
    let use_principals = "use principals (cluster.local/ns/<ns>/sa/<sa>)";
    c.unsupported(
        "serviceAccounts",
        s.service_accounts.is_some(),
        use_principals,
    )?;
    c.unsupported(
        "notServiceAccounts",
        s.not_service_accounts.is_some(),
        use_principals,
    )?;
    Ok(Source {
        principals: c.string_field(
            "principals",
            "notPrincipals",
            &principal_values(&s.principals),
            &principal_values(&s.not_principals),
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
        _ if k.starts_with("request.auth.") => {
            return Err(c.err(
                &[key("key")],
                format!("{k:?} is not supported: request authentication (JWT) is not available in mesh-agent"),
            ));
        }
        _ => {
            return Err(c.err(
                &[key("key")],
                format!(
                    "{k:?} is not a supported condition key (supported: request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni)"
                ),
            ));
        }
    })
}
