//! Putting a desired state in force, whole or not at all.
//!
//! 1. plan: remote workloads, services and policies are built from the
//!    desired state without touching anything running; a failure here is
//!    the whole change's failure (reported, counted, nothing changed);
//! 2. pods: enrolled and released (each pod on its own: one that cannot be
//!    enrolled is reported and does not stop the others);
//! 3. one snapshot of all of it is swapped in for the data path;
//! 4. the new pods' listeners start accepting.

use std::sync::Arc;

use anyhow::{Result, anyhow};

use crate::{desired::Desired, proxy::Plan, state::AgentState};

/// What became of an applied desired state.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// In force as this generation.
    Generation(u64),
    /// The same as the state in force: nothing to do.
    Unchanged,
}

/// Applies `desired`, or changes nothing and says why. Node settings
/// (`node.yaml`) are read at start only: a changed node is kept as pending
/// and the one in force stays.
pub fn apply(state: &AgentState, mut desired: Desired) -> Result<Applied> {
    let running_node = state.node_config();
    let mut pending = state.pending_node.write();
    if desired.node != running_node {
        if pending.as_ref() != Some(&desired.node) {
            tracing::warn!(
                "node.yaml changed: node settings apply at the next restart (shown as pending in /config_dump); the rest applies now"
            );
        }
        *pending = Some(desired.node.clone());
        desired.node = running_node;
    } else {
        *pending = None;
    }
    drop(pending);
    let previous = state.proxy.snapshot();
    if previous.generation > 0 && *state.desired() == desired {
        return Ok(Applied::Unchanged);
    }
    let plan = Plan::build(&desired, &previous).map_err(|e| anyhow!("{e:#}"))?;
    let generation = previous.generation + 1;
    let mut enroller = state.enroller.lock();
    enroller.reconcile(&desired.pods);
    state
        .proxy
        .publish(plan.with_pods(&enroller.pods(), generation));
    // Balancers kept from the previous table learn their new endpoints only
    // now that the new table is in force (connections routing by the old
    // one keep choosing among its endpoints until then).
    state.proxy.snapshot().services.commit();
    enroller.start_serving();
    drop(enroller);
    for policy in desired.policies.set.unenforceable() {
        if let Some(error) = policy.unenforceable() {
            tracing::error!(
                policy = %policy.name(),
                %error,
                "authorization policy cannot be enforced as written: it denies all traffic to the workloads it selects until it is fixed"
            );
        }
    }
    *state.desired.write() = Arc::new(desired);
    Ok(Applied::Generation(generation))
}

/// Applies `desired` as a reload: the outcome is logged, counted in
/// `mesh_config_reloads_total{result}` and shown in `/status`.
pub fn reload(state: &AgentState, desired: Desired) {
    let pods = desired.pods.len();
    let applied = apply(state, desired);
    state.applied.notify_waiters();
    match applied {
        Ok(Applied::Unchanged) => {
            // Back to what is running (e.g. a bad edit undone): nothing to
            // apply, but the source is valid again.
            state.clear_reload_error();
        }
        Ok(Applied::Generation(generation)) => {
            tracing::info!(generation, pods, "configuration applied");
            state.set_reload_result(None);
        }
        Err(err) => {
            let reason = format!("{err:#}");
            tracing::error!(error = %reason, "configuration change not applied; the previous configuration keeps serving, unchanged");
            state.set_reload_result(Some(reason));
        }
    }
}

/// A source's change that was refused before it could be applied (a file
/// that does not parse or validate).
pub fn rejected(state: &AgentState, reason: String) {
    tracing::error!(error = %reason, "configuration change rejected; the previous configuration keeps serving");
    state.set_reload_result(Some(reason));
}
