//! Refuses a request signature replayed to another Envoy worker: each worker remembers what it
//! accepted (`auth::ReplayCache`), and every accepted signature is also recorded in Envoy's
//! shared data, which all workers of the VM see.
//!
//! Shared-data entries cannot be deleted, so the store is a fixed set of slots: a signature's
//! first bytes pick one of `SLOTS` entries, each holding the unexpired signatures of its slot
//! (16-byte prefix and expiry, 24 bytes each), pruned on every write. Memory is at most
//! `SLOTS × SLOT_CAPACITY × 24` bytes (6 MiB) whatever the traffic; a slot that is full of
//! unexpired signatures answers 503 rather than risk an undetected replay.

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
