//! The plugin configuration: JSON wire types (the documented format) and the validated `Config`
//! the pipeline runs on. Parsing and validation happen once, when the plugin starts; every error
//! names the field path so an operator can find the mistake.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::auth::{Authenticator, RawAuth};
use crate::credits::{Credits, PolicyCredits, RawCredits, RawPolicyCredits};
use crate::ratelimit::{RateLimits, RawPolicyLimit, RawRateLimits};
use crate::routes::{Access, Policy, RouteTable};

/// An HTTP method, as routes and content-type rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
}

impl Method {
    /// Parses the value of Envoy's `:method` pseudo-header.
    pub fn from_header(value: &str) -> Option<Method> {
        Some(match value {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "CONNECT" => Method::Connect,
            "TRACE" => Method::Trace,
            _ => return None,
        })
    }
}

/// The whole plugin configuration, given as JSON in the Wasm filter's `configuration`.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[cfg_attr(not(target_arch = "wasm32"), schemars(title = "tollgate plugin configuration"))]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Named policies. Routes, `default_policy` and Envoy route metadata refer to them by name.
    pub policies: BTreeMap<String, RawPolicy>,
    /// The prefix table: the longest matching `prefix` (among entries whose `methods` allow the
    /// request's method) selects the policy. Envoy route metadata, when present, wins over it.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// The policy for paths no route matches. Omitted: such requests are refused with 404.
    #[serde(default)]
    pub default_policy: Option<String>,
    /// Limits that apply to every policy that does not set its own.
    #[serde(default)]
    pub request_checks: RawRequestChecks,
    /// Headers added to every response the client sees, the filter's own errors included.
    #[serde(default)]
    pub security_headers: RawSecurityHeaders,
    /// The headers the filter sets upstream for the verified caller. Whatever the client sends
    /// under these names is removed before the request goes on.
    #[serde(default)]
    pub identity_headers: RawIdentityHeaders,
    /// How callers prove who they are: JWT providers, API keys, request signatures.
    #[serde(default)]
    pub auth: RawAuth,
    /// Tier and anonymous limits, and the shared-data table the counts live in. Policies opt in
    /// with `rate_limit`.
    #[serde(default)]
    pub rate_limits: Option<RawRateLimits>,
    /// The credit service that billed policies (`credits` on a policy) reserve their cost with.
    #[serde(default)]
    pub credits: Option<RawCredits>,
}

/// What protections apply to the requests a route selects.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Who may call: `public` (anyone), `authenticated` (a verified caller), or `deny` (nobody: 404).
    pub access: Access,
    /// The largest request body in bytes; overrides `request_checks.max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Allowed `Content-Type` media types per method; overrides `request_checks.content_types`.
    #[serde(default)]
    pub content_types: Option<BTreeMap<Method, Vec<String>>>,
    /// The `Cache-Control` value for responses on this policy's routes; overrides
    /// `security_headers.cache_control`.
    #[serde(default)]
    pub cache_control: Option<String>,
    /// Scopes the caller must all have (`authenticated` policies only); a caller without them
    /// gets 403.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Require an HMAC request signature (`auth.signatures`) on top of the caller's credential.
    #[serde(default)]
    pub signature: bool,
    /// Rate-limit this policy's requests. Omitted: never limited.
    #[serde(default)]
    pub rate_limit: Option<RawPolicyLimit>,
    /// Bill this policy's requests to the caller's account (`authenticated` policies only).
    #[serde(default)]
    pub credits: Option<RawPolicyCredits>,
}

/// One entry of the prefix table.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// A path prefix that starts with `/`. It matches whole segments: `/api` matches `/api` and
    /// `/api/x`, never `/apix`. A trailing `/` is ignored.
    pub prefix: String,
    /// Methods this entry applies to; omitted means all methods.
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// The name of a policy in `policies`.
    pub policy: String,
}

/// Request size and shape limits.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRequestChecks {
    /// The largest request body in bytes, by `Content-Length` or counted as it streams.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Allowed `Content-Type` media types (parameters such as `charset` ignored) per method.
    /// Methods not listed accept any content type.
    #[serde(default = "default_content_types")]
    pub content_types: BTreeMap<Method, Vec<String>>,
}

