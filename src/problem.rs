//! Why the filter refuses a request, and the RFC 9457 `application/problem+json` response for it.

use crate::auth::{self, AuthError};
use crate::checks::CheckError;
use crate::credits::CreditError;
use crate::host::HostError;
use crate::ratelimit::Limited;

/// Every reason the filter answers a request itself instead of passing it on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("this route requires authentication")]
    Unauthenticated,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no route for this path")]
    NotFound,
    #[error(transparent)]
    RateLimited(#[from] Limited),
    #[error(transparent)]
    Credits(#[from] CreditError),
    /// The Envoy route names a policy the plugin does not define: refuse rather than guess.
    #[error("the gateway is misconfigured for this route")]
    UnknownRoutePolicy { name: String },
    #[error("the gateway is not configured")]
    Unconfigured,
    /// The proxy refused an edit the request needs (removing a forged header, say): refuse the
    /// request rather than let it go on half-edited.
    #[error("the gateway could not process this request")]
    Host(#[from] HostError),
}

/// A problem type: the status and the stable `type` URI and `title` clients can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemType {
    pub status: u16,
    /// The last part of the `type` URI, `urn:tollgate:problem:<slug>`.
    pub slug: &'static str,
    pub title: &'static str,
}

impl Denial {
    /// The one place a denial becomes a status and problem type.
    pub fn problem_type(&self) -> ProblemType {
        use CheckError::*;
        let (status, slug, title) = match self {
            Denial::Check(
                MissingPath | ControlCharacter | MalformedEscape | EncodedSlash | Backslash | DotSegment
                | PathParameter | EncodedPercent | InvalidEncoding,
            ) => (400, "invalid-path", "Invalid request path"),
            Denial::Check(InvalidContentLength) => (400, "invalid-content-length", "Invalid Content-Length"),
            Denial::Check(BodyTooLarge { .. }) => (413, "payload-too-large", "Payload too large"),
            Denial::Check(UnsupportedMediaType { .. }) => (415, "unsupported-media-type", "Unsupported media type"),
            Denial::Unauthenticated => (401, "unauthenticated", "Authentication required"),
            Denial::Auth(err) => match err.status() {
                403 => (403, "insufficient-scope", "Insufficient scope"),
                503 => (503, "auth-unavailable", "Authentication unavailable"),
                _ => (401, "invalid-credentials", "Invalid credentials"),
            },
            Denial::NotFound => (404, "not-found", "Not found"),
            Denial::RateLimited(Limited::UnknownAddress) => (500, "client-address-unknown", "Client address unknown"),
            Denial::RateLimited(_) => (429, "rate-limited", "Too many requests"),
            Denial::Credits(CreditError::Insufficient { .. }) => (402, "insufficient-credits", "Insufficient credits"),
            Denial::Credits(CreditError::InvalidMultiplier { .. }) => {
                (400, "invalid-credit-multiplier", "Invalid credit multiplier")
            }
            Denial::Credits(CreditError::DuplicateMultiplier { .. }) => {
                (400, "invalid-credit-multiplier", "Invalid credit multiplier")
            }
            Denial::Credits(CreditError::Unavailable) => (503, "credits-unavailable", "Credit service unavailable"),
            Denial::Credits(CreditError::Refused) => (403, "billing-refused", "Billing refused"),
            Denial::UnknownRoutePolicy { .. } => (500, "gateway-misconfigured", "Gateway misconfigured"),
            Denial::Unconfigured => (503, "gateway-unavailable", "Gateway unavailable"),
            Denial::Host(_) => (500, "gateway-error", "Gateway error"),
        };
        ProblemType { status, slug, title }
    }
}

impl Denial {
    /// The `WWW-Authenticate` challenge for a refused credential (RFC 6750), if any.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            Denial::Unauthenticated => Some(auth::challenge()),
            Denial::Auth(err) => err.www_authenticate(),
            _ => None,
        }
    }
}

impl Denial {
    /// `Retry-After` and the limit's headers on a 429, so a client knows when to come back.
    pub fn rate_limit_headers(&self, now: u64) -> Vec<(&'static str, String)> {
        match self {
            Denial::RateLimited(Limited::Exceeded { quota, retry_after }) => {
                let mut headers = vec![("retry-after", retry_after.to_string())];
                headers.extend(quota.headers(now));
                headers
            }
            Denial::RateLimited(Limited::Contended) => vec![("retry-after", "1".to_owned())],
            _ => Vec::new(),
        }
    }
}

/// The response body: `type`, `title`, `status`, `detail` and the request id. The detail is the
/// denial's message, which never carries a credential or an internal address.
pub fn body(denial: &Denial, request_id: &str) -> Vec<u8> {
    let kind = denial.problem_type();
    // RFC 9457 extension members: what the request needed and what the account has.
    let (required, balance) = match denial {
        Denial::Credits(CreditError::Insufficient { required, balance }) => (Some(*required), Some(*balance)),
        _ => (None, None),
    };
    let problem = Problem {
        kind: format!("urn:tollgate:problem:{}", kind.slug),
        title: kind.title,
        status: kind.status,
        detail: denial.to_string(),
        request_id,
        required,
        balance,
    };
    // Serializing strings and integers cannot fail.
    serde_json::to_vec(&problem).unwrap_or_default()
}

/// The document, serialized as declared: smaller code than building a `serde_json::Value`, which
/// counts in a module that has to stay under 1 MiB.
#[derive(serde::Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    required: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_rfc9457_with_the_request_id() {
        let denial = Denial::Check(CheckError::BodyTooLarge { limit: 10 });
        let body: serde_json::Value = serde_json::from_slice(&body(&denial, "req-1")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "urn:tollgate:problem:payload-too-large",
                "title": "Payload too large",
                "status": 413,
                "detail": "the request body exceeds the limit of 10 bytes for this route",
                "request_id": "req-1",
            })
        );
    }

    #[test]
    fn misconfiguration_does_not_reveal_the_policy_name() {
        let denial = Denial::UnknownRoutePolicy { name: "internal-admin".to_owned() };
        let text = String::from_utf8(body(&denial, "r")).unwrap();
        assert!(!text.contains("internal-admin"), "{text}");
    }
}
