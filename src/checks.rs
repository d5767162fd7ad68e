//! Request checks: a path the backend cannot misread, a body within the route's limit, and a
//! content type the route accepts.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::common::{is_token_byte, ConfigError, Method};

/// A request that fails a check, with what the client needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("the request has no :path")]
    MissingPath,
    #[error("the path contains a control character")]
    ControlCharacter,
    #[error("the path contains a malformed percent-encoding")]
    MalformedEscape,
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
    #[error("the path contains ';' parameters")]
    PathParameter,
    #[error("the path contains an encoded '%'")]
    EncodedPercent,
    #[error("the path's percent-encoded bytes are not UTF-8")]
    InvalidEncoding,
    #[error("the Content-Length header is not a number")]
    InvalidContentLength,
    #[error("the request body exceeds the limit of {limit} bytes for this route")]
    BodyTooLarge { limit: u64 },
    #[error("content type {media_type:?} is not accepted for {method}; accepted: {accepted}")]
    UnsupportedMediaType { media_type: String, method: &'static str, accepted: String },
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

/// Every media type must look like `type/subtype`, so a typo is an error rather than a list
/// nothing matches.
pub(crate) fn check_content_types(path: &str, types: &BTreeMap<Method, Vec<String>>) -> Result<(), ConfigError> {
    for (method, list) in types {
        for (i, media_type) in list.iter().enumerate() {
            let valid = media_type
                .split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && media_type.bytes().all(is_token_or_slash));
            if !valid {
                return Err(ConfigError::at(
                    format!("{path}.{}[{i}]", method.as_str()),
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

/// Media types per method, lower-case, as requests are compared against them.
pub(crate) fn lower_case(types: &BTreeMap<Method, Vec<String>>) -> BTreeMap<Method, Vec<String>> {
    types.iter().map(|(m, list)| (*m, list.iter().map(|t| t.to_ascii_lowercase()).collect())).collect()
}

/// Checks the raw `:path` and returns it as the route table matches it: the part before the
/// query, with percent-encoded unreserved characters decoded (`/%61pi` is `/api`, as every backend
/// reads it) and every other escape kept as sent.
///
/// Refused, so that no backend can read the path differently from the route that was checked:
/// controls anywhere; and before the query a backslash, `;` path parameters (Spring and Tomcat drop
/// `;…`, so `/api/admin;x` would reach `/api/admin` under another route's policy), escapes that
/// decode to a control, a slash, a backslash or `%` (a backend that decodes twice would read
/// `%252e` as `.`), escapes whose bytes are not UTF-8 (overlong forms such as `%c0%ae` decode to
/// `.` in old servers), malformed escapes, and `.`/`..` segments, raw or encoded. Envoy's
/// `normalize_path` catches some of these first; this holds when a listener lacks it.
pub fn path(raw: &str) -> Result<Cow<'_, str>, CheckError> {
    if raw.bytes().any(is_control) {
        return Err(CheckError::ControlCharacter);
    }
    let text = raw.split(['?', '#']).next().unwrap_or_default();
    let path = text.as_bytes();
    // Without an escape the path is already what every backend reads: nothing to build.
    let escaped = path.contains(&b'%');
    let capacity = if escaped { path.len() + 1 } else { 0 };
    let mut matched = Vec::with_capacity(capacity);
    // Every byte as a decoding backend reads it, to check the escapes form UTF-8.
    let mut decoded = Vec::with_capacity(capacity);
    // Decoded bytes of the current segment, only as long as it could still be "." or "..".
    let mut segment = [0u8; 3];
    let mut segment_len = 0usize;
    let mut i = 0;
    while i <= path.len() {
        let byte = match path.get(i) {
            None | Some(b'/') => {
                if matches!(&segment[..segment_len], b"." | b"..") {
                    return Err(CheckError::DotSegment);
                }
                segment_len = 0;
                if escaped {
                    matched.push(b'/');
                    decoded.push(b'/');
                }
                i += 1;
                continue;
            }
            Some(b'\\') => return Err(CheckError::Backslash),
            Some(b';') => return Err(CheckError::PathParameter),
            Some(b'%') => {
                let escape = path.get(i..i + 3).ok_or(CheckError::MalformedEscape)?;
                let byte = std::str::from_utf8(&escape[1..])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(CheckError::MalformedEscape)?;
                match byte {
                    b if is_control(b) => return Err(CheckError::ControlCharacter),
                    b'/' | b'\\' => return Err(CheckError::EncodedSlash),
                    b'%' => return Err(CheckError::EncodedPercent),
                    b if is_unreserved(b) => matched.push(b),
                    _ => matched.extend_from_slice(escape),
                }
                i += 3;
                byte
            }
            Some(&b) => {
                if escaped {
                    matched.push(b);
                }
                i += 1;
                b
            }
        };
        if escaped {
            decoded.push(byte);
        }
        if segment_len < segment.len() {
            segment[segment_len] = byte;
        }
        segment_len = segment_len.saturating_add(1).min(segment.len());
    }
    if !escaped {
        return Ok(Cow::Borrowed(text));
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(CheckError::InvalidEncoding);
    }
    matched.pop(); // the '/' pushed for the end of the path
    String::from_utf8(matched).map(Cow::Owned).map_err(|_| CheckError::InvalidEncoding)
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// RFC 3986 unreserved characters: an escape of one means the same as the character.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Refuses a declared body over the limit before a byte of it is read; the declared length.
pub fn content_length(header: Option<&str>, limit: u64) -> Result<Option<u64>, CheckError> {
    let Some(value) = header else { return Ok(None) };
    let length: u64 = value.trim().parse().map_err(|_| CheckError::InvalidContentLength)?;
    if length > limit {
        return Err(CheckError::BodyTooLarge { limit });
    }
    Ok(Some(length))
}

/// Refuses a `Content-Type` outside the allow-list for the method. Requests without one, and
/// methods without a list, pass: there is nothing to misinterpret.
pub fn content_type(
    method: Option<Method>,
    header: Option<&str>,
    allowed: &BTreeMap<Method, Vec<String>>,
) -> Result<(), CheckError> {
    let (Some(method), Some(header)) = (method, header) else { return Ok(()) };
    let Some(accepted) = allowed.get(&method) else { return Ok(()) };
    let media_type = header.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if media_type.is_empty() || accepted.contains(&media_type) {
        return Ok(());
    }
    Err(CheckError::UnsupportedMediaType {
        // The client's value is echoed back, so keep it short.
        media_type: media_type.chars().take(64).collect(),
        method: method.as_str(),
        accepted: accepted.join(", "),
    })
}

/// Counts a streamed body against the route's limit, chunk by chunk, so a body without
/// `Content-Length` is stopped at the limit instead of buffered whole.
#[derive(Debug, Clone, Copy)]
pub struct BodyCounter {
    limit: u64,
    seen: u64,
}

impl BodyCounter {
    pub fn new(limit: u64) -> BodyCounter {
        BodyCounter { limit, seen: 0 }
    }

    /// Bytes counted so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn add(&mut self, chunk_len: usize) -> Result<(), CheckError> {
        self.seen = self.seen.saturating_add(chunk_len as u64);
        if self.seen > self.limit {
            return Err(CheckError::BodyTooLarge { limit: self.limit });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_table() {
        use CheckError::*;
        let cases: &[(&str, Result<&str, CheckError>)] = &[
            ("/", Ok("/")),
            ("/api/items/42", Ok("/api/items/42")),
            ("/api/items?q=../x&r=%2F;x=%25", Ok("/api/items")),
            ("/api/a%20b/%7Euser", Ok("/api/a%20b/~user")),
            ("/%61pi/%2Dx", Ok("/api/-x")),
            ("/api/caf%C3%A9", Ok("/api/caf%C3%A9")),
            ("/api/.hidden/..x/x..", Ok("/api/.hidden/..x/x..")),
            ("/api/a\0b", Err(ControlCharacter)),
            ("/api/a\tb", Err(ControlCharacter)),
            ("/api/x?q=\x7f", Err(ControlCharacter)),
            ("/api/a%00b", Err(ControlCharacter)),
            ("/api/a%0Ab", Err(ControlCharacter)),
            ("/api/a%7fb", Err(ControlCharacter)),
            ("/api/a%2Fb", Err(EncodedSlash)),
            ("/api/a%2fb", Err(EncodedSlash)),
            ("/api/a%5Cb", Err(EncodedSlash)),
            ("/api/a\\b", Err(Backslash)),
            ("/api/admin;x/users", Err(PathParameter)),
            ("/api/a%252e", Err(EncodedPercent)),
            ("/api/%c0%ae%c0%ae/x", Err(InvalidEncoding)),
            ("/api/%ff", Err(InvalidEncoding)),
            ("/api/../billing", Err(DotSegment)),
            ("/api/./x", Err(DotSegment)),
            ("/api/..", Err(DotSegment)),
            ("/api/%2e%2E/billing", Err(DotSegment)),
            ("/api/.%2e", Err(DotSegment)),
            ("/api/%2e", Err(DotSegment)),
            ("/api/%zz", Err(MalformedEscape)),
            ("/api/%2", Err(MalformedEscape)),
        ];
        for (input, want) in cases {
            assert_eq!(path(input).as_deref(), want.as_deref(), "{input:?}");
        }
    }

    #[test]
    fn content_length_limit() {
        assert_eq!(content_length(None, 10), Ok(None));
        assert_eq!(content_length(Some("10"), 10), Ok(Some(10)));
        assert_eq!(content_length(Some("11"), 10), Err(CheckError::BodyTooLarge { limit: 10 }));
        assert_eq!(content_length(Some("99999999999999999999999"), 10), Err(CheckError::InvalidContentLength));
        assert_eq!(content_length(Some("-1"), 10), Err(CheckError::InvalidContentLength));
    }

    #[test]
    fn content_type_allow_list() {
        let allowed = BTreeMap::from([(Method::Post, vec!["application/json".to_owned()])]);
        assert_eq!(content_type(Some(Method::Post), Some("application/json; charset=utf-8"), &allowed), Ok(()));
        assert_eq!(content_type(Some(Method::Post), Some("Application/JSON"), &allowed), Ok(()));
        assert_eq!(content_type(Some(Method::Post), None, &allowed), Ok(()));
        assert_eq!(content_type(Some(Method::Get), Some("text/xml"), &allowed), Ok(()));
        assert_eq!(
            content_type(Some(Method::Post), Some("text/xml"), &allowed),
            Err(CheckError::UnsupportedMediaType {
                media_type: "text/xml".to_owned(),
                method: "POST",
                accepted: "application/json".to_owned()
            })
        );
    }

    #[test]
    fn body_counter_stops_at_the_limit() {
        let mut counter = BodyCounter::new(10);
        assert_eq!(counter.add(4), Ok(()));
        assert_eq!(counter.add(6), Ok(()));
        assert_eq!(counter.add(1), Err(CheckError::BodyTooLarge { limit: 10 }));
    }
}
