//! gRPC callers. A gRPC client acts on `grpc-status`, never on the HTTP status, and shows
//! `grpc-message`, never a body: the filter knows one by its request's content type, refuses it
//! with a trailers-only answer (HTTP 200, the status in the headers) carrying the gRPC status that
//! makes its client do the right thing, and bills its call on `grpc-status`, which usually comes
//! in the response trailers.

use crate::host::StreamHost;
use crate::problem::Denial;
use crate::ratelimit::Limited;

/// How a gRPC caller frames its messages, by the request's `content-type`; a refusal answers in
/// the same framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `application/grpc`, `application/grpc+proto`, `application/grpc+json`, …
    Grpc,
    /// `application/grpc-web`, `application/grpc-web+proto`, …: a browser's, without Envoy's
    /// `grpc_web` filter in front (which hands the filters after it `application/grpc`).
    Web,
    /// `application/grpc-web-text` (base64 framing), with or without a `+` suffix.
    WebText,
}

impl Wire {
    /// The wire of a request with this `content-type`; `None`: not a gRPC call.
    pub fn of(content_type: Option<&str>) -> Option<Wire> {
        // `+proto`, `+json`, any codec: the framing is the same. Media types are case-insensitive.
        let base = content_type?.split([';', '+']).next()?.trim().to_ascii_lowercase();
        match base.as_str() {
            "application/grpc" => Some(Wire::Grpc),
            "application/grpc-web" => Some(Wire::Web),
            "application/grpc-web-text" => Some(Wire::WebText),
            _ => None,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Wire::Grpc => "application/grpc",
            Wire::Web => "application/grpc-web",
            Wire::WebText => "application/grpc-web-text",
        }
    }
}

/// A gRPC call in progress: how it is framed, and what billing keeps for its trailers.
#[derive(Debug)]
pub struct Call {
    pub wire: Wire,
    /// The upstream's cost report when it came in the response headers (initial metadata) and the
    /// call settles on its trailers.
    pub reported: Option<String>,
}

/// The gRPC status codes refusals use (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    /// The number as `grpc-status` carries it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "3",
            Code::PermissionDenied => "7",
            Code::ResourceExhausted => "8",
            Code::FailedPrecondition => "9",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
            Code::Unauthenticated => "16",
        }
    }

    /// The status that makes a gRPC client do with a refusal what an HTTP client does with its
    /// problem status. Not Envoy's HTTP→gRPC table, under which 429 and 503 are UNAVAILABLE (a
    /// client retries that at once: a rate limit would become a retry storm) and 402, 413 and 415
    /// are UNKNOWN.
    pub fn of(http_status: u16) -> Code {
        match http_status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            // Out of credits: not worth retrying until the account is topped up, which is what
            // FAILED_PRECONDITION tells a client ("until the system state has been fixed").
            402 => Code::FailedPrecondition,
            403 => Code::PermissionDenied,
            // To gRPC a path is a method: no route, a `deny` policy, or a route that does not take
            // gRPC, is a method this server does not serve.
            404 | 415 => Code::Unimplemented,
            // What gRPC itself answers for a message over its size limit, and for a quota.
            413 | 429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            _ => Code::Internal,
        }
    }
}

/// Answers a gRPC caller with `denial`: trailers-only, HTTP 200, `grpc-status` (`code`) and a short
/// `grpc-message`, beside `metadata` (security, challenge and rate-limit headers). A 429's
/// `Retry-After` is also given as `grpc-retry-pushback-ms`, which a gRPC client with a retry policy
/// waits for before it tries again.
pub fn refuse(
    host: &mut dyn StreamHost,
    wire: Wire,
    code: Code,
    denial: &Denial,
    request_id: &str,
    metadata: Vec<(&str, &str)>,
) {
    let message = percent_encode(&denial.to_string());
    let pushback = match denial {
        // Seconds to milliseconds.
        Denial::RateLimited(Limited::Exceeded { retry_after, .. }) => format!("{retry_after}000"),
        Denial::RateLimited(Limited::Contended) => "1000".to_owned(),
        _ => String::new(),
    };
    let mut headers = metadata;
    headers.extend([("content-type", wire.content_type()), ("grpc-status", code.as_str()), ("grpc-message", &message)]);
    if !pushback.is_empty() {
        headers.push(("grpc-retry-pushback-ms", &pushback));
    }
    if !request_id.is_empty() {
        headers.push(("x-request-id", request_id));
    }
    host.send_grpc_response(code, &headers);
}

/// `grpc-message` as the gRPC protocol requires it: every byte outside printable ASCII, and `%`,
/// percent-encoded.
pub(crate) fn percent_encode(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = Vec::with_capacity(message.len());
    for byte in message.bytes() {
        match byte {
            b' '..=b'~' if byte != b'%' => encoded.push(byte),
            _ => encoded.extend_from_slice(&[b'%', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]),
        }
    }
    // Printable ASCII only, so always UTF-8.
    String::from_utf8(encoded).unwrap_or_default()
}

