//! Authentication (pipeline step 4): who the caller is, from a bearer JWT or an API key, plus
//! HMAC request signatures and route scopes. Pure logic: the wasm glue hands in the request
//! headers and the clock, fetches remote JWKS documents, and turns an `AuthError` into a response.

pub mod api_key;
mod cache;
pub mod jwks;
pub mod jwt;
pub mod signature;

use std::fmt;

use serde::Deserialize;

use crate::common::ConfigError;
use crate::ratelimit::{AddressBudget, RawLimits};

pub use api_key::{ApiKeys, RawApiKey, RawApiKeys};
pub use jwks::{RawJwk, RawJwks};
pub use jwt::{
    JwksReport, Provider, ProviderState, RawClaimMapping, RawHmacAlgorithm, RawHmacSecret, RawJwt, RawProvider,
    RawRemoteJwks, RawTokenSources, RemoteJwks,
};
pub use signature::{
    Accepted, BodyCheck, PendingSignature, RawSignatures, RawSigningSecret, ReplayCache, SignatureScheme, Signatures,
};

/// Where the auth section sits in the plugin configuration; every error path starts with it.
const PATH: &str = "auth";

/// The realm named in every `WWW-Authenticate` challenge.
const REALM: &str = "tollgate";

/// How a caller may prove who they are. Each part is optional; with none, no request carries an
/// identity and routes that require one answer 401.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// The longest bearer token or API key accepted, in bytes. Longer ones are refused before any
    /// parsing, so a huge header cannot cost more than a length check.
    #[serde(default = "default_max_credential_bytes")]
    pub max_credential_bytes: usize,
    /// JWT bearer tokens, from one or more issuers.
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    /// API keys, stored only as SHA-256 hashes.
    #[serde(default)]
    pub api_keys: Option<RawApiKeys>,
    /// HMAC request signatures (`X-Signature`, `X-Timestamp`) for routes that require them.
    #[serde(default)]
    pub signatures: Option<RawSignatures>,
    /// Failed authentications allowed per client address, checked before any credential is
    /// verified: past them every request of that address is 429 until its budget refills. On by
    /// default; `null` turns it off.
    #[serde(default = "default_failures")]
    pub failures: Option<RawFailures>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            max_credential_bytes: default_max_credential_bytes(),
            jwt: None,
            api_keys: None,
            signatures: None,
            failures: default_failures(),
        }
    }
}

fn default_max_credential_bytes() -> usize {
    8192
}

/// `auth.failures`: the budget of failed authentications per client address (IPv6 per /64).
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawFailures {
    /// Failures per minute; `null` for none.
    #[serde(default = "default_failures_per_minute")]
    pub per_minute: Option<u64>,
    /// Failures per hour, on top.
    #[serde(default)]
    pub per_hour: Option<u64>,
    /// The most failures back to back; by default the whole per-minute budget.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Client addresses tracked at once, in a table of Envoy's shared data of its own (about
    /// 160 bytes each), fixed at start.
    #[serde(default = "default_failure_slots")]
    pub slots: u32,
}

fn default_failures() -> Option<RawFailures> {
    Some(RawFailures {
        per_minute: default_failures_per_minute(),
        per_hour: None,
        burst: None,
        slots: default_failure_slots(),
    })
}
fn default_failures_per_minute() -> Option<u64> {
    Some(30)
}
fn default_failure_slots() -> u32 {
    4096
}

/// A secret from the configuration: deserialized like a string, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The validated authentication settings, every key decoded once at plugin start.
#[derive(Debug)]
pub struct Authenticator {
    max_credential_bytes: usize,
    failures: Option<AddressBudget>,
    providers: Vec<Provider>,
    api_keys: Option<ApiKeys>,
    signatures: Option<Signatures>,
}

impl TryFrom<&RawAuth> for Authenticator {
    type Error = ConfigError;

