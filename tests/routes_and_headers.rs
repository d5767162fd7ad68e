//! Route policies and the headers the filter owns, through a real Envoy: public routes pass,
//! unmatched paths follow the default, Envoy route metadata wins over the prefix table, client
//! identity headers never reach the upstream, and every response carries the security headers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use harness::*;

#[test]
fn a_public_path_passes_with_security_headers_and_no_server() {
    let gw = Gateway::start(GatewayOptions::default());
    let resp = gw.send(Request::get("/health?probe=1"));
    assert_eq!(resp.status, 200);
    assert_security_headers(&resp);
    assert_eq!(resp.header("cache-control"), Some("no-store"));
    assert_eq!(resp.header("server"), None, "the upstream's server header leaked");
    assert_eq!(resp.header("strict-transport-security"), None, "HSTS over plain http");
    let seen = gw.upstream().wait_for(1, std::time::Duration::from_secs(5));
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("GET", "/health?probe=1"));
}

#[test]
fn upstream_security_headers_are_overridden() {
    let gw = Gateway::start(GatewayOptions::default());
    let resp = gw.send(
        Request::get("/health")
            .header("x-upstream-header", "x-frame-options: ALLOWALL")
            .header("x-upstream-header", "cache-control: public, max-age=600"),
    );
    assert_eq!(resp.header_all("x-frame-options"), ["DENY"]);
    assert_eq!(resp.header_all("cache-control"), ["no-store"]);
}

#[test]
fn an_error_from_the_upstream_gets_security_headers_too() {
    let gw = Gateway::start(GatewayOptions::default());
    let resp = gw.send(Request::get("/health").header("x-upstream-status", "503"));
    assert_eq!(resp.status, 503);
    assert_security_headers(&resp);
    assert_eq!(resp.header("server"), None);
}

#[test]
fn unmatched_paths_are_refused_by_default() {
    let gw = Gateway::start(GatewayOptions::default());
    assert_problem(&gw.send(Request::get("/nowhere")), 404, "not-found");
    // `/health` routes GET and HEAD only.
    assert_problem(&gw.send(Request::new("DELETE", "/health")), 404, "not-found");
    assert_eq!(gw.upstream().requests().len(), 0);
}

#[test]
fn unmatched_paths_follow_the_configured_default() {
    let config = shipped_plugin_config().replacen("\"routes\"", "\"default_policy\": \"public\", \"routes\"", 1);
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
    assert_eq!(gw.send(Request::get("/nowhere")).status, 200);
    assert_problem(&gw.send(Request::get("/api/items")), 401, "unauthenticated");
}

#[test]
fn authenticated_routes_refuse_anonymous_callers() {
    let gw = Gateway::start(GatewayOptions::default());
    for path in ["/api/items", "/billing/invoices"] {
        let resp = gw.send(Request::get(path));
        assert_problem(&resp, 401, "unauthenticated");
        assert_eq!(resp.header("www-authenticate"), Some("Bearer realm=\"tollgate\""));
    }
    assert_eq!(gw.upstream().requests().len(), 0);
}

#[test]
fn envoy_route_metadata_wins_over_the_prefix_table() {
    // The shipped config marks /internal/ closed through route metadata.
    let gw = Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            // And this route opens /api/open/ although the prefix table says /api/ is authenticated.
            let routes = &mut hcm(config)["route_config"]["virtual_hosts"][0]["routes"];
            let open = serde_json::json!({
                "match": {"prefix": "/api/open/"},
                "route": {"cluster": "upstream"},
                "metadata": {"filter_metadata": {"tollgate": {"policy": "public"}}}
            });
            routes.as_array_mut().unwrap().insert(0, open);
        })),
        ..GatewayOptions::default()
    });
    assert_problem(&gw.send(Request::get("/internal/admin")), 404, "not-found");
    assert_eq!(gw.send(Request::get("/api/open/x")).status, 200);
    assert_problem(&gw.send(Request::get("/api/closed")), 401, "unauthenticated");
}

#[test]
fn route_metadata_naming_an_unknown_policy_fails_closed() {
    let gw = Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            let routes = &mut hcm(config)["route_config"]["virtual_hosts"][0]["routes"];
            routes[0]["metadata"]["filter_metadata"]["tollgate"]["policy"] = "no-such-policy".into();
        })),
        ..GatewayOptions::default()
    });
    let resp = gw.send(Request::get("/internal/admin"));
    assert_problem(&resp, 500, "gateway-misconfigured");
    assert!(!resp.text().contains("no-such-policy"), "the problem leaked the policy name");
    assert_eq!(gw.upstream().requests().len(), 0);
}

