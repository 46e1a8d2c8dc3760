//! JWT verification of one HTTP request, by the `jwtRules` of the
//! RequestAuthentications that apply to its destination (Istio's semantics,
//! as Envoy's `jwt_authn` filter implements them for Istio):
//!
//! - no token in any of the rules' locations: the request goes on without a
//!   request principal (a policy may then deny it: `requestPrincipals`);
//! - a token whose issuer no rule names: the same (it is not ours to judge);
//! - a token of a known issuer that fails (signature, expiry, not-before,
//!   audience, no key), or a token that is not a JWT: 401;
//! - a valid token: principal `<iss>/<sub>`, audiences, presenter (`azp`)
//!   and claims for the policies; the token is removed unless
//!   `forwardOriginalToken`; `outputPayloadToHeader` and
//!   `outputClaimToHeaders` are written.
//!
//! A verified token is remembered by its rule (up to [`CACHE_SIZE`], until
//! its `exp`), as Envoy's JWT cache does: a client sends the same token
//! many times, and a signature check costs far more than a request.

use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Map, Value};

use super::request_authn::{JwtKeys, JwtRule, TokenLocation};

/// Tolerated clock difference with the issuer (Envoy's default).
const CLOCK_SKEW_SECONDS: u64 = 60;
/// Verified tokens remembered per rule.
pub(super) const CACHE_SIZE: usize = 256;

/// What a valid token says, for the policies.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    /// `aud`, a string or a list of strings.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: Map<String, Value>,
}

impl RequestAuth {
    /// The string values of a (nested) claim: a string, or the strings of a
    /// list. Anything else has none.
    pub fn claim<'a>(&'a self, path: &[Box<str>]) -> Vec<&'a str> {
        let mut at: Option<&Value> = None;
        for (i, name) in path.iter().enumerate() {
            at = if i == 0 {
                self.claims.get(&**name)
            } else {
                at.and_then(|v| v.get(&**name))
            };
        }
        match at {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// Why a request is answered 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// Checks the request's token against `rules` (those of every
/// RequestAuthentication applying to the destination, in order); see the
/// module doc. `headers` are edited in place on success.
pub fn authenticate(
    rules: &[Arc<JwtRule>],
    headers: &mut HeaderMap,
    query: Option<&str>,
) -> Result<Option<Arc<RequestAuth>>, Unauthenticated> {
    for rule in rules {
        for location in rule.locations() {
            let Some(token) = extract(location, headers, query) else {
                continue;
            };
            let auth = match rule.verified.get(&token) {
                Some(auth) => auth,
                None => {
                    let issuer = issuer_of(&token)?;
                    if issuer != rule.issuer {
                        // Maybe another rule's; else not ours to judge.
                        continue;
                    }
                    let auth = Arc::new(verify(rule, &token)?);
                    rule.verified.insert(&token, &auth);
                    auth
                }
            };
            apply_outputs(rule, location, &token, &auth, headers);
            return Ok(Some(auth));
        }
    }
    Ok(None)
}

fn extract(location: &TokenLocation, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    match location {
        TokenLocation::Header { name, prefix } => {
            let value = headers.get(name)?.to_str().ok()?;
            let token = if prefix.is_empty() {
                value
            } else {
                // Envoy compares the prefix case-sensitively, except that
                // "Bearer " is the scheme, which is case-insensitive.
                let head = value.get(..prefix.len())?;
                let same = if prefix.eq_ignore_ascii_case("bearer ") {
                    head.eq_ignore_ascii_case(prefix)
                } else {
                    head == prefix.as_str()
                };
                if !same {
                    return None;
                }
                &value[prefix.len()..]
            };
            Some(token.trim().to_owned()).filter(|t| !t.is_empty())
        }
        TokenLocation::Param(name) => form_urlencoded::parse(query?.as_bytes())
            .find(|(k, _)| k == name.as_str())
            .map(|(_, v)| v.into_owned())
            .filter(|t| !t.is_empty()),
        TokenLocation::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim_matches('"').to_owned())
            .filter(|t| !t.is_empty()),
    }
}