    fn try_from(raw: &RawAuth) -> Result<Authenticator, ConfigError> {
        if raw.max_credential_bytes == 0 {
            return Err(ConfigError::at(format!("{PATH}.max_credential_bytes"), "must be > 0"));
        }
        let providers = match &raw.jwt {
            Some(jwt) => jwt::compile_providers(jwt, &format!("{PATH}.jwt"), raw.api_keys.is_some())?,
            None => Vec::new(),
        };
        let api_keys = raw.api_keys.as_ref().map(|k| ApiKeys::compile(k, &format!("{PATH}.api_keys"))).transpose()?;
        let signatures =
            raw.signatures.as_ref().map(|s| Signatures::compile(s, &format!("{PATH}.signatures"))).transpose()?;
        // Without a way to authenticate nothing can fail, and no table is made.
        let failures = match &raw.failures {
            Some(f) if !providers.is_empty() || api_keys.is_some() => {
                let limits = RawLimits {
                    per_second: None,
                    per_minute: f.per_minute,
                    per_hour: f.per_hour,
                    per_day: None,
                    burst: f.burst,
                };
                Some(AddressBudget::new(&format!("{PATH}.failures"), &limits, "auth-failures", f.slots)?)
            }
            _ => None,
        };
        Ok(Authenticator { max_credential_bytes: raw.max_credential_bytes, failures, providers, api_keys, signatures })
    }
}

/// What one worker keeps for authentication across requests: per JWT provider, in configuration
/// order, the remote documents it fetched and the tokens it verified.
pub struct AuthState {
    providers: Vec<ProviderState>,
}

impl AuthState {
    pub fn new(auth: &Authenticator) -> AuthState {
        AuthState { providers: auth.providers.iter().map(ProviderState::new).collect() }
    }

    /// Tokens refused from memory, unchecked, since the last call: the pipeline counts them.
    pub fn take_remembered_refusals(&self) -> u64 {
        self.providers.iter().map(ProviderState::take_remembered_refusals).sum()
    }

    /// Provider `index`'s state, as `Authenticator::providers` numbers them.
    pub fn provider(&self, index: usize) -> Option<&ProviderState> {
        self.providers.get(index)
    }
}

impl Authenticator {
    /// The JWT providers in configuration order; a provider's index is what `AuthError` variants
    /// and the remote-JWKS glue refer to it by.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    pub fn signatures(&self) -> Option<&Signatures> {
        self.signatures.as_ref()
    }

    /// The budget of failed authentications per client address, when one is kept.
    pub fn failures(&self) -> Option<&AddressBudget> {
        self.failures.as_ref()
    }

    /// Whether the request's credential costs no signature check: an API key (a hash), none, or
    /// a JWT this worker verified already. Only a signature check is worth refusing an address
    /// over its failure budget before it runs.
    pub fn verifies_cheaply(&self, state: &AuthState, request: &RequestCredentials, now: u64) -> bool {
        let Ok(authorization) = request.single_header("authorization", "Authorization header") else { return false };
        match jwt::find_tokens(&self.providers, request, split_authorization(authorization).bearer) {
            Ok(tokens) => tokens.is_empty() || jwt::cached(&state.providers, &tokens, now),
            Err(_) => false,
        }
    }

    /// Finds and verifies the caller's credential. `Ok(None)`: the request carries none (the route
    /// decides whether that is acceptable). A bearer JWT wins over an API key when both are sent,
    /// and the API key is then not looked at, only removed.
    /// `state` is this worker's (`AuthState::new` of this authenticator).
    pub fn authenticate(
        &self,
        state: &AuthState,
        request: &RequestCredentials,
        now: u64,
    ) -> Result<Option<Identity>, AuthError> {
        let authorization = split_authorization(request.single_header("authorization", "Authorization header")?);
        let api_key = match &self.api_keys {
            Some(keys) => presented_api_key(keys, request, &authorization)?,
            None => None,
        };
        let api_key_location = api_key.as_ref().and_then(|(_, location)| location.clone());

        let tokens = jwt::find_tokens(&self.providers, request, authorization.bearer)?;
        if !tokens.is_empty() {
            let mut identity = jwt::verify(&self.providers, &state.providers, &tokens, self.max_credential_bytes, now)?;
            identity.remove_upstream.extend(api_key_location);
            return Ok(Some(identity));
        }
        let (Some(keys), Some((key, location))) = (&self.api_keys, api_key) else {
            return Ok(None);
        };
        if key.len() > self.max_credential_bytes {
            return Err(AuthError::CredentialTooLarge { limit: self.max_credential_bytes });
        }
        let mut identity = keys.verify(key, now)?;
        identity.remove_upstream.extend(location);
        Ok(Some(identity))
    }
}