/// A `grpc-status` value as a number; `None` for anything else, which no client reads as OK.
pub fn status(value: &str) -> Option<u32> {
    value.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credits::CreditError;
    use crate::host::fake::FakeHost;

    #[test]
    fn grpc_is_known_by_its_content_type() {
        let cases = [
            ("application/grpc", Some(Wire::Grpc)),
            ("application/grpc+proto", Some(Wire::Grpc)),
            ("Application/GRPC+json; charset=utf-8", Some(Wire::Grpc)),
            ("application/grpc-web", Some(Wire::Web)),
            ("application/grpc-web+proto", Some(Wire::Web)),
            ("application/grpc-web-text", Some(Wire::WebText)),
            ("application/grpc-web-text+proto", Some(Wire::WebText)),
            ("application/grpcx", None),
            ("application/grpc-webx", None),
            ("application/grpc ; x=y", Some(Wire::Grpc)),
            ("application/grp", None),
            ("application/json", None),
            ("", None),
        ];
        for (content_type, want) in cases {
            assert_eq!(Wire::of(Some(content_type)), want, "{content_type:?}");
        }
        assert_eq!(Wire::of(None), None);
    }

    #[test]
    fn every_refusal_has_the_status_its_client_acts_on() {
        let cases =
            [(400, 3), (401, 16), (402, 9), (403, 7), (404, 12), (413, 8), (415, 12), (429, 8), (500, 13), (503, 14)];
        for (http, grpc) in cases {
            assert_eq!(Code::of(http).as_str(), grpc.to_string(), "{http}");
        }
    }

    #[test]
    fn a_refusal_is_trailers_only_with_a_short_encoded_message_and_never_a_body() {
        let mut host = FakeHost::default();
        let denial = Denial::Credits(CreditError::Insufficient { required: 5, balance: 3 });
        refuse(&mut host, Wire::Grpc, Code::FailedPrecondition, &denial, "rid-1", vec![("x-frame-options", "DENY")]);
        assert_eq!(host.grpc_sent, Some(Code::FailedPrecondition));
        assert_eq!(host.sent_header("grpc-status"), Some("9"));
        assert_eq!(host.sent_header("content-type"), Some("application/grpc"));
        assert_eq!(
            host.sent_header("grpc-message"),
            Some("insufficient credits: this request costs 5, the balance is 3")
        );
        assert_eq!(host.sent_header("x-request-id"), Some("rid-1"));
        assert_eq!(host.sent_header("x-frame-options"), Some("DENY"));

        let mut host = FakeHost::default();
        let denial = Denial::RateLimited(Limited::Contended);
        refuse(&mut host, Wire::WebText, Code::ResourceExhausted, &denial, "", vec![("retry-after", "1")]);
        assert_eq!(host.sent_header("content-type"), Some("application/grpc-web-text"));
        assert_eq!(host.sent_header("grpc-status"), Some("8"));
        assert_eq!(host.sent_header("grpc-retry-pushback-ms"), Some("1000"));
        assert_eq!(host.sent_header("x-request-id"), None);
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("100% \"x\"\n"), "100%25 \"x\"%0A");
        assert_eq!(percent_encode("café"), "caf%C3%A9");
    }

    // The pipeline with gRPC callers.

    use std::rc::Rc;

    use crate::config::Config;
    use crate::worker::Worker;
    use crate::{Flow, Stream};

    const GRPC: (&str, &str) = ("content-type", "application/grpc");

    fn config() -> String {
        let key: String = hmac_sha256::Hash::hash(b"key-one").iter().map(|b| format!("{b:02x}")).collect();
        format!(
            r#"{{
            "policies": {{
                "rpc": {{"access": "authenticated", "grpc": true,
                         "credits": {{"cost": 5}}}},
                "open": {{"access": "public", "grpc": true, "max_body_bytes": 8}},
                "rest": {{"access": "public"}}
            }},
            "routes": [
                {{"prefix": "/demo.Billed", "policy": "rpc"}},
                {{"prefix": "/demo.Open", "policy": "open"}},
                {{"prefix": "/rest", "policy": "rest"}}
            ],
            "credits": {{"cluster": "credits", "service_token": "s3cret", "actual_cost_header": "x-cost"}},
            "auth": {{"api_keys": {{"keys": [{{"id": "k1", "sha256": "{key}", "account": "acme"}}]}}}}
        }}"#
        )
    }

    fn call(path: &str, extra: &[(&str, &str)], end_of_stream: bool) -> (Stream, FakeHost, Flow) {
        let mut headers = vec![GRPC];
        headers.extend_from_slice(extra);
        let mut host = FakeHost::request("POST", path, &headers);
        let config = Rc::new(Config::from_json(config().as_bytes()).unwrap());
        let worker = Rc::new(Worker::new(&config, &mut host));
        let mut stream = Stream::new(config, worker);
        let flow = stream.on_request_headers(&mut host, end_of_stream);
        (stream, host, flow)
    }

    #[test]
    fn refusals_reach_a_grpc_caller_as_grpc_statuses_on_any_route() {
        let cases = [
            ("/demo.Billed/Get", Code::Unauthenticated),
            ("/demo.Open/../x", Code::InvalidArgument),
            ("/nowhere.Svc/Get", Code::Unimplemented),
            ("/rest/items", Code::Unimplemented),
        ];
        for (path, code) in cases {
            let (_, host, flow) = call(path, &[], true);
            assert_eq!((flow, host.grpc_sent), (Flow::Pause, Some(code)), "{path}");
            let (status, _, body) = host.sent.as_ref().unwrap();
            assert_eq!((*status, body), (200, &serde_json::Value::Null), "trailers-only, no JSON: {path}");
            assert_eq!(host.sent_header("grpc-status"), Some(code.as_str()));
            assert_eq!(host.sent_header("x-frame-options"), Some("DENY"));
        }
        let (_, host, flow) = call("/demo.Open/Get", &[], true);
        assert_eq!((flow, host.sent.is_none()), (Flow::Continue, true), "a gRPC policy takes gRPC");
    }

    #[test]
    fn the_body_limit_counts_the_whole_request_stream() {
        let (mut stream, mut host, flow) = call("/demo.Open/Upload", &[], false);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 5, false), Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 5, false), Flow::Pause);
        assert_eq!(host.grpc_sent, Some(Code::ResourceExhausted));
    }

    /// A billed call, reserved and gone upstream.
    fn reserved() -> (Stream, FakeHost) {
        let (mut stream, mut host, flow) = call("/demo.Billed/Get", &[("x-api-key", "key-one")], true);
        assert_eq!(flow, Flow::Pause);
        let granted = br#"{"reservation_id": "res_1", "balance": 95}"#.to_vec();
        stream.on_http_call_response(&mut host, 1, Some((201, granted)));
        assert!(host.resumed);
        host.response = vec![(":status".into(), "200".into()), (GRPC.0.into(), GRPC.1.into())];
        (stream, host)
    }

    /// The settlement calls the worker's root context sends.
    fn settlements(stream: &Stream, host: &mut FakeHost) -> Vec<String> {
        let credits = stream.config.credits.as_ref().unwrap();
        stream.worker.settler.borrow_mut().send_due(host, credits);
        host.sent_calls.iter().skip(1).map(|c| format!("{} {}", c.path, String::from_utf8_lossy(&c.body))).collect()
    }

    fn trailer(host: &FakeHost, name: &str) -> Option<String> {
        host.response_trailers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_call_settles_on_the_grpc_status_in_its_trailers() {
        let (mut stream, mut host) = reserved();
        stream.on_response_headers(&mut host);
        assert!(settlements(&stream, &mut host).is_empty(), "the outcome is still to come");
        assert_eq!(host.response_header("x-credits-charged"), None);
        host.response_trailers = vec![("grpc-status".into(), "0".into()), ("x-cost".into(), "3".into())];
        stream.on_response_trailers(&mut host);
        assert_eq!(settlements(&stream, &mut host), [r#"/v1/reservations/res_1/commit {"amount":3}"#]);
        assert_eq!(trailer(&host, "x-credits-charged").as_deref(), Some("3"));
        assert_eq!(trailer(&host, "x-credits-remaining").as_deref(), Some("97"));
        assert_eq!(trailer(&host, "x-cost"), None, "the upstream's report stays inside");
        stream.on_done(&mut host);
        assert_eq!(settlements(&stream, &mut host).len(), 1, "once per call");

        let (mut stream, mut host) = reserved();
        host.response.push(("x-cost".into(), "2".into()));
        stream.on_response_headers(&mut host);
        host.response_trailers = vec![("grpc-status".into(), "0".into())];
        stream.on_response_trailers(&mut host);
        assert_eq!(settlements(&stream, &mut host), [r#"/v1/reservations/res_1/commit {"amount":2}"#]);
    }

    #[test]
    fn a_failed_call_an_http_error_and_a_reset_are_released() {
        let release = "/v1/reservations/res_1/release {}";
        let (mut stream, mut host) = reserved();
        stream.on_response_headers(&mut host);
        host.response_trailers = vec![("grpc-status".into(), "13".into())];
        stream.on_response_trailers(&mut host);
        assert_eq!(settlements(&stream, &mut host), [release]);
        assert_eq!(trailer(&host, "x-credits-charged").as_deref(), Some("0"));

        // Trailers-only: the status is in the headers.
        let (mut stream, mut host) = reserved();
        host.response.push(("grpc-status".into(), "5".into()));
        stream.on_response_headers(&mut host);
        assert_eq!(settlements(&stream, &mut host), [release]);
        assert_eq!(host.response_header("x-credits-charged").as_deref(), Some("0"));

        let (mut stream, mut host) = reserved();
        host.response[0].1 = "503".into();
        stream.on_response_headers(&mut host);
        assert_eq!(settlements(&stream, &mut host), [release]);

        let (mut stream, mut host) = reserved();
        stream.on_response_headers(&mut host);
        stream.on_done(&mut host);
        assert_eq!(settlements(&stream, &mut host), [release], "reset before its trailers");
    }
}
