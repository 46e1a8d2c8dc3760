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

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use super::compile::{Policy, PolicyName, PolicySet};
use super::model::RawPolicy;

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
const KIND: &str = "AuthorizationPolicy";
pub(super) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

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

/// Loads every policy of every `(path, text)` file.
///
/// A document that is an `AuthorizationPolicy` with a namespace and a name
/// but cannot be enforced as written (an unsupported or misspelled field, a
/// bad value) does not stop the others: it loads as a DENY-all over the
/// workloads it selects (its whole namespace when its selector cannot be
/// read), carrying its error, until it is fixed. Fail closed, one policy at
/// a time. Anything else (invalid YAML, another kind or API version, no
/// namespace or name, a duplicate name) is an error of the whole load.
pub fn load<'a, I, P>(files: I) -> Result<PolicySet, LoadError>
where
    I: IntoIterator<Item = (P, &'a str)>,
    P: AsRef<Path>,
{
    let mut policies = Vec::new();
    let mut peer_authentications = Vec::new();
    let mut request_authentications = Vec::new();
    let mut rate_limits = Vec::new();
    // (kind, namespace, name) -> where it was first defined, to reject duplicates.
    let mut seen: HashMap<(&'static str, PolicyName), (PathBuf, usize)> = HashMap::new();
    for (path, text) in files {
        let path = path.as_ref();
        for (doc, loaded) in load_file(path, text)? {
            let (kind, id) = match &loaded {
                Loaded::Authorization(p) => (KIND, p.id.clone()),
                Loaded::PeerAuthentication(p) => (super::peer_auth::KIND, p.id.clone()),
                Loaded::RequestAuthentication(r) => (super::request_authn::KIND, r.id.clone()),
                Loaded::RateLimit(r) => (super::rate_limit::KIND, r.id.clone()),
            };
            if let Some((first_file, first_doc)) = seen.get(&(kind, (*id).clone())) {
                let ctx = DocCtx {
                    file: path,
                    text,
                    index: doc,
                    label: id.to_string(),
                };
                return Err(ctx.semantic(
                    &[key("metadata"), key("name")],
                    format!(
                        "duplicate {kind} {id}: already defined in {} document {}",
                        first_file.display(),
                        first_doc + 1
                    ),
                ));
            }
            seen.insert((kind, (*id).clone()), (path.to_path_buf(), doc));
            match loaded {
                Loaded::Authorization(p) => policies.push(Arc::new(p)),
                Loaded::PeerAuthentication(p) => peer_authentications.push(Arc::new(p)),
                Loaded::RequestAuthentication(r) => request_authentications.push(Arc::new(r)),
                Loaded::RateLimit(r) => rate_limits.push(Arc::new(r)),
            }
        }
    }
    Ok(PolicySet {
        policies,
        peer_authentications,
        request_authentications,
        rate_limits,
    })
}

/// One document of a policy file.
enum Loaded {
    Authorization(Policy),
    PeerAuthentication(super::PeerAuthentication),
    RequestAuthentication(super::RequestAuthentication),
    RateLimit(super::RateLimit),
}

/// Returns (0-based document index, document) pairs.
fn load_file(path: &Path, text: &str) -> Result<Vec<(usize, Loaded)>, LoadError> {
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
        let kind = check_header(&ctx, &value)?;
        if kind == super::rate_limit::KIND {
            // A rate limit that cannot be read rejects the load (the last
            // good set keeps serving).
            let raw =
                super::rate_limit::RawRateLimit::deserialize(de).map_err(|e| ctx.serde(&e))?;
            out.push((
                index,
                Loaded::RateLimit(super::rate_limit::convert(&ctx, raw)?),
            ));
            continue;
        }
        if kind == super::request_authn::KIND {
            // As a PeerAuthentication: one that cannot be read rejects the
            // load (the last good set keeps serving).
            let raw = super::request_authn::RawRequestAuthentication::deserialize(de)
                .map_err(|e| ctx.serde(&e))?;
            out.push((
                index,
                Loaded::RequestAuthentication(super::request_authn::convert(&ctx, raw)?),
            ));
            continue;
        }
        if kind == super::peer_auth::KIND {
            // A PeerAuthentication that cannot be read rejects the load: it
            // has no "deny" to fall back on that would be its closed form.
            let raw = super::peer_auth::RawPeerAuthentication::deserialize(de)
                .map_err(|e| ctx.serde(&e))?;
            out.push((
                index,
                Loaded::PeerAuthentication(super::peer_auth::convert(&ctx, raw)?),
            ));
            continue;
        }
        let policy = RawPolicy::deserialize(de)
            .map_err(|e| ctx.serde(&e))
            .and_then(|raw| super::convert::convert(&ctx, raw));
        out.push((
            index,
            Loaded::Authorization(match policy {
                Ok(policy) => policy,
                Err(error) => deny_all_in_place_of(&ctx, &value, error)?,
            }),
        ));
    }
    Ok(out)
}

/// What stands for a policy that cannot be enforced: a DENY-all with its
/// name, namespace and selector, read leniently from the document. Without
/// a namespace or a name it cannot be placed: `error` is returned.
fn deny_all_in_place_of(
    ctx: &DocCtx<'_>,
    v: &Value,
    error: LoadError,
) -> Result<Policy, LoadError> {
    let text = |map: Option<&Value>, k: &str| {
        map.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let metadata = v.get("metadata");
    let (Some(namespace), Some(name)) = (text(metadata, "namespace"), text(metadata, "name"))
    else {
        return Err(error);
    };
    // A selector that cannot be read selects the whole namespace: wider,
    // never narrower, than what the author meant.
    let selector = v
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
        .and_then(|m| {
            m.as_mapping()?
                .iter()
                .map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect::<Option<std::collections::BTreeMap<_, _>>>()
        })
        .filter(|labels| !labels.is_empty());
    Ok(Policy {
        id: Arc::new(PolicyName { namespace, name }),
        action: super::compile::Action::Deny,
        dry_run: false,
        selector,
        target_services: None,
        rules: vec![super::compile::Rule::default()],
        has_http: false,
        source: Arc::from(ctx.file),
        unenforceable: Some(Arc::new(error)),
    })
}

pub(crate) fn label_of(v: &Value) -> String {
    let get = |k: &str| {
        v.get("metadata")
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    format!("{}/{}", get("namespace"), get("name"))
}

/// Checks `apiVersion` and `kind`; returns the kind.
fn check_header(ctx: &DocCtx<'_>, v: &Value) -> Result<&'static str, LoadError> {
    if !v.is_mapping() {
        return Err(ctx.semantic(&[], "document is not a mapping".into()));
    }
    if v.get("kind").and_then(Value::as_str) == Some(super::rate_limit::KIND) {
        return match v.get("apiVersion").and_then(Value::as_str) {
            Some(super::rate_limit::API_VERSION) => Ok(super::rate_limit::KIND),
            Some(a) => Err(ctx.semantic(
                &[key("apiVersion")],
                format!(
                    "{a:?} is not supported (expected {})",
                    super::rate_limit::API_VERSION
                ),
            )),
            None => Err(ctx.semantic(&[], "missing field `apiVersion`".into())),
        };
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
        Some(k) if k.as_str() == Some(KIND) => Ok(KIND),
        Some(k) if k.as_str() == Some(super::peer_auth::KIND) => Ok(super::peer_auth::KIND),
        Some(k) if k.as_str() == Some(super::request_authn::KIND) => Ok(super::request_authn::KIND),
        Some(k) => Err(ctx.semantic(
            &[key("kind")],
            format!(
                "{} is not supported (expected {KIND}, {}, {} or {})",
                show(k),
                super::peer_auth::KIND,
                super::request_authn::KIND,
                super::rate_limit::KIND
            ),
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
pub(crate) enum Seg {
    Key(&'static str),
    Index(usize),
}

pub(crate) fn key(k: &'static str) -> Seg {
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

pub(crate) struct DocCtx<'a> {
    pub(super) file: &'a Path,
    text: &'a str,
    index: usize,
    label: String,
}

impl<'a> DocCtx<'a> {
    /// Document `index` (0-based) of `file`, labelled `namespace/name`.
    pub(crate) fn new(file: &'a Path, text: &'a str, index: usize, label: String) -> Self {
        Self {
            file,
            text,
            index,
            label,
        }
    }

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
    pub(crate) fn serde(&self, e: &serde_yaml::Error) -> LoadError {
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
    pub(crate) fn semantic(&self, path: &[Seg], message: String) -> LoadError {
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