/// The API key and where it came from (`None` location when the config forwards it). Given in
/// both places it is refused, even when the two agree: a client that sends two has a bug the
/// gateway should not paper over.
fn presented_api_key<'r>(
    keys: &ApiKeys,
    request: &RequestCredentials<'r>,
    authorization: &Authorization<'r>,
) -> Result<Option<(&'r str, Option<CredentialLocation>)>, AuthError> {
    let header = request.single_header(keys.header(), "API key header")?;
    let (key, location) = match (header, authorization.api_key) {
        (Some(_), Some(_)) => return Err(AuthError::DuplicateCredential("API key (header and Authorization)")),
        (Some(key), None) => (key, CredentialLocation::Header(keys.header().to_owned())),
        (None, Some(key)) => (key, CredentialLocation::Authorization),
        (None, None) => return Ok(None),
    };
    Ok(Some((key, (!keys.forward()).then_some(location))))
}

/// The parts of a request that can carry a credential.
#[derive(Debug, Clone, Copy)]
pub struct RequestCredentials<'a> {
    headers: &'a [(String, String)],
    /// The query string of `:path`, without `?` or fragment.
    query: &'a str,
}

impl<'a> RequestCredentials<'a> {
    /// `headers` as the pipeline has them: lower-case names, pseudo-headers included.
    pub fn new(headers: &'a [(String, String)]) -> RequestCredentials<'a> {
        let path = headers.iter().find(|(n, _)| n == ":path").map_or("", |(_, v)| v.as_str());
        let before_fragment = path.split('#').next().unwrap_or_default();
        let query = before_fragment.split_once('?').map_or("", |(_, q)| q);
        RequestCredentials { headers, query }
    }

    /// A header that may appear at most once; two are refused rather than one picked.
    fn single_header(&self, name: &str, what: &'static str) -> Result<Option<&'a str>, AuthError> {
        let mut found = self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let first = found.next();
        match found.next() {
            Some(_) => Err(AuthError::DuplicateCredential(what)),
            None => Ok(first),
        }
    }

    /// The value of cookie `name` across every `cookie` header (HTTP/2 may split them).
    fn cookie(&self, name: &str) -> Result<Option<&'a str>, AuthError> {
        let mut value = None;
        for (_, header) in self.headers.iter().filter(|(n, _)| n == "cookie") {
            for pair in header.split(';') {
                let Some((n, v)) = pair.split_once('=') else { continue };
                if n.trim() == name {
                    if value.is_some() {
                        return Err(AuthError::DuplicateCredential("token cookie"));
                    }
                    let v = v.trim();
                    value = Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v));
                }
            }
        }
        Ok(value)
    }

    /// The percent-decoded value of query parameter `name`.
    fn query_param(&self, name: &str) -> Result<Option<String>, AuthError> {
        let mut value = None;
        for pair in self.query.split('&') {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            if n == name {
                if value.is_some() {
                    return Err(AuthError::DuplicateCredential("token query parameter"));
                }
                value = Some(percent_decode(v).ok_or(AuthError::MalformedToken)?);
            }
        }
        Ok(value)
    }

    pub(crate) fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The credential in an `Authorization` header, by scheme (RFC 9110: schemes are case-insensitive).
#[derive(Default)]
struct Authorization<'a> {
    bearer: Option<&'a str>,
    api_key: Option<&'a str>,
}

