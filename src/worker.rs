//! State one Envoy worker keeps across requests: each worker runs its own VM, so nothing here is
//! shared between threads, and every stream of the worker sees the same values.

use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, RandomState};

use crate::auth::ReplayCache;
use crate::config::Config;
use crate::settle::Settler;

/// A JWKS whose `kid` is unknown is fetched again at most this often per provider and worker, so
/// tokens with made-up key ids cannot make the gateway hammer the identity provider.
const REFETCH_INTERVAL_SECONDS: u64 = 10;

pub struct Worker {
    /// Signatures accepted recently, so a replay inside the skew window is refused.
    pub replays: RefCell<ReplayCache>,
    /// Per JWT provider: when its JWKS was last refetched for an unknown `kid`.
    refetched_at: RefCell<Vec<Option<u64>>>,
    /// Commits and releases in flight or waiting for a retry; the root context answers them.
    pub settler: RefCell<Settler>,
    /// Random per VM (hex), so the reservation ids and queue names this worker makes are its own.
    id: String,
    reservations: Cell<u64>,
}

impl Worker {
    pub fn new(config: &Config) -> Worker {
        let replays = config.auth.signatures().map_or_else(|| ReplayCache::new(0), |s| s.replay_cache());
        Worker {
            replays: RefCell::new(replays),
            refetched_at: RefCell::new(vec![None; config.auth.providers().len()]),
            settler: RefCell::new(Settler::default()),
            // RandomState is seeded from the OS (WASI random_get in Envoy).
            id: format!("{:016x}", RandomState::new().hash_one(0u8)),
            reservations: Cell::new(0),
        }
    }

    /// Unique to this VM: names what belongs to it among the process's shared data and queues.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A reservation's idempotency key: the request id for the ledger's reader, and a suffix
    /// unique to this worker and request that no client can choose or repeat.
    pub fn reservation_key(&self, request_id: &str) -> String {
        let n = self.reservations.get().wrapping_add(1);
        self.reservations.set(n);
        let request_id: String = request_id.chars().filter(|c| c.is_ascii_graphic()).take(128).collect();
        format!("{request_id}~{}{n:x}", self.id)
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
