//! The harness itself, with the tollgate filter taken out so no wasm module is needed: Envoy starts on
//! free ports, routes to the recording upstream, relays its answers, and several gateways coexist.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use harness::*;

const WAIT: Duration = Duration::from_secs(5);

/// Envoy routing straight to the upstream, with `also` applied to the config.
fn plain_gateway(also: impl FnOnce(&mut serde_json::Value) + 'static) -> Gateway {
    Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            remove_tollgate_filter(config);
            also(config);
        })),
        ..GatewayOptions::default()
    })
}

#[test]
fn a_get_reaches_the_upstream_and_is_recorded() {
    let gw = plain_gateway(|_| {});
    assert_ne!(gw.port(), gw.admin_port());
    let resp = gw.send(Request::get("/hello?x=1").header("X-Test", "one").header("x-test", "two"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    // The shipped connection manager passes the upstream's server header through.
    assert_eq!(resp.header("server"), Some("recording-upstream"));
    let echo = resp.json();
    assert_eq!((echo["method"].as_str(), echo["path"].as_str()), (Some("GET"), Some("/hello?x=1")));
    assert_eq!(echo["body_len"], 0);

    let seen = gw.upstream().wait_for(1, WAIT);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("GET", "/hello?x=1"));
    assert!(seen[0].complete);
    assert_eq!(seen[0].header("host"), Some("localhost"));
    let tests: Vec<&str> = seen[0].headers.iter().filter(|(n, _)| n == "x-test").map(|(_, v)| v.as_str()).collect();
    assert_eq!(tests, ["one", "two"], "duplicate headers, names lower-cased");
}

#[test]
fn a_chunked_post_arrives_complete() {
    let gw = plain_gateway(|_| {});
    let chunks = vec![b"hello ".to_vec(), b"chunked ".to_vec(), vec![b'w'; 20_000]];
    let resp = gw.send(Request::new("POST", "/upload").header("content-type", "text/plain").chunked(chunks));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["body_len"], 14 + 20_000);
    let seen = gw.upstream().wait_for(1, WAIT);
    assert!(seen[0].complete);
    assert_eq!(&seen[0].body[..14], b"hello chunked ");
    assert_eq!(seen[0].body.len(), 14 + 20_000);

    // And a Content-Length body, on the same (kept-alive) upstream connection or another.
    let resp = gw.send(Request::new("PUT", "/upload").body(b"{}".to_vec()));
    assert_eq!(resp.status, 200);
    let seen = gw.upstream().wait_for(2, WAIT);
    assert_eq!((seen[1].method.as_str(), seen[1].body.as_slice(), seen[1].complete), ("PUT", &b"{}"[..], true));
}

#[test]
fn the_upstream_status_and_headers_are_relayed() {
    let gw = plain_gateway(|_| {});
    let resp = gw.send(
        Request::get("/x")
            .header("x-upstream-status", "503")
            .header("x-upstream-header", "x-one: 1")
            .header("x-upstream-header", "x-one: 2"),
    );
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header_all("x-one"), ["1", "2"]);
    assert_eq!(gw.send(Request::get("/x").header("x-upstream-status", "404")).status, 404);
    assert_eq!(gw.send(Request::new("HEAD", "/x")).body, b"");
}

#[test]
fn the_client_sends_the_path_as_given() {
    // Without normalization Envoy forwards the path as is: the client changed nothing.
    let gw = plain_gateway(|config| {
        let hcm = hcm(config);
        hcm["normalize_path"] = false.into();
        hcm["merge_slashes"] = false.into();
        hcm["path_with_escaped_slashes_action"] = "KEEP_UNCHANGED".into();
    });
    for path in ["/api/../x", "/api//a%2Fb", "/a/./b%zz"] {
        assert_eq!(gw.send(Request::get(path)).json()["path"], path);
    }
    // Raw control bytes in the path: Envoy's codec refuses them.
    assert_eq!(gw.send(Request::get("/").raw_path(b"/a\x01b".to_vec())).status, 400);
    // And the shipped settings normalize (the same request through a normalizing listener).
    let normalizing = plain_gateway(|_| {});
    assert_eq!(normalizing.send(Request::get("/api/../x")).json()["path"], "/x");
}

#[test]
fn an_early_response_to_a_chunked_upload_is_read() {
    // Envoy's buffer filter answers 413 once the body passes 1 KiB, while the client is still sending.
    let gw = plain_gateway(|config| {
        let filters = hcm(config)["http_filters"].as_array_mut().unwrap();
        let buffer = serde_json::json!({
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 1024
            }
        });
        filters.insert(0, buffer);
    });
    let chunks: Vec<Vec<u8>> = (0..200).map(|_| vec![b'y'; 8192]).collect(); // 1.6 MiB
    let resp = gw.send(Request::new("POST", "/upload").chunked(chunks));
    assert_eq!(resp.status, 413, "{}", resp.text());
    assert_eq!(gw.upstream().requests().len(), 0, "the buffer filter holds the request back");
}

#[test]
fn a_body_cut_off_is_recorded_as_incomplete() {
    let gw = plain_gateway(|_| {});
    let mut conn = TcpStream::connect(("127.0.0.1", gw.upstream().port())).unwrap();
    conn.write_all(b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").unwrap();
    // Recorded as soon as the head arrives, before the body ends.
    let seen = gw.upstream().wait_until(WAIT, |r| r.first().is_some_and(|r| r.body.len() == 10));
    assert!(!seen[0].complete);
    drop(conn);
    let seen = gw.upstream().wait_for(1, WAIT);
    assert_eq!((seen[0].path.as_str(), seen[0].body.as_slice(), seen[0].complete), ("/cut", &b"0123456789"[..], false));
}

#[test]
fn two_gateways_run_at_once() {
    let a = plain_gateway(|_| {});
    let b = plain_gateway(|_| {});
    assert_ne!(a.port(), b.port());
    assert_eq!(a.send(Request::get("/a")).status, 200);
    assert_eq!(b.send(Request::get("/b")).status, 200);
    assert_eq!(a.upstream().wait_for(1, WAIT)[0].path, "/a");
    assert_eq!(b.upstream().wait_for(1, WAIT)[0].path, "/b");
    assert_eq!(a.upstream().requests().len(), 1);
    assert!(a.envoy_log().contains("starting main dispatch loop"));
}

#[test]
fn a_config_envoy_rejects_is_a_start_failure_with_the_log() {
    let failure = Gateway::try_start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            remove_tollgate_filter(config);
            config["static_resources"]["clusters"][0]["connect_timeout"] = "soon".into();
        })),
        ..GatewayOptions::default()
    })
    .err()
    .expect("Envoy started with an invalid config");
    assert!(failure.reason.contains("exited"), "{failure:?}");
    assert!(failure.log.contains("connect_timeout") || failure.log.contains("Duration"), "{failure:?}");
}
