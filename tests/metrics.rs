//! The filter's metrics in Envoy's Prometheus output: each decision moves its own counter by
//! exactly the number of requests that took it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use harness::*;

#[test]
fn decisions_move_their_counters_by_exactly_the_requests_that_took_them() {
    let gw = Gateway::start(GatewayOptions::default());
    let json = |path: &str| Request::new("POST", path).header("content-type", "application/json");
    let traffic: Vec<(Request, u16)> = vec![
        (Request::get("/health"), 200),
        (Request::get("/health"), 200),
        (Request::get("/health").header("x-api-key", "ignored on a public route"), 200),
        (Request::get("/health/%zz"), 400),
        (Request::get("/api/items"), 401),
        (Request::get("/api/items").header("x-api-key", "wrong"), 401),
        (Request::get("/nowhere"), 404),
        (json("/auth/signup").body(vec![b'x'; 70_000]), 413),
        (Request::new("POST", "/auth/signup").header("content-type", "text/xml").body(b"<x/>".to_vec()), 415),
    ];
    for (request, status) in traffic {
        let what = request.describe();
        assert_eq!(gw.send(request).status, status, "{what}");
    }
    // The shipped login limit: 5 a minute per client address; the 6th and 7th are refused.
    for i in 0..7 {
        let resp = gw.send(json("/auth/login").body(b"{}".to_vec()));
        assert_eq!(resp.status, if i < 5 { 200 } else { 429 });
    }

    let expected = [
        ("allowed", 3 + 5),
        ("denied_400", 1),
        ("denied_401", 2),
        ("denied_404", 1),
        ("denied_413", 1),
        ("denied_415", 1),
        ("denied_429", 2),
        ("denied_403", 0),
        ("denied_503", 0),
    ];
    for (decision, count) in expected {
        let name = format!("tollgate_requests_{decision}");
        assert_eq!(gw.metric(&name), count, "{name}\n{}", gw.admin("/stats/prometheus?filter=tollgate").text());
    }
}