impl Default for RawRequestChecks {
    fn default() -> Self {
        RawRequestChecks { max_body_bytes: default_max_body_bytes(), content_types: default_content_types() }
    }
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

fn default_content_types() -> BTreeMap<Method, Vec<String>> {
    let list = |types: &[&str]| types.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>();
    BTreeMap::from([
        (
            Method::Post,
            list(&["application/json", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]),
        ),
        (Method::Put, list(&["application/json", "application/octet-stream", "multipart/form-data"])),
        (Method::Patch, list(&["application/json", "application/merge-patch+json"])),
    ])
}

/// Response security headers. Each value is sent as given; `null` turns a header off.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawSecurityHeaders {
    /// `X-Content-Type-Options`.
    #[serde(default = "default_content_type_options")]
    pub content_type_options: Option<String>,
    /// `X-Frame-Options`.
    #[serde(default = "default_frame_options")]
    pub frame_options: Option<String>,
    /// `Referrer-Policy`.
    #[serde(default = "default_referrer_policy")]
    pub referrer_policy: Option<String>,
    /// `Permissions-Policy`.
    #[serde(default = "default_permissions_policy")]
    pub permissions_policy: Option<String>,
    /// `Cache-Control`; a policy may set its own.
    #[serde(default = "default_cache_control")]
    pub cache_control: Option<String>,
    /// `Strict-Transport-Security`, sent only when the request came over https.
    #[serde(default = "default_hsts")]
    pub strict_transport_security: Option<String>,
    /// `Content-Security-Policy`; off unless set.
    #[serde(default)]
    pub content_security_policy: Option<String>,
    /// Remove the `server` header from responses. Envoy only lets a filter see it with the
    /// connection manager's `server_header_transformation: PASS_THROUGH`.
    #[serde(default = "default_true")]
    pub remove_server_header: bool,
}

impl Default for RawSecurityHeaders {
    fn default() -> Self {
        RawSecurityHeaders {
            content_type_options: default_content_type_options(),
            frame_options: default_frame_options(),
            referrer_policy: default_referrer_policy(),
            permissions_policy: default_permissions_policy(),
            cache_control: default_cache_control(),
            strict_transport_security: default_hsts(),
            content_security_policy: None,
            remove_server_header: true,
        }
    }
}

fn default_content_type_options() -> Option<String> {
    Some("nosniff".to_owned())
}
fn default_frame_options() -> Option<String> {
    Some("DENY".to_owned())
}
fn default_referrer_policy() -> Option<String> {
    Some("strict-origin-when-cross-origin".to_owned())
}
fn default_permissions_policy() -> Option<String> {
    Some(
        "camera=(), microphone=(), geolocation=(), payment=(), usb=(), magnetometer=(), \
         gyroscope=(), accelerometer=()"
            .to_owned(),
    )
}
fn default_cache_control() -> Option<String> {
    Some("no-store".to_owned())
}
fn default_hsts() -> Option<String> {
    Some("max-age=31536000; includeSubDomains".to_owned())
}
fn default_true() -> bool {
    true
}

/// Names of the identity headers the filter sets upstream.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentityHeaders {
    /// The caller's subject (JWT `sub`, or the API key's id).
    pub subject: String,
    /// The account that is rate-limited and billed.
    pub account: String,
    /// The caller's tier (`free`, `pro`, …).
    pub tier: String,
    /// How the caller authenticated: `jwt` or `api_key`.
    pub auth_method: String,
    /// The id of the API key used.
    pub key_id: String,
    /// The caller's scopes, space-separated.
    pub scopes: String,
}

impl Default for RawIdentityHeaders {
    fn default() -> Self {
        RawIdentityHeaders {
            subject: "x-tollgate-subject".to_owned(),
            account: "x-tollgate-account".to_owned(),
            tier: "x-tollgate-tier".to_owned(),
            auth_method: "x-tollgate-auth-method".to_owned(),
            key_id: "x-tollgate-key-id".to_owned(),
            scopes: "x-tollgate-scopes".to_owned(),
        }
    }
}

/// A configuration the filter refuses, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Where the fault is, e.g. `routes[2].policy`; `$` for the document itself.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn at(path: impl fmt::Display, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.to_string(), message: message.into() }
    }
}

/// The validated configuration the pipeline runs on.
#[derive(Debug)]
pub struct Config {
    pub routes: RouteTable,
    pub auth: Authenticator,
    /// `None` when no policy is rate-limited.
    pub rate_limits: Option<RateLimits>,
    pub credits: Option<Credits>,
    pub security_headers: SecurityHeaders,
    /// Lower-case names of the identity headers, in the order of `RawIdentityHeaders`.
    pub identity_headers: Vec<String>,
}

/// Security headers ready to send: names and values fixed at start so no request formats them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityHeaders {
    /// Headers sent on every response, `Cache-Control` excepted (it is per policy).
    pub always: Vec<(&'static str, String)>,
    /// The default `Cache-Control`, for responses whose route set none.
    pub cache_control: Option<String>,
    pub strict_transport_security: Option<String>,
    pub remove_server_header: bool,
}