fn split_authorization(value: Option<&str>) -> Authorization<'_> {
    let Some((scheme, credential)) = value.and_then(|v| v.trim().split_once(' ')) else {
        return Authorization::default();
    };
    let credential = credential.trim_start();
    if scheme.eq_ignore_ascii_case("bearer") {
        Authorization { bearer: Some(credential), api_key: None }
    } else if scheme.eq_ignore_ascii_case("apikey") {
        Authorization { bearer: None, api_key: Some(credential) }
    } else {
        Authorization::default()
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push((hex_value(hex[0])? << 4) | hex_value(hex[1])?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// 64 hex digits, either case, as 32 bytes.
pub(crate) fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(out)
}

/// Base64url as JWKs carry it (RFC 7515: no padding); padding is tolerated because some
/// identity providers publish it.
pub(crate) fn decode_base64url(s: &str) -> Option<Vec<u8>> {
    use ct_codecs::{Base64UrlSafeNoPadding, Decoder};
    Base64UrlSafeNoPadding::decode_to_vec(s.trim_end_matches('='), None).ok()
}

/// A secret an operator pasted: standard or URL-safe alphabet, padded or not.
pub(crate) fn decode_base64_any(s: &str) -> Option<Vec<u8>> {
    use ct_codecs::{Base64NoPadding, Decoder};
    let s = s.trim_end_matches('=');
    if s.contains(['-', '_']) {
        decode_base64url(s)
    } else {
        Base64NoPadding::decode_to_vec(s, None).ok()
    }
}

/// A value the filter will put in an upstream header: no control characters, so a claim cannot
/// smuggle a header line.
pub(crate) fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b >= 0x20 && b != 0x7f)
}

/// RFC 6749 `scope-token`: visible ASCII except `"` and `\`.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// How the caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

impl AuthMethod {
    /// The value of the upstream auth-method header.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
        }
    }
}

/// Where a credential travelled, so the glue can remove it before the request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialLocation {
    /// The `Authorization` header (bearer token or `ApiKey` scheme).
    Authorization,
    /// A request header, lower-case name (the API key header).
    Header(String),
    /// A cookie in the `cookie` header(s); see `remove_cookie`.
    Cookie(String),
    /// A query parameter of `:path`; see `remove_query_param`.
    Query(String),
}

/// The verified caller, as later steps and the upstream see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    /// The account that is rate-limited and billed.
    pub account: String,
    pub tier: Option<String>,
    pub method: AuthMethod,
    /// The id of the API key used; `None` for JWTs.
    pub key_id: Option<String>,
    pub scopes: Vec<String>,
    /// Credentials to strip before the request goes upstream: the one used, and an API key that
    /// lost to a JWT. Empty when the config forwards them.
    pub remove_upstream: Vec<CredentialLocation>,
}

/// A `cookie` header value without cookie `name`; `None` when nothing else is left.
pub fn remove_cookie(header: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map_or(*pair, |(n, _)| n).trim() != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// `:path` without query parameter `name`; the `?` goes too when it was the only one.
pub fn remove_query_param(path: &str, name: &str) -> String {
    let (before_fragment, fragment) = match path.split_once('#') {
        Some((p, f)) => (p, Some(f)),
        None => (path, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return path.to_owned();
    };
    let kept: Vec<&str> =
        query.split('&').filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) != name).collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// A route that requires scopes: every one must be among the caller's.
pub fn require_scopes(identity: &Identity, required: &[String]) -> Result<(), AuthError> {
    if required.iter().all(|scope| identity.scopes.contains(scope)) {
        Ok(())
    } else {
        Err(AuthError::InsufficientScope { required: required.join(" ") })
    }
}

/// Why a request's credentials were refused. Messages are safe to send to the client: they never
/// contain a token, a key, a secret or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the request carries more than one {0}")]
    DuplicateCredential(&'static str),
    #[error("the credential is longer than {limit} bytes")]
    CredentialTooLarge { limit: usize },
    #[error("the bearer token is not a well-formed JWT")]
    MalformedToken,
    #[error("the token's signing algorithm is not accepted")]
    UnsupportedAlgorithm,
    #[error("no key of this issuer verifies the token's algorithm")]
    AlgorithmMismatch,
    /// The glue refetches provider `provider`'s remote JWKS (rate-limited) and retries once.
    #[error("the token's key id is not known")]
    UnknownKeyId { provider: usize },
    /// The provider's remote JWKS has never loaded: the gateway cannot tell, so 503, not 401.
    #[error("the signing keys or revocation list for this token have not loaded yet")]
    KeysUnavailable { provider: usize },
    #[error("the token's signature is not valid")]
    BadSignature,
    /// Past `max_keys_without_kid`: refused before any of the keys is tried.
    #[error("the token names no key id and {keys} keys could have signed it")]
    KeyIdRequired { keys: usize },
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("the token's claim `{0}` has a value the gateway cannot use")]
    InvalidClaim(String),
    #[error("the token has been revoked")]
    Revoked,
    #[error("the API key is not valid")]
    UnknownApiKey,
    #[error("the API key has expired")]
    ApiKeyExpired,
    #[error("the API key has been deactivated")]
    ApiKeyInactive,
    #[error("this route requires the scopes: {required}")]
    InsufficientScope { required: String },
    #[error("the request must be signed (signature and timestamp headers)")]
    SignatureMissing,
    #[error("the request signature is not a hex-encoded HMAC-SHA256")]
    SignatureMalformed,
    #[error("the request timestamp is not a Unix time in seconds")]
    TimestampMalformed,
    #[error("the request timestamp is more than {max_skew_seconds} s away from the gateway's clock")]
    TimestampOutsideSkew { max_skew_seconds: u64 },
    #[error("the request timestamp is more than {max_seconds} s ahead of the gateway's clock")]
    TimestampInFuture { max_seconds: u64 },
    #[error("no signing secret is configured for this caller")]
    NoSigningSecret,
    #[error("the request signature does not match")]
    SignatureMismatch,
    #[error("the request signature was already used")]
    SignatureReplayed,
    #[error("a signed request with a body must carry a Content-Digest header with a sha-256 digest (RFC 9530)")]
    DigestMissing,
    #[error("the Content-Digest header is malformed or has no sha-256 digest")]
    DigestMalformed,
    #[error("the request body does not match its signed Content-Digest")]
    DigestMismatch,
    #[error("too many recent signed requests to rule out a replay")]
    ReplayCacheFull,
}

