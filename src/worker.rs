//! State one Envoy worker keeps across requests: each worker runs its own VM, so nothing here is
//! shared between threads, and every stream of the worker sees the same values.

use std::cell::RefCell;

use crate::auth::ReplayCache;
use crate::config::Config;

/// A JWKS whose `kid` is unknown is fetched again at most this often per provider and worker, so
/// tokens with made-up key ids cannot make the gateway hammer the identity provider.
const REFETCH_INTERVAL_SECONDS: u64 = 10;

pub struct Worker {
    /// Signatures accepted recently, so a replay inside the skew window is refused.
    pub replays: RefCell<ReplayCache>,
    /// Per JWT provider: when its JWKS was last refetched for an unknown `kid`.
    refetched_at: RefCell<Vec<Option<u64>>>,
}

impl Worker {
    pub fn new(config: &Config) -> Worker {
        let replays = config.auth.signatures().map_or_else(|| ReplayCache::new(0), |s| s.replay_cache());
        Worker { replays: RefCell::new(replays), refetched_at: RefCell::new(vec![None; config.auth.providers().len()]) }
    }

    /// Whether provider `index` may refetch now; if so, the attempt is recorded.
    pub fn may_refetch(&self, index: usize, now: u64) -> bool {
        let Ok(mut times) = self.refetched_at.try_borrow_mut() else { return false };
        let Some(last) = times.get_mut(index) else { return false };
        if last.is_some_and(|at| now < at.saturating_add(REFETCH_INTERVAL_SECONDS)) {
            return false;
        }
        *last = Some(now);
        true
    }
}
