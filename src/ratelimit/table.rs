//! Where callers' rate-limit state lives: a fixed table of slots in Envoy's shared data, which
//! every worker of the process sees.
//!
//! Envoy's shared data cannot delete an entry, so a key per caller would grow without bound under
//! a flood of client addresses. Instead the table has `slots` entries, all created when the plugin
//! starts: `tollgate.rl.<n>` holds one caller as `[fingerprint][TAT per window]` (little-endian
//! u64s). A caller hashes to two candidate slots (SipHash keyed by the configuration, so clients
//! cannot aim at a slot);
//! a newcomer takes an idle slot (every bucket full again, so nothing is lost), or else evicts the
//! candidate closest to idle. Memory is fixed at start, whatever the traffic; the price of a full
//! table is that an evicted caller starts again with a full bucket.
//!
//! Updates are read, decide, compare-and-swap on the slot's version, so two workers never both
//! spend the same token; a lost race reads again, at most `MAX_ATTEMPTS` times.

use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::host::Host;

/// Past this many lost races in a row the request is refused: an exact count matters more than
/// one request, and two workers racing on one key lose far less often than this.
const MAX_ATTEMPTS: u32 = 32;
/// Records which layout the slots were created for, so each VM after the first skips the work.
const LAYOUT_KEY: &str = "tollgate.rl.layout";
/// What an unused slot holds: fingerprint 0, no windows.
const EMPTY: [u8; 8] = [0; 8];

#[derive(Debug)]
pub struct Table {
    slots: u32,
    /// TATs per caller: the table's value layout.
    width: usize,
    /// Keys the slot hash; derived from the configuration, so every worker agrees on it.
    key: [u8; 16],
    /// Names the configuration in the layout marker: the other half of the seed, because shared
    /// data is readable by every plugin in the process and the key must stay secret.
    config_id: [u8; 16],
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

struct Slot {
    key: String,
    version: Option<u32>,
    fingerprint: u64,
    tats: Vec<u64>,
}

impl Slot {
    fn read(host: &dyn Host, index: u32, width: usize) -> Slot {
        let key = format!("tollgate.rl.{index}");
        let (value, version) = match host.shared_get(&key) {
            Some((value, version)) => (value, Some(version)),
            None => (Vec::new(), None),
        };
        let mut words = value.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let fingerprint = words.next().unwrap_or(0);
        let mut tats: Vec<u64> = words.collect();
        tats.resize(width, 0);
        Slot { key, version, fingerprint, tats }
    }

    /// Every bucket is full again: the slot can be given away without losing anything.
    fn idle(&self, now: u64) -> bool {
        self.fingerprint == 0 || self.tats.iter().all(|&tat| tat <= now)
    }

    fn latest(&self) -> u64 {
        self.tats.iter().copied().max().unwrap_or(0)
    }
}

impl Table {
    pub fn new(slots: u32, width: usize, seed: [u8; 32]) -> Table {
        let (mut key, mut config_id) = ([0u8; 16], [0u8; 16]);
        key.copy_from_slice(&seed[..16]);
        config_id.copy_from_slice(&seed[16..]);
        Table { slots: slots.max(1), width, key, config_id }
    }

    /// Creates every slot, once per process and layout: with all keys present, each later write
    /// is a compare-and-swap (Envoy inserts a missing key unconditionally, which could lose a
    /// count when two workers meet a new key at once). Envoy configures the plugin on its main
    /// thread before any worker, so the workers find the marker and skip this.
    pub fn create_slots(&self, host: &mut dyn Host) {
        let layout = self.layout();
        if host.shared_get(LAYOUT_KEY).is_some_and(|(value, _)| value == layout) {
            return;
        }
        for index in 0..self.slots {
            host.shared_set(&format!("tollgate.rl.{index}"), &EMPTY);
        }
        host.shared_set(LAYOUT_KEY, &layout);
    }

    fn layout(&self) -> Vec<u8> {
        let mut layout = self.config_id.to_vec();
        layout.extend_from_slice(&self.slots.to_le_bytes());
        layout.extend_from_slice(&(self.width as u64).to_le_bytes());
        layout
    }

    /// The caller's fingerprint (never 0) and two candidate slots.
    fn locate(&self, caller: &[u8]) -> (u64, u32, u32) {
        let mut hasher = SipHasher13::new_with_key(&self.key);
        hasher.write(caller);
        let hash = hasher.finish128();
        let fingerprint = hash.h1.max(1);
        let first = ((hash.h2 & 0xffff_ffff) % u64::from(self.slots)) as u32;
        let mut second = ((hash.h2 >> 32) % u64::from(self.slots)) as u32;
        if second == first {
            second = (first + 1) % self.slots;
        }
        (fingerprint, first, second)
    }

