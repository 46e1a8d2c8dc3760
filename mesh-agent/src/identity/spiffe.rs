//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// SPIFFE caps trust domains at 255 bytes and whole IDs at 2048 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error(
        "invalid trust domain {0:?}: only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChars(String),
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must not have a query or fragment")]
    QueryOrFragment,
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, got {0:?}")]
    PathShape(String),
    #[error("SPIFFE ID has an empty {0}")]
    EmptyPart(&'static str),
    #[error("invalid {what} {value:?}: only letters, digits, '.', '-' and '_' are allowed")]
    PartChars { what: &'static str, value: String },
}

/// A workload identity. Ordered by trust domain, then namespace, then service account.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an ID from its parts, with the same checks as parsing.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    // No uppercase, ports or userinfo: the spec's character set keeps IDs comparable byte-wise.
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::TrustDomainChars(td.to_owned()));
    }
    Ok(())
}

fn check_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    if value.is_empty() {
        return Err(SpiffeIdError::EmptyPart(what));
    }
    // "." and ".." would make paths that normalise differently from how they compare.
    if value == "."
        || value == ".."
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::PartChars {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::PathShape(path.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), s);
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "bookinfo-productpage").unwrap(),
            id
        );
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/ns/a\"").is_err());
    }

    #[test]
    fn ordering_is_by_parts() {
        let a = SpiffeId::new("td", "a", "z").unwrap();
        let b = SpiffeId::new("td", "b", "a").unwrap();
        assert!(a < b);
    }

    #[test]
    fn rejections() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("http://td/ns/a/sa/b", SpiffeIdError::Scheme),
            ("SPIFFE://td/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:/td/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:///ns/a/sa/b", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://td/ns/a", SpiffeIdError::PathShape("/ns/a".into())),
            (
                "spiffe://td/ns/a/sa",
                SpiffeIdError::PathShape("/ns/a/sa".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b/c",
                SpiffeIdError::PathShape("/ns/a/sa/b/c".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b/",
                SpiffeIdError::PathShape("/ns/a/sa/b/".into()),
            ),
            (
                "spiffe://td/sa/b/ns/a",
                SpiffeIdError::PathShape("/sa/b/ns/a".into()),
            ),
            ("spiffe://td", SpiffeIdError::PathShape("".into())),
            (
                "spiffe://td/ns//sa/b",
                SpiffeIdError::EmptyPart("namespace"),
            ),
            (
                "spiffe://td/ns/a/sa/",
                SpiffeIdError::EmptyPart("service account"),
            ),
            ("spiffe://td/ns/a/sa/b?x=1", SpiffeIdError::QueryOrFragment),
            ("spiffe://td/ns/a/sa/b#f", SpiffeIdError::QueryOrFragment),
            (
                "spiffe://TD/ns/a/sa/b",
                SpiffeIdError::TrustDomainChars("TD".into()),
            ),
            (
                "spiffe://td:443/ns/a/sa/b",
                SpiffeIdError::TrustDomainChars("td:443".into()),
            ),
            (
                "spiffe://user@td/ns/a/sa/b",
                SpiffeIdError::TrustDomainChars("user@td".into()),
            ),
            (
                "spiffe://td/ns/../sa/b",
                SpiffeIdError::PartChars {
                    what: "namespace",
                    value: "..".into(),
                },
            ),
            (
                "spiffe://td/ns/a/sa/b%2F",
                SpiffeIdError::PartChars {
                    what: "service account",
                    value: "b%2F".into(),
                },
            ),
        ];
        for (input, want) in cases {
            let got = input.parse::<SpiffeId>();
            assert_eq!(got.as_ref().err(), Some(want), "input {input:?}: {got:?}");
            // Every error message says what is wrong.
            assert!(!want.to_string().is_empty());
        }
        assert_eq!(
            SpiffeId::new("td", "", "b").unwrap_err(),
            SpiffeIdError::EmptyPart("namespace")
        );
        assert_eq!(
            SpiffeId::new("", "a", "b").unwrap_err(),
            SpiffeIdError::EmptyTrustDomain
        );
        let long = "a".repeat(MAX_ID_LEN);
        assert_eq!(
            SpiffeId::new("td", &long, "b").unwrap_err(),
            SpiffeIdError::TooLong
        );
    }
}
