//! Request checks through a real Envoy: bad paths (400), bodies over the limit with and without
//! Content-Length (413), and content types outside the allow-list (415). Each refusal is
//! problem+json with every security header, and the upstream never sees the refused request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use harness::*;

#[test]
fn bad_paths_that_reach_the_filter_get_400_problem() {
    let gw = Gateway::start(GatewayOptions::default());
    for path in ["/health/a%0ab", "/health/a%7Fb", "/health/a%zzb", "/health/a%1b"] {
        let resp = gw.send(Request::get(path));
        assert_problem(&resp, 400, "invalid-path");
    }
    assert_eq!(gw.upstream().requests().len(), 0, "a refused path reached the upstream");
}

/// A listener without path normalization, as some meshes default to.
fn lax_gateway() -> Gateway {
    Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            let hcm = hcm(config);
            hcm["normalize_path"] = false.into();
            hcm["merge_slashes"] = false.into();
            hcm["path_with_escaped_slashes_action"] = "KEEP_UNCHANGED".into();
        })),
        ..GatewayOptions::default()
    })
}

#[test]
fn the_filter_alone_catches_what_a_lax_listener_lets_through() {
    let gw = lax_gateway();
    for path in
        ["/health/a%2Fb", "/health/a%5Cb", "/health/../api/x", "/health/%2e%2e/api", "/health/./x", "/health/a%00b"]
    {
        let resp = gw.send(Request::get(path));
        assert_problem(&resp, 400, "invalid-path");
    }
    assert_eq!(gw.upstream().requests().len(), 0);
    // The same listener still serves a clean path.
    assert_eq!(gw.send(Request::get("/health")).status, 200);
}

#[test]
fn a_path_is_matched_as_the_backend_reads_it_or_refused() {
    let gw = lax_gateway();
    // Spring and Tomcat drop `;…`; a backend that decodes twice reads `%252e` as `.`; old servers
    // read the overlong `%c0%ae` as `.`.
    for path in
        ["/api/admin;x/users", "/health;x", "/health/a%252e%252e/api", "/health/%c0%ae%c0%ae/api", "/health/%ff"]
    {
        let resp = gw.send(Request::get(path));
        assert_problem(&resp, 400, "invalid-path");
    }
    assert_eq!(gw.upstream().requests().len(), 0);
    // An escaped unreserved character is that character to every backend: `/%68ealth` is the
    // public health route, and goes upstream as sent.
    let resp = gw.send(Request::get("/%68ealth"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gw.upstream().wait_for(1, std::time::Duration::from_secs(5))[0].path, "/%68ealth");
}

#[test]
fn content_length_over_the_limit_is_refused_before_the_body() {
    let gw = Gateway::start(GatewayOptions::default());
    // /auth/ is the public policy: 64 KiB.
    let body = vec![b'x'; 65_537];
    let resp = gw.send(Request::new("POST", "/auth/login").header("content-type", "application/json").body(body));
    assert_problem(&resp, 413, "payload-too-large");
    assert!(resp.json()["detail"].as_str().unwrap().contains("65536 bytes"));

    let resp = gw
        .send(Request::new("POST", "/auth/login").header("content-type", "application/json").body(vec![b'x'; 65_536]));
    assert_eq!(resp.status, 200, "a body exactly at the limit passes");
    let seen = gw.upstream().wait_for(1, std::time::Duration::from_secs(5));
    assert_eq!(seen.len(), 1, "only the body within the limit reached the upstream");
    assert_eq!(seen[0].body.len(), 65_536);
}

#[test]
fn a_chunked_body_is_cut_off_at_the_limit() {
    let gw = Gateway::start(GatewayOptions::default());
    let chunks: Vec<Vec<u8>> = (0..20).map(|_| vec![b'y'; 8192]).collect(); // 160 KiB in all
    let resp = gw.send(Request::new("POST", "/auth/login").header("content-type", "application/json").chunked(chunks));
    assert_problem(&resp, 413, "payload-too-large");
    // The upstream may have seen the start of the stream, never a complete request, and never
    // more than the limit.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for seen in gw.upstream().requests() {
        assert!(!seen.complete, "the upstream received the whole oversized request");
        assert!(seen.body.len() <= 65_536, "the upstream received {} bytes", seen.body.len());
    }

    let within: Vec<Vec<u8>> = (0..4).map(|_| vec![b'z'; 8192]).collect();
    let resp = gw.send(Request::new("POST", "/auth/login").header("content-type", "application/json").chunked(within));
    assert_eq!(resp.status, 200);
    let complete: Vec<_> = gw.upstream().requests().into_iter().filter(|r| r.complete).collect();
    assert_eq!(complete.len(), 1);
    assert_eq!(complete[0].body, vec![b'z'; 32_768]);
}

#[test]
fn a_content_type_outside_the_allow_list_is_415() {
    let gw = Gateway::start(GatewayOptions::default());
    let resp = gw.send(Request::new("POST", "/auth/login").header("content-type", "text/xml").body(b"<x/>".to_vec()));
    assert_problem(&resp, 415, "unsupported-media-type");
    assert_eq!(gw.upstream().requests().len(), 0);

    let resp = gw.send(
        Request::new("POST", "/auth/login")
            .header("content-type", "application/json; charset=utf-8")
            .body(b"{}".to_vec()),
    );
    assert_eq!(resp.status, 200);
}

#[test]
fn a_header_value_that_is_not_utf8_does_not_take_the_filter_down() {
    // HTTP lets a header value carry obs-text bytes (0x80-0xFF) and Envoy passes them on. The
    // filter must answer that request and every later one: a panic would kill the worker's VM.
    let gw = Gateway::start(GatewayOptions { concurrency: 1, ..GatewayOptions::default() });
    let resp = gw.send_raw(b"GET /health HTTP/1.1\r\nhost: gw\r\nx-note: caf\xe9\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let seen = gw.upstream().requests();
    assert_eq!(seen.len(), 1);
    let resp = gw.send(Request::get("/health"));
    assert_eq!(resp.status, 200, "the filter still serves: {}", resp.text());
}
