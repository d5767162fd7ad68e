//! Refuses a request signature replayed to another Envoy worker: each worker remembers what it
//! accepted (`auth::ReplayCache`), and every accepted signature is also recorded in Envoy's
//! shared data, which all workers of the VM see.
//!
//! Shared-data entries cannot be deleted, so the store is a fixed set of slots: a signature's
//! first bytes pick one of `SLOTS` entries, each holding the unexpired signatures of its slot
//! (16-byte prefix and expiry, 24 bytes each), pruned on every write. Memory is at most
//! `SLOTS × (SLOT_CAPACITY × 24 + ~90)` bytes (about 6.5 MB; Envoy keeps ~90 bytes per key)
//! whatever the traffic; a slot full of unexpired signatures answers 503 rather than risk an
//! undetected replay.

use crate::auth::{Accepted, AuthError};
use crate::host::Host;

const SLOTS: usize = 4096;
const SLOT_CAPACITY: usize = 64;
const RECORD: usize = 24;
/// Writers race only on one slot, and briefly; past this many lost races, refuse (503).
const MAX_ATTEMPTS: usize = 16;

pub fn record(host: &mut dyn Host, accepted: &Accepted, now: u64) -> Result<(), AuthError> {
    let sig = &accepted.signature;
    let slot = (usize::from(sig[0]) << 8 | usize::from(sig[1])) % SLOTS;
    let key = format!("tollgate.sig.{slot}");
    for _ in 0..MAX_ATTEMPTS {
        let (current, version) = match host.shared_get(&key) {
            Some((value, version)) => (value, Some(version)),
            None => (Vec::new(), None),
        };
        let mut kept = Vec::with_capacity(current.len() + RECORD);
        for record in current.chunks_exact(RECORD) {
            let (prefix, expiry) = record.split_at(16);
            let expires_at = u64::from_le_bytes(expiry.try_into().unwrap_or_default());
            if expires_at < now {
                continue;
            }
            if prefix == &sig[..16] {
                return Err(AuthError::SignatureReplayed);
            }
            kept.extend_from_slice(record);
        }
        if kept.len() / RECORD >= SLOT_CAPACITY {
            return Err(AuthError::ReplayCacheFull);
        }
        kept.extend_from_slice(&sig[..16]);
        kept.extend_from_slice(&accepted.expires_at.to_le_bytes());
        if host.shared_swap(&key, &kept, version) {
            return Ok(());
        }
    }
    Err(AuthError::ReplayCacheFull)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeHost, NOW};

    fn accepted(first: u8, second: u8, tail: u8, expires_at: u64) -> Accepted {
        let mut signature = [tail; 32];
        signature[0] = first;
        signature[1] = second;
        Accepted { signature, expires_at }
    }

    #[test]
    fn a_signature_is_accepted_once_across_workers() {
        // Both "workers" see the same shared data, as Envoy's workers do.
        let mut host = FakeHost::default();
        let sig = accepted(1, 2, 3, NOW + 300);
        assert_eq!(record(&mut host, &sig, NOW), Ok(()));
        assert_eq!(record(&mut host, &sig, NOW + 10), Err(AuthError::SignatureReplayed));
        assert_eq!(record(&mut host, &accepted(1, 2, 4, NOW + 300), NOW), Ok(()), "a neighbour in the slot");
    }

    #[test]
    fn expired_signatures_leave_their_slot() {
        let mut host = FakeHost::default();
        let sig = accepted(9, 9, 9, NOW + 300);
        assert_eq!(record(&mut host, &sig, NOW), Ok(()));
        assert_eq!(record(&mut host, &sig, NOW + 301), Ok(()), "an expired entry still blocked");
        let (slot, _) = host.shared.values().next().unwrap();
        assert_eq!(slot.len(), RECORD, "the expired entry was not pruned");
    }

    #[test]
    fn a_full_slot_refuses_rather_than_forgets() {
        let mut host = FakeHost::default();
        for tail in 0..u8::try_from(SLOT_CAPACITY).unwrap() {
            assert_eq!(record(&mut host, &accepted(5, 5, tail, NOW + 300), NOW), Ok(()));
        }
        assert_eq!(record(&mut host, &accepted(5, 5, 200, NOW + 300), NOW), Err(AuthError::ReplayCacheFull));
        assert_eq!(host.shared.len(), 1, "one slot, whatever the number of signatures");
    }
}
