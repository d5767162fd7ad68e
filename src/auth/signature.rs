//! HMAC request signatures. `X-Signature` is the hex HMAC-SHA256, under the caller's account
//! secret, of `METHOD:path:timestamp:` and then, by scheme:
//!
//! - `content-digest` (the default): the request's RFC 9530 `Content-Digest` sha-256 value, as
//!   sent. The whole signature is checked when the headers arrive, before anything goes upstream;
//!   the body is then hashed as it streams and its end held until it matches the digest.
//! - `body`: the body itself, as the seeds' `RequestSignatureMiddleware` signs it. It can only be
//!   checked at the end of the body, and Envoy hands a filter the body only after the head went on,
//!   so the upstream sees the head of a request whose signature has not been checked yet.
//!
//! `X-Timestamp` must be near the gateway's clock, and each signature is accepted once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use hmac_sha256::{Hash, HMAC};
use serde::Deserialize;

use super::{decode_base64_any, decode_hex32, AuthError, Identity, RequestCredentials};
use crate::common::{default_true, header_name, ConfigError, Secret};

/// Signature settings. Which routes require a signature is up to the route policy.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawSignatures {
    /// The header with the hex signature.
    #[serde(default = "default_signature_header")]
    pub header: String,
    /// The header with the Unix time in seconds the client signed.
    #[serde(default = "default_timestamp_header")]
    pub timestamp_header: String,
    /// How far the timestamp may be from the gateway's clock, either way, in seconds. A signature
    /// is remembered this long to refuse its replay.
    #[serde(default = "default_max_skew_seconds")]
    pub max_skew_seconds: u64,
    /// Sign the path with its query string (`/a?b=1`). `false` signs the path alone, as the
    /// seeds' middleware does, which leaves the query open to tampering.
    #[serde(default = "default_true")]
    pub sign_query: bool,
    /// How many recent signatures each Envoy worker remembers (about 120 bytes each). When full,
    /// the one closest to expiry is forgotten: the process-wide record in shared data still
    /// refuses its replay, so this only saves the shared-data round trip.
    #[serde(default = "default_replay_cache_entries")]
    pub replay_cache_entries: usize,
    /// What the signature covers after `METHOD:path:timestamp:`.
    #[serde(default)]
    pub scheme: SignatureScheme,
    /// A secret per account; the caller must have authenticated as that account.
    pub secrets: Vec<RawSigningSecret>,
}

/// What a request signature covers besides the method, path and timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SignatureScheme {
    /// The sha-256 value of the request's `Content-Digest` header (RFC 9530), base64 as sent:
    /// checked before anything goes upstream; the body is then checked against the digest.
    #[default]
    ContentDigest,
    /// The body itself (the seeds' scheme): checkable only at the end of the body, after the
    /// request's head has reached the upstream. Only for upstreams that act on complete requests.
    Body,
}

/// How far ahead of the gateway's clock a request timestamp may be.
const MAX_FUTURE_SECONDS: u64 = 30;

/// The sha-256 of an empty body, as `Content-Digest` carries it: what a body-less request signs
/// when it sends no `Content-Digest`.
const EMPTY_SHA256: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

fn default_signature_header() -> String {
    "x-signature".to_owned()
}

fn default_timestamp_header() -> String {
    "x-timestamp".to_owned()
}

fn default_max_skew_seconds() -> u64 {
    300
}

fn default_replay_cache_entries() -> usize {
    16_384
}

/// One account's signing secret.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawSigningSecret {
    /// The account, as the caller's identity names it (API key `account`, or the JWT account claim).
    pub account: String,
    /// The HMAC key, base64; at least 32 bytes.
    pub secret: Secret,
}

const MIN_SECRET_BYTES: usize = 32;

/// Validated signature settings, each secret already keyed into an HMAC state.
pub struct Signatures {
    header: String,
    timestamp_header: String,
    max_skew_seconds: u64,
    sign_query: bool,
    replay_cache_entries: usize,
    scheme: SignatureScheme,
    /// Each account's HMAC state with the key already absorbed; cloned per request.
    secrets: HashMap<String, HMAC>,
}

impl fmt::Debug for Signatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut accounts: Vec<&String> = self.secrets.keys().collect();
        accounts.sort();
        f.debug_struct("Signatures")
            .field("header", &self.header)
            .field("timestamp_header", &self.timestamp_header)
            .field("max_skew_seconds", &self.max_skew_seconds)
            .field("accounts", &accounts)
            .finish_non_exhaustive()
    }
}

