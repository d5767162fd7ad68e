//! A fixed set of entries in Envoy's shared data that every worker of the process updates by
//! compare-and-swap: the rate-limit table and the record of accepted request signatures are both
//! one. Shared data cannot delete an entry, so a store has a fixed number of slots whatever the
//! traffic, and an item is placed by a keyed hash so a client cannot aim at a slot.
//!
//! The hash key is a secret of the process, made once and kept in shared data (`secret`): every
//! worker uses the same one, no client can guess it, and it outlives configuration changes, so a
//! new config finds its counts where the old one left them.

use std::hash::{BuildHasher, Hasher, RandomState};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::common::push_decimal;
use crate::host::Host;

/// Past this many lost races in a row an update gives up: an exact record matters more than one
/// request, and two workers racing on one slot lose far less often than this.
pub const MAX_ATTEMPTS: u32 = 32;

/// Where the process's slot-hash key is kept.
const SECRET_KEY: &str = "tollgate.secret";

/// The slot-hash key every worker of the process shares. The first VM to configure makes it; Envoy
/// configures a plugin on its main thread (the configuration canary) before any worker does, so
/// the workers, and every later configuration, read the one it wrote.
pub fn secret(host: &mut dyn Host) -> [u8; 16] {
    process_random(host, SECRET_KEY)
}

/// 128 random bits made once per process and kept in shared data under `name`: the first VM to
/// ask makes them, every later one reads them.
pub fn process_random(host: &mut dyn Host, name: &str) -> [u8; 16] {
    if let Some(key) = stored(host, name) {
        return key;
    }
    // RandomState is seeded from the OS (WASI random_get in Envoy); two outputs of the one keyed
    // hash make 128 unpredictable bits.
    let random = RandomState::new();
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&random.hash_one(0u8).to_le_bytes());
    key[8..].copy_from_slice(&random.hash_one(1u8).to_le_bytes());
    host.shared_set(name, &key);
    // Read back: if another VM wrote between the read and the write, both now use the last one.
    stored(host, name).unwrap_or(key)
}

fn stored(host: &dyn Host, name: &str) -> Option<[u8; 16]> {
    host.shared_get(name).and_then(|(value, _)| value.try_into().ok())
}

/// One store: `count` entries named `<prefix>.<n>`.
#[derive(Debug)]
pub struct SlotStore {
    prefix: &'static str,
    count: u32,
    key: [u8; 16],
}

/// A slot as read: its value and the version a write must match.
pub struct Slot {
    pub index: u32,
    pub value: Vec<u8>,
    version: Option<u32>,
}

/// What one attempt of an update decided.
pub enum Step<T> {
    /// Nothing to write; the update is over.
    Done(T),
    /// Write `value` to `slot` if no one has changed it since it was read; `result` is the
    /// outcome once the write holds.
    Write { slot: Slot, value: Vec<u8>, result: T },
}

/// The outcome of an update, and how many lost races it took.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied<T> {
    pub value: T,
    pub retries: u32,
}

/// The slot stayed contended for `MAX_ATTEMPTS` tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contended;

impl SlotStore {
    pub fn new(prefix: &'static str, count: u32, key: [u8; 16]) -> SlotStore {
        SlotStore { prefix, count: count.max(1), key }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// A keyed 128-bit hash of `item` (SipHash-1-3: a PRF, at a fraction of SHA-256's cost).
    pub fn hash(&self, item: &[u8]) -> (u64, u64) {
        let mut hasher = SipHasher13::new_with_key(&self.key);
        hasher.write(item);
        let hash = hasher.finish128();
        (hash.h1, hash.h2)
    }

    fn name(&self, index: u32) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 11);
        name.push_str(self.prefix);
        name.push('.');
        push_decimal(&mut name, u64::from(index));
        name
    }

    pub fn read(&self, host: &dyn Host, index: u32) -> Slot {
        let (value, version) = match host.shared_get(&self.name(index)) {
            Some((value, version)) => (value, Some(version)),
            None => (Vec::new(), None),
        };
        Slot { index, value, version }
    }

    /// Writes `value` to every slot, whatever they hold.
    pub fn fill(&self, host: &mut dyn Host, value: &[u8]) {
        for index in 0..self.count {
            host.shared_set(&self.name(index), value);
        }
    }

    /// Read, decide, compare-and-swap: `attempt` reads the slots it needs and says what to write;
    /// a write that lost a race to another worker runs `attempt` again on what that worker wrote.
    pub fn update<T>(
        &self,
        host: &mut dyn Host,
        mut attempt: impl FnMut(&dyn Host) -> Step<T>,
    ) -> Result<Applied<T>, Contended> {
        for retries in 0..MAX_ATTEMPTS {
            match attempt(host) {
                Step::Done(value) => return Ok(Applied { value, retries }),
                Step::Write { slot, value, result } => {
                    if host.shared_swap(&self.name(slot.index), &value, slot.version) {
                        return Ok(Applied { value: result, retries });
                    }
                }
            }
        }
        Err(Contended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    #[test]
    fn the_secret_is_made_once_and_then_shared() {
        let mut host = FakeHost::default();
        let first = secret(&mut host);
        assert_eq!(secret(&mut host), first, "a second VM must read the first one's secret");
        assert_ne!(secret(&mut FakeHost::default()), first, "another process makes its own");
    }

    #[test]
    fn a_lost_race_is_retried_up_to_the_cap() {
        let store = SlotStore::new("test", 4, [0; 16]);
        let mut host = FakeHost::default();
        let write = |host: &dyn Host| {
            let slot = store.read(host, 1);
            let mut value = slot.value.clone();
            value.push(1);
            Step::Write { slot, value, result: () }
        };
        host.lose_swaps = 2;
        assert_eq!(store.update(&mut host, write), Ok(Applied { value: (), retries: 2 }));
        host.lose_swaps = MAX_ATTEMPTS;
        assert_eq!(store.update(&mut host, write), Err(Contended));
        assert_eq!(host.shared["test.1"].0, [1], "only the write that held is stored");
    }
}
