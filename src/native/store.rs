//! Shared data in process memory: what proxy-wasm's shared data is to the wasm build. One store for
//! every worker thread, each entry a value and a version, and a compare-and-swap on the version, so
//! rate-limit counters and the replay window stay exact across workers. The keys are the ones the
//! pipeline makes (fixed rate-limit slots, replay slots, JWKS documents), so memory stays as bounded
//! as the wasm build's. Sharded by key so that workers updating different slots do not wait on one
//! lock; a lock is held only for one map operation and never across a call into Envoy.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

const SHARDS: usize = 64;

/// FNV-1a. The keys are the pipeline's own names (slot numbers, provider names), never a client's
/// choice, so a keyed hash buys nothing here, and SipHash cost more than the rest of a lookup.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = self.0;
        for byte in bytes {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Keys = BuildHasherDefault<Fnv>;
type Shard = Mutex<HashMap<String, (Vec<u8>, u32), Keys>>;

pub struct Store {
    shards: Vec<Shard>,
    /// Counts unconditional stores (`set`): documents such as a JWKS, the slot secret, a table's
    /// fill. Rate-limit and replay updates go through `swap` and leave it alone, so a worker can
    /// tell with one atomic load whether there is anything new to load.
    sets: AtomicU64,
}

/// The one store of the process: like proxy-wasm's shared data, it outlives a config reload.
pub fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(Store::new)
}

impl Store {
    fn new() -> Store {
        Store { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(), sets: AtomicU64::new(0) }
    }

    /// A panic elsewhere while a shard was held leaves a map that is still whole (every operation
    /// below is one insert or lookup), so a poisoned lock is taken as is.
    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, (Vec<u8>, u32), Keys>> {
        // The high bits: the map inside the shard uses the low ones.
        let index = usize::try_from(Keys::default().hash_one(key) >> 58).unwrap_or(0) % SHARDS;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shard(key).get(key).cloned()
    }

    /// Stores `value` whatever the entry holds, and counts it (`sets`).
    pub fn set(&self, key: &str, value: &[u8]) {
        self.swap(key, value, None);
        self.sets.fetch_add(1, Ordering::Release);
    }

    /// How many `set`s the process has made: read it before loading what they stored.
    pub fn sets(&self) -> u64 {
        self.sets.load(Ordering::Acquire)
    }

    /// Stores `value` if the entry is still at `version` (`None`: whatever it is); versions start
    /// at 1 and grow by one per store, as Envoy's do.
    pub fn swap(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        let mut shard = self.shard(key);
        let current = shard.get(key).map(|(_, v)| *v);
        if version.is_some() && version != current {
            return false;
        }
        let next = current.map_or(1, |v| v.wrapping_add(1).max(1));
        match shard.get_mut(key) {
            Some(entry) => {
                entry.0.clear();
                entry.0.extend_from_slice(value);
                entry.1 = next;
            }
            None => {
                shard.insert(key.to_owned(), (value.to_vec(), next));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn a_swap_at_a_stale_version_fails_and_one_at_the_current_version_wins() {
        let store = Store::new();
        assert!(store.get("k").is_none());
        assert!(store.swap("k", b"a", None));
        let (value, version) = store.get("k").unwrap();
        assert_eq!((value.as_slice(), version), (&b"a"[..], 1));
        assert!(store.swap("k", b"b", Some(1)));
        assert!(!store.swap("k", b"c", Some(1)), "a stale version won");
        assert_eq!(store.get("k").unwrap(), (b"b".to_vec(), 2));
    }

    #[test]
    fn only_unconditional_stores_are_counted() {
        let store = Store::new();
        store.set("doc", b"jwks");
        assert!(store.swap("slot", b"1", None));
        assert!(store.swap("doc", b"jwks2", Some(1)));
        assert_eq!(store.sets(), 1);
    }

    #[test]
    fn increments_by_compare_and_swap_from_many_threads_are_exact() {
        let store = Arc::new(Store::new());
        store.swap("n", &0u64.to_le_bytes(), None);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    for _ in 0..1000 {
                        loop {
                            let (value, version) = store.get("n").unwrap();
                            let value = u64::from_le_bytes(value.try_into().unwrap());
                            if store.swap("n", &(value + 1).to_le_bytes(), Some(version)) {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let (value, _) = store.get("n").unwrap();
        assert_eq!(u64::from_le_bytes(value.try_into().unwrap()), 4000);
    }
}
