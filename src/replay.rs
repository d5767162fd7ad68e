//! Refuses a request signature replayed to another Envoy worker: each worker remembers what it
//! accepted (`auth::ReplayCache`), and every accepted signature is also recorded in Envoy's
//! shared data, which all workers of the VM see.
//!
//! Shared-data entries cannot be deleted, so the store is a fixed set of slots (a `SlotStore`): a
//! signature's keyed hash picks one of `SLOTS` entries, each holding the unexpired signatures of
//! its slot (12-byte prefix, the signing account's tag and expiry, 24 bytes each), pruned on every
//! write. Memory is at most `SLOTS × (SLOT_CAPACITY × 24 + ~90)` bytes (about 6.5 MB; Envoy keeps
//! ~90 bytes per key) whatever the traffic.
//!
//! Each account may hold at most `ACCOUNT_SHARE` records of a slot: an account that signs faster
//! than its share drains gets 503 for its own requests (rather than risk an undetected replay),
//! and every other account still finds room in every slot.

use crate::auth::{Accepted, AuthError};
use crate::host::Host;
use crate::slots::{SlotStore, Step};

const SLOTS: u32 = 4096;
const SLOT_CAPACITY: usize = 64;
/// A quarter of a slot: at least three other accounts always fit beside a flooding one. An
/// account still has 4096 × 16 records, about 100 signed requests a second over a 10-minute window.
const ACCOUNT_SHARE: usize = SLOT_CAPACITY / 4;
const RECORD: usize = 24;
/// How much of the signature a record keeps: 96 bits leave no room for an accidental match.
const PREFIX: usize = 12;

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
        let tag = accepted.account.to_le_bytes();
        let applied = self.store.update(host, |host| {
            let slot = self.store.read(host, index);
            let mut kept = Vec::with_capacity(slot.value.len() + RECORD);
            let mut own = 0;
            for record in slot.value.chunks_exact(RECORD) {
                let (prefix, rest) = record.split_at(PREFIX);
                let (account, expiry) = rest.split_at(4);
                let expires_at = u64::from_le_bytes(expiry.try_into().unwrap_or_default());
                if expires_at < now {
                    continue;
                }
                if prefix == &sig[..PREFIX] {
                    return Step::Done(Err(AuthError::SignatureReplayed));
                }
                own += usize::from(account == tag);
                kept.extend_from_slice(record);
            }
            if own >= ACCOUNT_SHARE || kept.len() / RECORD >= SLOT_CAPACITY {
                return Step::Done(Err(AuthError::ReplayCacheFull));
            }
            kept.extend_from_slice(&sig[..PREFIX]);
            kept.extend_from_slice(&tag);
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
        Accepted { signature, expires_at, account: n % 5 }
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
        for (n, sig) in signatures.iter().enumerate() {
            let one_account = Accepted { account: n as u32 % 4, ..*sig };
            assert_eq!(seen.record(&mut host, &one_account, NOW), Ok(()));
        }
        assert_eq!(seen.record(&mut host, &last, NOW), Err(AuthError::ReplayCacheFull));
        assert_eq!(host.shared.len(), 1, "one slot, whatever the number of signatures");
    }

    #[test]
    fn one_account_fills_only_its_share_of_a_slot() {
        let mut host = FakeHost::default();
        let seen = SeenSignatures::new([4; 16]);
        let signatures = same_slot(&seen, ACCOUNT_SHARE + 2);
        let flooder = |sig: &Accepted| Accepted { account: 1, ..*sig };
        for sig in &signatures[..ACCOUNT_SHARE] {
            assert_eq!(seen.record(&mut host, &flooder(sig), NOW), Ok(()));
        }
        let over = flooder(&signatures[ACCOUNT_SHARE]);
        assert_eq!(seen.record(&mut host, &over, NOW), Err(AuthError::ReplayCacheFull), "its own requests wait");
        let other = Accepted { account: 2, ..signatures[ACCOUNT_SHARE + 1] };
        assert_eq!(seen.record(&mut host, &other, NOW), Ok(()), "another account is not blocked");
    }
}
