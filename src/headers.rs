//! Headers the filter owns: client-sent identity headers removed on the way in, security headers
//! set on the way out.

use crate::auth::{remove_cookie, remove_query_param, CredentialLocation, Identity};
use crate::config::SecurityHeaders;
use crate::host::{HostError, StreamHost};

/// Removes every identity header the client sent, so only the filter can set them upstream.
/// Only headers actually present cost a hostcall.
pub fn strip_identity(
    host: &mut dyn StreamHost,
    request: &[(String, String)],
    identity: &[String],
) -> Result<(), HostError> {
    for name in identity {
        if request.iter().any(|(n, _)| n == name) {
            host.remove_request_header(name)?;
        }
    }
    Ok(())
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
