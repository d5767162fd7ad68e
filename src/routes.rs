//! Route policies: which protections apply to a request, chosen by Envoy route metadata or by the
//! longest matching path prefix.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;

use crate::checks::{check_content_types, lower_case, RawRequestChecks};
use crate::common::{header_value, ConfigError, Method};
use crate::credits::{PolicyCredits, RawPolicyCredits};
use crate::ratelimit::{PolicyLimit, RawPolicyLimit};

/// Who may call the routes of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone; no credentials are checked.
    Public,
    /// Only a verified caller; anyone else gets 401.
    Authenticated,
    /// Nobody: the gateway answers 404 as if the path did not exist.
    Deny,
}

/// How a route prefix compares letters with the request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RouteCase {
    /// Byte for byte, as Envoy's own route matching does by default.
    #[default]
    Sensitive,
    /// ASCII letters in either case, as Express and case-insensitive Spring match: a route that
    /// only the case tells apart from another would reach the upstream as the other.
    Insensitive,
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
    /// Serve gRPC: calls with a gRPC content type (`application/grpc`, `…+proto`, `…+json`,
    /// `application/grpc-web`, `…-web-text`) are accepted whatever `content_types` says, and billed
    /// on their `grpc-status`. `max_body_bytes` is then the limit for a call's whole request
    /// stream. Refusals reach every gRPC caller as gRPC statuses, on any policy.
    #[serde(default)]
    pub grpc: bool,
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

/// A validated policy, shared by every route that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub access: Access,
    pub max_body_bytes: u64,
    /// Lower-case media types per method; a method without an entry accepts any.
    pub content_types: BTreeMap<Method, Vec<String>>,
    /// gRPC calls are accepted.
    pub grpc: bool,
    pub cache_control: Option<String>,
    /// Scopes an authenticated caller must all have.
    pub scopes: Vec<String>,
    /// An HMAC request signature is required.
    pub signature: bool,
    /// `None`: never rate-limited.
    pub rate_limit: Option<PolicyLimit>,
    /// `None`: not billed.
    pub credits: Option<PolicyCredits>,
}

/// What a policy falls back to and may refer to, from the rest of the configuration.
pub struct PolicyContext<'a> {
    pub defaults: &'a RawRequestChecks,
    /// `security_headers.cache_control`.
    pub cache_control: Option<&'a String>,
    pub credits_configured: bool,
    pub signatures_configured: bool,
}

impl Policy {
    /// Validates policy `name`; `rate_limit` is what `ratelimit` compiled of its `rate_limit`.
    pub fn build(
        name: &str,
        p: &RawPolicy,
        context: &PolicyContext,
        rate_limit: Option<PolicyLimit>,
    ) -> Result<Policy, ConfigError> {
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
            Some(c) => Some(PolicyCredits::build(&format!("{path}.credits"), c, context.credits_configured)?),
            None => None,
        };
        if p.signature && !context.signatures_configured {
            return Err(ConfigError::at(format!("{path}.signature"), "needs auth.signatures to be configured"));
        }
        let defaults = context.defaults;
        Ok(Policy {
            name: name.to_owned(),
            access: p.access,
            max_body_bytes: p.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            content_types: lower_case(p.content_types.as_ref().unwrap_or(&defaults.content_types)),
            grpc: p.grpc,
            cache_control: p.cache_control.clone().or_else(|| context.cache_control.cloned()),
            scopes: p.scopes.clone(),
            signature: p.signature,
            rate_limit,
            credits,
        })
    }

    /// For unmatched paths with no default policy: refused, under the default limits.
    pub fn unmatched(context: &PolicyContext) -> Policy {
        let defaults = context.defaults;
        Policy {
            name: "(unmatched)".to_owned(),
            access: Access::Deny,
            max_body_bytes: defaults.max_body_bytes,
            content_types: lower_case(&defaults.content_types),
            grpc: false,
            cache_control: context.cache_control.cloned(),
            scopes: Vec::new(),
            signature: false,
            rate_limit: None,
            credits: None,
        }
    }
}

#[derive(Debug)]
struct Route {
    /// Without a trailing slash, except the root `/`.
    prefix: String,
    methods: Option<Vec<Method>>,
    policy: Rc<Policy>,
}