    /// Runs `decide` on the caller's TATs (zeros for a newcomer) and stores what it returns, if
    /// anything, atomically with respect to every other worker.
    pub fn update<T>(
        &self,
        host: &mut dyn Host,
        caller: &[u8],
        now: u64,
        mut decide: impl FnMut(&[u64]) -> (T, Option<Vec<u64>>),
    ) -> Result<Applied<T>, Contended> {
        let (fingerprint, first, second) = self.locate(caller);
        for retries in 0..MAX_ATTEMPTS {
            let mut slot = Slot::read(host, first, self.width);
            if slot.fingerprint != fingerprint {
                let other = Slot::read(host, second, self.width);
                if other.fingerprint == fingerprint || choose_second(&slot, &other, now) {
                    slot = other;
                }
                if slot.fingerprint != fingerprint {
                    slot.tats.iter_mut().for_each(|tat| *tat = 0);
                }
            }
            let (value, store) = decide(&slot.tats);
            let Some(tats) = store else { return Ok(Applied { value, retries }) };
            let mut bytes = Vec::with_capacity(8 * (tats.len() + 1));
            bytes.extend_from_slice(&fingerprint.to_le_bytes());
            tats.iter().for_each(|tat| bytes.extend_from_slice(&tat.to_le_bytes()));
            if host.shared_swap(&slot.key, &bytes, slot.version) {
                return Ok(Applied { value, retries });
            }
        }
        Err(Contended)
    }
}

/// Which candidate a newcomer takes: an idle one, the first preferred; else the one whose buckets
/// refill soonest, so the evicted caller loses the least.
fn choose_second(first: &Slot, second: &Slot, now: u64) -> bool {
    if first.idle(now) {
        return false;
    }
    second.idle(now) || second.latest() < first.latest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    const NOW: u64 = 1_000;

    /// Counts requests: allows while the first TAT is under `limit`.
    fn count(table: &Table, host: &mut FakeHost, caller: &str, limit: u64) -> bool {
        let applied = table.update(host, caller.as_bytes(), NOW, |tats| {
            let n = tats[0].saturating_sub(NOW);
            if n >= limit {
                (false, None)
            } else {
                (true, Some(vec![NOW + n + 1]))
            }
        });
        applied.unwrap().value
    }

    #[test]
    fn slots_are_created_once_per_layout() {
        let table = Table::new(64, 1, [7; 32]);
        let mut host = FakeHost::default();
        table.create_slots(&mut host);
        assert_eq!(host.shared.len(), 65);
        host.shared.insert("tollgate.rl.3".to_owned(), (vec![1; 16], 9));
        table.create_slots(&mut host);
        assert_eq!(host.shared["tollgate.rl.3"].0, vec![1; 16], "a second VM must not wipe the table");
        Table::new(64, 2, [7; 32]).create_slots(&mut host);
        assert_eq!(host.shared["tollgate.rl.3"].0, EMPTY, "a new layout starts afresh");
    }

    #[test]
    fn callers_are_counted_apart() {
        let table = Table::new(1024, 1, [1; 32]);
        let mut host = FakeHost::default();
        table.create_slots(&mut host);
        for _ in 0..3 {
            assert!(count(&table, &mut host, "a:acme", 3));
        }
        assert!(!count(&table, &mut host, "a:acme", 3));
        assert!(count(&table, &mut host, "a:globex", 3));
        let written = host.shared.values().filter(|(v, _)| v.len() == 16).count();
        assert_eq!(written, 2, "one slot per caller, and the refusal wrote nothing");
    }

    #[test]
    fn a_full_table_evicts_an_idle_caller_first_and_keeps_busy_ones() {
        let table = Table::new(2, 1, [2; 32]);
        let mut host = FakeHost::default();
        table.create_slots(&mut host);
        for _ in 0..3 {
            count(&table, &mut host, "busy", 3);
        }
        // An idle caller's slot: fingerprint set, TAT in the past.
        let (_, a, b) = table.locate(b"busy");
        let free = if host.shared[&format!("tollgate.rl.{a}")].0[..8] == EMPTY { a } else { b };
        let mut idle = 99u64.to_le_bytes().to_vec();
        idle.extend_from_slice(&(NOW - 1).to_le_bytes());
        host.shared.insert(format!("tollgate.rl.{free}"), (idle, 1));

        assert!(count(&table, &mut host, "newcomer", 3), "took the idle slot");
        assert!(!count(&table, &mut host, "busy", 3), "the busy caller kept its count");
    }

    #[test]
    fn a_lost_race_is_retried_and_counted() {
        let table = Table::new(16, 1, [3; 32]);
        let mut host = FakeHost::default();
        table.create_slots(&mut host);
        host.lose_swaps = 2;
        let applied = table.update(&mut host, b"x", NOW, |_| ((), Some(vec![NOW + 1]))).unwrap();
        assert_eq!(applied.retries, 2);
        host.lose_swaps = MAX_ATTEMPTS;
        assert_eq!(table.update(&mut host, b"x", NOW, |_| ((), Some(vec![NOW + 2]))), Err(Contended));
    }
}
