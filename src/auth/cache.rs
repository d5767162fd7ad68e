//! A bounded cache of verified JWTs, as Envoy's `jwt_authn` keeps (`jwt_cache_config`). Clients
//! send the same token until it expires, and a signature check in wasm costs milliseconds for RSA
//! and ECDSA. Only successes are cached, keyed by the token itself as `jwt_authn` keys them: a hit
//! costs one SipHash (randomly keyed per VM, so clients cannot collide entries on purpose) and one
//! comparison, where a SHA-256 of the token cost as much as verifying an HS256 signature. A hit
//! re-checks the time window.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use super::{AuthError, Identity};

/// What a verified token proved, and when that stops being true.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    /// `max(nbf, iat) - leeway`: earlier, the full check would refuse the token.
    pub(crate) valid_from: u64,
    /// `exp + leeway`, or never.
    pub(crate) valid_until: u64,
}

/// Tokens and what is known of each, at most `capacity`, first in first out: a token in steady
/// use comes back right after eviction, and no request pays for bookkeeping an LRU would need.
#[derive(Debug)]
struct Bounded<V> {
    capacity: usize,
    entries: HashMap<Rc<str>, V>,
    order: VecDeque<Rc<str>>,
}

impl<V> Bounded<V> {
    fn new(capacity: usize) -> Bounded<V> {
        Bounded { capacity, entries: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&self, token: &str) -> Option<&V> {
        self.entries.get(token)
    }

    fn insert(&mut self, token: &str, value: V) {
        if self.capacity == 0 {
            return;
        }
        if let Some(entry) = self.entries.get_mut(token) {
            *entry = value;
            return;
        }
        let token: Rc<str> = token.into();
        self.entries.insert(Rc::clone(&token), value);
        self.order.push_back(token);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }
}

#[derive(Debug)]
pub(crate) struct TokenCache(Bounded<Verified>);

impl TokenCache {
    pub(crate) fn new(capacity: usize) -> TokenCache {
        TokenCache(Bounded::new(capacity))
    }

    pub(crate) fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let hit = self.0.get(token)?;
        (hit.valid_from <= now && now <= hit.valid_until).then(|| hit.identity.clone())
    }

    pub(crate) fn insert(&mut self, token: &str, verified: Verified) {
        self.0.insert(token, verified);
    }

    /// After a key set changes: a token whose key was withdrawn must not live on here.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.entries.len()
    }
}

/// Tokens that failed, and why, for a short while: a client that replays one bad token (or a
/// flood of copies of it) pays for its signature check once per `seconds`, not once per request.
/// Same bounded first-in-first-out shape as `TokenCache`, so memory is fixed whatever is sent.
#[derive(Debug)]
pub(crate) struct FailedTokens {
    seconds: u64,
    /// The refusal, and the span (seconds) it answers for: from its check to `seconds` later.
    entries: Bounded<(AuthError, u64, u64)>,
    /// Refusals answered from here since the pipeline last took the count, for its metric.
    hits: Cell<u64>,
}

impl FailedTokens {
    pub(crate) fn new(capacity: usize, seconds: u64) -> FailedTokens {
        FailedTokens { seconds, entries: Bounded::new(capacity), hits: Cell::new(0) }
    }

    pub(crate) fn get(&self, token: &str, now: u64) -> Option<AuthError> {
        let (error, from, until) = self.entries.get(token)?;
        let hit = *from <= now && now < *until;
        self.hits.set(self.hits.get() + u64::from(hit));
        hit.then(|| error.clone())
    }

    /// The refusals answered from here since the last call.
    pub(crate) fn take_hits(&self) -> u64 {
        self.hits.take()
    }

    /// Remembers `error` for `token` if it is an answer that stays true: a token that is only
    /// early, or whose key has not loaded, may pass a moment later.
    pub(crate) fn insert(&mut self, token: &str, error: &AuthError, now: u64) {
        use AuthError::*;
        let lasting = matches!(
            error,
            MalformedToken
                | UnsupportedAlgorithm
                | AlgorithmMismatch
                | BadSignature
                | Expired
                | WrongIssuer
                | WrongAudience
                | MissingClaim(_)
                | InvalidClaim(_)
                | Revoked
                | KeyIdRequired { .. }
        );
        if self.seconds == 0 || !lasting {
            return;
        }
        self.entries.insert(token, (error.clone(), now, now.saturating_add(self.seconds)));
    }

    /// After a key set or revocation list changes, a refused token may now pass.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
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
        cache.insert("token", verified("a", 100, 200));
        assert_eq!(cache.get("token", 150).map(|i| i.subject), Some("a".to_owned()));
        assert!(cache.get("token", 99).is_none());
        assert!(cache.get("token", 201).is_none());
        assert!(cache.get("other", 150).is_none());
        assert!(cache.get("toke", 150).is_none(), "only the whole token hits");
    }

    #[test]
    fn stays_within_capacity_oldest_out_first() {
        let mut cache = TokenCache::new(2);
        for name in ["a", "b", "c"] {
            cache.insert(name, verified(name, 0, 10));
        }
        cache.insert("c", verified("c", 0, 20));
        assert_eq!(cache.len(), 2, "a repeated token takes no second place");
        assert!(cache.get("a", 5).is_none());
        assert!(cache.get("b", 5).is_some());
        assert!(cache.get("c", 15).is_some(), "the newer verification replaces the older");
        cache.clear();
        assert_eq!(cache.len(), 0);
        let mut off = TokenCache::new(0);
        off.insert("token", verified("a", 0, 10));
        assert_eq!(off.len(), 0);
    }

    #[test]
    fn a_failed_token_is_refused_unchecked_for_a_while_and_only_for_lasting_reasons() {
        let mut failed = FailedTokens::new(2, 30);
        failed.insert("bad", &AuthError::BadSignature, 100);
        failed.insert("early", &AuthError::NotYetValid, 100);
        failed.insert("no-keys", &AuthError::KeysUnavailable { provider: 0 }, 100);
        assert_eq!(failed.get("bad", 129), Some(AuthError::BadSignature));
        assert_eq!(failed.get("bad", 130), None, "remembered briefly");
        assert_eq!(failed.get("bad", 99), None, "and not before it was checked");
        assert_eq!(failed.get("early", 100), None, "a token that is only early may pass soon");
        assert_eq!(failed.get("no-keys", 100), None);
        for token in ["a", "b", "c"] {
            failed.insert(token, &AuthError::Expired, 100);
        }
        assert_eq!((failed.get("a", 100), failed.entries.entries.len()), (None, 2), "bounded, oldest out first");
        failed.clear();
        assert_eq!(failed.get("c", 100), None);
    }
}
