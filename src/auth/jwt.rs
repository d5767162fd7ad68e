//! JWT bearer tokens: providers (issuers) with their keys and token sources, and the checks a
//! token passes before its claims become an `Identity`.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use jwt_simple::prelude::{Duration, UnixTimeStamp, VerificationOptions};
use jwt_simple::JWTError;
use serde::Deserialize;
use serde_json::Value;

use super::cache::{FailedTokens, TokenCache, Verified};
use super::jwks::{self, Algorithm, Claims, Key, KeySet, RawJwks};
use super::{
    decode_base64_any, decode_base64url, header_safe, is_scope_token, AuthError, AuthMethod, CredentialLocation,
    Identity, RequestCredentials,
};
use crate::common::{default_true, is_token_byte, ConfigError, Secret};

/// JWT settings.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Token issuers. With several, a token goes to the provider whose `issuer` equals its `iss`
    /// (or else to the one provider without `issuer`).
    pub providers: Vec<RawProvider>,
    /// Verified tokens remembered per provider and Envoy worker, so a client that reuses its
    /// token pays for the signature check once. 0 turns the cache off.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Refused tokens remembered per provider and Envoy worker, with why, so a token sent again
    /// is refused without another signature check. 0 turns this off.
    #[serde(default = "default_cache_entries")]
    pub failed_cache_entries: usize,
    /// How long a refused token is remembered, in seconds (at most 3600).
    #[serde(default = "default_failed_cache_seconds")]
    pub failed_cache_seconds: u64,
    /// The most keys a token without `kid` is tried against; with more keys of its algorithm it
    /// is refused unchecked (401), so one token cannot cost a verification per key.
    #[serde(default = "default_max_keys_without_kid")]
    pub max_keys_without_kid: usize,
}

fn default_cache_entries() -> usize {
    1024
}
fn default_failed_cache_seconds() -> u64 {
    30
}
fn default_max_keys_without_kid() -> usize {
    4
}

/// One token issuer: its keys, what its tokens must say, and how claims map to the identity.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// The exact `iss` tokens must carry. Omitted: `iss` is not checked (allowed for one
    /// provider only).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values; a token must name at least one. Required: a token the same issuer
    /// minted for another of its clients must not pass. `"any"` accepts every audience.
    #[serde(default)]
    pub audiences: Option<RawAudiences>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (at most 3600).
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
    /// Claims every token must carry. By default `exp`: a token that never expires is refused.
    #[serde(default = "default_required_claims")]
    pub required_claims: Vec<String>,
    /// Where the token is read from.
    #[serde(default)]
    pub sources: RawTokenSources,
    /// Inline public (or `oct`) keys, as a JWK Set.
    #[serde(default)]
    pub jwks: Option<RawJwks>,
    /// HMAC secrets, base64.
    #[serde(default)]
    pub secrets: Vec<RawHmacSecret>,
    /// A JWKS the filter fetches through an Envoy cluster, at start and then periodically.
    #[serde(default)]
    pub remote_jwks: Option<RawRemoteJwks>,
    /// Which claims become the identity.
    #[serde(default)]
    pub claims: RawClaimMapping,
    /// A list of revoked `jti` values fetched like `remote_jwks` (a JSON array of strings, or
    /// `{"revoked_jti": [...]}`), refreshed the same way and added to `revoked_jti`. Until it
    /// first loads, this provider's tokens get 503: the gateway cannot tell which are revoked.
    #[serde(default)]
    pub revoked_jti_remote: Option<RawRemoteJwks>,
    /// `jti` values that are refused even when the token is otherwise valid.
    #[serde(default)]
    pub revoked_jti: Vec<String>,
    /// Keep the token in the request that goes upstream. By default it is removed, as Envoy's
    /// `jwt_authn` does.
    #[serde(default)]
    pub forward: bool,
    /// Put before every account this provider's tokens name, so that accounts from different
    /// sources (another provider, the API keys) never share a budget or a balance by having the
    /// same name. `""` shares the namespace on purpose. Omitted: nothing when this provider is
    /// the only source of accounts, else the issuer without its scheme and a `:`
    /// (`https://auth.example.com/` → `auth.example.com:`), or `jwt:` without an issuer.
    #[serde(default)]
    pub account_prefix: Option<String>,
}

fn default_leeway_seconds() -> u64 {
    60
}

const MAX_LEEWAY_SECONDS: u64 = 3600;

/// Where a provider's token may come from, tried in this order.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawTokenSources {
    /// `Authorization: Bearer <token>`.
    #[serde(default = "default_true")]
    pub authorization: bool,
    /// A cookie name, e.g. `access_token`.
    #[serde(default)]
    pub cookie: Option<String>,
    /// A query parameter name, e.g. `token`, for clients such as browsers' WebSocket that cannot
    /// set headers.
    #[serde(default)]
    pub query: Option<String>,
}

impl Default for RawTokenSources {
    fn default() -> Self {
        RawTokenSources { authorization: true, cookie: None, query: None }
    }
}

/// An HMAC algorithm for a shared secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
pub enum RawHmacAlgorithm {
    #[default]
    HS256,
    HS384,
    HS512,
}

/// A shared HMAC secret.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawHmacSecret {
    /// Key id, matched against a token's `kid` header.
    #[serde(default)]
    pub kid: Option<String>,
    /// The one algorithm this secret verifies.
    #[serde(default)]
    pub alg: RawHmacAlgorithm,
    /// The secret, base64 (standard or URL-safe alphabet, padding optional); at least as many
    /// bytes as the hash output (32 for HS256).
    pub secret: Secret,
}

/// A JWKS served over HTTP through an Envoy cluster.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRemoteJwks {
    /// The Envoy cluster that reaches the JWKS server.
    pub cluster: String,
    /// The request path, e.g. `/.well-known/jwks.json`.
    pub path: String,
    /// The `:authority` of the request. Omitted: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// How often the key set is fetched again, in seconds.
    #[serde(default = "default_refresh_seconds")]
    pub refresh_seconds: u64,
    /// How long a fetch may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_refresh_seconds() -> u64 {
    600
}

fn default_timeout_ms() -> u64 {
    5000
}

/// Which claims become the identity. Each names a claim of the token.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawClaimMapping {
    /// The subject; tokens without it are refused.
    #[serde(default = "default_subject_claim")]
    pub subject: String,
    /// The account that is rate-limited and billed; tokens without it are refused. Omitted: the
    /// subject is the account.
    #[serde(default)]
    pub account: Option<String>,
    /// The caller's tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// The tier of tokens that carry no tier claim.
    #[serde(default)]
    pub default_tier: Option<String>,
    /// Scope claims, the first present one wins: a space-separated string (`scope`) or an array
    /// of strings (`scp`).
    #[serde(default = "default_scope_claims")]
    pub scopes: Vec<String>,
}

impl Default for RawClaimMapping {
    fn default() -> Self {
        RawClaimMapping {
            subject: default_subject_claim(),
            account: None,
            tier: None,
            default_tier: None,
            scopes: default_scope_claims(),
        }
    }
}

fn default_subject_claim() -> String {
    "sub".to_owned()
}

fn default_scope_claims() -> Vec<String> {
    vec!["scope".to_owned(), "scp".to_owned()]
}

/// Where a provider reads its token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenSources {
    authorization: bool,
    cookie: Option<String>,
    query: Option<String>,
}

/// A remote JWKS the glue fetches for a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_seconds: u64,
    pub timeout_ms: u64,
}

#[derive(Debug)]
struct ClaimMapping {
    subject: String,
    account: Option<String>,
    tier: Option<String>,
    default_tier: Option<String>,
    scopes: Vec<String>,
}

/// A validated provider, as immutable as the rest of the config: what a worker fetches and caches
/// for it lives in a `ProviderState`.
pub struct Provider {
    issuer: Option<String>,
    audiences: Option<HashSet<String>>,
    leeway_seconds: u64,
    required_claims: Vec<String>,
    sources: TokenSources,
    keys: KeySet,
    remote: Option<RemoteJwks>,
    revocation: Option<RemoteJwks>,
    claims: ClaimMapping,
    revoked_jti: HashSet<String>,
    forward: bool,
    account_prefix: String,
    cache_entries: usize,
    failed_cache_entries: usize,
    failed_cache_seconds: u64,
    max_keys_without_kid: usize,
}