/// The prefix table, longest prefix first, and the policies by name.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    case: RouteCase,
    /// For paths no route matches: `default_policy`, or a built-in deny.
    default: Rc<Policy>,
    by_name: BTreeMap<String, Rc<Policy>>,
}

impl RouteTable {
    pub fn build(
        raw: &[RawRoute],
        case: RouteCase,
        default_policy: Option<&str>,
        policies: BTreeMap<String, Policy>,
        unmatched: Policy,
    ) -> Result<RouteTable, ConfigError> {
        let by_name: BTreeMap<String, Rc<Policy>> = policies.into_iter().map(|(name, p)| (name, Rc::new(p))).collect();
        let lookup = |path: String, name: &str| {
            by_name.get(name).cloned().ok_or_else(|| ConfigError { path, message: format!("no policy named {name:?}") })
        };

        let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let at = |field: &str, message: &str| ConfigError {
                path: format!("routes[{i}].{field}"),
                message: message.to_owned(),
            };
            if !r.prefix.starts_with('/') {
                return Err(at("prefix", "must start with '/'"));
            }
            if r.prefix.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#' || b == b'%') {
                return Err(at("prefix", "must be a plain decoded path: no spaces, controls, '?', '#' or '%'"));
            }
            if r.methods.as_ref().is_some_and(Vec::is_empty) {
                return Err(at("methods", "must list at least one method, or be omitted for all"));
            }
            let mut prefix = normalize_prefix(&r.prefix);
            if case == RouteCase::Insensitive {
                // So two prefixes that differ only in case are caught as the same route below.
                prefix.make_ascii_lowercase();
            }
            let methods = r.methods.clone();
            if let Some(j) = routes.iter().position(|other| other.prefix == prefix && overlap(&other.methods, &methods))
            {
                return Err(at(
                    "prefix",
                    &format!("{:?} is already routed by routes[{j}] for the same methods", r.prefix),
                ));
            }
            let policy = lookup(format!("routes[{i}].policy"), &r.policy)?;
            routes.push(Route { prefix, methods, policy });
        }
        // Longest first, so the first match is the longest; a stable sort keeps method-specific
        // entries in the order they were written.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        let default = match default_policy {
            Some(name) => lookup("default_policy".to_owned(), name)?,
            None => Rc::new(unmatched),
        };
        Ok(RouteTable { routes, case, default, by_name })
    }

    /// The policy for a request path (query excluded).
    pub fn select(&self, method: Option<Method>, path: &str) -> &Rc<Policy> {
        self.routes
            .iter()
            .find(|r| {
                prefix_matches(&r.prefix, path, self.case)
                    && r.methods.as_ref().is_none_or(|ms| method.is_some_and(|m| ms.contains(&m)))
            })
            .map_or(&self.default, |r| &r.policy)
    }

    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// A policy by name, as Envoy route metadata refers to it.
    pub fn policy(&self, name: &str) -> Option<&Rc<Policy>> {
        self.by_name.get(name)
    }
}

fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn overlap(a: &Option<Vec<Method>>, b: &Option<Vec<Method>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
        _ => true,
    }
}

