//! Refuses a request signature replayed to another Envoy worker: each worker remembers what it
//! accepted (`auth::ReplayCache`), and every accepted signature is also recorded in Envoy's
//! shared data, which all workers of the VM see.
//!
//! Shared-data entries cannot be deleted, so the store is a fixed set of slots (a `SlotStore`): a
//! signature's keyed hash picks one of `SLOTS` entries, each holding the unexpired signatures of
//! its slot (16-byte prefix and expiry, 24 bytes each), pruned on every write. Memory is at most
//! `SLOTS × (SLOT_CAPACITY × 24 + ~90)` bytes (about 6.5 MB; Envoy keeps ~90 bytes per key)
//! whatever the traffic; a slot full of unexpired signatures answers 503 rather than risk an
//! undetected replay.

use crate::auth::{Accepted, AuthError};
use crate::host::Host;
use crate::slots::{SlotStore, Step};

const SLOTS: u32 = 4096;
const SLOT_CAPACITY: usize = 64;
const RECORD: usize = 24;

/// The signatures every worker of the process accepted recently.
#[derive(Debug)]
pub struct SeenSignatures {
    store: SlotStore,
}

impl SeenSignatures {
    /// `secret` is the process's slot-hash key (`slots::secret`): a client that signs its own
    /// requests cannot aim them at one slot to fill it.
    pub fn new(secret: [u8; 16]) -> SeenSignatures {
        SeenSignatures { store: SlotStore::new("tollgate.sig", SLOTS, secret) }
    }

    /// Records an accepted signature; refused if any worker recorded it before.
    pub fn record(&self, host: &mut dyn Host, accepted: &Accepted, now: u64) -> Result<(), AuthError> {
        let sig = &accepted.signature;
        let index = (self.store.hash(sig).1 % u64::from(SLOTS)) as u32;
        let applied = self.store.update(host, |host| {
            let slot = self.store.read(host, index);
            let mut kept = Vec::with_capacity(slot.value.len() + RECORD);
            for record in slot.value.chunks_exact(RECORD) {
                let (prefix, expiry) = record.split_at(16);
                let expires_at = u64::from_le_bytes(expiry.try_into().unwrap_or_default());
                if expires_at < now {
                    continue;
                }
                if prefix == &sig[..16] {
                    return Step::Done(Err(AuthError::SignatureReplayed));
                }
                kept.extend_from_slice(record);
            }
            if kept.len() / RECORD >= SLOT_CAPACITY {
                return Step::Done(Err(AuthError::ReplayCacheFull));
            }
            kept.extend_from_slice(&sig[..16]);
            kept.extend_from_slice(&accepted.expires_at.to_le_bytes());
            Step::Write { slot, value: kept, result: Ok(()) }
        });
        // Still contended after every retry: refuse (503) rather than risk an undetected replay.
        applied.map_or(Err(AuthError::ReplayCacheFull), |applied| applied.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeHost, NOW};

    fn accepted(n: u32, expires_at: u64) -> Accepted {
        let mut signature = [7; 32];
        signature[..4].copy_from_slice(&n.to_le_bytes());
        Accepted { signature, expires_at }
    }

    /// `count` signatures that land in one slot, as a client grinding for a slot would need.
    fn same_slot(seen: &SeenSignatures, count: usize) -> Vec<Accepted> {
        let index = |a: &Accepted| seen.store.hash(&a.signature).1 % u64::from(SLOTS);
        let target = index(&accepted(0, 0));
        (0..).map(|n| accepted(n, NOW + 300)).filter(|a| index(a) == target).take(count).collect()
    }

    #[test]
    fn a_signature_is_accepted_once_across_workers() {
        // Both "workers" see the same shared data, as Envoy's workers do.
        let mut host = FakeHost::default();
        let seen = SeenSignatures::new([1; 16]);
        let [sig, neighbour] = <[Accepted; 2]>::try_from(same_slot(&seen, 2)).unwrap();
        assert_eq!(seen.record(&mut host, &sig, NOW), Ok(()));
        assert_eq!(seen.record(&mut host, &sig, NOW + 10), Err(AuthError::SignatureReplayed));
        assert_eq!(seen.record(&mut host, &neighbour, NOW), Ok(()), "a neighbour in the slot");
    }

    #[test]
    fn expired_signatures_leave_their_slot() {
        let mut host = FakeHost::default();
        let seen = SeenSignatures::new([2; 16]);
        let sig = accepted(9, NOW + 300);
        assert_eq!(seen.record(&mut host, &sig, NOW), Ok(()));
        assert_eq!(seen.record(&mut host, &sig, NOW + 301), Ok(()), "an expired entry still blocked");
        let (slot, _) = host.shared.values().next().unwrap();
        assert_eq!(slot.len(), RECORD, "the expired entry was not pruned");
    }

    #[test]
    fn a_full_slot_refuses_rather_than_forgets() {
        let mut host = FakeHost::default();
        let seen = SeenSignatures::new([3; 16]);
        let mut signatures = same_slot(&seen, SLOT_CAPACITY + 1);
        let last = signatures.pop().unwrap();
        for sig in &signatures {
            assert_eq!(seen.record(&mut host, sig, NOW), Ok(()));
        }
        assert_eq!(seen.record(&mut host, &last, NOW), Err(AuthError::ReplayCacheFull));
        assert_eq!(host.shared.len(), 1, "one slot, whatever the number of signatures");
    }
}
