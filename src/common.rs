//! What every part of the configuration shares: the error that names a field path, HTTP methods,
//! the header grammar values are checked against, the retry backoff, and a key's decimal digits. A leaf: it imports no
//! other module of the crate, so each domain module can compile its own wire types with it and
//! `config` only assembles them, with no import pointing back up.

use std::fmt;

use serde::Deserialize;

/// A configuration the filter refuses, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Where the fault is, e.g. `routes[2].policy`; `$` for the document itself.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl fmt::Display, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.to_string(), message: message.into() }
    }
}

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
    /// Every method and its name on the wire, in declaration order: the one table both directions
    /// read, so a method cannot parse under one name and print under another.
    const NAMES: [(Method, &'static str); 9] = [
        (Method::Get, "GET"),
        (Method::Head, "HEAD"),
        (Method::Post, "POST"),
        (Method::Put, "PUT"),
        (Method::Patch, "PATCH"),
        (Method::Delete, "DELETE"),
        (Method::Options, "OPTIONS"),
        (Method::Connect, "CONNECT"),
        (Method::Trace, "TRACE"),
    ];

    /// Parses the value of Envoy's `:method` pseudo-header.
    pub fn from_header(value: &str) -> Option<Method> {
        Method::NAMES.iter().find(|(_, name)| *name == value).map(|(method, _)| *method)
    }

    pub fn as_str(self) -> &'static str {
        // `NAMES` is in declaration order; the unit test below holds it there.
        Method::NAMES[self as usize].1
    }
}

/// For `#[serde(default = "default_true")]` on switches that are on unless turned off.
pub(crate) fn default_true() -> bool {
    true
}

/// RFC 9110 `tchar`: what header names and media type parts are made of.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A configured header name, lower-case as Envoy hands headers to the filter.
pub(crate) fn header_name(name: &str, path: &str) -> Result<String, ConfigError> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(ConfigError::at(path, format!("{name:?} is not a valid header name")));
    }
    Ok(name.to_ascii_lowercase())
}

/// A header value must be visible ASCII and spaces: anything else Envoy would refuse mid-request.
pub(crate) fn header_value(path: &str, value: &Option<String>) -> Result<(), ConfigError> {
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

/// Retry delays grow to this: a remote document that never loaded, or a settlement the credit
/// service has not taken, is tried again at least this often.
/// A secret in the config, given inline or, so that it appears neither in the Envoy config nor in
/// Envoy's `/config_dump`, as `{"env": "NAME"}`: an environment variable of the VM, which Envoy
/// passes to a Wasm VM when `vm_config.environment_variables.host_env_keys` lists it. Read once,
/// when the config is parsed; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SecretSource")]
pub struct Secret(String);

/// Where a `Secret` comes from, as the config says it.
#[derive(Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum SecretSource {
    /// The secret itself (visible in the Envoy config and its `/config_dump`).
    Inline(String),
    /// The name of an environment variable that holds it.
    Env(EnvSecret),
}

#[derive(Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EnvSecret {
    pub env: String,
}

impl TryFrom<SecretSource> for Secret {
    type Error = String;

    fn try_from(source: SecretSource) -> Result<Secret, String> {
        match source {
            SecretSource::Inline(secret) => Ok(Secret(secret)),
            SecretSource::Env(EnvSecret { env }) => std::env::var(&env).map(Secret).map_err(|_| {
                format!(
                    "the environment variable {env:?} is not set: Envoy gives a Wasm VM only those that \
                     vm_config.environment_variables.host_env_keys lists"
                )
            }),
        }
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        SecretSource::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        SecretSource::json_schema(generator)
    }
}

pub const MAX_BACKOFF_SECONDS: u64 = 30;

/// Appends `n` in decimal. The shared-data keys a request reads are built with it: through
/// `format!` each cost ~750 instructions, a few percent of the native build's whole request.
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[start..].iter().map(|&d| char::from(d)));
}

/// The wait after the `failures`-th failure in a row: 1, 2, 4, … seconds, up to
/// `MAX_BACKOFF_SECONDS`. Every retry loop of the filter uses this one curve.
pub fn backoff_seconds(failures: u32) -> u64 {
    1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX).min(MAX_BACKOFF_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_appended_as_display_writes_them() {
        for n in [0, 7, 10, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut out = String::from("key.");
            push_decimal(&mut out, n);
            assert_eq!(out, format!("key.{n}"));
        }
    }

    #[test]
    fn method_names_are_in_declaration_order_and_round_trip() {
        for (i, (method, name)) in Method::NAMES.iter().enumerate() {
            assert_eq!(*method as usize, i, "{name} is out of order");
            assert_eq!(Method::from_header(name), Some(*method));
            assert_eq!(method.as_str(), *name);
        }
        assert_eq!(Method::from_header("get"), None, "methods are case-sensitive (RFC 9110)");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let waits: Vec<u64> = (0..8).map(backoff_seconds).collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff_seconds(u32::MAX), MAX_BACKOFF_SECONDS);
    }

    #[test]
    fn a_secret_is_inline_or_read_from_the_environment() {
        std::env::set_var("TOLLGATE_TEST_SECRET_FROM_ENV", "from-env");
        let secret: Secret = serde_json::from_str(r#"{"env": "TOLLGATE_TEST_SECRET_FROM_ENV"}"#).unwrap();
        assert_eq!(secret.expose(), "from-env");
        assert_eq!(serde_json::from_str::<Secret>(r#""inline""#).unwrap().expose(), "inline");
        let err = serde_json::from_str::<Secret>(r#"{"env": "TOLLGATE_TEST_SECRET_UNSET"}"#).unwrap_err();
        assert!(err.to_string().contains("\"TOLLGATE_TEST_SECRET_UNSET\" is not set"), "{err}");
        assert_eq!(format!("{secret:?}"), "<redacted>");
    }
}