impl Config {
    /// Parses and validates the plugin configuration. This is the one entry point: Envoy's plugin
    /// start and `tollgate check` both call it.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let raw = parse(bytes)?;
        Config::build(raw, hmac_sha256::Hash::hash(bytes))
    }
}

/// Deserializes the wire format, turning serde's message into a field-path error.
fn parse(bytes: &[u8]) -> Result<RawConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut track = serde_path_to_error::Track::new();
    let result = RawConfig::deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
        .and_then(|raw| de.end().map(|()| raw));
    result.map_err(|err| {
        // A map key that failed to decode shows as `?`; the message names the key itself.
        let path = track.path().to_string();
        let path = path.strip_suffix(".?").unwrap_or(&path);
        let path = if path == "." || path == "?" { "$".to_owned() } else { path.to_owned() };
        ConfigError::at(path, strip_position(&err.to_string()))
    })
}

/// serde_json appends " at line L column C"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

impl Config {
    /// The one validation step. `seed` is a digest of the configuration's bytes: every worker
    /// computes the same one, and a client cannot guess it without the config.
    fn build(raw: RawConfig, seed: [u8; 32]) -> Result<Config, ConfigError> {
        let sec = &raw.security_headers;
        header_value("security_headers.cache_control", &sec.cache_control)?;
        let defaults = &raw.request_checks;
        check_content_types("request_checks.content_types", &defaults.content_types)?;

        let limited = raw.policies.iter().map(|(name, p)| (name.clone(), (p.access, p.rate_limit.as_ref()))).collect();
        let (rate_limits, mut policy_limits) = RateLimits::build(raw.rate_limits.as_ref(), &limited, seed)?;
        check_tiers(&raw)?;

        let mut policies = BTreeMap::new();
        for (name, p) in &raw.policies {
            let path = format!("policies.{name}");
            if name.is_empty() {
                return Err(ConfigError::at("policies", "a policy name must not be empty"));
            }
            if let Some(types) = &p.content_types {
                check_content_types(&format!("{path}.content_types"), types)?;
            }
            header_value(&format!("{path}.cache_control"), &p.cache_control)?;
            if p.access != Access::Authenticated && (!p.scopes.is_empty() || p.signature) {
                let field = if p.signature { "signature" } else { "scopes" };
                return Err(ConfigError::at(format!("{path}.{field}"), "needs \"access\": \"authenticated\""));
            }
            if let Some(i) = p.scopes.iter().position(|s| !crate::auth::is_scope_token(s)) {
                return Err(ConfigError::at(format!("{path}.scopes[{i}]"), "is not a scope token"));
            }
            let credits = match &p.credits {
                Some(_) if p.access != Access::Authenticated => {
                    return Err(ConfigError::at(
                        format!("{path}.credits"),
                        "needs \"access\": \"authenticated\": credits are charged to the caller's account",
                    ))
                }
                Some(c) => Some(PolicyCredits::build(&format!("{path}.credits"), c, raw.credits.is_some())?),
                None => None,
            };
            if p.signature && raw.auth.signatures.is_none() {
                return Err(ConfigError::at(format!("{path}.signature"), "needs auth.signatures to be configured"));
            }
            let policy = Policy {
                name: name.clone(),
                access: p.access,
                max_body_bytes: p.max_body_bytes.unwrap_or(defaults.max_body_bytes),
                content_types: lower_case(p.content_types.as_ref().unwrap_or(&defaults.content_types)),
                cache_control: p.cache_control.clone().or_else(|| sec.cache_control.clone()),
                scopes: p.scopes.clone(),
                signature: p.signature,
                rate_limit: policy_limits.remove(name),
                credits,
            };
            policies.insert(name.clone(), policy);
        }

        // Unmatched paths with no default policy are refused, under the default limits.
        let unmatched = Policy {
            name: "(unmatched)".to_owned(),
            access: Access::Deny,
            max_body_bytes: defaults.max_body_bytes,
            content_types: lower_case(&defaults.content_types),
            cache_control: sec.cache_control.clone(),
            scopes: Vec::new(),
            signature: false,
            rate_limit: None,
            credits: None,
        };
        let routes = RouteTable::build(&raw.routes, raw.default_policy.as_deref(), policies, unmatched)?;
        Ok(Config {
            routes,
            auth: Authenticator::try_from(&raw.auth)?,
            rate_limits,
            credits: raw.credits.as_ref().map(Credits::build).transpose()?,
            security_headers: security_headers(sec)?,
            identity_headers: identity_headers(&raw.identity_headers)?,
        })
    }
}

