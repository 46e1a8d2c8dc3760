//! Workload identities (SPIFFE) and the mutual-TLS configurations that use them.
//!
//! Every workload is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, carried
//! as the single URI SAN of an X.509 certificate. The [`IdentityManager`] holds a certificate
//! and key for each service account with a pod on this node (from files, or minted from an
//! issuing CA) plus the trust bundle, and hands out rustls configs for TLS 1.3 between nodes
//! that always use its *current* material, so bundles and certificates rotate without
//! rebuilding configs or breaking established connections.
//!
//! Layout: `spiffe` (the ID type), `ca` (making CAs and certificates), `ca_api` (the Istio
//! CA API), `requester` (asking a CA for certificates), `store` (the manager: loading,
//! minting, reload, renewal), `verify` (webpki chain checks + SPIFFE ID checks),
//! `tls` (rustls configs and handshake-failure classification).

pub mod ca;
pub mod ca_api;
pub mod requester;
mod spiffe;
mod store;
mod tls;
mod verify;

#[cfg(test)]
mod tests;

pub use spiffe::{SpiffeId, SpiffeIdError};
pub use store::{
    CertSource, CertificateInfo, DEFAULT_RENEW_AT, IdentityManager, IdentitySource,
    NOT_BEFORE_BACKDATE, RequestHealth, SigningRequestSource, SystemClock, WallClock, not_after_of,
};
pub use tls::{ALPN_H2, HandshakeRejection, classify_io_error, classify_tls_error};
pub use verify::{PeerIdentityError, peer_spiffe_id, spiffe_id_of};
