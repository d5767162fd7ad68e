//! Headers the filter owns: client-sent identity headers removed on the way in, security headers
//! set on the way out.

use crate::config::SecurityHeaders;
use crate::host::Host;

/// Removes every identity header the client sent, so only the filter can set them upstream.
/// Only headers actually present cost a hostcall.
pub fn strip_identity(host: &mut dyn Host, request: &[(String, String)], identity: &[String]) {
    for name in identity {
        if request.iter().any(|(n, _)| n == name) {
            host.remove_request_header(name);
        }
    }
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
pub fn secure_response(host: &mut dyn Host, config: &SecurityHeaders, cache_control: Option<&str>, https: bool) {
    for (name, value) in security(config, cache_control, https) {
        host.set_response_header(name, value);
    }
    if config.remove_server_header {
        host.remove_response_header("server");
    }
}