/// Whole-segment prefix match: `/api` matches `/api` and `/api/x`, not `/apix`. Insensitive, the
/// prefix is already lower-case.
fn prefix_matches(prefix: &str, path: &str, case: RouteCase) -> bool {
    if prefix == "/" {
        return true;
    }
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    let Some((head, rest)) = path.split_at_checked(prefix.len()) else { return false };
    let same = match case {
        RouteCase::Sensitive => head == prefix,
        RouteCase::Insensitive => head.eq_ignore_ascii_case(prefix),
    };
    same && rest.first().is_none_or(|b| *b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn an_insensitive_table_routes_every_spelling_of_a_prefix_as_the_upstream_would() {
        let config = |case: &str| {
            format!(
                r#"{{"route_case": "{case}", "default_policy": "api",
                "policies": {{"api": {{"access": "public"}}, "admin": {{"access": "deny"}}}},
                "routes": [{{"prefix": "/api", "policy": "api"}}, {{"prefix": "/api/Admin", "policy": "admin"}}]}}"#
            )
        };
        let insensitive = table(&config("insensitive"));
        for path in ["/api/admin/users", "/API/ADMIN", "/Api/aDmIn/x"] {
            assert_eq!(insensitive.select(Some(Method::Get), path).name, "admin", "{path}");
        }
        assert_eq!(insensitive.select(Some(Method::Get), "/api/administrator").name, "api", "still whole segments");
        assert_eq!(insensitive.select(Some(Method::Get), "/api/\u{212a}").name, "api", "ASCII letters only");
        let sensitive = table(&config("sensitive"));
        assert_eq!(sensitive.select(Some(Method::Get), "/api/admin/users").name, "api", "the default is exact");
        assert_eq!(sensitive.select(Some(Method::Get), "/api/Admin/users").name, "admin");

        let twice = r#"{"route_case": "insensitive", "policies": {"p": {"access": "public"}},
            "routes": [{"prefix": "/API", "policy": "p"}, {"prefix": "/api", "policy": "p"}]}"#;
        let err = Config::from_json(twice.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("routes[1].prefix: \"/api\" is already routed by routes[0]"), "{err}");
    }

    fn table(json: &str) -> RouteTable {
        Config::from_json(json.as_bytes()).unwrap().routes
    }

    const MATRIX: &str = r#"{
        "policies": {
            "public": {"access": "public"},
            "account": {"access": "authenticated"},
            "api": {"access": "authenticated"},
            "upload": {"access": "authenticated", "max_body_bytes": 52428800},
            "closed": {"access": "deny"}
        },
        "routes": [
            {"prefix": "/health", "policy": "public"},
            {"prefix": "/auth/", "policy": "public"},
            {"prefix": "/billing/", "policy": "account"},
            {"prefix": "/api/", "policy": "api"},
            {"prefix": "/api/upload", "methods": ["POST", "PUT"], "policy": "upload"},
            {"prefix": "/api/upload", "methods": ["DELETE"], "policy": "closed"}
        ]
    }"#;

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = table(MATRIX);
        let cases = [
            (Method::Get, "/health", Some("public")),
            (Method::Get, "/health/ready", Some("public")),
            (Method::Get, "/healthz", None),
            (Method::Post, "/auth/login", Some("public")),
            (Method::Get, "/auth", Some("public")),
            (Method::Get, "/billing/invoices", Some("account")),
            (Method::Get, "/api/items", Some("api")),
            (Method::Post, "/api/upload/x", Some("upload")),
            (Method::Get, "/api/upload", Some("api")),
            (Method::Delete, "/api/upload", Some("closed")),
            (Method::Get, "/", None),
            (Method::Get, "/apix", None),
        ];
        for (method, path, want) in cases {
            let got = t.select(Some(method), path).name.as_str();
            assert_eq!(got, want.unwrap_or("(unmatched)"), "{method:?} {path}");
        }
    }

    #[test]
    fn unmatched_paths_take_the_default_policy() {
        let json = MATRIX.replacen("\"routes\"", "\"default_policy\": \"public\", \"routes\"", 1);
        let t = table(&json);
        assert_eq!(t.select(Some(Method::Get), "/other").name, "public");
        assert_eq!(t.select(None, "/api/x").name, "api");
    }

    #[test]
    fn an_unknown_method_only_matches_entries_for_all_methods() {
        let t = table(MATRIX);
        assert_eq!(t.select(None, "/api/upload").name, "api");
    }

    #[test]
    fn duplicate_routes_are_refused_unless_methods_are_disjoint() {
        let dup = r#"{"policies": {"p": {"access": "public"}}, "routes": [
            {"prefix": "/a/", "policy": "p"}, {"prefix": "/a", "methods": ["GET"], "policy": "p"}]}"#;
        let err = Config::from_json(dup.as_bytes()).unwrap_err().to_string();
        assert_eq!(err, "routes[1].prefix: \"/a\" is already routed by routes[0] for the same methods");
        let err = Config::from_json(
            br#"{"policies": {"p": {"access": "public"}}, "routes": [
            {"prefix": "/a", "methods": [], "policy": "p"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("routes[0].methods: must list at least one"), "{err}");
    }

    #[test]
    fn root_prefix_catches_everything() {
        let t = table(r#"{"policies": {"p": {"access": "public"}}, "routes": [{"prefix": "/", "policy": "p"}]}"#);
        assert_eq!(t.select(Some(Method::Get), "/anything/at/all").name, "p");
    }
}