/// The response class of an `AuthError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthErrorKind {
    /// 401 with `error="invalid_request"`: credentials the gateway will not read.
    InvalidRequest,
    /// 401 with `error="invalid_token"`: a bearer token that does not verify.
    InvalidToken,
    /// 401 with a plain challenge: an API key or request signature that does not verify.
    Unauthorized,
    /// 403 with `error="insufficient_scope"`.
    InsufficientScope,
    /// 503: the gateway cannot decide yet.
    Unavailable,
}

impl AuthErrorKind {
    pub fn status(self) -> u16 {
        match self {
            AuthErrorKind::InvalidRequest | AuthErrorKind::InvalidToken | AuthErrorKind::Unauthorized => 401,
            AuthErrorKind::InsufficientScope => 403,
            AuthErrorKind::Unavailable => 503,
        }
    }
}

impl AuthError {
    pub fn kind(&self) -> AuthErrorKind {
        use AuthError::*;
        match self {
            DuplicateCredential(_) | CredentialTooLarge { .. } => AuthErrorKind::InvalidRequest,
            MalformedToken
            | UnsupportedAlgorithm
            | AlgorithmMismatch
            | UnknownKeyId { .. }
            | BadSignature
            | KeyIdRequired { .. }
            | Expired
            | NotYetValid
            | WrongIssuer
            | WrongAudience
            | MissingClaim(_)
            | InvalidClaim(_)
            | Revoked => AuthErrorKind::InvalidToken,
            UnknownApiKey
            | ApiKeyExpired
            | ApiKeyInactive
            | SignatureMissing
            | SignatureMalformed
            | TimestampMalformed
            | TimestampOutsideSkew { .. }
            | TimestampInFuture { .. }
            | NoSigningSecret
            | SignatureMismatch
            | SignatureReplayed
            | DigestMissing
            | DigestMalformed
            | DigestMismatch => AuthErrorKind::Unauthorized,
            InsufficientScope { .. } => AuthErrorKind::InsufficientScope,
            KeysUnavailable { .. } | ReplayCacheFull => AuthErrorKind::Unavailable,
        }
    }

    pub fn status(&self) -> u16 {
        self.kind().status()
    }