impl Signatures {
    pub(crate) fn compile(raw: &RawSignatures, path: &str) -> Result<Signatures, ConfigError> {
        let header = header_name(&raw.header, &format!("{path}.header"))?;
        let timestamp_header = header_name(&raw.timestamp_header, &format!("{path}.timestamp_header"))?;
        if header == timestamp_header {
            return Err(ConfigError::at(format!("{path}.timestamp_header"), "must differ from header"));
        }
        if raw.max_skew_seconds == 0 {
            return Err(ConfigError::at(format!("{path}.max_skew_seconds"), "must be > 0"));
        }
        if raw.replay_cache_entries == 0 {
            return Err(ConfigError::at(format!("{path}.replay_cache_entries"), "must be > 0"));
        }
        let mut secrets = HashMap::with_capacity(raw.secrets.len());
        for (i, s) in raw.secrets.iter().enumerate() {
            let at = |field: &str, message: String| ConfigError::at(format!("{path}.secrets[{i}].{field}"), message);
            if s.account.is_empty() {
                return Err(at("account", "must not be empty".to_owned()));
            }
            let key =
                decode_base64_any(s.secret.expose()).ok_or_else(|| at("secret", "not valid base64".to_owned()))?;
            if key.len() < MIN_SECRET_BYTES {
                return Err(at(
                    "secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes, this one has {}", key.len()),
                ));
            }
            if secrets.insert(s.account.clone(), HMAC::new(&key)).is_some() {
                return Err(at("account", format!("{:?} has another secret already", s.account)));
            }
        }
        Ok(Signatures {
            header,
            timestamp_header,
            max_skew_seconds: raw.max_skew_seconds,
            sign_query: raw.sign_query,
            replay_cache_entries: raw.replay_cache_entries,
            scheme: raw.scheme,
            secrets,
        })
    }

    /// An empty replay cache of the configured size, one per worker.
    pub fn replay_cache(&self) -> ReplayCache {
        ReplayCache::new(self.replay_cache_entries)
    }

    pub fn scheme(&self) -> SignatureScheme {
        self.scheme
    }

    /// The `content-digest` scheme, at request headers: checks the whole signature, and hands back
    /// what it accepted (for the replay check) and the digest the body must then have. `has_body`:
    /// the request's headers did not end the stream.
    pub fn verify_head(
        &self,
        request: &RequestCredentials,
        identity: Option<&Identity>,
        now: u64,
        has_body: bool,
    ) -> Result<(Accepted, Option<BodyDigest>), AuthError> {
        let (mut mac, signature, expires_at, account) = self.signed_head(request, identity, now)?;
        let digest = match request.single_header("content-digest", "Content-Digest header")? {
            Some(value) => sha256_member(value).ok_or(AuthError::DigestMalformed)?,
            None if has_body => return Err(AuthError::DigestMissing),
            None => EMPTY_SHA256,
        };
        let expected = decode_base64_any(digest)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or(AuthError::DigestMalformed)?;
        mac.update(digest.as_bytes());
        if !mac.finalize_verify(&signature) {
            return Err(AuthError::SignatureMismatch);
        }
        let body = BodyDigest { hash: Hash::new(), expected };
        let accepted = Accepted { signature, expires_at, account };
        if has_body {
            return Ok((accepted, Some(body)));
        }
        body.finish()?;
        Ok((accepted, None))
    }

    /// The `body` scheme, at request headers: the header-time checks; the body goes into the
    /// returned state.
    pub fn begin(
        &self,
        request: &RequestCredentials,
        identity: Option<&Identity>,
        now: u64,
    ) -> Result<PendingSignature, AuthError> {
        let (mac, signature, expires_at, account) = self.signed_head(request, identity, now)?;
        Ok(PendingSignature { mac, signature, expires_at, account })
    }

    /// Both headers present and single, the timestamp within the skew, a secret for the caller's
    /// account: the MAC with `METHOD:path:timestamp:` absorbed, the signature to compare it with,
    /// until when a replay of it would pass the timestamp check, and the account's tag.
    fn signed_head(
        &self,
        request: &RequestCredentials,
        identity: Option<&Identity>,
        now: u64,
    ) -> Result<(HMAC, [u8; 32], u64, u32), AuthError> {
        let signature = request.single_header(&self.header, "signature header")?;
        let timestamp = request.single_header(&self.timestamp_header, "timestamp header")?;
        let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
            return Err(AuthError::SignatureMissing);
        };
        let signature = decode_hex32(signature.trim()).ok_or(AuthError::SignatureMalformed)?;
        let seconds = parse_seconds(timestamp).ok_or(AuthError::TimestampMalformed)?;
        if now.abs_diff(seconds) > self.max_skew_seconds {
            return Err(AuthError::TimestampOutsideSkew { max_skew_seconds: self.max_skew_seconds });
        }
        // A timestamp ahead of the clock keeps its signature replayable for longer than the skew
        // window the replay store is sized for: only a clock a little fast is forgiven.
        if seconds > now.saturating_add(MAX_FUTURE_SECONDS) {
            return Err(AuthError::TimestampInFuture { max_seconds: MAX_FUTURE_SECONDS });
        }
        let identity = identity.ok_or(AuthError::NoSigningSecret)?;
        let mut mac = self.secrets.get(&identity.account).cloned().ok_or(AuthError::NoSigningSecret)?;
        let path = request.header(":path").unwrap_or_default();
        let path = if self.sign_query { path } else { path.split(['?', '#']).next().unwrap_or_default() };
        for part in [request.header(":method").unwrap_or_default(), path, timestamp] {
            mac.update(part.as_bytes());
            mac.update(b":");
        }
        Ok((mac, signature, seconds.saturating_add(self.max_skew_seconds), account_tag(&identity.account)))
    }
}

