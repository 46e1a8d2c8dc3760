//! Istio `RequestAuthentication`: which JWTs the selected workloads accept
//! (verification per request: `jwt`). Every RequestAuthentication that
//! applies to a workload counts (the mesh's in the root namespace, its
//! namespace's, those whose selector matches it), as in Istio, where they
//! are combined.

// As in `load`: a load error is built at most once per load.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::compile::PolicyName;
use super::jwks_fetch::RemoteJwks;
use super::load::{DocCtx, LoadError, key};
use super::model::{RawMetadata, RawSelector};

pub(super) const KIND: &str = "RequestAuthentication";

/// How long a `jwksUri` fetch may take, unless `timeout` says otherwise
/// (Istio's default).
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One loaded RequestAuthentication.
#[derive(Debug)]
pub struct RequestAuthentication {
    pub(crate) id: Arc<PolicyName>,
    /// `None`: namespace-wide (mesh-wide in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) rules: Vec<Arc<JwtRule>>,
    pub(crate) source: Arc<std::path::Path>,
}

impl RequestAuthentication {
    pub fn name(&self) -> &PolicyName {
        &self.id
    }
    pub fn source(&self) -> &std::path::Path {
        &self.source
    }
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }
    pub fn rules(&self) -> &[Arc<JwtRule>] {
        &self.rules
    }

    fn applies_to(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_none_or(|sel| {
            sel.iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
        })
    }
}

/// One `jwtRules` entry.
#[derive(Debug)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    pub keys: JwtKeys,
    /// Where tokens are looked for; empty means Istio's defaults.
    pub(crate) locations: Vec<TokenLocation>,
    pub(crate) output_payload_to_header: Option<HeaderName>,
    pub(crate) forward_original_token: bool,
    pub(crate) output_claim_to_headers: Vec<(HeaderName, String)>,
    /// Tokens this rule verified (a reload starts afresh).
    pub(crate) verified: super::jwt::VerifiedTokens,
}

/// Istio's default token locations: `Authorization: Bearer <token>` and
/// the `access_token` query parameter.
static DEFAULT_LOCATIONS: std::sync::LazyLock<[TokenLocation; 2]> =
    std::sync::LazyLock::new(|| {
        [
            TokenLocation::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            TokenLocation::Param("access_token".into()),
        ]
    });

impl JwtRule {
    pub(crate) fn locations(&self) -> &[TokenLocation] {
        if self.locations.is_empty() {
            &DEFAULT_LOCATIONS[..]
        } else {
            &self.locations
        }
    }
}

/// The keys that sign a rule's tokens.
#[derive(Debug)]
pub enum JwtKeys {
    /// `jwks`, inline in the policy file.
    Set(Arc<JwkSet>),
    /// `jwksUri`, fetched and refreshed by the agent.
    Remote(Arc<RemoteJwks>),
}