/// The `iss` of a token, read before its signature is checked (to choose
/// the rule that checks it).
fn issuer_of(token: &str) -> Result<String, Unauthenticated> {
    let payload = token
        .split('.')
        .nth(1)
        .filter(|_| token.split('.').count() == 3)
        .ok_or_else(|| {
            Unauthenticated("Jwt is not in the form of Header.Payload.Signature".into())
        })?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| Unauthenticated("Jwt payload is not base64url".into()))?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| Unauthenticated("Jwt payload is not a JSON object".into()))?;
    Ok(claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

fn verify(rule: &JwtRule, token: &str) -> Result<RequestAuth, Unauthenticated> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| Unauthenticated(format!("Jwt header is invalid: {e}")))?;
    let keys: Arc<JwkSet> = match &rule.keys {
        JwtKeys::Set(set) => set.clone(),
        JwtKeys::Remote(remote) => remote.get().ok_or_else(|| {
            Unauthenticated(format!("Jwks for {} not fetched (yet)", rule.issuer))
        })?,
    };
    let mut validation = Validation::new(header.alg);
    // Envoy checks exp and nbf when present and requires neither.
    validation.required_spec_claims.clear();
    validation.validate_nbf = true;
    validation.leeway = CLOCK_SKEW_SECONDS;
    validation.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        // Named audiences: a token without `aud` fails too (Envoy).
        validation.set_audience(&rule.audiences);
        validation.set_required_spec_claims(&["aud"]);
    }
    // With a `kid`, that key; without, any key that verifies (Envoy).
    let candidates = keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid);
    let mut last_error = format!("Jwks has no key for kid {:?}", header.kid);
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
            Ok(data) => return Ok(auth_of(data.claims)),
            Err(e) => last_error = format!("Jwt verification fails: {e}"),
        }
    }
    Err(Unauthenticated(last_error))
}

fn auth_of(claims: Map<String, Value>) -> RequestAuth {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let audiences = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    RequestAuth {
        principal: format!(
            "{}/{}",
            text("iss").unwrap_or_default(),
            text("sub").unwrap_or_default()
        ),
        audiences,
        presenter: text("azp"),
        claims,
    }
}

fn apply_outputs(
    rule: &JwtRule,
    location: &TokenLocation,
    token: &str,
    auth: &RequestAuth,
    headers: &mut HeaderMap,
) {
    if !rule.forward_original_token
        && let TokenLocation::Header { name, .. } = location
    {
        headers.remove(name);
    }
    if let Some(name) = &rule.output_payload_to_header
        && let Some(payload) = token.split('.').nth(1)
        && let Ok(value) = HeaderValue::from_str(payload)
    {
        headers.insert(name.clone(), value);
    }
    for (name, claim) in &rule.output_claim_to_headers {
        // Only claims that are a string, a number or a boolean (Istio).
        let value = match auth.claims.get(claim) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => continue,
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert::<HeaderName>(name.clone(), value);
        }
    }
}

/// Tokens a rule has verified, with when each stops being valid.
#[derive(Debug, Default)]
pub(crate) struct VerifiedTokens {
    entries: parking_lot::Mutex<std::collections::HashMap<Box<str>, Arc<RequestAuth>>>,
}

impl VerifiedTokens {
    /// The token's claims, if verified before and still within `nbf`..`exp`.
    fn get(&self, token: &str) -> Option<Arc<RequestAuth>> {
        let auth = self.entries.lock().get(token).cloned()?;
        let now = jsonwebtoken::get_current_timestamp();
        let number = |name: &str| auth.claims.get(name).and_then(Value::as_u64);
        let expired = number("exp").is_some_and(|exp| exp + CLOCK_SKEW_SECONDS <= now);
        let early = number("nbf").is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECONDS);
        if expired || early {
            self.entries.lock().remove(token);
            return None;
        }
        Some(auth)
    }

    #[cfg(test)]
    pub(crate) fn insert_for_test(&self, token: &str, auth: &Arc<RequestAuth>) {
        self.insert(token, auth);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }

    fn insert(&self, token: &str, auth: &Arc<RequestAuth>) {
        let mut entries = self.entries.lock();
        if entries.len() >= CACHE_SIZE {
            // Simple and bounded: start over (a busy issuer refills it).
            entries.clear();
        }
        entries.insert(token.into(), auth.clone());
    }
}