/// The `sha-256` member of a `Content-Digest` dictionary (RFC 9530, RFC 8941 byte sequence
/// `:base64:`), as sent. Other algorithms are ignored; two `sha-256` members are refused.
fn sha256_member(header: &str) -> Option<&str> {
    let mut found = None;
    for member in header.split(',') {
        let (key, value) = member.trim().split_once('=')?;
        if key.trim() == "sha-256" {
            let value = value.trim().strip_prefix(':')?.strip_suffix(':')?;
            if found.replace(value).is_some() {
                return None;
            }
        }
    }
    found
}

/// The digest a signed `Content-Digest` promises, checked against the body as it streams.
pub struct BodyDigest {
    hash: Hash,
    expected: [u8; 32],
}

impl BodyDigest {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hash.update(chunk);
    }

    /// The whole body has been fed.
    pub fn finish(self) -> Result<(), AuthError> {
        match self.hash.finalize() == self.expected {
            true => Ok(()),
            false => Err(AuthError::DigestMismatch),
        }
    }
}

/// What a request's body must pass before its end goes upstream.
pub enum BodyCheck {
    /// The `body` scheme's MAC over the body: the body is held until it verifies.
    Signature(PendingSignature),
    /// The `content-digest` scheme: the body goes on as it streams, its end held until it matches.
    Digest(BodyDigest),
}

impl fmt::Debug for BodyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyCheck::Signature(_) => "BodyCheck::Signature",
            BodyCheck::Digest(_) => "BodyCheck::Digest",
        })
    }
}

impl BodyCheck {
    pub fn update(&mut self, chunk: &[u8]) {
        match self {
            BodyCheck::Signature(pending) => pending.update(chunk),
            BodyCheck::Digest(digest) => digest.update(chunk),
        }
    }

    /// Whether the body may go on as it streams (only its end is held).
    pub fn streams(&self) -> bool {
        matches!(self, BodyCheck::Digest(_))
    }

    /// The whole body has been fed. A `body` signature is accepted here, once: what it accepted
    /// comes back for the check across workers.
    pub fn finish(self, replays: &mut ReplayCache, now: u64) -> Result<Option<Accepted>, AuthError> {
        match self {
            BodyCheck::Signature(pending) => pending.finish(replays, now).map(Some),
            BodyCheck::Digest(digest) => digest.finish().map(|()| None),
        }
    }
}