#[derive(Debug, Clone)]
pub(crate) enum TokenLocation {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRequestAuthentication {
    #[allow(dead_code)] // checked on the lenient first pass
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    spec: Option<RawSpec>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Option<RawSelector>,
    target_ref: Option<IgnoredAny>,
    target_refs: Option<IgnoredAny>,
    jwt_rules: Option<Vec<RawJwtRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawJwtRule {
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_uri: Option<String>,
    jwks: Option<String>,
    from_headers: Option<Vec<RawHeaderLocation>>,
    from_params: Option<Vec<String>>,
    from_cookies: Option<Vec<String>>,
    output_payload_to_header: Option<String>,
    forward_original_token: Option<bool>,
    output_claim_to_headers: Option<Vec<RawClaimToHeader>>,
    /// The `jwksUri` fetch timeout, a duration such as `5s`.
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderLocation {
    name: String,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaimToHeader {
    header: String,
    claim: String,
}

pub(super) fn convert(
    ctx: &DocCtx<'_>,
    raw: RawRequestAuthentication,
) -> Result<RequestAuthentication, LoadError> {
    let meta = &raw.metadata;
    let Some(namespace) = meta.namespace.clone().filter(|n| !n.is_empty()) else {
        return Err(ctx.semantic(&[key("metadata")], "missing field `namespace`".into()));
    };
    if meta.name.is_empty() {
        return Err(ctx.semantic(&[key("metadata"), key("name")], "empty name".into()));
    }
    let spec = raw.spec.unwrap_or_default();
    for (field, set) in [
        ("targetRef", spec.target_ref.is_some()),
        ("targetRefs", spec.target_refs.is_some()),
    ] {
        if set {
            return Err(ctx.semantic(
                &[key("spec"), key(field)],
                format!("`{field}` is not supported: select workloads with spec.selector"),
            ));
        }
    }
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .filter(|labels| !labels.is_empty());
    let mut rules = Vec::new();
    for (i, rule) in spec.jwt_rules.into_iter().flatten().enumerate() {
        let at = |field: &'static str| {
            [
                key("spec"),
                key("jwtRules"),
                super::load::Seg::Index(i),
                key(field),
            ]
        };
        rules.push(Arc::new(convert_rule(ctx, rule, &at)?));
    }
    Ok(RequestAuthentication {
        id: Arc::new(PolicyName {
            namespace,
            name: meta.name.clone(),
        }),
        selector,
        rules,
        source: Arc::from(ctx.file),
    })
}

fn convert_rule(
    ctx: &DocCtx<'_>,
    raw: RawJwtRule,
    at: &dyn Fn(&'static str) -> [super::load::Seg; 4],
) -> Result<JwtRule, LoadError> {
    let err = |field: &'static str, msg: String| ctx.semantic(&at(field), msg);
    let issuer = raw
        .issuer
        .filter(|i| !i.is_empty())
        .ok_or_else(|| err("issuer", "a JWT rule needs an `issuer`".into()))?;
    let timeout = match &raw.timeout {
        None => DEFAULT_FETCH_TIMEOUT,
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| err("timeout", format!("{t:?} is not a duration: {e}")))?,
    };
    let keys = match (raw.jwks, raw.jwks_uri) {
        (Some(_), Some(_)) => {
            return Err(err("jwks", "set `jwks` or `jwksUri`, not both".into()));
        }
        (Some(jwks), None) => JwtKeys::Set(Arc::new(
            serde_json::from_str(&jwks)
                .map_err(|e| err("jwks", format!("not a JSON Web Key Set: {e}")))?,
        )),
        (None, Some(uri)) => {
            let parsed: http::Uri = uri
                .parse()
                .map_err(|e| err("jwksUri", format!("{uri:?} is not a URI: {e}")))?;
            if !matches!(parsed.scheme_str(), Some("http" | "https")) {
                return Err(err(
                    "jwksUri",
                    format!("{uri:?}: expected an http or https URI"),
                ));
            }
            JwtKeys::Remote(super::jwks_fetch::remote(&uri, timeout))
        }
        (None, None) => {
            // Istio would look the issuer's keys up by OpenID discovery.
            return Err(err(
                "jwksUri",
                "a JWT rule needs `jwks` or `jwksUri` (OpenID discovery from the issuer is not supported)".into(),
            ));
        }
    };
    let header_name = |field: &'static str, name: &str| {
        HeaderName::try_from(name).map_err(|_| err(field, format!("{name:?} is not a header name")))
    };
    let mut locations = Vec::new();
    for h in raw.from_headers.into_iter().flatten() {
        locations.push(TokenLocation::Header {
            name: header_name("fromHeaders", &h.name)?,
            prefix: h.prefix.unwrap_or_default(),
        });
    }
    for p in raw.from_params.into_iter().flatten() {
        locations.push(TokenLocation::Param(p));
    }
    for c in raw.from_cookies.into_iter().flatten() {
        locations.push(TokenLocation::Cookie(c));
    }
    let output_payload_to_header = raw
        .output_payload_to_header
        .filter(|h| !h.is_empty())
        .map(|h| header_name("outputPayloadToHeader", &h))
        .transpose()?;
    let mut output_claim_to_headers = Vec::new();
    for c in raw.output_claim_to_headers.into_iter().flatten() {
        output_claim_to_headers.push((header_name("outputClaimToHeaders", &c.header)?, c.claim));
    }
    Ok(JwtRule {
        issuer,
        audiences: raw.audiences.unwrap_or_default(),
        keys,
        locations,
        output_payload_to_header,
        forward_original_token: raw.forward_original_token.unwrap_or(false),
        output_claim_to_headers,
        verified: Default::default(),
    })
}

/// Every RequestAuthentication, by namespace.
#[derive(Debug, Default)]
pub(crate) struct RequestAuthnIndex {
    root_namespace: String,
    by_namespace: HashMap<String, Vec<Arc<RequestAuthentication>>>,
}

impl RequestAuthnIndex {
    pub(crate) fn new(all: &[Arc<RequestAuthentication>], root_namespace: &str) -> Self {
        let mut by_namespace: HashMap<String, Vec<Arc<RequestAuthentication>>> = HashMap::new();
        for r in all {
            by_namespace
                .entry(r.id.namespace.clone())
                .or_default()
                .push(r.clone());
        }
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
        }
    }

    /// The JWT rules of every RequestAuthentication applying to a workload:
    /// the mesh's (root namespace, no selector), then its namespace's, in
    /// name order.
    pub(crate) fn rules_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<Arc<JwtRule>> {
        let mut out = Vec::new();
        if namespace != self.root_namespace
            && let Some(list) = self.by_namespace.get(&self.root_namespace)
        {
            for r in list.iter().filter(|r| r.selector.is_none()) {
                out.extend(r.rules.iter().cloned());
            }
        }
        if let Some(list) = self.by_namespace.get(namespace) {
            for r in list.iter().filter(|r| r.applies_to(labels)) {
                out.extend(r.rules.iter().cloned());
            }
        }
        out
    }
}
