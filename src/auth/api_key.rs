//! API keys: the config holds only their SHA-256 hashes. A presented key is hashed, looked up by
//! the first bytes of its hash, and the whole hash compared in constant time.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{decode_hex32, header_safe, is_scope_token, AuthError, AuthMethod, Identity};
use crate::common::{default_true, is_token_byte, ConfigError};

/// API key settings.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    /// The request header that carries the key. `Authorization: ApiKey <key>` is accepted too;
    /// a request with both is refused.
    #[serde(default = "default_header")]
    pub header: String,
    /// Keep the key in the request that goes upstream. By default it is removed.
    #[serde(default)]
    pub forward: bool,
    /// The accepted keys.
    pub keys: Vec<RawApiKey>,
}

fn default_header() -> String {
    "x-api-key".to_owned()
}

/// One API key, by the SHA-256 of the key itself (`tollgate` can generate an entry).
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// A unique, non-secret name for the key; sent upstream as the key id and the subject.
    pub id: String,
    /// Lower- or upper-case hex SHA-256 of the key (64 digits).
    pub sha256: String,
    /// The account the key's requests are rate-limited and billed to.
    pub account: String,
    /// The caller's tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// The scopes the key grants.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// When the key stops working, RFC 3339 (`2027-01-01T00:00:00Z`).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// `false` turns the key off without removing it.
    #[serde(default = "default_true")]
    pub active: bool,
}

/// The validated key table.
#[derive(Debug)]
pub struct ApiKeys {
    header: String,
    forward: bool,
    entries: Vec<Entry>,
    /// Index into `entries` by the first 8 bytes of the hash. Which bucket a key falls in says
    /// nothing useful about any stored hash; the full comparison is constant time.
    by_prefix: HashMap<[u8; 8], usize>,
}

#[derive(Debug)]
struct Entry {
    sha256: [u8; 32],
    id: String,
    account: String,
    tier: Option<String>,
    scopes: Vec<String>,
    /// Unix seconds.
    expires_at: Option<i64>,
    active: bool,
}

impl ApiKeys {
    pub(crate) fn compile(raw: &RawApiKeys, path: &str) -> Result<ApiKeys, ConfigError> {
        let header = raw.header.to_ascii_lowercase();
        if header.is_empty() || !header.bytes().all(is_token_byte) || header == "authorization" {
            return Err(ConfigError::at(
                format!("{path}.header"),
                format!("{:?} is not a usable header name (Authorization: ApiKey is always accepted)", raw.header),
            ));
        }
        let mut entries = Vec::with_capacity(raw.keys.len());
        let mut by_prefix = HashMap::with_capacity(raw.keys.len());
        let mut ids = HashMap::new();
        for (i, key) in raw.keys.iter().enumerate() {
            let at = |field: &str, message: String| ConfigError::at(format!("{path}.keys[{i}].{field}"), message);
            if !header_safe(&key.id) {
                return Err(at("id", "must be a non-empty header value".to_owned()));
            }
            if let Some(j) = ids.insert(key.id.clone(), i) {
                return Err(at("id", format!("{:?} is also the id of keys[{j}]", key.id)));
            }
            let sha256 = hash_hex(&key.sha256).map_err(|message| at("sha256", message))?;
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&sha256[..8]);
            if let Some(j) = by_prefix.insert(prefix, i) {
                return Err(at("sha256", format!("the same hash as keys[{j}]")));
            }
            if !header_safe(&key.account) {
                return Err(at("account", "must be a non-empty header value".to_owned()));
            }
            if key.tier.as_deref().is_some_and(|t| !header_safe(t)) {
                return Err(at("tier", "must be a non-empty header value".to_owned()));
            }
            let mut seen = HashSet::new();
            for (k, scope) in key.scopes.iter().enumerate() {
                if !is_scope_token(scope) || !seen.insert(scope) {
                    return Err(at(&format!("scopes[{k}]"), format!("{scope:?} is empty, repeated or has spaces")));
                }
            }
            let expires_at = match &key.expires_at {
                Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                    at("expires_at", format!("{text:?} is not an RFC 3339 date-time like 2027-01-31T00:00:00Z"))
                })?),
                None => None,
            };
            entries.push(Entry {
                sha256,
                id: key.id.clone(),
                account: key.account.clone(),
                tier: key.tier.clone(),
                scopes: key.scopes.clone(),
                expires_at,
                active: key.active,
            });
        }
        Ok(ApiKeys { header, forward: raw.forward, entries, by_prefix })
    }

    /// The lower-case name of the API key header.
    pub fn header(&self) -> &str {
        &self.header
    }

    pub fn forward(&self) -> bool {
        self.forward
    }

    /// The identity of a presented key. Errors say which check failed, never the key.
    pub fn verify(&self, key: &str, now: u64) -> Result<Identity, AuthError> {
        let digest = hmac_sha256::Hash::hash(key.as_bytes());
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&digest[..8]);
        let entry = self
            .by_prefix
            .get(&prefix)
            .and_then(|&i| self.entries.get(i))
            .filter(|e| bool::from(e.sha256.ct_eq(&digest)))
            .ok_or(AuthError::UnknownApiKey)?;
        if !entry.active {
            return Err(AuthError::ApiKeyInactive);
        }
        if entry.expires_at.is_some_and(|at| i128::from(now) >= i128::from(at)) {
            return Err(AuthError::ApiKeyExpired);
        }
        Ok(Identity {
            subject: entry.id.clone(),
            account: entry.account.clone(),
            tier: entry.tier.clone(),
            method: AuthMethod::ApiKey,
            key_id: Some(entry.id.clone()),
            scopes: entry.scopes.clone(),
            remove_upstream: Vec::new(),
        })
    }
}

