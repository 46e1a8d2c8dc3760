//! `jwksUri`: key sets the agent fetches itself, caches and refreshes.
//!
//! One fetcher thread for the process (blocking HTTP off the async
//! workers), started by the agent ([`start_fetching`]): loading policies
//! alone (`mesh-agent check`, tests, fuzzing) fetches nothing. Once
//! started, a URI is fetched as soon as a policy names it, then every
//! [`REFRESH`]; a failed fetch is retried every [`RETRY`] and keeps the last
//! good keys. Until a first fetch succeeds, tokens of that issuer are
//! answered 401 (as Istio does when it cannot fetch them). Reloading the
//! policies reuses what was fetched for the same URI. https is checked
//! against the Mozilla root set (webpki-roots).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::JwkSet;
use parking_lot::{Condvar, Mutex};

/// Istio's default refresh interval for fetched key sets.
const REFRESH: Duration = Duration::from_secs(20 * 60);
const RETRY: Duration = Duration::from_secs(5);
/// A key set is a few kilobytes.
const MAX_BODY: u64 = 1024 * 1024;

/// One fetched key set.
pub struct RemoteJwks {
    uri: String,
    timeout: Duration,
    keys: ArcSwapOption<JwkSet>,
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// `None`: due now.
    next: Option<Instant>,
    last_error: Option<String>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("uri", &self.uri)
            .field("fetched", &self.keys.load().is_some())
            .finish()
    }
}

impl RemoteJwks {
    /// The keys, once fetched.
    pub fn get(&self) -> Option<Arc<JwkSet>> {
        self.keys.load_full()
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Why the last fetch failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.state.lock().last_error.clone()
    }

    fn fetch(&self) {
        let result = fetch(&self.uri, self.timeout);
        let mut state = self.state.lock();
        match result {
            Ok(keys) => {
                tracing::info!(uri = %self.uri, keys = keys.keys.len(), "JWKS fetched");
                self.keys.store(Some(Arc::new(keys)));
                state.last_error = None;
                state.next = Some(Instant::now() + REFRESH);
            }
            Err(e) => {
                tracing::warn!(uri = %self.uri, error = %e, "JWKS fetch failed; tokens of its issuer are refused until it succeeds (the last fetched keys, if any, stay in use)");
                state.last_error = Some(e);
                state.next = Some(Instant::now() + RETRY);
            }
        }
    }
}

fn fetch(uri: &str, timeout: Duration) -> Result<JwkSet, String> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .new_agent();
    let mut response = agent.get(uri).call().map_err(|e| e.to_string())?;
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

struct Registry {
    entries: Mutex<HashMap<String, Weak<RemoteJwks>>>,
    wake: Condvar,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry {
    entries: Mutex::new(HashMap::new()),
    wake: Condvar::new(),
});

static STARTED: std::sync::Once = std::sync::Once::new();

/// Starts fetching the key sets policies name (once per process; the agent
/// calls it at start).
pub fn start_fetching() {
    STARTED.call_once(|| {
        std::thread::Builder::new()
            .name("jwks-fetch".into())
            .spawn(fetch_loop)
            .expect("spawning the JWKS fetcher thread");
    });
}

/// The key set at `uri`, shared with every policy that names it.
pub(super) fn remote(uri: &str, timeout: Duration) -> Arc<RemoteJwks> {
    let registry = &*REGISTRY;
    let mut entries = registry.entries.lock();
    if let Some(existing) = entries.get(uri).and_then(Weak::upgrade) {
        return existing;
    }
    let jwks = Arc::new(RemoteJwks {
        uri: uri.to_owned(),
        timeout,
        keys: ArcSwapOption::empty(),
        state: Mutex::new(FetchState::default()),
    });
    entries.insert(uri.to_owned(), Arc::downgrade(&jwks));
    registry.wake.notify_one();
    jwks
}

fn fetch_loop() {
    let registry = &*REGISTRY;
    loop {
        let live: Vec<Arc<RemoteJwks>> = {
            let mut entries = registry.entries.lock();
            entries.retain(|_, weak| weak.strong_count() > 0);
            entries.values().filter_map(Weak::upgrade).collect()
        };
        let now = Instant::now();
        for jwks in &live {
            let due = jwks.state.lock().next.is_none_or(|next| next <= now);
            if due {
                jwks.fetch();
            }
        }
        let next = live
            .iter()
            .filter_map(|j| j.state.lock().next)
            .min()
            .unwrap_or(now + REFRESH);
        drop(live);
        let mut entries = registry.entries.lock();
        // A URI named since the list was taken is due now (its wake-up may
        // have come before this wait).
        let new_uri = entries
            .values()
            .filter_map(Weak::upgrade)
            .any(|j| j.state.lock().next.is_none());
        let wait = next.saturating_duration_since(Instant::now());
        if !new_uri && !wait.is_zero() {
            // Woken early when a policy names a new URI.
            registry.wake.wait_for(&mut entries, wait);
        }
    }
}