/// What one worker learns about a provider while it runs: the remote key set and revocation list
/// it fetched last, and the tokens it verified. The glue installs each fetched document, and the
/// requests of this worker see it at once.
pub struct ProviderState {
    /// `Cell`s rather than `RefCell`s: reading can never fail or panic.
    remote_keys: Cell<Option<Rc<KeySet>>>,
    remote_revoked: Cell<Option<Rc<HashSet<String>>>>,
    /// Only `try_borrow*` is used, so a busy cache is skipped rather than a panic.
    cache: RefCell<TokenCache>,
    /// Same discipline as `cache`.
    failed: RefCell<FailedTokens>,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("sources", &self.sources)
            .field("keys", &self.keys)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// What loading a fetched JWKS did, for the glue's log.
#[derive(Debug)]
pub struct JwksReport {
    pub keys: usize,
    /// Keys of the document that were left out, with why.
    pub skipped: Vec<ConfigError>,
}

impl Provider {
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    pub fn remote_jwks(&self) -> Option<&RemoteJwks> {
        self.remote.as_ref()
    }

    /// Where this provider's revocation list is fetched from, if it has one.
    pub fn revocation_source(&self) -> Option<&RemoteJwks> {
        self.revocation.as_ref()
    }
}

impl ProviderState {
    pub fn new(provider: &Provider) -> ProviderState {
        ProviderState {
            remote_keys: Cell::new(None),
            remote_revoked: Cell::new(None),
            cache: RefCell::new(TokenCache::new(provider.cache_entries)),
            failed: RefCell::new(FailedTokens::new(provider.failed_cache_entries, provider.failed_cache_seconds)),
        }
    }

    /// Whether a remote key set has loaded at least once.
    #[cfg(test)]
    pub fn has_remote_keys(&self) -> bool {
        self.remote_key_set().is_some()
    }

    /// Turns a fetched JWKS body into this provider's remote key set. On error the previous set
    /// stays in use: a broken or unreachable JWKS server must not lock every caller out.
    pub fn load_remote_jwks(&self, body: &[u8]) -> Result<JwksReport, ConfigError> {
        let load = jwks::parse_remote_jwks(body)?;
        let report = JwksReport { keys: load.keys.len(), skipped: load.skipped };
        self.remote_keys.set(Some(Rc::new(load.keys)));
        self.clear_caches();
        Ok(report)
    }

    /// Installs a fetched revocation list; on error the previous list stays in use.
    pub fn load_revoked_jti(&self, body: &[u8]) -> Result<usize, ConfigError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Document {
            List(Vec<String>),
            Object { revoked_jti: Vec<String> },
        }
        let list = match serde_json::from_slice(body) {
            Ok(Document::List(list) | Document::Object { revoked_jti: list }) => list,
            Err(err) => return Err(ConfigError::at("revoked_jti_remote", format!("not a list of jti values: {err}"))),
        };
        let count = list.len();
        self.remote_revoked.set(Some(Rc::new(list.into_iter().collect())));
        // A cached token may have just been revoked, or a refused one restored.
        self.clear_caches();
        Ok(count)
    }

    /// Tokens refused from memory since the last call, for the metric.
    pub fn take_remembered_refusals(&self) -> u64 {
        self.failed.try_borrow().map_or(0, |failed| failed.take_hits())
    }

    fn clear_caches(&self) {
        if let Ok(mut cache) = self.cache.try_borrow_mut() {
            cache.clear();
        }
        if let Ok(mut failed) = self.failed.try_borrow_mut() {
            failed.clear();
        }
    }

    fn remote_revoked_set(&self) -> Option<Rc<HashSet<String>>> {
        let set = self.remote_revoked.take();
        self.remote_revoked.set(set.clone());
        set
    }

    fn remote_key_set(&self) -> Option<Rc<KeySet>> {
        let keys = self.remote_keys.take();
        self.remote_keys.set(keys.clone());
        keys
    }
}

/// `audiences`: a list, or `"any"` to say on purpose that the audience is not checked.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum RawAudiences {
    List(Vec<String>),
    Any(AnyAudience),
}

/// The one word `"any"`.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
pub enum AnyAudience {
    #[serde(rename = "any")]
    Any,
}

fn default_required_claims() -> Vec<String> {
    vec!["exp".to_owned()]
}

/// `api_keys`: whether API keys name accounts too, so each provider's accounts need a prefix of
/// their own unless the config says otherwise.
pub(crate) fn compile_providers(raw: &RawJwt, path: &str, api_keys: bool) -> Result<Vec<Provider>, ConfigError> {
    let shared = api_keys || raw.providers.len() > 1;
    if raw.providers.is_empty() {
        return Err(ConfigError::at(format!("{path}.providers"), "must list at least one provider, or omit jwt"));
    }
    if raw.failed_cache_seconds > MAX_LEEWAY_SECONDS {
        return Err(ConfigError::at(format!("{path}.failed_cache_seconds"), "must be at most 3600"));
    }
    if raw.max_keys_without_kid == 0 {
        return Err(ConfigError::at(format!("{path}.max_keys_without_kid"), "must be > 0"));
    }
    let mut providers: Vec<Provider> = Vec::with_capacity(raw.providers.len());
    for (i, p) in raw.providers.iter().enumerate() {
        let path = format!("{path}.providers[{i}]");
        let provider = compile_provider(p, &path, raw, shared)?;
        for (j, other) in providers.iter().enumerate() {
            if other.issuer == provider.issuer {
                let message = match &provider.issuer {
                    Some(_) => format!("the same issuer as providers[{j}]"),
                    None => format!(
                        "providers[{j}] already omits issuer; only one provider may, to take tokens whose \
                         iss no other provider names"
                    ),
                };
                return Err(ConfigError::at(format!("{path}.issuer"), message));
            }
        }
        providers.push(provider);
    }
    Ok(providers)
}

fn compile_provider(raw: &RawProvider, path: &str, jwt: &RawJwt, shared: bool) -> Result<Provider, ConfigError> {
    let at = |field: &str, message: &str| ConfigError::at(format!("{path}.{field}"), message);
    if raw.issuer.as_deref() == Some("") {
        return Err(at("issuer", "must not be empty; omit it to accept any issuer"));
    }
    if raw.leeway_seconds > MAX_LEEWAY_SECONDS {
        return Err(at("leeway_seconds", &format!("must be at most {MAX_LEEWAY_SECONDS}")));
    }
    if let Some(i) = raw.required_claims.iter().position(String::is_empty) {
        return Err(at(&format!("required_claims[{i}]"), "must not be empty"));
    }
    let sources = token_sources(&raw.sources, &format!("{path}.sources"))?;

    let mut seen_kids = HashSet::new();
    let mut keys = match &raw.jwks {
        Some(set) => jwks::compile_inline(set, &format!("{path}.jwks"), &mut seen_kids)?,
        None => KeySet::default(),
    };
    for (i, secret) in raw.secrets.iter().enumerate() {
        let path = format!("{path}.secrets[{i}]");
        if let Some(kid) = &secret.kid {
            if kid.is_empty() || !seen_kids.insert(kid.clone()) {
                return Err(ConfigError::at(format!("{path}.kid"), format!("{kid:?} is empty or used by another key")));
            }
        }
        let bytes = decode_base64_any(secret.secret.expose())
            .ok_or_else(|| ConfigError::at(format!("{path}.secret"), "not valid base64"))?;
        let alg = match secret.alg {
            RawHmacAlgorithm::HS256 => Algorithm::HS256,
            RawHmacAlgorithm::HS384 => Algorithm::HS384,
            RawHmacAlgorithm::HS512 => Algorithm::HS512,
        };
        keys.push(Key::hmac(secret.kid.clone(), alg, &bytes, &format!("{path}.secret"))?);
    }
    let remote = raw.remote_jwks.as_ref().map(|r| remote_jwks(r, &format!("{path}.remote_jwks"))).transpose()?;
    let revocation =
        raw.revoked_jti_remote.as_ref().map(|r| remote_jwks(r, &format!("{path}.revoked_jti_remote"))).transpose()?;
    if keys.is_empty() && remote.is_none() {
        return Err(ConfigError::at(path, "has no keys: give jwks, secrets or remote_jwks"));
    }

    let c = &raw.claims;
    let claim_name = |field: &str, name: &str| {
        if name.is_empty() {
            Err(at(&format!("claims.{field}"), "must name a claim"))
        } else {
            Ok(name.to_owned())
        }
    };
    let claims = ClaimMapping {
        subject: claim_name("subject", &c.subject)?,
        account: c.account.as_deref().map(|n| claim_name("account", n)).transpose()?,
        tier: c.tier.as_deref().map(|n| claim_name("tier", n)).transpose()?,
        default_tier: match &c.default_tier {
            Some(t) if !header_safe(t) => return Err(at("claims.default_tier", "must be a non-empty header value")),
            other => other.clone(),
        },
        scopes: c
            .scopes
            .iter()
            .enumerate()
            .map(|(i, n)| claim_name(&format!("scopes[{i}]"), n))
            .collect::<Result<_, _>>()?,
    };
    if let Some(i) = raw.revoked_jti.iter().position(String::is_empty) {
        return Err(at(&format!("revoked_jti[{i}]"), "must not be empty"));
    }
    let audiences = match &raw.audiences {
        None => {
            return Err(at(
                "audiences",
                "is required: list the audiences this gateway accepts (a token the issuer minted for \
                 another client must not pass), or \"any\"",
            ))
        }
        Some(RawAudiences::Any(AnyAudience::Any)) => None,
        Some(RawAudiences::List(list)) if list.is_empty() => {
            return Err(at("audiences", "must list at least one audience, or be \"any\""))
        }
        Some(RawAudiences::List(list)) => {
            if let Some(i) = list.iter().position(String::is_empty) {
                return Err(at(&format!("audiences[{i}]"), "must not be empty"));
            }
            Some(list.iter().cloned().collect())
        }
    };
    Ok(Provider {
        issuer: raw.issuer.clone(),
        audiences,
        leeway_seconds: raw.leeway_seconds,
        required_claims: raw.required_claims.clone(),
        sources,
        keys,
        remote,
        revocation,
        claims,
        revoked_jti: raw.revoked_jti.iter().cloned().collect(),
        forward: raw.forward,
        account_prefix: account_prefix(raw, shared, path)?,
        cache_entries: jwt.cache_entries,
        failed_cache_entries: jwt.failed_cache_entries,
        failed_cache_seconds: jwt.failed_cache_seconds,
        max_keys_without_kid: jwt.max_keys_without_kid,
    })
}

