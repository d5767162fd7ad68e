//! A bounded cache of verified JWTs, as Envoy's `jwt_authn` keeps (`jwt_cache_config`). Clients
//! send the same token until it expires, and a signature check in wasm costs milliseconds for RSA
//! and ECDSA; a hit costs one SHA-256 of the token. Only successes are cached, keyed by the
//! token's hash (the token itself is not kept), and a hit re-checks the time window.

use std::collections::{HashMap, VecDeque};

use super::Identity;

/// What a verified token proved, and when that stops being true.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    /// `max(nbf, iat) - leeway`: earlier, the full check would refuse the token.
    pub(crate) valid_from: u64,
    /// `exp + leeway`, or never.
    pub(crate) valid_until: u64,
}

/// First in, first out: a token in steady use comes back right after eviction, and no request
/// pays for bookkeeping an LRU would need.
#[derive(Debug)]
pub(crate) struct TokenCache {
    capacity: usize,
    entries: HashMap<[u8; 32], Verified>,
    order: VecDeque<[u8; 32]>,
}

impl TokenCache {
    pub(crate) fn new(capacity: usize) -> TokenCache {
        TokenCache { capacity, entries: HashMap::new(), order: VecDeque::new() }
    }

    /// The token's hash, or `None` when caching is off and hashing would be wasted.
    pub(crate) fn key(&self, token: &str) -> Option<[u8; 32]> {
        (self.capacity > 0).then(|| hmac_sha256::Hash::hash(token.as_bytes()))
    }

    pub(crate) fn get(&self, key: &[u8; 32], now: u64) -> Option<Identity> {
        let hit = self.entries.get(key)?;
        (hit.valid_from <= now && now <= hit.valid_until).then(|| hit.identity.clone())
    }

    pub(crate) fn insert(&mut self, key: [u8; 32], verified: Verified) {
        if self.entries.insert(key, verified).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    /// After a key set changes: a token whose key was withdrawn must not live on here.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::AuthMethod;
    use super::*;

    fn verified(subject: &str, valid_from: u64, valid_until: u64) -> Verified {
        let identity = Identity {
            subject: subject.to_owned(),
            account: subject.to_owned(),
            tier: None,
            method: AuthMethod::Jwt,
            key_id: None,
            scopes: Vec::new(),
            remove_upstream: Vec::new(),
        };
        Verified { identity, valid_from, valid_until }
    }

    #[test]
    fn hits_only_inside_the_validity_window() {
        let mut cache = TokenCache::new(4);
        let key = cache.key("token").unwrap();
        cache.insert(key, verified("a", 100, 200));
        assert_eq!(cache.get(&key, 150).map(|i| i.subject), Some("a".to_owned()));
        assert!(cache.get(&key, 99).is_none());
        assert!(cache.get(&key, 201).is_none());
        assert!(cache.get(&cache.key("other").unwrap(), 150).is_none());
    }

    #[test]
    fn stays_within_capacity_oldest_out_first() {
        let mut cache = TokenCache::new(2);
        let keys: Vec<[u8; 32]> = ["a", "b", "c"].iter().map(|t| cache.key(t).unwrap()).collect();
        for (key, name) in keys.iter().zip(["a", "b", "c"]) {
            cache.insert(*key, verified(name, 0, 10));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&keys[0], 5).is_none());
        assert!(cache.get(&keys[2], 5).is_some());
        cache.clear();
        assert_eq!(cache.len(), 0);
        assert!(TokenCache::new(0).key("token").is_none());
    }
}