#[test]
fn client_identity_headers_never_reach_the_upstream() {
    let gw = Gateway::start(GatewayOptions::default());
    let forged = [
        ("X-Tollgate-Subject", "admin"),
        ("x-tollgate-account", "someone-else"),
        ("X-TOLLGATE-TIER", "enterprise"),
        ("x-tollgate-auth-method", "jwt"),
        ("x-tollgate-key-id", "k1"),
        ("x-tollgate-scopes", "admin"),
    ];
    let mut request = Request::get("/health");
    for (name, value) in forged {
        request = request.header(name, value).header(name, value);
    }
    assert_eq!(gw.send(request.header("x-kept", "yes")).status, 200);
    let seen = gw.upstream().wait_for(1, std::time::Duration::from_secs(5));
    let names: Vec<&str> = seen[0].headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.iter().all(|n| !n.starts_with("x-tollgate-")), "forged identity reached the upstream: {names:?}");
    assert!(names.contains(&"x-kept"));
}

#[test]
fn forged_identity_in_other_spellings_never_reaches_the_upstream() {
    // Envoy's default (and Istio's) lets names with underscores through; CGI, Rack and PHP
    // upstreams merge `x_tollgate_account` with `x-tollgate-account`. The shipped config refuses
    // such names outright; the filter strips them where a listener allows them.
    let gw = Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| {
            hcm(config)["common_http_protocol_options"]["headers_with_underscores_action"] = "ALLOW".into();
        })),
        ..GatewayOptions::default()
    });
    let request = Request::get("/health")
        .header("x_tollgate_account", "admin")
        .header("X_Tollgate_Scopes", "admin")
        .header("x-tollgate_tier", "enterprise")
        .header("x_kept", "yes");
    assert_eq!(gw.send(request).status, 200);
    let seen = gw.upstream().wait_for(1, std::time::Duration::from_secs(5));
    let names: Vec<String> = seen[0].headers.iter().map(|(n, _)| n.replace('_', "-")).collect();
    assert!(names.iter().all(|n| !n.starts_with("x-tollgate-")), "forged identity reached the upstream: {names:?}");
    assert!(names.iter().any(|n| n == "x-kept"), "{names:?}");
}

#[test]
fn hsts_only_when_envoy_says_the_request_came_over_https() {
    // The edge config trusts no hop: a client claiming https is not believed.
    let gw = Gateway::start(GatewayOptions::default());
    let resp = gw.send(Request::get("/health").header("x-forwarded-proto", "https"));
    assert_eq!(resp.header("strict-transport-security"), None);
    drop(gw);

    // Behind one trusted TLS-terminating hop, its X-Forwarded-Proto counts.
    let gw = Gateway::start(GatewayOptions {
        mutate: Some(Box::new(|config| hcm(config)["xff_num_trusted_hops"] = 1.into())),
        ..GatewayOptions::default()
    });
    let resp =
        gw.send(Request::get("/health").header("x-forwarded-proto", "https").header("x-forwarded-for", "203.0.113.9"));
    assert_eq!(resp.header("strict-transport-security"), Some("max-age=31536000; includeSubDomains"));
    let resp =
        gw.send(Request::get("/nowhere").header("x-forwarded-proto", "https").header("x-forwarded-for", "203.0.113.9"));
    assert_problem(&resp, 404, "not-found");
    assert_eq!(resp.header("strict-transport-security"), Some("max-age=31536000; includeSubDomains"));
}

#[test]
fn per_policy_cache_control() {
    let config = shipped_plugin_config().replacen(
        "\"public\":  { \"access\": \"public\",",
        "\"public\":  { \"access\": \"public\", \"cache_control\": \"public, max-age=60\",",
        1,
    );
    assert!(config.contains("max-age=60"));
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
    assert_eq!(gw.send(Request::get("/health")).header("cache-control"), Some("public, max-age=60"));
    // Errors stay uncacheable whatever the policy says.
    let resp = gw.send(Request::new("POST", "/auth/login").header("content-type", "text/xml").body(b"x".to_vec()));
    assert_eq!(resp.header("cache-control"), Some("no-store"));
}

#[test]
fn an_insensitive_route_table_limits_every_spelling_of_the_login_route() {
    let logins = |config: String| {
        let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
        // Express routes `/auth/LOGIN` to its login handler: the login limit (5 a minute) must hold.
        (0..6).map(|_| gw.send(Request::get("/auth/LOGIN")).status).collect::<Vec<u16>>()
    };
    let insensitive = shipped_plugin_config().replacen("\"routes\"", "\"route_case\": \"insensitive\", \"routes\"", 1);
    assert_eq!(logins(insensitive), [200, 200, 200, 200, 200, 429]);
    assert_eq!(logins(shipped_plugin_config()), [200; 6], "by default only the exact spelling is the login route");
}
