//! The mesh's own signer for clusters without istiod (`mesh-agent ca`,
//! issue 26, in progress): it serves the Istio CA API (identity::ca_api) and
//! signs an identity only for a node agent that runs pods of it.
//!
//! - `authorize.rs`: who may have which identity (istiod's node authorizer).

pub mod authorize;
