//! Where callers' rate-limit state lives: a fixed table of slots in Envoy's shared data (a
//! `SlotStore`), which every worker of the process sees.
//!
//! Envoy's shared data cannot delete an entry, so a key per caller would grow without bound under
//! a flood of client addresses. Instead the table has `slots` entries, all created when the plugin
//! starts: `tollgate.rl.<n>` holds one caller as `[fingerprint][TAT per window]` (little-endian
//! u64s). A caller hashes to two candidate slots (keyed by the process's secret, so clients
//! cannot aim at a slot); a newcomer takes an idle slot (every bucket full again, so nothing is
//! lost), or else evicts the candidate closest to idle. Memory is fixed at start, whatever the
//! traffic; the price of a full table is that an evicted caller starts again with a full bucket.
//!
//! The slots are wiped only when the layout marker changes: the table's size, or what its
//! windows count (any limit, burst or window position). Any other config edit — an API key, a
//! route, a header — keeps every count.

use crate::host::Host;
pub use crate::slots::{Applied, Contended};
use crate::slots::{Slot, SlotStore, Step};

/// The rate-limit table's name in shared data.
const RATE_LIMITS: &str = "tollgate.rl";
/// What an unused slot holds: fingerprint 0, no windows.
const EMPTY: [u8; 8] = [0; 8];

/// What the table is, as the configuration fixes it: its size, the windows per caller, and a
/// marker of what those windows mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub slots: u32,
    /// TATs per caller: the table's value layout.
    pub width: usize,
    /// A digest of every window's position, period, limit and burst: a TAT means something else
    /// once any of them changes.
    pub windows: [u8; 32],
}

impl Layout {
    fn marker(&self) -> Vec<u8> {
        let mut marker = self.windows.to_vec();
        marker.extend_from_slice(&self.slots.to_le_bytes());
        marker.extend_from_slice(&(self.width as u64).to_le_bytes());
        marker
    }
}

/// The table a worker counts in: the configuration's layout over the process's slot store.
#[derive(Debug)]
pub struct Table {
    store: SlotStore,
    width: usize,
}

struct Caller {
    slot: Slot,
    fingerprint: u64,
    tats: Vec<u64>,
}

impl Caller {
    fn read(store: &SlotStore, host: &dyn Host, index: u32, width: usize) -> Caller {
        let slot = store.read(host, index);
        let mut words = slot.value.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let fingerprint = words.next().unwrap_or(0);
        let mut tats: Vec<u64> = words.collect();
        tats.resize(width, 0);
        Caller { slot, fingerprint, tats }
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
    /// Opens the table for `layout`, hashed with the process's `secret` (`slots::secret`), creating every slot once per
    /// process and layout: with all keys present, each later write is a compare-and-swap (Envoy
    /// inserts a missing key unconditionally, which could lose a count when two workers meet a
    /// new key at once). Envoy configures the plugin on its main thread before any worker, so the
    /// workers find the marker and skip this.
    pub fn open(layout: &Layout, secret: [u8; 16], host: &mut dyn Host) -> Table {
        Table::open_named(RATE_LIMITS, layout, secret, host)
    }

    /// The same for another table of counts (authentication failures), apart from the rate limits
    /// under its own `name`. `<name>.layout` records which layout the slots were created for, so
    /// each VM after the first skips the work.
    pub fn open_named(name: &'static str, layout: &Layout, secret: [u8; 16], host: &mut dyn Host) -> Table {
        let table = Table { store: SlotStore::new(name, layout.slots, secret), width: layout.width };
        let marker = layout.marker();
        let layout_key = format!("{name}.layout");
        if host.shared_get(&layout_key).is_none_or(|(value, _)| value != marker) {
            table.store.fill(host, &EMPTY);
            host.shared_set(&layout_key, &marker);
        }
        table
    }

    /// The caller's fingerprint (never 0) and two candidate slots.
    fn locate(&self, caller: &[u8]) -> (u64, u32, u32) {
        let (h1, h2) = self.store.hash(caller);
        let slots = self.store.count();
        let fingerprint = h1.max(1);
        let first = ((h2 & 0xffff_ffff) % u64::from(slots)) as u32;
        let mut second = ((h2 >> 32) % u64::from(slots)) as u32;
        if second == first {
            second = (first + 1) % slots;
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
        self.store.update(host, |host| {
            let mut current = Caller::read(&self.store, host, first, self.width);
            if current.fingerprint != fingerprint {
                let other = Caller::read(&self.store, host, second, self.width);
                if other.fingerprint == fingerprint || choose_second(&current, &other, now) {
                    current = other;
                }
                if current.fingerprint != fingerprint {
                    current.tats.iter_mut().for_each(|tat| *tat = 0);
                }
            }
            let (result, store) = decide(&current.tats);
            let Some(tats) = store else { return Step::Done(result) };
            let mut value = Vec::with_capacity(8 * (tats.len() + 1));
            value.extend_from_slice(&fingerprint.to_le_bytes());
            tats.iter().for_each(|tat| value.extend_from_slice(&tat.to_le_bytes()));
            Step::Write { slot: current.slot, value, result }
        })
    }
}

/// Which candidate a newcomer takes: an idle one, the first preferred; else the one whose buckets
/// refill soonest, so the evicted caller loses the least.
fn choose_second(first: &Caller, second: &Caller, now: u64) -> bool {
    if first.idle(now) {
        return false;
    }
    second.idle(now) || second.latest() < first.latest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::slots::MAX_ATTEMPTS;

    fn layout(slots: u32, width: usize, windows: u8) -> Layout {
        Layout { slots, width, windows: [windows; 32] }
    }

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
        let mut host = FakeHost::default();
        Table::open(&layout(64, 1, 7), [0; 16], &mut host);
        assert_eq!(host.shared.len(), 65, "64 slots and the layout marker");
        host.shared.insert("tollgate.rl.3".to_owned(), (vec![1; 16], 9));
        Table::open(&layout(64, 1, 7), [0; 16], &mut host);
        assert_eq!(host.shared["tollgate.rl.3"].0, vec![1; 16], "a second VM must not wipe the table");
        Table::open(&layout(64, 2, 7), [0; 16], &mut host);
        assert_eq!(host.shared["tollgate.rl.3"].0, EMPTY, "a new width starts afresh");
        host.shared.insert("tollgate.rl.3".to_owned(), (vec![1; 16], 9));
        Table::open(&layout(64, 2, 8), [0; 16], &mut host);
        assert_eq!(host.shared["tollgate.rl.3"].0, EMPTY, "so do windows that mean something else");
    }

    #[test]
    fn callers_are_counted_apart() {
        let mut host = FakeHost::default();
        let table = Table::open(&layout(1024, 1, 1), [0; 16], &mut host);
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
        let mut host = FakeHost::default();
        let table = Table::open(&layout(2, 1, 2), [0; 16], &mut host);
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
        let mut host = FakeHost::default();
        let table = Table::open(&layout(16, 1, 3), [0; 16], &mut host);
        host.lose_swaps = 2;
        let applied = table.update(&mut host, b"x", NOW, |_| ((), Some(vec![NOW + 1]))).unwrap();
        assert_eq!(applied.retries, 2);
        host.lose_swaps = MAX_ATTEMPTS;
        assert_eq!(table.update(&mut host, b"x", NOW, |_| ((), Some(vec![NOW + 2]))), Err(Contended));
    }
}