fn hash_hex(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 64 {
        return Err(format!("must be 64 hex digits (a SHA-256), not {} characters", text.len()));
    }
    decode_hex32(text).ok_or_else(|| "is not valid hex".to_owned())
}

/// RFC 3339 `date-time` to Unix seconds: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`. Fractions are
/// dropped; a leap second counts as the next second.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |acc, d| d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 20 || separators.iter().any(|&(i, c)| b[i] != c) || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| {
                (a.is_ascii_digit() && b.is_ascii_digit()).then(|| i64::from((a - b'0') * 10 + (b - b'0')))
            };
            let (h, m) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset * 60)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::super::tests::{headers, parse, Fixture};
    use super::super::{CredentialLocation, RequestCredentials};
    use super::*;

    const NOW: u64 = 1_800_000_000; // 2027-01-15T08:00:00Z

    fn sha(key: &str) -> String {
        hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn auth() -> Fixture {
        let config = serde_json::json!({"api_keys": {"keys": [
            {"id": "live-1", "sha256": sha("tg_live_good"), "account": "acme", "tier": "pro", "scopes": ["read", "write"]},
            {"id": "old", "sha256": sha("tg_live_old").to_uppercase(), "account": "acme", "expires_at": "2027-01-01T00:00:00Z"},
            {"id": "off", "sha256": sha("tg_live_off"), "account": "acme", "active": false},
            {"id": "soon", "sha256": sha("tg_live_soon"), "account": "beta", "expires_at": "2027-01-15T09:00:00+01:00"},
        ]}});
        parse(&config.to_string()).unwrap()
    }

    fn run(auth: &Fixture, pairs: &[(&str, &str)]) -> Result<Option<Identity>, AuthError> {
        let mut all = vec![(":path", "/api")];
        all.extend_from_slice(pairs);
        auth.authenticate(&RequestCredentials::new(&headers(&all)), NOW)
    }

    #[test]
    fn keys_are_checked_by_hash() {
        let auth = auth();
        let id = run(&auth, &[("x-api-key", "tg_live_good")]).unwrap().unwrap();
        assert_eq!(
            (id.subject.as_str(), id.account.as_str(), id.tier.as_deref(), id.key_id.as_deref()),
            ("live-1", "acme", Some("pro"), Some("live-1"))
        );
        assert_eq!((id.method, id.scopes.clone()), (AuthMethod::ApiKey, vec!["read".to_owned(), "write".to_owned()]));
        assert_eq!(id.remove_upstream, [CredentialLocation::Header("x-api-key".to_owned())]);

        let id = run(&auth, &[("authorization", "ApiKey tg_live_good")]).unwrap().unwrap();
        assert_eq!(id.remove_upstream, [CredentialLocation::Authorization]);

        let long = "k".repeat(8193);
        let cases: &[(&[(&str, &str)], AuthError)] = &[
            (&[("x-api-key", "tg_live_wrong")], AuthError::UnknownApiKey),
            (&[("x-api-key", "")], AuthError::UnknownApiKey),
            (&[("x-api-key", "tg_live_old")], AuthError::ApiKeyExpired),
            (&[("x-api-key", "tg_live_soon")], AuthError::ApiKeyExpired),
            (&[("x-api-key", "tg_live_off")], AuthError::ApiKeyInactive),
            (&[("x-api-key", &long)], AuthError::CredentialTooLarge { limit: 8192 }),
            (
                &[("x-api-key", "tg_live_good"), ("x-api-key", "tg_live_good")],
                AuthError::DuplicateCredential("API key header"),
            ),
            (
                &[("x-api-key", "tg_live_good"), ("authorization", "ApiKey tg_live_good")],
                AuthError::DuplicateCredential("API key (header and Authorization)"),
            ),
            (
                &[("authorization", "ApiKey tg_live_good"), ("authorization", "ApiKey tg_live_good")],
                AuthError::DuplicateCredential("Authorization header"),
            ),
        ];
        for (pairs, expected) in cases {
            let result = run(&auth, pairs);
            assert_eq!(result.as_ref(), Err(expected), "{pairs:?}");
            let message = result.unwrap_err().to_string();
            assert!(!message.contains("tg_live"), "{message}");
        }
        assert_eq!(run(&auth, &[]), Ok(None));
    }

    #[test]
    fn a_jwt_wins_over_an_api_key() {
        let secret = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY";
        let config = serde_json::json!({
            "jwt": {"providers": [{"audiences": "any", "secrets": [{"secret": secret}]}]},
            "api_keys": {"keys": [{"id": "live-1", "sha256": sha("tg_live_good"), "account": "acme"}]},
        });
        let auth = parse(&config.to_string()).unwrap();
        let key = jwt_simple::prelude::HS256Key::from_bytes(b"0123456789abcdef0123456789abcdef");
        let claims =
            jwt_simple::prelude::Claims::create(jwt_simple::prelude::Duration::from_hours(1)).with_subject("jwt-user");
        let token = jwt_simple::prelude::MACLike::authenticate(&key, claims).unwrap();
        let now = jwt_simple::prelude::Clock::now_since_epoch().as_secs();
        let h =
            headers(&[(":path", "/"), ("authorization", &format!("Bearer {token}")), ("x-api-key", "tg_live_wrong")]);
        let id = auth.authenticate(&RequestCredentials::new(&h), now).unwrap().unwrap();
        assert_eq!((id.method, id.subject.as_str()), (AuthMethod::Jwt, "jwt-user"));
        // Both credentials are kept from the upstream.
        assert_eq!(
            id.remove_upstream,
            [CredentialLocation::Authorization, CredentialLocation::Header("x-api-key".to_owned())]
        );
        // A bad JWT is not rescued by a good API key.
        let h = headers(&[(":path", "/"), ("authorization", "Bearer x.y.z"), ("x-api-key", "tg_live_good")]);
        assert_eq!(auth.authenticate(&RequestCredentials::new(&h), now), Err(AuthError::MalformedToken));
    }

    #[test]
    fn config_errors_name_the_field() {
        let good = sha("k");
        let key = |extra: serde_json::Value| {
            let mut k = serde_json::json!({"id": "a", "sha256": good, "account": "acme"});
            if let (Some(k), Some(extra)) = (k.as_object_mut(), extra.as_object()) {
                k.extend(extra.clone());
            }
            k
        };
        let cases = [
            (
                serde_json::json!([key(serde_json::json!({"sha256": "abc"}))]),
                "auth.api_keys.keys[0].sha256: must be 64 hex digits (a SHA-256), not 3 characters",
            ),
            (
                serde_json::json!([key(serde_json::json!({"sha256": "g".repeat(64)}))]),
                "auth.api_keys.keys[0].sha256: is not valid hex",
            ),
            (
                serde_json::json!([key(serde_json::json!({})), key(serde_json::json!({"id": "b"}))]),
                "auth.api_keys.keys[1].sha256: the same hash as keys[0]",
            ),
            (
                serde_json::json!([key(serde_json::json!({})), key(serde_json::json!({"sha256": sha("other")}))]),
                "auth.api_keys.keys[1].id: \"a\" is also the id of keys[0]",
            ),
            (
                serde_json::json!([key(serde_json::json!({"id": ""}))]),
                "auth.api_keys.keys[0].id: must be a non-empty header value",
            ),
            (
                serde_json::json!([key(serde_json::json!({"account": "a\nb"}))]),
                "auth.api_keys.keys[0].account: must be a non-empty header value",
            ),
            (
                serde_json::json!([key(serde_json::json!({"scopes": ["read", "read"]}))]),
                "auth.api_keys.keys[0].scopes[1]: \"read\" is empty, repeated or has spaces",
            ),
            (
                serde_json::json!([key(serde_json::json!({"expires_at": "2027-02-30T00:00:00Z"}))]),
                "auth.api_keys.keys[0].expires_at: \"2027-02-30T00:00:00Z\" is not an RFC 3339",
            ),
            (
                serde_json::json!([key(serde_json::json!({"active": "yes"}))]),
                "auth.api_keys.keys[0].active: invalid type: string",
            ),
            (
                serde_json::json!([key(serde_json::json!({"key": "plain"}))]),
                "auth.api_keys.keys[0].key: unknown field `key`",
            ),
        ];
        for (keys, expected) in cases {
            let config = serde_json::json!({"api_keys": {"keys": keys}});
            let message = parse(&config.to_string()).unwrap_err();
            assert!(message.starts_with(expected), "{config}\n  gave: {message}\n  want: {expected}");
        }
        let message = parse(r#"{"api_keys": {"header": "Authorization", "keys": []}}"#).unwrap_err();
        assert!(
            message.starts_with("auth.api_keys.header: \"Authorization\" is not a usable header name"),
            "{message}"
        );
    }

    #[test]
    fn rfc3339_dates() {
        let cases = [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2027-01-15T08:00:00Z", Some(1_800_000_000)),
            ("2027-01-15T09:00:00+01:00", Some(1_800_000_000)),
            ("2027-01-15t03:30:00.123-04:30", Some(1_800_000_000)),
            ("2024-02-29T00:00:00Z", Some(1_709_164_800)),
            ("1969-12-31T23:59:59Z", Some(-1)),
            ("2023-02-29T00:00:00Z", None),
            ("2027-01-15T08:00:00", None),
            ("2027-01-15", None),
            ("2027-1-15T08:00:00Z", None),
            ("2027-01-15T24:00:00Z", None),
            ("2027-01-15T08:00:00.Z", None),
            ("2027-01-15T08:00:00+0100", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_rfc3339(text), expected, "{text}");
        }
    }
}