/// A short tag of the signing account (FNV-1a), so the replay store can keep each account to its
/// share. Accounts come from the configuration, not the client: two that collide only share a
/// share.
fn account_tag(account: &str) -> u32 {
    account.bytes().fold(0x811c_9dc5, |hash, b| (hash ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Decimal digits only: no sign, no fraction, nothing a lenient parser would guess at.
fn parse_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A signature whose headers passed, waiting for the body.
pub struct PendingSignature {
    mac: HMAC,
    signature: [u8; 32],
    /// Until when a replay of this signature would pass the timestamp check.
    expires_at: u64,
    account: u32,
}

impl fmt::Debug for PendingSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingSignature").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

impl PendingSignature {
    /// Feeds the next piece of the request body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    /// Compares in constant time, then records the signature so the same request is accepted
    /// once. Call when the whole body has been fed.
    pub fn finish(self, replays: &mut ReplayCache, now: u64) -> Result<Accepted, AuthError> {
        // `finalize_verify` compares in constant time.
        if !self.mac.finalize_verify(&self.signature) {
            return Err(AuthError::SignatureMismatch);
        }
        replays.insert(self.signature, self.expires_at, now)?;
        Ok(Accepted { signature: self.signature, expires_at: self.expires_at, account: self.account })
    }
}

/// A signature that verified and was new to this worker, for the check across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub signature: [u8; 32],
    /// Until when a replay would pass the timestamp check.
    pub expires_at: u64,
    /// The signing account's tag: its share of the replay store.
    pub account: u32,
}

/// Recently accepted signatures, each until its timestamp leaves the skew window. Bounded: it
/// never holds more than its capacity; expired entries go first, then the one closest to expiry.
/// It is a shortcut before the shared record (`replay::SeenSignatures`), which has the last word,
/// so forgetting early never lets a replay through, and a flood cannot make it refuse anyone.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    expiry_of: HashMap<[u8; 32], u64>,
    by_expiry: BinaryHeap<Reverse<(u64, [u8; 32])>>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache { capacity, expiry_of: HashMap::new(), by_expiry: BinaryHeap::new() }
    }

    pub fn len(&self) -> usize {
        self.expiry_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry_of.is_empty()
    }

    /// Records `signature` until `expires_at`; refuses one already recorded and unexpired.
    pub fn insert(&mut self, signature: [u8; 32], expires_at: u64, now: u64) -> Result<(), AuthError> {
        while let Some(Reverse((at, old))) = self.by_expiry.peek().copied() {
            if at >= now {
                break;
            }
            self.by_expiry.pop();
            self.expiry_of.remove(&old);
        }
        if self.expiry_of.contains_key(&signature) {
            return Err(AuthError::SignatureReplayed);
        }
        while self.expiry_of.len() >= self.capacity.max(1) {
            let Some(Reverse((_, old))) = self.by_expiry.pop() else { break };
            self.expiry_of.remove(&old);
        }
        self.expiry_of.insert(signature, expires_at);
        self.by_expiry.push(Reverse((expires_at, signature)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::headers;
    use super::super::AuthMethod;
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &[u8] = b"an account secret of 32+ bytes!!";

    fn signatures(extra: serde_json::Value) -> Signatures {
        use ct_codecs::{Base64, Encoder};
        let mut raw =
            serde_json::json!({"secrets": [{"account": "acme", "secret": Base64::encode_to_string(SECRET).unwrap()}]});
        if let (Some(raw), Some(extra)) = (raw.as_object_mut(), extra.as_object()) {
            raw.extend(extra.clone());
        }
        let raw: RawSignatures = serde_json::from_value(raw).unwrap();
        Signatures::compile(&raw, "auth.signatures").unwrap()
    }

    fn identity(account: &str) -> Identity {
        Identity {
            subject: "k".to_owned(),
            account: account.to_owned(),
            tier: None,
            method: AuthMethod::ApiKey,
            key_id: Some("k".to_owned()),
            scopes: Vec::new(),
            remove_upstream: Vec::new(),
        }
    }

    fn sign(message: &str) -> String {
        HMAC::mac(message.as_bytes(), SECRET).iter().map(|b| format!("{b:02x}")).collect()
    }

    struct Request {
        headers: Vec<(String, String)>,
    }

    impl Request {
        fn new(path: &str, pairs: &[(&str, &str)]) -> Request {
            let mut all = vec![(":method", "POST"), (":path", path)];
            all.extend_from_slice(pairs);
            Request { headers: headers(&all) }
        }

        fn check(
            &self,
            sigs: &Signatures,
            account: &str,
            body: &[&[u8]],
            cache: &mut ReplayCache,
            now: u64,
        ) -> Result<(), AuthError> {
            let identity = identity(account);
            let mut pending = sigs.begin(&RequestCredentials::new(&self.headers), Some(&identity), now)?;
            for chunk in body {
                pending.update(chunk);
            }
            pending.finish(cache, now).map(|_| ())
        }
    }

    #[test]
    fn signed_requests_pass_once() {
        let sigs = signatures(serde_json::json!({}));
        let mut cache = sigs.replay_cache();
        let ts = NOW.to_string();
        let good = sign(&format!("POST:/api/pay?x=1:{ts}:{{\"amount\":5}}"));
        let request = Request::new("/api/pay?x=1", &[("x-signature", &good), ("x-timestamp", &ts)]);
        assert_eq!(request.check(&sigs, "acme", &[b"{\"amount\"", b":5}"], &mut cache, NOW), Ok(()));
        assert_eq!(
            request.check(&sigs, "acme", &[b"{\"amount\":5}"], &mut cache, NOW + 10),
            Err(AuthError::SignatureReplayed)
        );
        assert_eq!(cache.len(), 1);

        let upper = good.to_uppercase();
        let request = Request::new("/api/pay?x=1", &[("x-signature", &upper), ("x-timestamp", &ts)]);
        assert_eq!(request.check(&sigs, "acme", &[b"{\"amount\":5}"], &mut sigs.replay_cache(), NOW), Ok(()));
    }

    #[test]
    #[allow(clippy::type_complexity, reason = "a table of requests reads best inline")]
    fn bad_signatures_are_refused() {
        let sigs = signatures(serde_json::json!({}));
        let ts = NOW.to_string();
        let stale_ts = (NOW - 301).to_string();
        let future_ts = (NOW + 31).to_string();
        let good = sign(&format!("POST:/api/pay:{ts}:body"));
        let stale = sign(&format!("POST:/api/pay:{stale_ts}:body"));
        let future = sign(&format!("POST:/api/pay:{future_ts}:body"));
        let skew = AuthError::TimestampOutsideSkew { max_skew_seconds: 300 };
        let fast_ts = (NOW + 30).to_string();
        let fast = sign(&format!("POST:/api/pay:{fast_ts}:body"));
        let fast_request = Request::new("/api/pay", &[("x-signature", &fast), ("x-timestamp", &fast_ts)]);
        assert_eq!(
            fast_request.check(&sigs, "acme", &[b"body"], &mut ReplayCache::new(8), NOW),
            Ok(()),
            "a clock 30 s fast"
        );
        let cases: Vec<(Vec<(&str, &str)>, &str, &[u8], AuthError)> = vec![
            (vec![("x-signature", &good), ("x-timestamp", &ts)], "acme", b"tampered", AuthError::SignatureMismatch),
            (vec![("x-signature", &stale), ("x-timestamp", &stale_ts)], "acme", b"body", skew.clone()),
            (
                vec![("x-signature", &future), ("x-timestamp", &future_ts)],
                "acme",
                b"body",
                AuthError::TimestampInFuture { max_seconds: 30 },
            ),
            (
                vec![("x-signature", &good), ("x-timestamp", &stale_ts)],
                "acme",
                b"body",
                AuthError::TimestampOutsideSkew { max_skew_seconds: 300 },
            ),
            (vec![("x-signature", &good)], "acme", b"body", AuthError::SignatureMissing),
            (vec![("x-timestamp", &ts)], "acme", b"body", AuthError::SignatureMissing),
            (vec![("x-signature", "abc"), ("x-timestamp", &ts)], "acme", b"body", AuthError::SignatureMalformed),
            (vec![("x-signature", &good), ("x-timestamp", "1.8e9")], "acme", b"body", AuthError::TimestampMalformed),
            (vec![("x-signature", &good), ("x-timestamp", "-5")], "acme", b"body", AuthError::TimestampMalformed),
            (vec![("x-signature", &good), ("x-timestamp", &ts)], "other", b"body", AuthError::NoSigningSecret),
            (
                vec![("x-signature", &good), ("x-signature", &good), ("x-timestamp", &ts)],
                "acme",
                b"body",
                AuthError::DuplicateCredential("signature header"),
            ),
        ];
        for (pairs, account, body, expected) in cases {
            let request = Request::new("/api/pay", &pairs);
            let result = request.check(&sigs, account, &[body], &mut sigs.replay_cache(), NOW);
            assert_eq!(result, Err(expected), "{pairs:?} {account}");
        }
        let request = Request::new("/api/pay", &[("x-signature", &good), ("x-timestamp", &ts)]);
        let pending = sigs.begin(&RequestCredentials::new(&request.headers), None, NOW);
        assert_eq!(pending.unwrap_err(), AuthError::NoSigningSecret);
    }

    #[test]
    fn the_query_is_signed_unless_configured_otherwise() {
        let ts = NOW.to_string();
        let path_only = sign(&format!("POST:/api/pay:{ts}:"));
        let request = Request::new("/api/pay?amount=1000", &[("x-signature", &path_only), ("x-timestamp", &ts)]);
        let sigs = signatures(serde_json::json!({}));
        assert_eq!(request.check(&sigs, "acme", &[], &mut sigs.replay_cache(), NOW), Err(AuthError::SignatureMismatch));
        let sigs = signatures(serde_json::json!({"sign_query": false}));
        assert_eq!(request.check(&sigs, "acme", &[], &mut sigs.replay_cache(), NOW), Ok(()));
    }

    #[test]
    fn the_replay_cache_forgets_expired_entries_and_stays_bounded() {
        let mut cache = ReplayCache::new(2);
        assert_eq!(cache.insert([1; 32], NOW + 10, NOW), Ok(()));
        assert_eq!(cache.insert([2; 32], NOW + 20, NOW), Ok(()));
        assert_eq!(cache.insert([1; 32], NOW + 10, NOW + 10), Err(AuthError::SignatureReplayed));
        // Entry 1 has expired at NOW + 11: room again, and 1 is no longer a replay.
        assert_eq!(cache.insert([3; 32], NOW + 30, NOW + 11), Ok(()));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.insert([1; 32], NOW + 40, NOW + 12), Ok(()));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_full_replay_cache_forgets_the_entry_closest_to_expiry_instead_of_refusing() {
        let mut cache = ReplayCache::new(2);
        assert_eq!(cache.insert([1; 32], NOW + 10, NOW), Ok(()));
        assert_eq!(cache.insert([2; 32], NOW + 20, NOW), Ok(()));
        assert_eq!(cache.insert([3; 32], NOW + 30, NOW), Ok(()), "a flood never makes it refuse");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.insert([2; 32], NOW + 20, NOW), Err(AuthError::SignatureReplayed), "the later ones stay");
        // The shared record (replay.rs) still refuses a replay of the forgotten one.
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"secrets": [{"account": "a", "secret": "c2hvcnQ="}]}),
                "auth.signatures.secrets[0].secret: must be at least 32 bytes, this one has 5",
            ),
            (
                serde_json::json!({"secrets": [{"account": "a", "secret": "***"}]}),
                "auth.signatures.secrets[0].secret: not valid base64",
            ),
            (
                serde_json::json!({"secrets": [{"account": "", "secret": "x"}]}),
                "auth.signatures.secrets[0].account: must not be empty",
            ),
            (
                serde_json::json!({"secrets": [{"account": "a", "secret": "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="}, {"account": "a", "secret": "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="}]}),
                "auth.signatures.secrets[1].account: \"a\" has another secret already",
            ),
            (
                serde_json::json!({"secrets": [], "header": "x sig"}),
                "auth.signatures.header: \"x sig\" is not a valid header name",
            ),
            (
                serde_json::json!({"secrets": [], "timestamp_header": "X-Signature"}),
                "auth.signatures.timestamp_header: must differ from header",
            ),
            (
                serde_json::json!({"secrets": [], "max_skew_seconds": 0}),
                "auth.signatures.max_skew_seconds: must be > 0",
            ),
            (
                serde_json::json!({"secrets": [], "replay_cache_entries": 0}),
                "auth.signatures.replay_cache_entries: must be > 0",
            ),
        ];
        for (raw, expected) in cases {
            let message = super::super::tests::parse(&serde_json::json!({"signatures": raw}).to_string()).unwrap_err();
            assert!(message.starts_with(expected), "{raw}\n  gave: {message}\n  want: {expected}");
        }
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let text = format!("{:?}", signatures(serde_json::json!({})));
        assert!(text.contains("acme") && !text.contains("account secret"), "{text}");
    }
}
