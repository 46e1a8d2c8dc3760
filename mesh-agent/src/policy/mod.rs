//! Istio `AuthorizationPolicy` enforcement, at L4 and L7 (HTTP),
//! `PeerAuthentication` (whether plaintext may come in; `peer_auth`) and
//! `RequestAuthentication` (which JWTs are accepted: `request_authn`, `jwt`,
//! `jwks_fetch`).
//!
//! Pipeline: [`load`] parses and validates policy YAML (all-or-nothing) into
//! a [`PolicySet`]; [`PolicySet::compile`] indexes it by namespace;
//! [`CompiledPolicies::for_workload`] selects (and caches) the policies of one
//! workload; [`WorkloadPolicy::decide`] evaluates a [`Request`].
//!
//! Semantics follow the Istio documentation (see `docs/policy-semantics.md` in the repository,
//! file for the full list with one example each):
//!
//! - Evaluation order: CUSTOM (unsupported, rejected at load) -> DENY ->
//!   ALLOW. Any matching DENY policy denies. With no ALLOW policy for the
//!   workload the request is allowed; otherwise it is allowed only if an ALLOW
//!   policy matches. AUDIT policies only mark the request for audit.
//! - Scope: a policy in the root namespace (default `istio-system`) applies to
//!   every workload of the mesh, otherwise to the workloads of its namespace;
//!   `selector.matchLabels` narrows that further.
//! - `spec: {}` with ALLOW is allow-nothing; `rules: [{}]` matches every
//!   request (allow-all with ALLOW, deny-all with DENY); a DENY or AUDIT policy
//!   without rules matches nothing.
//! - Rules are ORed; in a rule `from`, `to` and `when` are ANDed; the entries
//!   of `from` (and of `to`) are ORed; the fields of one source / operation
//!   are ANDed; the values of one field are ORed; a `notX` field matches when
//!   the value matches none of its entries. An absent attribute (no peer
//!   identity, missing header) fails `X` and satisfies `notX`.
//! - Values: `abc` exact, `abc*` prefix, `*abc` suffix, `*` any non-empty value.
//!   Hosts are case-insensitive and matched without the request's port;
//!   methods and paths are case-sensitive.
//! - Plain TCP (no HTTP attributes): an ALLOW rule that uses HTTP-only fields
//!   (hosts, methods, paths and their notX, `request.headers` conditions)
//!   matches nothing; in DENY and AUDIT rules those fields are ignored, which
//!   makes the rule wider.
//! - Dry-run (`istio.io/dry-run: "true"`, ALLOW and DENY only): evaluated and
//!   reported in [`Decision`]'s `dry_run_denies`, never enforced.

mod compile;
mod convert;
mod decide;
mod jwks_fetch;
pub(crate) mod jwt;
mod load;
mod matcher;
mod model;
mod normalize;
mod peer_auth;
mod rate_limit;
mod request_authn;

#[cfg(test)]
mod tests;

pub use compile::{
    Action, CompiledPolicies, DEFAULT_ROOT_NAMESPACE, Policy, PolicyName, PolicySet, Workload,
    WorkloadPolicy,
};
pub use decide::{Decision, HeaderLookup, HttpAttributes, NoHeaders, PolicyRef, Request};
pub use jwks_fetch::{RemoteJwks, start_fetching as start_fetching_jwks};
pub use jwt::{RequestAuth, Unauthenticated};
pub(crate) use load::{DocCtx, Seg, key, label_of};
pub use load::{LoadError, load};
pub use normalize::{PathError, normalize_path};
pub use peer_auth::{MtlsMode, PeerAuthentication};
pub use rate_limit::{Limited, RateLimit, RateLimiter};
pub use request_authn::{JwtKeys, JwtRule, RequestAuthentication};