/// Tiers that API keys and JWT providers name must be configured, so a typo is not silently the
/// default tier.
fn check_tiers(raw: &RawConfig) -> Result<(), ConfigError> {
    let limits = raw.rate_limits.as_ref();
    for (i, key) in raw.auth.api_keys.iter().flat_map(|k| k.keys.iter()).enumerate() {
        if let Some(tier) = &key.tier {
            RateLimits::check_tier(limits, tier, &format!("auth.api_keys.keys[{i}].tier"))?;
        }
    }
    for (i, provider) in raw.auth.jwt.iter().flat_map(|j| j.providers.iter()).enumerate() {
        if let Some(tier) = &provider.claims.default_tier {
            RateLimits::check_tier(limits, tier, &format!("auth.jwt.providers[{i}].claims.default_tier"))?;
        }
    }
    Ok(())
}

fn check_content_types(path: &str, types: &BTreeMap<Method, Vec<String>>) -> Result<(), ConfigError> {
    for (method, list) in types {
        for (i, media_type) in list.iter().enumerate() {
            let valid = media_type
                .split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && media_type.bytes().all(is_token_or_slash));
            if !valid {
                return Err(ConfigError::at(
                    format!("{path}.{}[{i}]", method_name(*method)),
                    format!("{media_type:?} is not a media type like \"application/json\""),
                ));
            }
        }
    }
    Ok(())
}

fn is_token_or_slash(b: u8) -> bool {
    b == b'/' || is_token_byte(b)
}

/// A configured header name, lower-case as Envoy hands headers to the filter.
pub(crate) fn header_name(name: &str, path: &str) -> Result<String, ConfigError> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(ConfigError::at(path, format!("{name:?} is not a valid header name")));
    }
    Ok(name.to_ascii_lowercase())
}

/// RFC 9110 `tchar`: what header names and media type parts are made of.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn method_name(method: Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Connect => "CONNECT",
        Method::Trace => "TRACE",
    }
}

fn lower_case(types: &BTreeMap<Method, Vec<String>>) -> BTreeMap<Method, Vec<String>> {
    types.iter().map(|(m, list)| (*m, list.iter().map(|t| t.to_ascii_lowercase()).collect())).collect()
}

/// A header value must be visible ASCII and spaces: anything else Envoy would refuse mid-request.
fn header_value(path: &str, value: &Option<String>) -> Result<(), ConfigError> {
    match value {
        Some(v) if v.trim().is_empty() => {
            Err(ConfigError::at(path, "must not be empty; use null to turn the header off"))
        }
        Some(v) if !v.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b)) => {
            Err(ConfigError::at(path, "must be printable ASCII"))
        }
        _ => Ok(()),
    }
}