    /// Whether this refusal spends the client address's failure budget: a credential that did not
    /// verify (or that the gateway would not read), never a 403 or the gateway's own 503.
    pub fn is_failure(&self) -> bool {
        matches!(self.kind(), AuthErrorKind::InvalidRequest | AuthErrorKind::InvalidToken | AuthErrorKind::Unauthorized)
    }

    /// The `WWW-Authenticate` value (RFC 6750 §3), or `None` for a 503.
    pub fn www_authenticate(&self) -> Option<String> {
        let error = match self.kind() {
            AuthErrorKind::Unavailable => return None,
            AuthErrorKind::Unauthorized => return Some(challenge()),
            AuthErrorKind::InvalidRequest => "invalid_request",
            AuthErrorKind::InvalidToken => "invalid_token",
            AuthErrorKind::InsufficientScope => "insufficient_scope",
        };
        let description = quotable(&self.to_string());
        let mut value = format!("{}, error=\"{error}\", error_description=\"{description}\"", challenge());
        if let AuthError::InsufficientScope { required } = self {
            value.push_str(&format!(", scope=\"{}\"", quotable(required)));
        }
        Some(value)
    }
}

/// The plain challenge for a request without (usable) credentials.
pub fn challenge() -> String {
    format!("Bearer realm=\"{REALM}\"")
}

