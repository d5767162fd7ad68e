//! Property tests of what an outsider reaches: the path checks, the whole request pipeline on
//! arbitrary header values (tokens, keys, cookies, signatures, digests, lengths), and the config
//! parser. Each runs a bounded number of cases (`CASES`), so `make test` stays fast; a failure
//! prints the smallest input proptest found.

use std::rc::Rc;

use proptest::prelude::*;

use crate::checks;
use crate::config::Config;
use crate::host::fake::FakeHost;
use crate::worker::Worker;
use crate::{Flow, Stream};

const CASES: u32 = 2_000;

/// Percent-decodes once; `None` for a malformed escape.
fn decode(path: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' {
            let hex = std::str::from_utf8(path.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(path[i]);
            i += 1;
        }
    }
    Some(out)
}

/// What a backend that decodes the path (once, or twice as some do) must never find in a path
/// the filter let through: a dot segment, a slash or backslash that was encoded, a control byte,
/// or bytes that are not UTF-8 (overlong forms like `%c0%ae` decode to `.` in old servers).
fn misreadable(path: &str) -> Option<String> {
    let raw = path.split(['?', '#']).next().unwrap_or_default().as_bytes();
    let mut layer = raw.to_vec();
    for round in 1..=2 {
        let decoded = decode(&layer)?;
        if std::str::from_utf8(&decoded).is_err() {
            return Some(format!("decoding {round}× gives bytes that are not UTF-8"));
        }
        let slashes = |bytes: &[u8]| bytes.iter().filter(|b| **b == b'/' || **b == b'\\').count();
        if slashes(&decoded) != slashes(raw) {
            return Some(format!("decoding {round}× gives a slash that was encoded"));
        }
        if decoded.split(|b| *b == b'/').any(|segment| segment == b"." || segment == b"..") {
            return Some(format!("decoding {round}× gives a dot segment"));
        }
        if decoded.iter().any(|b| *b < 0x20 || *b == 0x7f) {
            return Some(format!("decoding {round}× gives a control byte"));
        }
        layer = decoded;
    }
    None
}

/// Path bytes an attacker would try: separators, dots, escapes (of the dangerous bytes too),
/// and plain letters.
fn path_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(";".to_owned()),
        Just("%".to_owned()),
        Just("?".to_owned()),
        "[a-zA-Z0-9_~-]{1,3}",
        prop::sample::select(vec![
            "%2e",
            "%2E",
            "%2f",
            "%2F",
            "%5c",
            "%25",
            "%252e",
            "%252f",
            "%c0%ae",
            "%e0%80%ae",
            "%c0%af",
            "%00",
            "%0a",
            "%7f",
            "%41",
            "%ff",
            "%zz",
            "%2",
        ])
        .prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_path_the_checks_let_through_reads_the_same_to_a_decoding_backend(path in path_strategy()) {
        if checks::path(&path).is_ok() {
            prop_assert_eq!(misreadable(&path), None, "{:?} passed the checks", path);
        }
    }

    #[test]
    fn the_checks_never_panic_on_any_path(path in "\\PC{0,64}") {
        let _ = checks::path(&path);
    }
}

const PIPELINE: &str = r#"{
    "policies": {
        "public": {"access": "public", "max_body_bytes": 64},
        "api": {"access": "authenticated", "scopes": ["read"]},
        "signed": {"access": "authenticated", "signature": true}
    },
    "routes": [{"prefix": "/health", "policy": "public"}, {"prefix": "/api", "policy": "api"},
               {"prefix": "/signed", "policy": "signed"}],
    "auth": {
        "jwt": {"providers": [{"issuer": "https://issuer.test", "audiences": ["api"],
            "secrets": [{"kid": "k", "alg": "HS256", "secret": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}],
            "sources": {"authorization": true, "cookie": "token", "query": "token"}}]},
        "api_keys": {"keys": [{"id": "k1", "sha256": "0000000000000000000000000000000000000000000000000000000000000000", "account": "acme"}]},
        "signatures": {"secrets": [{"account": "acme", "secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}]}
    }
}"#;

/// Header values as a client may send them: anything printable, plus the shapes the parsers look
/// for (JWT segments, digests, numbers).
fn value_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "Bearer [A-Za-z0-9_=.-]{0,60}",
        "Bearer eyJ[A-Za-z0-9_-]{0,20}\\.[A-Za-z0-9_-]{0,20}\\.[A-Za-z0-9_-]{0,20}",
        "ApiKey [ -~]{0,20}",
        "sha-256=:[A-Za-z0-9+/=]{0,50}:",
        "[0-9]{0,22}",
        "[0-9a-f]{64}",
    ]
}

fn header_strategy() -> impl Strategy<Value = (String, String)> {
    let names = prop::sample::select(vec![
        "authorization",
        "x-api-key",
        "cookie",
        "content-length",
        "content-type",
        "x-signature",
        "x-timestamp",
        "content-digest",
        "x-tollgate-account",
        "x-request-id",
    ]);
    (names.prop_map(str::to_owned), value_strategy())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever a client sends, the pipeline answers with a known status and a problem document
    /// (`FakeHost` parses it), or lets the request on; it never panics.
    #[test]
    fn the_pipeline_answers_any_request_without_panicking(
        method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "BREW"]),
        path in prop_oneof![path_strategy(), "/(health|api|signed)(/[a-z?=&%.]{0,12}){0,3}"],
        headers in prop::collection::vec(header_strategy(), 0..6),
        end_of_stream in any::<bool>(),
    ) {
        let config = Rc::new(Config::from_json(PIPELINE.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?);
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut host = FakeHost::request(method, &path, &pairs);
        let worker = Rc::new(Worker::new(&config, &mut host));
        let mut stream = Stream::new(config, worker);
        let flow = stream.on_request_headers(&mut host, end_of_stream);
        if let Some((status, _, body)) = &host.sent {
            prop_assert_eq!(flow, Flow::Pause);
            prop_assert!([400, 401, 403, 404, 413, 415, 500, 503].contains(status), "status {}", status);
            prop_assert_eq!(body["status"].as_u64(), Some(u64::from(*status)));
        }
        host.response = vec![(":status".to_owned(), "200".to_owned())];
        stream.on_response_headers(&mut host);
        stream.on_done(&mut host);
    }
}

/// JSON documents shaped like configs: the known keys at the top, arbitrary values below.
fn json_strategy() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[ -~]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "policies",
                    "routes",
                    "access",
                    "prefix",
                    "policy",
                    "rate_limits",
                    "tiers",
                    "per_second",
                    "credits",
                    "auth",
                    "jwt",
                    "providers",
                    "api_keys",
                    "keys",
                    "signatures",
                    "secrets",
                    "public",
                    "api",
                    "cost",
                    "scheme",
                    "max_body_bytes",
                ])
                .prop_map(str::to_owned),
                inner,
                0..4,
            )
            .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any document is accepted or refused with a field path; none panics the parser.
    #[test]
    fn the_config_parser_refuses_with_a_path_or_accepts(doc in json_strategy(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        for input in [serde_json::to_vec(&doc).unwrap_or_default(), bytes] {
            if let Err(err) = Config::from_json(&input) {
                prop_assert!(!err.path.is_empty(), "no path in {:?}", err);
            }
        }
    }
}
