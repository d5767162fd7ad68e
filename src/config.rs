//! The plugin configuration: the JSON document (the documented format) and the validated
//! `Config` the pipeline runs on. This module only assembles: each domain module (`auth`,
//! `ratelimit`, `credits`, `routes`, `checks`, `headers`) owns its wire types and compiles them,
//! and what they all share (`ConfigError`, `Method`, header validation) lives in `common`.
//! Parsing and validation happen once, when the plugin starts; every error names the field path
//! so an operator can find the mistake. `Config` is immutable: what a worker learns while it runs
//! (remote keys, token caches, rate-limit counts) lives in `worker::Worker`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::auth::{Authenticator, RawAuth};
use crate::checks::{check_content_types, RawRequestChecks};
use crate::common::header_value;
pub use crate::common::{ConfigError, Method};
use crate::credits::{Credits, RawCredits};
use crate::headers::{
    identity_headers, security_headers, IdentityHeaders, RawIdentityHeaders, RawSecurityHeaders, SecurityHeaders,
};
use crate::ratelimit::{RateLimits, RawRateLimits};
use crate::routes::{Policy, PolicyContext, RawPolicy, RawRoute, RouteCase, RouteTable};

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
    /// How `routes[].prefix` compares letters with the path. `insensitive` for upstreams that
    /// route regardless of case (Express by default, Spring with case-insensitive matching), so
    /// `/ADMIN/users` gets the `/admin` policy there too.
    #[serde(default)]
    pub route_case: RouteCase,
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

/// The validated configuration the pipeline runs on.
#[derive(Debug)]
pub struct Config {
    pub routes: RouteTable,
    pub auth: Authenticator,
    /// `None` when no policy is rate-limited.
    pub rate_limits: Option<RateLimits>,
    pub credits: Option<Credits>,
    pub security_headers: SecurityHeaders,
    pub identity_headers: IdentityHeaders,
}

impl Config {
    /// Parses and validates the plugin configuration. This is the one entry point: Envoy's plugin
    /// start and `tollgate check` both call it.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::build(parse(bytes)?)
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
    /// The one validation step: each domain module compiles its own section; this only hands
    /// each what it needs of the others.
    fn build(raw: RawConfig) -> Result<Config, ConfigError> {
        let sec = &raw.security_headers;
        header_value("security_headers.cache_control", &sec.cache_control)?;
        let defaults = &raw.request_checks;
        check_content_types("request_checks.content_types", &defaults.content_types)?;

        let limited = raw.policies.iter().map(|(name, p)| (name.clone(), (p.access, p.rate_limit.as_ref()))).collect();
        let (rate_limits, mut policy_limits) = RateLimits::build(raw.rate_limits.as_ref(), &limited)?;
        check_tiers(&raw)?;

        let context = PolicyContext {
            defaults,
            cache_control: sec.cache_control.as_ref(),
            credits_configured: raw.credits.is_some(),
            signatures_configured: raw.auth.signatures.is_some(),
        };
        let mut policies = BTreeMap::new();
        for (name, p) in &raw.policies {
            let policy = Policy::build(name, p, &context, policy_limits.remove(name))?;
            policies.insert(name.clone(), policy);
        }

        // Unmatched paths with no default policy are refused, under the default limits.
        let unmatched = Policy::unmatched(&context);
        let routes =
            RouteTable::build(&raw.routes, raw.route_case, raw.default_policy.as_deref(), policies, unmatched)?;
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
    fn the_config_holds_no_interior_mutability() {
        // Cell and RefCell are not RefUnwindSafe, so this stops compiling if one comes back into
        // Config: what a worker learns while it runs belongs in worker::Worker.
        fn immutable<T: std::panic::RefUnwindSafe>() {}
        immutable::<Config>();
    }

    #[test]
    fn minimal_config_gets_secure_defaults() {
        let config = Config::from_json(MINIMAL.as_bytes()).unwrap();
        let names: Vec<_> = config.security_headers.always.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["x-content-type-options", "x-frame-options", "referrer-policy", "permissions-policy"]);
        assert!(config.security_headers.remove_server_header);
        assert_eq!(config.identity_headers.set[0], "x-tollgate-subject");
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