/// The provider's `account_prefix`, or its default (see `RawProvider::account_prefix`).
fn account_prefix(raw: &RawProvider, shared: bool, path: &str) -> Result<String, ConfigError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b".-_:@".contains(&b);
    match (&raw.account_prefix, &raw.issuer) {
        (Some(prefix), _) if prefix.len() > 64 || !prefix.bytes().all(allowed) => Err(ConfigError::at(
            format!("{path}.account_prefix"),
            "must be at most 64 of A-Z a-z 0-9 . - _ : @ (what the credit service accepts in an account id)",
        )),
        (Some(prefix), _) => Ok(prefix.clone()),
        (None, _) if !shared => Ok(String::new()),
        (None, None) => Ok("jwt:".to_owned()),
        (None, Some(issuer)) => {
            let name = issuer.split_once("://").map_or(issuer.as_str(), |(_, rest)| rest).trim_end_matches('/');
            let mut prefix: String =
                name.bytes().take(63).map(|b| if allowed(b) { char::from(b) } else { '_' }).collect();
            prefix.push(':');
            Ok(prefix)
        }
    }
}

fn token_sources(raw: &RawTokenSources, path: &str) -> Result<TokenSources, ConfigError> {
    if !raw.authorization && raw.cookie.is_none() && raw.query.is_none() {
        return Err(ConfigError::at(path, "must enable at least one of authorization, cookie, query"));
    }
    if let Some(name) = &raw.cookie {
        // RFC 6265: a cookie name is an RFC 9110 token.
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(ConfigError::at(format!("{path}.cookie"), format!("{name:?} is not a valid cookie name")));
        }
    }
    if let Some(name) = &raw.query {
        // RFC 3986 unreserved characters: matched against the raw query without decoding.
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if name.is_empty() || !name.bytes().all(unreserved) {
            return Err(ConfigError::at(
                format!("{path}.query"),
                format!("{name:?} must be letters, digits and - . _ ~ only"),
            ));
        }
    }
    Ok(TokenSources { authorization: raw.authorization, cookie: raw.cookie.clone(), query: raw.query.clone() })
}

fn remote_jwks(raw: &RawRemoteJwks, path: &str) -> Result<RemoteJwks, ConfigError> {
    let at = |field: &str, message: &str| ConfigError::at(format!("{path}.{field}"), message);
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !visible(&raw.cluster) {
        return Err(at("cluster", "must name an Envoy cluster"));
    }
    if !raw.path.starts_with('/') || !visible(&raw.path) {
        return Err(at("path", "must start with '/' and contain no spaces or control characters"));
    }
    if raw.authority.as_deref().is_some_and(|a| !visible(a)) {
        return Err(at("authority", "must be a host name, optionally with a port"));
    }
    if raw.refresh_seconds == 0 {
        return Err(at("refresh_seconds", "must be > 0"));
    }
    if raw.timeout_ms == 0 {
        return Err(at("timeout_ms", "must be > 0"));
    }
    Ok(RemoteJwks {
        cluster: raw.cluster.clone(),
        path: raw.path.clone(),
        authority: raw.authority.clone().unwrap_or_else(|| raw.cluster.clone()),
        refresh_seconds: raw.refresh_seconds,
        timeout_ms: raw.timeout_ms,
    })
}

/// A token found in the request for one provider.
pub(crate) struct Candidate<'r> {
    provider: usize,
    token: Cow<'r, str>,
    location: CredentialLocation,
}

/// Each provider's token, from the first of its sources that has one.
pub(crate) fn find_tokens<'r>(
    providers: &[Provider],
    request: &RequestCredentials<'r>,
    bearer: Option<&'r str>,
) -> Result<Vec<Candidate<'r>>, AuthError> {
    let mut found = Vec::new();
    for (provider, p) in providers.iter().enumerate() {
        let mut token = None;
        if p.sources.authorization {
            token = bearer.map(|t| (Cow::Borrowed(t), CredentialLocation::Authorization));
        }
        if let (None, Some(name)) = (&token, &p.sources.cookie) {
            token = request.cookie(name)?.map(|t| (Cow::Borrowed(t), CredentialLocation::Cookie(name.clone())));
        }
        if let (None, Some(name)) = (&token, &p.sources.query) {
            token = request.query_param(name)?.map(|t| (Cow::Owned(t), CredentialLocation::Query(name.clone())));
        }
        if let Some((token, location)) = token {
            found.push(Candidate { provider, token, location });
        }
    }
    Ok(found)
}

/// Whether one of the tokens is in its provider's cache of verified tokens, still valid: it costs
/// no signature check.
pub(crate) fn cached(states: &[ProviderState], candidates: &[Candidate], now: u64) -> bool {
    candidates.iter().any(|c| {
        let state = states.get(c.provider);
        state.and_then(|s| s.cache.try_borrow().ok()).is_some_and(|cache| cache.get(&c.token, now).is_some())
    })
}

/// Verifies the token of the provider it belongs to; `candidates` is not empty.
pub(crate) fn verify(
    providers: &[Provider],
    states: &[ProviderState],
    candidates: &[Candidate],
    max_bytes: usize,
    now: u64,
) -> Result<Identity, AuthError> {
    if candidates.iter().any(|c| c.token.len() > max_bytes) {
        return Err(AuthError::CredentialTooLarge { limit: max_bytes });
    }
    let chosen = choose_provider(providers, candidates)?;
    let provider = providers.get(chosen.provider).ok_or(AuthError::WrongIssuer)?;
    // A worker state for each provider, made from the same config: missing, the keys are.
    let state = states.get(chosen.provider).ok_or(AuthError::KeysUnavailable { provider: chosen.provider })?;
    if provider.revocation.is_some() && state.remote_revoked_set().is_none() {
        return Err(AuthError::KeysUnavailable { provider: chosen.provider });
    }
    let cached = state.cache.try_borrow().ok().and_then(|cache| cache.get(&chosen.token, now));
    let mut identity = match cached {
        Some(identity) => identity,
        None => {
            if let Some(refused) = state.failed.try_borrow().ok().and_then(|failed| failed.get(&chosen.token, now)) {
                return Err(refused);
            }
            let verified = verify_signature(provider, state, chosen.provider, &chosen.token, max_bytes, now)
                .and_then(|claims| Ok((provider.identity(state, &claims)?, claims)));
            let (identity, claims) = match verified {
                Ok(verified) => verified,
                Err(err) => {
                    if let Ok(mut failed) = state.failed.try_borrow_mut() {
                        failed.insert(&chosen.token, &err, now);
                    }
                    return Err(err);
                }
            };
            if let Ok(mut cache) = state.cache.try_borrow_mut() {
                cache.insert(&chosen.token, provider.verified(&claims, identity.clone()));
            }
            identity
        }
    };
    if !provider.forward {
        identity.remove_upstream.push(chosen.location.clone());
    }
    Ok(identity)
}