fn security_headers(raw: &RawSecurityHeaders) -> Result<SecurityHeaders, ConfigError> {
    let fields: [(&str, &'static str, &Option<String>); 5] = [
        ("content_type_options", "x-content-type-options", &raw.content_type_options),
        ("frame_options", "x-frame-options", &raw.frame_options),
        ("referrer_policy", "referrer-policy", &raw.referrer_policy),
        ("permissions_policy", "permissions-policy", &raw.permissions_policy),
        ("content_security_policy", "content-security-policy", &raw.content_security_policy),
    ];
    let mut always = Vec::new();
    for (field, header, value) in fields {
        header_value(&format!("security_headers.{field}"), value)?;
        if let Some(v) = value {
            always.push((header, v.clone()));
        }
    }
    header_value("security_headers.strict_transport_security", &raw.strict_transport_security)?;
    Ok(SecurityHeaders {
        always,
        cache_control: raw.cache_control.clone(),
        strict_transport_security: raw.strict_transport_security.clone(),
        remove_server_header: raw.remove_server_header,
    })
}

fn identity_headers(raw: &RawIdentityHeaders) -> Result<Vec<String>, ConfigError> {
    let fields = [
        ("subject", &raw.subject),
        ("account", &raw.account),
        ("tier", &raw.tier),
        ("auth_method", &raw.auth_method),
        ("key_id", &raw.key_id),
        ("scopes", &raw.scopes),
    ];
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for (field, name) in fields {
        let path = format!("identity_headers.{field}");
        let lower = header_name(name, &path)?;
        if !seen.insert(lower.clone()) {
            return Err(ConfigError::at(path, format!("{name:?} is used for two identity fields")));
        }
        names.push(lower);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(json: &str) -> String {
        match Config::from_json(json.as_bytes()) {
            Ok(_) => panic!("config was accepted: {json}"),
            Err(e) => e.to_string(),
        }
    }

    const MINIMAL: &str = r#"{"policies": {"public": {"access": "public"}},
        "routes": [{"prefix": "/", "policy": "public"}]}"#;

    #[test]
    fn minimal_config_gets_secure_defaults() {
        let config = Config::from_json(MINIMAL.as_bytes()).unwrap();
        let names: Vec<_> = config.security_headers.always.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["x-content-type-options", "x-frame-options", "referrer-policy", "permissions-policy"]);
        assert!(config.security_headers.remove_server_header);
        assert_eq!(config.identity_headers[0], "x-tollgate-subject");
    }

    #[test]
    fn errors_name_the_field_path() {
        let cases = [
            (r#"{"policies": {}, "routez": []}"#, "routez"),
            (
                r#"{"policies": {"p": {"access": "public", "max_body_bytes": -1}}}"#,
                "policies.p.max_body_bytes: invalid value: integer `-1`",
            ),
            (
                r#"{"policies": {"p": {"access": "public", "max_body_bytes": "10"}}}"#,
                "policies.p.max_body_bytes: invalid type: string",
            ),
            (r#"{"policies": {"p": {"access": "everyone"}}}"#, "policies.p.access: unknown variant `everyone`"),
            (
                r#"{"policies": {"p": {"access": "public"}}, "routes": [{"prefix": "/", "policy": "p"}, {"prefix": "/a", "policy": "q"}]}"#,
                "routes[1].policy: no policy named \"q\"",
            ),
            (
                r#"{"policies": {"p": {"access": "public"}}, "routes": [{"prefix": "a", "policy": "p"}]}"#,
                "routes[0].prefix: must start with '/'",
            ),
            (
                r#"{"policies": {"p": {"access": "public"}}, "default_policy": "x"}"#,
                "default_policy: no policy named \"x\"",
            ),
            (
                r#"{"policies": {"p": {"access": "public", "content_types": {"POST": ["json"]}}}}"#,
                "policies.p.content_types.POST[0]: \"json\" is not a media type",
            ),
            (
                r#"{"policies": {}, "security_headers": {"frame_options": ""}}"#,
                "security_headers.frame_options: must not be empty",
            ),
            (
                r#"{"policies": {}, "identity_headers": {"tier": "x-tollgate-subject"}}"#,
                "identity_headers.tier: \"x-tollgate-subject\" is used for two",
            ),
            (
                r#"{"policies": {}, "request_checks": {"content_types": {"BREW": []}}}"#,
                "request_checks.content_types: unknown variant `BREW`",
            ),
            (
                r#"{"policies": {"p": {"access": "public", "credits": {"cost": 1}}}}"#,
                "policies.p.credits: needs \"access\": \"authenticated\"",
            ),
            (
                r#"{"policies": {"p": {"access": "authenticated", "credits": {"cost": 1}}}}"#,
                "policies.p.credits: needs the credits section",
            ),
            (
                r#"{"policies": {}, "credits": {"cluster": "c", "service_token": "has space"}}"#,
                "credits.service_token: must be",
            ),
            (r#"{"policies": {}"#, "$: EOF while parsing"),
            (r#"{"policies": {}} trailing"#, "$: trailing characters"),
        ];
        for (json, expected) in cases {
            let message = error(json);
            assert!(message.starts_with(expected), "{json}\n  gave: {message}\n  want: {expected}");
        }
    }

    #[test]
    fn unknown_field_error_lists_what_is_allowed() {
        let message = error(r#"{"policies": {"p": {"access": "public", "max_body": 1}}}"#);
        assert!(message.starts_with("policies.p.max_body: unknown field `max_body`, expected one of"), "{message}");
    }

    #[test]
    fn policy_overrides_fall_back_to_the_defaults() {
        let config = Config::from_json(
            br#"{"policies": {
                "small": {"access": "public", "max_body_bytes": 10, "cache_control": "private"},
                "plain": {"access": "public"}},
              "request_checks": {"max_body_bytes": 99, "content_types": {"POST": ["Application/JSON"]}}}"#,
        )
        .unwrap();
        let small = config.routes.policy("small").unwrap();
        let plain = config.routes.policy("plain").unwrap();
        assert_eq!((small.max_body_bytes, plain.max_body_bytes), (10, 99));
        assert_eq!(small.cache_control.as_deref(), Some("private"));
        assert_eq!(plain.cache_control.as_deref(), Some("no-store"));
        assert_eq!(plain.content_types[&Method::Post], ["application/json"]);
    }
}