/// RFC 6750 quoted values: printable ASCII without `"` or `\`. Claim names and scopes come from
/// the config, which may hold anything.
fn quotable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An authenticator and one worker's state for it, as the pipeline holds them.
    pub(crate) struct Fixture {
        pub(crate) auth: Authenticator,
        pub(crate) state: AuthState,
    }

    impl Fixture {
        pub(crate) fn authenticate(
            &self,
            request: &RequestCredentials,
            now: u64,
        ) -> Result<Option<Identity>, AuthError> {
            self.auth.authenticate(&self.state, request, now)
        }

        pub(crate) fn provider_state(&self, index: usize) -> &ProviderState {
            self.state.provider(index).unwrap()
        }
    }

    impl fmt::Debug for Fixture {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.auth.fmt(f)
        }
    }

    /// Parses a `RawAuth` the way the plugin config does, with serde's field path on errors.
    pub(crate) fn parse(json: &str) -> Result<Fixture, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let raw: RawAuth = serde_path_to_error::deserialize(&mut de).map_err(|e| format!("{PATH}.{e}"))?;
        let auth = Authenticator::try_from(&raw).map_err(|e| e.to_string())?;
        Ok(Fixture { state: AuthState::new(&auth), auth })
    }

    pub(crate) fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn authorization_schemes_are_case_insensitive() {
        let cases = [
            (Some("Bearer abc"), Some("abc"), None),
            (Some("bearer   abc"), Some("abc"), None),
            (Some("ApiKey k1"), None, Some("k1")),
            (Some("APIKEY k1"), None, Some("k1")),
            (Some("Basic dXNlcg=="), None, None),
            (Some("Bearer"), None, None),
            (None, None, None),
        ];
        for (value, bearer, api_key) in cases {
            let a = split_authorization(value);
            assert_eq!((a.bearer, a.api_key), (bearer, api_key), "{value:?}");
        }
    }

    #[test]
    fn cookies_and_query_parameters_are_read_whole_or_refused() {
        let h = headers(&[
            (":path", "/ws?a=1&token=x%2Ey&b#frag"),
            ("cookie", "a=1; access_token=\"tok\""),
            ("cookie", "other=2"),
        ]);
        let r = RequestCredentials::new(&h);
        assert_eq!(r.cookie("access_token"), Ok(Some("tok")));
        assert_eq!(r.cookie("missing"), Ok(None));
        assert_eq!(r.query_param("token"), Ok(Some("x.y".to_owned())));
        assert_eq!(r.query_param("b"), Ok(Some(String::new())));

        let h = headers(&[(":path", "/ws?token=a&token=b"), ("cookie", "t=1"), ("cookie", "t=2")]);
        let r = RequestCredentials::new(&h);
        assert_eq!(r.query_param("token"), Err(AuthError::DuplicateCredential("token query parameter")));
        assert_eq!(r.cookie("t"), Err(AuthError::DuplicateCredential("token cookie")));
        let h = headers(&[(":path", "/ws?token=%zz")]);
        assert_eq!(RequestCredentials::new(&h).query_param("token"), Err(AuthError::MalformedToken));
    }

    #[test]
    fn credentials_can_be_removed_from_cookie_and_path() {
        assert_eq!(remove_cookie("a=1; access_token=t; b=2", "access_token").as_deref(), Some("a=1; b=2"));
        assert_eq!(remove_cookie("access_token=t", "access_token"), None);
        assert_eq!(remove_query_param("/ws?token=t&x=1#f", "token"), "/ws?x=1#f");
        assert_eq!(remove_query_param("/ws?token=t", "token"), "/ws");
        assert_eq!(remove_query_param("/ws", "token"), "/ws");
    }

    #[test]
    fn errors_map_to_statuses_and_challenges() {
        let cases: &[(AuthError, u16, Option<&str>)] = &[
            (
                AuthError::Expired,
                401,
                Some(r#"Bearer realm="tollgate", error="invalid_token", error_description="the token has expired""#),
            ),
            (
                AuthError::DuplicateCredential("Authorization header"),
                401,
                Some(
                    r#"Bearer realm="tollgate", error="invalid_request", error_description="the request carries more than one Authorization header""#,
                ),
            ),
            (AuthError::UnknownApiKey, 401, Some(r#"Bearer realm="tollgate""#)),
            (AuthError::SignatureReplayed, 401, Some(r#"Bearer realm="tollgate""#)),
            (
                AuthError::InsufficientScope { required: "read write".to_owned() },
                403,
                Some(
                    r#"Bearer realm="tollgate", error="insufficient_scope", error_description="this route requires the scopes: read write", scope="read write""#,
                ),
            ),
            (
                AuthError::MissingClaim("ünïcode \"x\"".to_owned()),
                401,
                Some(
                    r#"Bearer realm="tollgate", error="invalid_token", error_description="the token lacks the required claim `?n?code 'x'`""#,
                ),
            ),
            (AuthError::KeysUnavailable { provider: 0 }, 503, None),
            (AuthError::ReplayCacheFull, 503, None),
        ];
        for (error, status, challenge) in cases {
            assert_eq!(error.status(), *status, "{error:?}");
            assert_eq!(error.www_authenticate().as_deref(), *challenge, "{error:?}");
        }
    }

    #[test]
    fn scope_check() {
        let identity = Identity {
            subject: "u".to_owned(),
            account: "a".to_owned(),
            tier: None,
            method: AuthMethod::Jwt,
            key_id: None,
            scopes: vec!["read".to_owned(), "write".to_owned()],
            remove_upstream: Vec::new(),
        };
        assert_eq!(require_scopes(&identity, &[]), Ok(()));
        assert_eq!(require_scopes(&identity, &["read".to_owned()]), Ok(()));
        let err = require_scopes(&identity, &["read".to_owned(), "admin".to_owned()]).unwrap_err();
        assert_eq!(err, AuthError::InsufficientScope { required: "read admin".to_owned() });
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn an_empty_auth_section_finds_no_caller() {
        let auth = parse("{}").unwrap();
        let h = headers(&[(":path", "/"), ("authorization", "Bearer abc"), ("x-api-key", "k")]);
        assert_eq!(auth.authenticate(&RequestCredentials::new(&h), 0), Ok(None));
        let h = headers(&[(":path", "/"), ("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(
            auth.authenticate(&RequestCredentials::new(&h), 0),
            Err(AuthError::DuplicateCredential("Authorization header"))
        );
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let secret: SecretString = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn base64_and_hex_helpers() {
        assert_eq!(decode_base64url("AQAB"), Some(vec![1, 0, 1]));
        assert_eq!(decode_base64url("AQAB=="), Some(vec![1, 0, 1]));
        assert_eq!(decode_base64url("AQ+B"), None);
        assert_eq!(decode_base64_any("+/8="), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_base64_any("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_base64_any("***"), None);
        assert_eq!(decode_hex32(&"aB".repeat(32)), Some([0xab; 32]));
        assert_eq!(decode_hex32(&"zz".repeat(32)), None);
        assert_eq!(decode_hex32("ab"), None);
    }
}