/// With one provider there is nothing to choose. With several, the unverified `iss` picks one;
/// that is safe because the chosen provider then checks the signature and `iss` itself.
fn choose_provider<'a, 'r>(
    providers: &[Provider],
    candidates: &'a [Candidate<'r>],
) -> Result<&'a Candidate<'r>, AuthError> {
    if let ([only], [_]) = (candidates, providers) {
        return Ok(only);
    }
    for candidate in candidates {
        let issuer = peek_issuer(&candidate.token)?;
        let wanted = providers.get(candidate.provider).and_then(|p| p.issuer.as_deref());
        if wanted.is_some() && wanted == issuer.as_deref() {
            return Ok(candidate);
        }
    }
    candidates
        .iter()
        .find(|c| providers.get(c.provider).is_some_and(|p| p.issuer.is_none()))
        .ok_or(AuthError::WrongIssuer)
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct IssuerOnly {
    #[serde(default)]
    iss: Option<String>,
}

/// Decodes one base64url JSON segment of a compact JWS.
fn segment<T: for<'de> Deserialize<'de>>(token: &str, index: usize) -> Result<T, AuthError> {
    let part = token.split('.').nth(index).ok_or(AuthError::MalformedToken)?;
    let json = decode_base64url(part).ok_or(AuthError::MalformedToken)?;
    serde_json::from_slice(&json).map_err(|_| AuthError::MalformedToken)
}

fn peek_issuer(token: &str) -> Result<Option<String>, AuthError> {
    Ok(segment::<IssuerOnly>(token, 1)?.iss)
}

/// Finds the keys that may have signed the token and checks its signature and time claims.
fn verify_signature(
    provider: &Provider,
    state: &ProviderState,
    index: usize,
    token: &str,
    max_bytes: usize,
    now: u64,
) -> Result<Claims, AuthError> {
    if token.split('.').count() != 3 {
        return Err(AuthError::MalformedToken);
    }
    let header: Header = segment(token, 0)?;
    // `none` and anything unknown stop here, before any key is considered.
    let alg = Algorithm::from_name(&header.alg).ok_or(AuthError::UnsupportedAlgorithm)?;
    let kid = header.kid.as_deref();
    let remote = state.remote_key_set();
    let remote_pending = provider.remote.is_some() && remote.is_none();
    let by_kid: Vec<&Key> =
        provider.keys.candidates(kid).chain(remote.iter().flat_map(|set| set.candidates(kid))).collect();
    if by_kid.is_empty() {
        return Err(match (remote_pending, kid) {
            (true, _) => AuthError::KeysUnavailable { provider: index },
            (false, Some(_)) => AuthError::UnknownKeyId { provider: index },
            (false, None) => AuthError::AlgorithmMismatch,
        });
    }
    // The key decides the algorithm: a token whose header names another (an HS256 token against
    // an RSA key, say) finds no key here.
    let usable: Vec<&Key> = by_kid.into_iter().filter(|k| k.algorithm() == alg).collect();
    if usable.is_empty() {
        return Err(if remote_pending {
            AuthError::KeysUnavailable { provider: index }
        } else {
            AuthError::AlgorithmMismatch
        });
    }
    if kid.is_none() && usable.len() > provider.max_keys_without_kid {
        return Err(AuthError::KeyIdRequired { keys: usable.len() });
    }
    let options = VerificationOptions {
        artificial_time: Some(UnixTimeStamp::from_secs(now)),
        time_tolerance: Some(Duration::from_secs(provider.leeway_seconds)),
        max_token_length: Some(max_bytes),
        ..VerificationOptions::default()
    };
    for key in usable {
        match key.verify(token, options.clone()).map_err(|e| jwt_error(&e)) {
            Ok(claims) => return Ok(claims),
            // Several keys without kid may match; only when none verifies is the signature bad.
            Err(AuthError::BadSignature) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(AuthError::BadSignature)
}

/// jwt-simple reports through `anyhow`; its own errors are typed, the rest are decoding errors
/// (base64, JSON) or a signature of the wrong shape.
fn jwt_error(err: &jwt_simple::Error) -> AuthError {
    match err.downcast_ref::<JWTError>() {
        Some(JWTError::TokenHasExpired) => AuthError::Expired,
        Some(JWTError::TokenNotValidYet | JWTError::ClockDrift) => AuthError::NotYetValid,
        Some(JWTError::AlgorithmMismatch) => AuthError::AlgorithmMismatch,
        Some(JWTError::TokenTooLong) => AuthError::MalformedToken,
        Some(
            JWTError::CompactEncodingError
            | JWTError::HeaderTooLarge
            | JWTError::NotJWT
            | JWTError::UnknownCriticalExtension,
        ) => AuthError::MalformedToken,
        Some(_) => AuthError::BadSignature,
        None if err.is::<serde_json::Error>() || err.is::<ct_codecs::Error>() => AuthError::MalformedToken,
        None => AuthError::BadSignature,
    }
}

impl Provider {
    /// The window in which the time checks `verify_signature` made stay true.
    fn verified(&self, claims: &Claims, identity: Identity) -> Verified {
        let leeway = self.leeway_seconds;
        let starts = [claims.invalid_before, claims.issued_at].into_iter().flatten().map(|t| t.as_secs()).max();
        Verified {
            identity,
            valid_from: starts.map_or(0, |t| t.saturating_sub(leeway)),
            valid_until: claims.expires_at.map_or(u64::MAX, |t| t.as_secs().saturating_add(leeway)),
        }
    }

    /// The checks after the signature, then the claims as an identity.
    fn identity(&self, state: &ProviderState, claims: &Claims) -> Result<Identity, AuthError> {
        if self.issuer.is_some() && claims.issuer != self.issuer {
            return Err(AuthError::WrongIssuer);
        }
        if let Some(accepted) = &self.audiences {
            if !claims.audiences.as_ref().is_some_and(|aud| aud.contains(accepted)) {
                return Err(AuthError::WrongAudience);
            }
        }
        if let Some(missing) = self.required_claims.iter().find(|name| !has_claim(claims, name)) {
            return Err(AuthError::MissingClaim(missing.clone()));
        }
        let remote_revoked = state.remote_revoked_set();
        let revoked = |jti: &String| {
            self.revoked_jti.contains(jti) || remote_revoked.as_ref().is_some_and(|set| set.contains(jti))
        };
        if claims.jwt_id.as_ref().is_some_and(revoked) {
            return Err(AuthError::Revoked);
        }
        let mapping = &self.claims;
        let required = |name: &String| string_claim(claims, name)?.ok_or_else(|| AuthError::MissingClaim(name.clone()));
        let subject = required(&mapping.subject)?;
        let account = match &mapping.account {
            Some(name) => required(name)?,
            None => subject.clone(),
        };
        let account =
            if self.account_prefix.is_empty() { account } else { format!("{}{account}", self.account_prefix) };
        let tier = match &mapping.tier {
            Some(name) => string_claim(claims, name)?,
            None => None,
        };
        Ok(Identity {
            subject,
            account,
            tier: tier.or_else(|| mapping.default_tier.clone()),
            method: AuthMethod::Jwt,
            key_id: None,
            scopes: scopes(claims, &mapping.scopes)?,
            remove_upstream: Vec::new(),
        })
    }
}

fn has_claim(claims: &Claims, name: &str) -> bool {
    match name {
        "iat" => claims.issued_at.is_some(),
        "exp" => claims.expires_at.is_some(),
        "nbf" => claims.invalid_before.is_some(),
        "aud" => claims.audiences.is_some(),
        "iss" => claims.issuer.is_some(),
        "sub" => claims.subject.is_some(),
        "jti" => claims.jwt_id.is_some(),
        "nonce" => claims.nonce.is_some(),
        other => claims.custom.contains_key(other),
    }
}

/// A claim that becomes a header value: a string or a number, with no control characters.
fn string_claim(claims: &Claims, name: &str) -> Result<Option<String>, AuthError> {
    let value = match name {
        "sub" => claims.subject.clone(),
        "iss" => claims.issuer.clone(),
        "jti" => claims.jwt_id.clone(),
        "nonce" => claims.nonce.clone(),
        other => match claims.custom.get(other) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // Integers only: formatting a float would link a float printer for a claim no one
            // should send.
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Some(u.to_string()),
                (None, Some(i)) => Some(i.to_string()),
                (None, None) => return Err(AuthError::InvalidClaim(name.to_owned())),
            },
            Some(_) => return Err(AuthError::InvalidClaim(name.to_owned())),
        },
    };
    match value {
        Some(v) if !header_safe(&v) => Err(AuthError::InvalidClaim(name.to_owned())),
        other => Ok(other),
    }
}

fn scopes(claims: &Claims, names: &[String]) -> Result<Vec<String>, AuthError> {
    let Some((name, value)) = names.iter().find_map(|n| claims.custom.get(n).map(|v| (n, v))) else {
        return Ok(Vec::new());
    };
    let invalid = || AuthError::InvalidClaim(name.clone());
    let list: Vec<String> = match value {
        Value::String(s) => s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        Value::Array(items) => {
            items.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(invalid)).collect::<Result<_, _>>()?
        }
        _ => return Err(invalid()),
    };
    if list.iter().all(|s| is_scope_token(s)) {
        Ok(list)
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;
    use std::time::Instant;

    use jwt_simple::prelude::*;
    use serde_json::json;

    use super::super::jwks::Claims;
    use super::super::tests::{headers, parse, Fixture};
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const ISSUER: &str = "https://issuer.example";

    fn b64(bytes: &[u8]) -> String {
        use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
        Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
    }

    /// One RSA key for every RSA algorithm: key generation is slow in debug builds.
    static RSA: LazyLock<RS256KeyPair> = LazyLock::new(|| RS256KeyPair::generate(2048).unwrap());

    /// A signing key per algorithm, with the JWK that verifies it.
    enum Signer {
        HS256(HS256Key),
        HS384(HS384Key),
        HS512(HS512Key),
        RS256(RS256KeyPair),
        RS384(RS384KeyPair),
        RS512(RS512KeyPair),
        PS256(PS256KeyPair),
        ES256(ES256KeyPair),
        ES384(ES384KeyPair),
        EdDSA(Ed25519KeyPair),
    }

    impl Signer {
        fn new(alg: &str, kid: &str) -> Signer {
            let der = RSA.to_der().unwrap();
            match alg {
                "HS256" => Signer::HS256(HS256Key::from_bytes(&[1; 32]).with_key_id(kid)),
                "HS384" => Signer::HS384(HS384Key::from_bytes(&[2; 48]).with_key_id(kid)),
                "HS512" => Signer::HS512(HS512Key::from_bytes(&[3; 64]).with_key_id(kid)),
                "RS256" => Signer::RS256(RS256KeyPair::from_der(&der).unwrap().with_key_id(kid)),
                "RS384" => Signer::RS384(RS384KeyPair::from_der(&der).unwrap().with_key_id(kid)),
                "RS512" => Signer::RS512(RS512KeyPair::from_der(&der).unwrap().with_key_id(kid)),
                "PS256" => Signer::PS256(PS256KeyPair::from_der(&der).unwrap().with_key_id(kid)),
                "ES256" => Signer::ES256(ES256KeyPair::generate().with_key_id(kid)),
                "ES384" => Signer::ES384(ES384KeyPair::generate().with_key_id(kid)),
                "EdDSA" => Signer::EdDSA(Ed25519KeyPair::generate().with_key_id(kid)),
                other => panic!("no signer for {other}"),
            }
        }

        fn sign(&self, claims: Claims) -> String {
            match self {
                Signer::HS256(k) => k.authenticate(claims),
                Signer::HS384(k) => k.authenticate(claims),
                Signer::HS512(k) => k.authenticate(claims),
                Signer::RS256(k) => k.sign(claims),
                Signer::RS384(k) => k.sign(claims),
                Signer::RS512(k) => k.sign(claims),
                Signer::PS256(k) => k.sign(claims),
                Signer::ES256(k) => k.sign(claims),
                Signer::ES384(k) => k.sign(claims),
                Signer::EdDSA(k) => k.sign(claims),
            }
            .unwrap()
        }

        fn jwk(&self, kid: &str) -> Value {
            let rsa = |alg: &str, c: RSAPublicKeyComponents| json!({"kty": "RSA", "kid": kid, "alg": alg, "n": b64(&c.n), "e": b64(&c.e)});
            let ec = |alg: &str, crv: &str, point: Vec<u8>| {
                let half = (point.len() - 1) / 2;
                json!({"kty": "EC", "kid": kid, "alg": alg, "crv": crv,
                       "x": b64(&point[1..=half]), "y": b64(&point[half + 1..])})
            };
            match self {
                Signer::HS256(k) => json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(&k.to_bytes())}),
                Signer::HS384(k) => json!({"kty": "oct", "kid": kid, "alg": "HS384", "k": b64(&k.to_bytes())}),
                Signer::HS512(k) => json!({"kty": "oct", "kid": kid, "alg": "HS512", "k": b64(&k.to_bytes())}),
                Signer::RS256(k) => rsa("RS256", k.public_key().to_components()),
                Signer::RS384(k) => rsa("RS384", k.public_key().to_components()),
                Signer::RS512(k) => rsa("RS512", k.public_key().to_components()),
                Signer::PS256(k) => rsa("PS256", k.public_key().to_components()),
                Signer::ES256(k) => ec("ES256", "P-256", k.public_key().public_key().to_bytes_uncompressed()),
                Signer::ES384(k) => ec("ES384", "P-384", k.public_key().public_key().to_bytes_uncompressed()),
                Signer::EdDSA(k) => {
                    json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(&k.public_key().to_bytes())})
                }
            }
        }
    }

    const ALGORITHMS: [&str; 10] =
        ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"];

    fn claims(custom: Value) -> Claims {
        let Value::Object(custom) = custom else { panic!("claims must be an object") };
        JWTClaims {
            issued_at: Some(UnixTimeStamp::from_secs(NOW - 10)),
            expires_at: Some(UnixTimeStamp::from_secs(NOW + 300)),
            invalid_before: None,
            issuer: Some(ISSUER.to_owned()),
            subject: Some("user-1".to_owned()),
            audiences: Some(Audiences::AsString("api".to_owned())),
            jwt_id: Some("jti-1".to_owned()),
            nonce: None,
            custom,
        }
    }

    /// An authenticator with one provider trusting `jwks`, plus `extra` provider fields.
    fn authenticator(jwks: Vec<Value>, extra: Value) -> Fixture {
        let mut provider = json!({"issuer": ISSUER, "audiences": ["api"], "jwks": {"keys": jwks}});
        if let (Value::Object(p), Value::Object(extra)) = (&mut provider, extra) {
            p.extend(extra);
        }
        parse(&json!({"jwt": {"providers": [provider]}}).to_string()).unwrap()
    }

    fn bearer(auth: &Fixture, token: &str) -> Result<Option<Identity>, AuthError> {
        let h = headers(&[(":path", "/api"), ("authorization", &format!("Bearer {token}"))]);
        auth.authenticate(&RequestCredentials::new(&h), NOW)
    }

    fn encode(header: Value, payload: Value, signature: &[u8]) -> String {
        format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(payload.to_string().as_bytes()), b64(signature))
    }

    #[test]
    fn a_token_without_kid_is_tried_against_a_few_keys_at_most() {
        let signers: Vec<Signer> = (0..5).map(|_| Signer::new("ES256", "unused")).collect();
        let jwks: Vec<Value> = signers
            .iter()
            .map(|s| {
                let mut jwk = s.jwk("unused");
                jwk.as_object_mut().unwrap().remove("kid");
                jwk
            })
            .collect();
        let Signer::ES256(last) = &signers[4] else { unreachable!() };
        let token = ES256KeyPair::from_bytes(&last.to_bytes()).unwrap().sign(claims(json!({}))).unwrap();
        let capped = authenticator(jwks.clone(), json!({}));
        assert_eq!(bearer(&capped, &token), Err(AuthError::KeyIdRequired { keys: 5 }));
        let raised = parse(
            &json!({"jwt": {"max_keys_without_kid": 5, "providers": [{"issuer": ISSUER, "audiences": ["api"], "jwks": {"keys": jwks}}]}})
                .to_string(),
        )
        .unwrap();
        assert!(bearer(&raised, &token).unwrap().is_some(), "within the cap the fifth key verifies it");
    }

    #[test]
    fn a_refused_token_is_refused_again_without_a_signature_check() {
        let signer = Signer::new("ES256", "k1");
        let auth = authenticator(vec![signer.jwk("k1")], json!({}));
        let token = signer.sign(claims(json!({})));
        let (head, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", b64(&[7; 64]));
        assert_eq!(bearer(&auth, &forged), Err(AuthError::BadSignature));
        assert_eq!(bearer(&auth, &forged), Err(AuthError::BadSignature));
        assert_eq!(auth.state.take_remembered_refusals(), 1, "the second time from memory");
        assert_eq!(auth.state.take_remembered_refusals(), 0, "counted once");
        assert!(bearer(&auth, &token).unwrap().is_some(), "the genuine token is not tarred with it");
        // Only what was remembered answers: a different signature for the same claims is checked.
        let state = auth.provider_state(0);
        state.failed.borrow_mut().insert(&token, &AuthError::Revoked, NOW);
        state.cache.borrow_mut().clear();
        assert_eq!(bearer(&auth, &token), Err(AuthError::Revoked), "answered from the cache, unverified");
    }

    #[test]
    fn a_valid_token_passes_for_every_algorithm() {
        for alg in ALGORITHMS {
            let signer = Signer::new(alg, "k1");
            let auth = authenticator(vec![signer.jwk("k1")], json!({}));
            let token = signer.sign(claims(json!({"scope": "read write"})));
            let identity = bearer(&auth, &token).unwrap_or_else(|e| panic!("{alg}: {e}")).unwrap();
            assert_eq!(identity.subject, "user-1", "{alg}");
            assert_eq!(identity.account, "user-1");
            assert_eq!(identity.method, AuthMethod::Jwt);
            assert_eq!(identity.scopes, ["read", "write"]);
            assert_eq!(identity.remove_upstream, [CredentialLocation::Authorization]);
        }
    }

    #[test]
    fn tokens_are_rejected_for_what_is_wrong_with_them() {
        let signer = Signer::new("ES256", "k1");
        let other = Signer::new("ES256", "k1");
        let auth = authenticator(vec![signer.jwk("k1")], json!({"revoked_jti": ["stolen"]}));
        let with = |f: &dyn Fn(&mut Claims)| {
            let mut c = claims(json!({}));
            f(&mut c);
            signer.sign(c)
        };
        let valid = with(&|_| {});
        let (head, rest) = valid.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        let cases: Vec<(&str, String, AuthError)> = vec![
            ("expired", with(&|c| c.expires_at = Some(UnixTimeStamp::from_secs(NOW - 61))), AuthError::Expired),
            (
                "not yet valid",
                with(&|c| c.invalid_before = Some(UnixTimeStamp::from_secs(NOW + 61))),
                AuthError::NotYetValid,
            ),
            (
                "issued in the future",
                with(&|c| c.issued_at = Some(UnixTimeStamp::from_secs(NOW + 61))),
                AuthError::NotYetValid,
            ),
            ("wrong iss", with(&|c| c.issuer = Some("https://evil.example".to_owned())), AuthError::WrongIssuer),
            ("no iss", with(&|c| c.issuer = None), AuthError::WrongIssuer),
            (
                "wrong aud",
                with(&|c| c.audiences = Some(Audiences::AsString("other".to_owned()))),
                AuthError::WrongAudience,
            ),
            ("no aud", with(&|c| c.audiences = None), AuthError::WrongAudience),
            ("no sub", with(&|c| c.subject = None), AuthError::MissingClaim("sub".to_owned())),
            ("revoked", with(&|c| c.jwt_id = Some("stolen".to_owned())), AuthError::Revoked),
            ("bad signature", other.sign(claims(json!({}))), AuthError::BadSignature),
            (
                "tampered payload",
                format!("{head}.{}.{}", b64(br#"{"sub":"admin"}"#), valid.rsplit('.').next().unwrap()),
                AuthError::BadSignature,
            ),
            (
                "alg none",
                encode(json!({"alg": "none", "kid": "k1"}), json!({"sub": "admin"}), b""),
                AuthError::UnsupportedAlgorithm,
            ),
            (
                "alg unknown",
                encode(json!({"alg": "XS256", "kid": "k1"}), json!({}), b"x"),
                AuthError::UnsupportedAlgorithm,
            ),
            (
                "alg of another key type",
                encode(json!({"alg": "ES384", "kid": "k1"}), json!({}), b"x"),
                AuthError::AlgorithmMismatch,
            ),
            (
                "unknown kid",
                encode(json!({"alg": "ES256", "kid": "k9"}), json!({}), b"x"),
                AuthError::UnknownKeyId { provider: 0 },
            ),
            ("two segments", format!("{head}.{payload}"), AuthError::MalformedToken),
            ("four segments", format!("{valid}.x"), AuthError::MalformedToken),
            ("header not base64", format!("!!.{payload}.x"), AuthError::MalformedToken),
            ("header not JSON", format!("{}.{payload}.x", b64(b"{alg")), AuthError::MalformedToken),
            ("header without alg", encode(json!({"kid": "k1"}), json!({}), b"x"), AuthError::MalformedToken),
            ("dots only", "..".to_owned(), AuthError::MalformedToken),
            ("oversized", "a".repeat(8193), AuthError::CredentialTooLarge { limit: 8192 }),
        ];
        for (name, token, expected) in cases {
            assert_eq!(bearer(&auth, &token), Err(expected), "{name}");
        }
        assert!(bearer(&auth, &valid).is_ok());
    }

    #[test]
    fn leeway_applies_to_exp_and_nbf() {
        let signer = Signer::new("HS256", "k1");
        let auth = authenticator(vec![signer.jwk("k1")], json!({"leeway_seconds": 5}));
        let mut c = claims(json!({}));
        c.expires_at = Some(UnixTimeStamp::from_secs(NOW - 5));
        c.invalid_before = Some(UnixTimeStamp::from_secs(NOW + 5));
        assert!(bearer(&auth, &signer.sign(c.clone())).is_ok());
        c.expires_at = Some(UnixTimeStamp::from_secs(NOW - 6));
        assert_eq!(bearer(&auth, &signer.sign(c)), Err(AuthError::Expired));
    }

    #[test]
    fn an_hs_token_made_with_the_rsa_public_key_is_refused() {
        let rsa = Signer::new("RS256", "rsa");
        let public_der = RSA.public_key().to_der().unwrap();
        let public_pem = RSA.public_key().to_pem().unwrap();
        // Without a kid too, in case a verifier picks keys by `alg` alone.
        let auth_kid = authenticator(vec![rsa.jwk("rsa")], json!({}));
        let auth_any = parse(
            &json!({"jwt": {"providers": [{"audiences": "any", "jwks": {"keys": [{"kty": "RSA", "n": rsa.jwk("rsa")["n"], "e": "AQAB"}]}}]}})
                .to_string(),
        )
        .unwrap();
        for secret in [public_der.as_slice(), public_pem.as_bytes()] {
            let forged = HS256Key::from_bytes(secret).with_key_id("rsa").authenticate(claims(json!({}))).unwrap();
            assert_eq!(bearer(&auth_kid, &forged), Err(AuthError::AlgorithmMismatch));
            let forged = HS256Key::from_bytes(secret).authenticate(claims(json!({}))).unwrap();
            assert_eq!(bearer(&auth_any, &forged), Err(AuthError::AlgorithmMismatch));
        }
        // The same RSA key without `alg` still accepts its whole family.
        let ps = Signer::PS256(PS256KeyPair::from_der(&RSA.to_der().unwrap()).unwrap());
        assert!(bearer(&auth_any, &ps.sign(claims(json!({})))).unwrap().is_some());
    }

    #[test]
    fn the_audience_must_be_chosen_and_a_token_must_expire_by_default() {
        let signer = Signer::new("HS256", "k1");
        let k = b64(&[1; 32]);
        let err = parse(&json!({"jwt": {"providers": [{"secrets": [{"secret": k}]}]}}).to_string()).err().unwrap();
        assert!(err.starts_with("auth.jwt.providers[0].audiences: is required"), "{err}");
        let any = |extra: Value| {
            let mut provider = json!({"issuer": ISSUER, "audiences": "any", "jwks": {"keys": [signer.jwk("k1")]}});
            if let (Value::Object(p), Value::Object(extra)) = (&mut provider, extra) {
                p.extend(extra);
            }
            parse(&json!({"jwt": {"providers": [provider]}}).to_string()).unwrap()
        };
        let mut other_client = claims(json!({}));
        other_client.audiences = Some(Audiences::AsString("someone-else".to_owned()));
        assert!(bearer(&any(json!({})), &signer.sign(other_client)).unwrap().is_some(), "\"any\" is on purpose");

        let mut forever = claims(json!({}));
        forever.expires_at = None;
        let token = signer.sign(forever);
        assert_eq!(bearer(&any(json!({})), &token), Err(AuthError::MissingClaim("exp".to_owned())));
        assert!(bearer(&any(json!({"required_claims": []})), &token).unwrap().is_some(), "opted out");
    }

    #[test]
    fn claims_map_to_the_identity() {
        let signer = Signer::new("HS256", "k1");
        let mapping = json!({"claims": {"account": "org", "tier": "plan", "default_tier": "free"},
                             "required_claims": ["exp", "org"]});
        let auth = authenticator(vec![signer.jwk("k1")], mapping);
        let id = bearer(&auth, &signer.sign(claims(json!({"org": "acme", "plan": "pro", "scp": ["a", "b"]}))))
            .unwrap()
            .unwrap();
        assert_eq!(
            (id.account.as_str(), id.tier.as_deref(), id.scopes.clone()),
            ("acme", Some("pro"), vec!["a".into(), "b".into()])
        );

        let id = bearer(&auth, &signer.sign(claims(json!({"org": 42})))).unwrap().unwrap();
        assert_eq!((id.account.as_str(), id.tier.as_deref()), ("42", Some("free")));

        let cases = [
            (json!({}), AuthError::MissingClaim("org".to_owned())),
            (json!({"org": "a\r\nx-injected: 1"}), AuthError::InvalidClaim("org".to_owned())),
            (json!({"org": {"nested": 1}}), AuthError::InvalidClaim("org".to_owned())),
            (json!({"org": 1.5}), AuthError::InvalidClaim("org".to_owned())),
            (json!({"org": "a", "scope": 7}), AuthError::InvalidClaim("scope".to_owned())),
            (json!({"org": "a", "scp": ["ok", "not ok"]}), AuthError::InvalidClaim("scp".to_owned())),
            (json!({"org": "a", "scp": [1]}), AuthError::InvalidClaim("scp".to_owned())),
        ];
        for (custom, expected) in cases {
            assert_eq!(bearer(&auth, &signer.sign(claims(custom.clone()))), Err(expected), "{custom}");
        }
    }

    #[test]
    fn tokens_are_read_from_cookie_and_query() {
        let signer = Signer::new("HS256", "k1");
        let sources = json!({"sources": {"authorization": false, "cookie": "access_token", "query": "token"}});
        let auth = authenticator(vec![signer.jwk("k1")], sources);
        let token = signer.sign(claims(json!({})));
        let run = |h: &[(&str, &str)]| auth.authenticate(&RequestCredentials::new(&headers(h)), NOW);

        let cookie = format!("theme=dark; access_token={token}");
        let id = run(&[(":path", "/"), ("cookie", &cookie)]).unwrap().unwrap();
        assert_eq!(id.remove_upstream, [CredentialLocation::Cookie("access_token".to_owned())]);
        let path = format!("/ws?token={token}");
        let id = run(&[(":path", &path)]).unwrap().unwrap();
        assert_eq!(id.remove_upstream, [CredentialLocation::Query("token".to_owned())]);
        // The bearer header is not a source of this provider.
        let bearer_header = format!("Bearer {token}");
        assert_eq!(run(&[(":path", "/"), ("authorization", &bearer_header)]), Ok(None));
    }

    #[test]
    fn forwarding_keeps_the_token() {
        let signer = Signer::new("HS256", "k1");
        let auth = authenticator(vec![signer.jwk("k1")], json!({"forward": true}));
        let id = bearer(&auth, &signer.sign(claims(json!({})))).unwrap().unwrap();
        assert!(id.remove_upstream.is_empty());
    }

    #[test]
    fn accounts_from_different_sources_never_share_a_name_unless_configured_to() {
        let signer = Signer::new("HS256", "k1");
        let token = signer.sign(claims(json!({})));
        let provider = |extra: Value| {
            let mut p = json!({"issuer": ISSUER, "audiences": "any", "jwks": {"keys": [signer.jwk("k1")]}});
            p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            p
        };
        let keys = json!({"keys": [{"id": "k", "sha256": "ab".repeat(32), "account": "user-1"}]});
        let account = |auth: Value| {
            let auth = parse(&auth.to_string()).unwrap();
            bearer(&auth, &token).unwrap().unwrap().account
        };
        assert_eq!(account(json!({"jwt": {"providers": [provider(json!({}))]}})), "user-1", "the only source");
        let issuer_prefix = format!("{}:user-1", ISSUER.split_once("://").unwrap().1.trim_end_matches('/'));
        assert_eq!(account(json!({"api_keys": keys, "jwt": {"providers": [provider(json!({}))]}})), issuer_prefix);
        let shared = provider(json!({"account_prefix": ""}));
        assert_eq!(account(json!({"api_keys": keys, "jwt": {"providers": [shared]}})), "user-1", "on purpose");
        let named = provider(json!({"account_prefix": "idp:"}));
        assert_eq!(account(json!({"jwt": {"providers": [named]}})), "idp:user-1");
        let bad = provider(json!({"account_prefix": "a b"}));
        let err = parse(&json!({"jwt": {"providers": [bad]}}).to_string()).unwrap_err();
        assert!(err.starts_with("auth.jwt.providers[0].account_prefix: must be at most 64"), "{err}");
    }

    #[test]
    fn several_providers_are_chosen_by_issuer() {
        let a = Signer::new("HS256", "a");
        let b = Signer::new("EdDSA", "b");
        let fallback = Signer::new("HS384", "c");
        let config = json!({"jwt": {"providers": [
            {"issuer": "https://a.example", "audiences": "any", "jwks": {"keys": [a.jwk("a")]}},
            {"issuer": "https://b.example", "audiences": "any", "jwks": {"keys": [b.jwk("b")]}, "claims": {"account": "org"}},
        ]}});
        let auth = parse(&config.to_string()).unwrap();
        let token = |signer: &Signer, iss: &str| {
            let mut c = claims(json!({"org": "bee"}));
            c.issuer = Some(iss.to_owned());
            signer.sign(c)
        };
        // Two sources of accounts: each provider's are its own by default.
        assert_eq!(bearer(&auth, &token(&a, "https://a.example")).unwrap().unwrap().account, "a.example:user-1");
        assert_eq!(bearer(&auth, &token(&b, "https://b.example")).unwrap().unwrap().account, "b.example:bee");
        // Signed by A's key but claiming B: B's keys decide, and refuse.
        assert_eq!(bearer(&auth, &token(&a, "https://b.example")), Err(AuthError::UnknownKeyId { provider: 1 }));
        assert_eq!(bearer(&auth, &token(&a, "https://c.example")), Err(AuthError::WrongIssuer));
        assert_eq!(bearer(&auth, "not-a-jwt"), Err(AuthError::MalformedToken));

        let mut config = config;
        config["jwt"]["providers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"audiences": "any", "jwks": {"keys": [fallback.jwk("c")]}}));
        let auth = parse(&config.to_string()).unwrap();
        assert!(bearer(&auth, &token(&fallback, "https://c.example")).unwrap().is_some());
    }

    #[test]
    fn a_remote_jwks_is_503_until_loaded_then_kept() {
        let signer = Signer::new("ES256", "r1");
        let config = json!({"jwt": {"providers": [{"issuer": ISSUER, "audiences": "any",
            "remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json"}}]}});
        let auth = parse(&config.to_string()).unwrap();
        let provider = auth.provider_state(0);
        let remote = auth.auth.providers()[0].remote_jwks().unwrap();
        assert_eq!((remote.authority.as_str(), remote.refresh_seconds, remote.timeout_ms), ("idp", 600, 5000));
        let token = signer.sign(claims(json!({})));
        assert_eq!(bearer(&auth, &token), Err(AuthError::KeysUnavailable { provider: 0 }));
        assert_eq!(bearer(&auth, &token).unwrap_err().status(), 503);

        assert!(provider.load_remote_jwks(b"{}").is_err());
        assert!(!provider.has_remote_keys());
        let body = json!({"keys": [signer.jwk("r1")]}).to_string();
        let report = provider.load_remote_jwks(body.as_bytes()).unwrap();
        assert_eq!((report.keys, report.skipped.len()), (1, 0));
        assert!(bearer(&auth, &token).unwrap().is_some());

        // Rotation: a token with a new kid is unknown until the next fetch brings its key.
        let rotated = Signer::new("EdDSA", "r2");
        let new_token = rotated.sign(claims(json!({})));
        assert_eq!(bearer(&auth, &new_token), Err(AuthError::UnknownKeyId { provider: 0 }));
        assert!(provider.load_remote_jwks(b"<html>down</html>").is_err());
        let fresh = signer.sign(claims(json!({"fresh": true})));
        assert!(bearer(&auth, &fresh).unwrap().is_some(), "the last good set stays");
        let body = json!({"keys": [signer.jwk("r1"), rotated.jwk("r2")]}).to_string();
        provider.load_remote_jwks(body.as_bytes()).unwrap();
        assert!(bearer(&auth, &new_token).unwrap().is_some());
        // r1 withdrawn: its tokens stop working at once, cached or not.
        let body = json!({"keys": [rotated.jwk("r2")]}).to_string();
        provider.load_remote_jwks(body.as_bytes()).unwrap();
        assert_eq!(bearer(&auth, &token), Err(AuthError::UnknownKeyId { provider: 0 }));
    }

    #[test]
    fn a_cached_token_still_expires_and_is_read_from_where_it_was_sent() {
        let signer = Signer::new("ES256", "k1");
        let auth = authenticator(vec![signer.jwk("k1")], json!({"sources": {"cookie": "access_token"}}));
        let token = signer.sign(claims(json!({})));
        let at = |now: u64, h: &[(&str, &str)]| auth.authenticate(&RequestCredentials::new(&headers(h)), now);
        let bearer_header = format!("Bearer {token}");
        let cookie = format!("access_token={token}");
        let id = at(NOW, &[(":path", "/"), ("authorization", &bearer_header)]).unwrap().unwrap();
        assert_eq!(id.remove_upstream, [CredentialLocation::Authorization]);
        assert_eq!(auth.provider_state(0).cache.borrow().len(), 1);
        let id = at(NOW + 1, &[(":path", "/"), ("cookie", &cookie)]).unwrap().unwrap();
        assert_eq!(id.remove_upstream, [CredentialLocation::Cookie("access_token".to_owned())]);
        // exp is NOW + 300, leeway 60.
        assert!(at(NOW + 360, &[(":path", "/"), ("authorization", &bearer_header)]).is_ok());
        assert_eq!(at(NOW + 361, &[(":path", "/"), ("authorization", &bearer_header)]), Err(AuthError::Expired));
        // iat is NOW - 10: before iat - leeway the cached entry does not answer either.
        assert_eq!(at(NOW - 71, &[(":path", "/"), ("authorization", &bearer_header)]), Err(AuthError::NotYetValid));
    }

    #[test]
    fn the_cache_can_be_turned_off() {
        let signer = Signer::new("HS256", "k1");
        let config = json!({"jwt": {"cache_entries": 0, "providers": [{"audiences": "any", "jwks": {"keys": [signer.jwk("k1")]}}]}});
        let auth = parse(&config.to_string()).unwrap();
        assert!(bearer(&auth, &signer.sign(claims(json!({})))).unwrap().is_some());
        assert_eq!(auth.provider_state(0).cache.borrow().len(), 0);
    }

    #[test]
    fn config_errors_name_the_field() {
        let k = b64(&[1; 32]);
        let cases = [
            (json!({"jwt": {"providers": []}}), "auth.jwt.providers: must list at least one provider"),
            (json!({"jwt": {"providers": [{}]}}), "auth.jwt.providers[0]: has no keys"),
            (
                json!({"jwt": {"providers": [{"audiences": [], "secrets": [{"secret": k}]}]}}),
                "auth.jwt.providers[0].audiences: must list at least one audience",
            ),
            (
                json!({"jwt": {"providers": [{"issuer": "", "secrets": [{"secret": k}]}]}}),
                "auth.jwt.providers[0].issuer: must not be empty",
            ),
            (
                json!({"jwt": {"providers": [{"audiences": "any", "secrets": [{"secret": k}]}, {"audiences": "any", "secrets": [{"secret": k}]}]}}),
                "auth.jwt.providers[1].issuer: providers[0] already omits issuer",
            ),
            (
                json!({"jwt": {"providers": [{"issuer": "a", "audiences": "any", "secrets": [{"secret": k}]}, {"issuer": "a", "audiences": "any", "secrets": [{"secret": k}]}]}}),
                "auth.jwt.providers[1].issuer: the same issuer as providers[0]",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": "not base64!"}]}]}}),
                "auth.jwt.providers[0].secrets[0].secret: not valid base64",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": "c2hvcnQ="}]}]}}),
                "auth.jwt.providers[0].secrets[0].secret: an HS256 secret must be at least 32 bytes, this one has 5",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k, "alg": "HS999"}]}]}}),
                "auth.jwt.providers[0].secrets[0].alg: unknown variant `HS999`",
            ),
            (
                json!({"jwt": {"providers": [{"jwks": {"keys": [{"kty": "oct", "kid": "x", "k": k}]}, "secrets": [{"kid": "x", "secret": k}]}]}}),
                "auth.jwt.providers[0].secrets[0].kid: \"x\" is empty or used by another key",
            ),
            (
                json!({"jwt": {"providers": [{"jwks": {"keys": [{"kty": "oct", "k": k}, {"kty": "oct", "k": k}, {"kty": "RSA", "n": "%%", "e": "AQAB"}]}}]}}),
                "auth.jwt.providers[0].jwks.keys[2].n: not valid base64url",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "sources": {"authorization": false}}]}}),
                "auth.jwt.providers[0].sources: must enable at least one",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "sources": {"cookie": "a b"}}]}}),
                "auth.jwt.providers[0].sources.cookie: \"a b\" is not a valid cookie name",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "sources": {"query": "t&x"}}]}}),
                "auth.jwt.providers[0].sources.query: \"t&x\" must be letters",
            ),
            (
                json!({"jwt": {"providers": [{"remote_jwks": {"cluster": "idp", "path": "jwks"}}]}}),
                "auth.jwt.providers[0].remote_jwks.path: must start with '/'",
            ),
            (
                json!({"jwt": {"providers": [{"remote_jwks": {"cluster": "idp", "path": "/j", "refresh_seconds": 0}}]}}),
                "auth.jwt.providers[0].remote_jwks.refresh_seconds: must be > 0",
            ),
            (
                json!({"jwt": {"providers": [{"remote_jwks": {"cluster": "", "path": "/j"}}]}}),
                "auth.jwt.providers[0].remote_jwks.cluster: must name an Envoy cluster",
            ),
            (
                json!({"jwt": {"providers": [{"remote_jwks": {"cluster": "idp", "path": "/j", "url": "x"}}]}}),
                "auth.jwt.providers[0].remote_jwks.url: unknown field `url`",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "claims": {"subject": ""}}]}}),
                "auth.jwt.providers[0].claims.subject: must name a claim",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "leeway_seconds": 7200}]}}),
                "auth.jwt.providers[0].leeway_seconds: must be at most 3600",
            ),
            (
                json!({"jwt": {"providers": [{"secrets": [{"secret": k}], "revoked_jti": ["a", ""]}]}}),
                "auth.jwt.providers[0].revoked_jti[1]: must not be empty",
            ),
            (json!({"max_credential_bytes": 0}), "auth.max_credential_bytes: must be > 0"),
        ];
        for (config, expected) in cases {
            let message = parse(&config.to_string()).unwrap_err();
            assert!(message.starts_with(expected), "{config}\n  gave: {message}\n  want: {expected}");
        }
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let auth = parse(&json!({"jwt": {"providers": [{"audiences": "any", "secrets": [{"kid": "s", "secret": b64(b"0123456789abcdef0123456789abcdef")}]}]}}).to_string()).unwrap();
        let text = format!("{auth:?}");
        assert!(text.contains("HS256") && !text.contains("MDEy") && !text.contains("0123"), "{text}");
    }

    /// Per-algorithm cost of the whole bearer path (header lookup, key selection, signature,
    /// claims, identity). `cargo test --release --lib auth::jwt::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark, run by hand in release mode"]
    fn bench_verify_per_algorithm() {
        let time = |auth: &Fixture, request: &RequestCredentials| {
            let run = |n: u32| {
                let start = Instant::now();
                for _ in 0..n {
                    let identity = auth.authenticate(request, NOW).unwrap().unwrap();
                    std::hint::black_box(identity);
                }
                start.elapsed()
            };
            run(20);
            let mut n = 50;
            while run(n).as_millis() < 100 {
                n *= 2;
            }
            // The best of several rounds: the least disturbed by whatever else the machine does.
            let best = (0..5).map(|_| run(n)).min().unwrap_or_default();
            best.as_secs_f64() * 1e6 / f64::from(n)
        };
        println!("   alg   verify µs/op   cached µs/op   token bytes");
        for alg in ALGORITHMS {
            let signer = Signer::new(alg, "k1");
            let jwks = json!({"keys": [signer.jwk("k1")]});
            let cold = parse(&json!({"jwt": {"cache_entries": 0, "providers": [{"jwks": jwks}]}}).to_string()).unwrap();
            let warm = parse(&json!({"jwt": {"providers": [{"jwks": jwks}]}}).to_string()).unwrap();
            let token = signer.sign(claims(json!({"scope": "read write", "tier": "pro"})));
            let h = headers(&[(":path", "/api"), ("authorization", &format!("Bearer {token}"))]);
            let request = RequestCredentials::new(&h);
            let (verify, cached) = (time(&cold, &request), time(&warm, &request));
            println!("{alg:>6}   {verify:>12.2}   {cached:>12.2}   {:>11}", token.len());
        }
    }
}
