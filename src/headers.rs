//! Headers the filter owns: client-sent identity headers removed on the way in, security headers
//! set on the way out.

use std::collections::HashSet;

use serde::Deserialize;

use crate::auth::{remove_cookie, remove_query_param, CredentialLocation, Identity};
use crate::common::{default_true, header_name, header_value, ConfigError};
use crate::host::{HostError, StreamHost};

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
    /// More request headers to remove from every request, for an upstream that trusts names of
    /// its own (`x-user-id`, say, behind the seeds' middleware).
    pub also_strip: Vec<String>,
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
            also_strip: Vec::new(),
        }
    }
}

/// The identity headers' names, lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// What the filter sets upstream, in the order of `RawIdentityHeaders`' fields.
    pub set: Vec<String>,
    /// What no request may carry: `set` and `also_strip`.
    pub strip: Vec<String>,
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

pub(crate) fn security_headers(raw: &RawSecurityHeaders) -> Result<SecurityHeaders, ConfigError> {
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

pub(crate) fn identity_headers(raw: &RawIdentityHeaders) -> Result<IdentityHeaders, ConfigError> {
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
    let mut strip = names.clone();
    for (i, name) in raw.also_strip.iter().enumerate() {
        strip.push(header_name(name, &format!("identity_headers.also_strip[{i}]"))?);
    }
    Ok(IdentityHeaders { set: names, strip })
}

/// Removes every identity header the client sent, so only the filter can set them upstream,
/// in any spelling an upstream merges with it: CGI, Rack and PHP read `x_tollgate_account` as
/// `x-tollgate-account`, and Envoy lets underscores through by default. `remove` is the header
/// map the names are in (request headers or trailers); only headers present cost a hostcall.
pub fn strip_identity(
    request: &[(String, String)],
    stripped: &[String],
    mut remove: impl FnMut(&str) -> Result<(), HostError>,
) -> Result<(), HostError> {
    for (i, (name, _)) in request.iter().enumerate() {
        let forged = stripped.iter().any(|s| same_name(name, s));
        if forged && !request[..i].iter().any(|(n, _)| n == name) {
            remove(name)?;
        }
    }
    Ok(())
}

/// Header names equal with `_` read as `-` (names are lower-case already).
fn same_name(a: &str, b: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// Sets the verified caller's identity headers upstream, and removes the credentials it used
/// (unless the config forwards them), as Envoy's `jwt_authn` does.
pub fn forward_identity(
    host: &mut dyn StreamHost,
    request: &[(String, String)],
    names: &[String],
    identity: &Identity,
) -> Result<(), HostError> {
    let scopes = identity.scopes.join(" ");
    let values = [
        Some(identity.subject.as_str()),
        Some(identity.account.as_str()),
        identity.tier.as_deref(),
        Some(identity.method.as_str()),
        identity.key_id.as_deref(),
        Some(scopes.as_str()).filter(|s| !s.is_empty()),
    ];
    for (name, value) in names.iter().zip(values) {
        if let Some(value) = value {
            host.set_request_header(name, value)?;
        }
    }
    let header = |name: &str| request.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    for location in &identity.remove_upstream {
        match location {
            CredentialLocation::Authorization => host.remove_request_header("authorization")?,
            CredentialLocation::Header(name) => host.remove_request_header(name)?,
            CredentialLocation::Cookie(name) => {
                // HTTP/2 may split cookies over several headers; they are joined back into one.
                let joined: Vec<&str> =
                    request.iter().filter(|(n, _)| n == "cookie").map(|(_, v)| v.as_str()).collect();
                match remove_cookie(&joined.join("; "), name) {
                    Some(rest) => host.set_request_header("cookie", &rest)?,
                    None => host.remove_request_header("cookie")?,
                }
            }
            CredentialLocation::Query(name) => {
                if let Some(path) = header(":path") {
                    host.set_request_header(":path", &remove_query_param(path, name))?;
                }
            }
        }
    }
    Ok(())
}

/// The security headers for one response: the configured set, the route's `Cache-Control`, and
/// HSTS when the request came over https.
pub fn security<'a>(
    config: &'a SecurityHeaders,
    cache_control: Option<&'a str>,
    https: bool,
) -> impl Iterator<Item = (&'a str, &'a str)> {
    let hsts = config.strict_transport_security.as_deref().filter(|_| https);
    config
        .always
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(cache_control.map(|v| ("cache-control", v)))
        .chain(hsts.map(|v| ("strict-transport-security", v)))
}

/// Sets the security headers on an upstream response and removes `server`.
pub fn secure_response(host: &mut dyn StreamHost, config: &SecurityHeaders, cache_control: Option<&str>, https: bool) {
    for (name, value) in security(config, cache_control, https) {
        host.set_response_header(name, value);
    }
    if config.remove_server_header {
        host.remove_response_header("server");
    }
}
