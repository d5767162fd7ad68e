//! Per-request credits through a real Envoy, the real credit service on a SQLite file, and a
//! recording upstream: what is charged, what is not, under concurrency, and across a credit
//! service crash. Grants have their own suite (`grants.rs`); per-request billing is also what a
//! grant falls back to.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

const COST: u64 = 5;

fn sha256(key: &str) -> String {
    hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// API key `key-<account>` for each account.
fn plugin_config(accounts: &[&str]) -> String {
    let keys: Vec<_> = accounts
        .iter()
        .map(|a| json!({"id": format!("key-{a}"), "sha256": sha256(&format!("key-{a}")), "account": a}))
        .collect();
    let billed = |extra: serde_json::Value| {
        let mut credits = json!({"cost": COST, "mode": "per_request"});
        credits.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"access": "authenticated", "credits": credits})
    };
    let mut limited = billed(json!({}));
    limited["rate_limit"] = json!({"tiers": false, "route": {"per_hour": 1}});
    json!({
        "policies": {
            "api": billed(json!({})),
            "lenient": billed(json!({"on_failure": "allow"})),
            "batch": billed(json!({"multiplier_header": "x-units", "max_multiplier": 10})),
            "revalidated": billed(json!({"bill_statuses": ["2xx", 304]})),
            "limited": limited,
            "free": {"access": "authenticated"}
        },
        "routes": [
            {"prefix": "/api", "policy": "api"},
            {"prefix": "/lenient", "policy": "lenient"},
            {"prefix": "/batch", "policy": "batch"},
            {"prefix": "/revalidated", "policy": "revalidated"},
            {"prefix": "/limited", "policy": "limited"},
            {"prefix": "/free", "policy": "free"}
        ],
        "request_checks": {"max_body_bytes": 1024},
        "credits": {
            "cluster": "credits", "service_token": SERVICE_TOKEN, "timeout_ms": 500,
            "actual_cost_header": "x-actual-cost", "retry_seconds": 60
        },
        "auth": {"api_keys": {"keys": keys}}
    })
    .to_string()
}

fn setup(accounts: &[(&str, u64)]) -> (Gateway, CreditService) {
    let credits = CreditService::start();
    for (account, balance) in accounts {
        credits.create_account(account, *balance);
    }
    let names: Vec<&str> = accounts.iter().map(|(a, _)| *a).collect();
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(&names)),
        credit_port: Some(credits.port()),
        ..GatewayOptions::default()
    });
    (gw, credits)
}

fn call(path: &str, account: &str) -> Request {
    Request::get(path).header("x-api-key", format!("key-{account}"))
}

#[test]
fn a_2xx_is_charged_and_an_upstream_error_is_not() {
    let (gw, credits) = setup(&[("acme", 100)]);
    let resp = gw.send(call("/api/items", "acme"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-credits-charged"), Some("5"));
    assert_eq!(resp.header("x-credits-remaining"), Some("95"));
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 95);

    for status in ["404", "500"] {
        // The previous release is sent after its response: let it land, so this request's
        // reservation sees the whole balance however slowly the machine runs.
        credits.settled("acme", Duration::from_secs(5));
        let resp = gw.send(call("/api/items", "acme").header("x-upstream-status", status));
        assert_eq!(resp.status.to_string(), status);
        assert_eq!(resp.header("x-credits-charged"), Some("0"));
        assert_eq!(resp.header("x-credits-remaining"), Some("95"));
    }
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 95, "errors cost nothing");
    assert_eq!(credits.kinds("acme"), ["topup", "reserve", "commit", "reserve", "release", "reserve", "release"]);
    assert_eq!(gw.upstream().requests().len(), 3);
    assert_eq!(gw.metric("tollgate_credit_callouts"), 6, "a reservation and a settlement per request");
}

#[test]
fn a_short_balance_is_402_and_never_reaches_the_upstream() {
    let (gw, credits) = setup(&[("poor", 3)]);
    let resp = gw.send(call("/api/items", "poor"));
    assert_problem(&resp, 402, "insufficient-credits");
    assert_eq!((resp.json()["required"].as_u64(), resp.json()["balance"].as_u64()), (Some(5), Some(3)));
    assert!(gw.upstream().requests().is_empty());
    assert_eq!(credits.kinds("poor"), ["topup"], "nothing was held");
}

#[test]
fn an_upstream_reporting_less_is_charged_less_and_never_more_than_reserved() {
    let (gw, credits) = setup(&[("acme", 100)]);
    let resp = gw.send(call("/api/items", "acme").header("x-upstream-header", "x-actual-cost: 2"));
    assert_eq!(resp.header("x-credits-charged"), Some("2"));
    assert_eq!(resp.header("x-credits-remaining"), Some("98"));
    assert_eq!(resp.header("x-actual-cost"), None, "the upstream's report is not the client's business");
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 98);

    let resp = gw.send(call("/api/items", "acme").header("x-upstream-header", "x-actual-cost: 9"));
    assert_eq!(resp.header("x-credits-charged"), Some("5"));
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 93);

    let resp = gw.send(call("/batch", "acme").header("x-units", "3"));
    assert_eq!(resp.header("x-credits-charged"), Some("15"), "cost × x-units");
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 78);
}

#[test]
fn fifty_concurrent_requests_on_an_account_that_affords_twenty() {
    let (gw, credits) = setup(&[("acme", 20 * COST)]);
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..50).map(|_| s.spawn(|| gw.send(call("/api/items", "acme")).status)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 20, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 402).count(), 30);
    assert_eq!(gw.upstream().requests().len(), 20);
    assert_eq!(credits.settled("acme", Duration::from_secs(10)), 0);
}

#[test]
fn an_unreachable_credit_service_is_503_or_unbilled_as_the_policy_says() {
    let (gw, mut credits) = setup(&[("acme", 100)]);
    credits.kill();
    let started = Instant::now();
    assert_problem(&gw.send(call("/api/items", "acme")), 503, "credits-unavailable");
    let resp = gw.send(call("/lenient", "acme"));
    assert!(started.elapsed() < Duration::from_secs(3), "the callouts took {:?}", started.elapsed());
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-credits-charged"), Some("0"));
    assert_eq!(gw.upstream().requests().len(), 1, "only the lenient route's request went up");
}

#[test]
fn a_client_chosen_request_id_is_charged_every_time() {
    // The idempotency key is the gateway's own: a client that repeats an x-request-id (its own or
    // someone else's) is charged for each request, and cannot touch another account's.
    let (gw, credits) = setup(&[("acme", 100), ("globex", 100)]);
    for account in ["acme", "acme", "globex"] {
        let resp = gw.send(call("/api/items", account).header("x-request-id", "7d1c3b0e-replayed"));
        assert_eq!(resp.header("x-credits-charged"), Some("5"));
    }
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 90);
    assert_eq!(credits.settled("globex", Duration::from_secs(5)), 95);
}

#[test]
fn the_gateways_own_refusals_never_call_the_credit_service() {
    let (gw, credits) = setup(&[("acme", 100)]);
    let json = |path: &str| Request::new("POST", path).header("x-api-key", "key-acme");
    assert_eq!(gw.send(call("/limited", "acme")).status, 200, "the hour's one request");
    // Its commit may still be on its way after the response: counted before the refusals are.
    credits.settled("acme", Duration::from_secs(5));
    let before = gw.metric("tollgate_credit_callouts");
    let refused = [
        (Request::get("/api/items"), 401),
        (call("/api/items", "nobody"), 401),
        (json("/api/items").header("content-type", "application/json").body(vec![b'x'; 2048]), 413),
        (json("/api/items").header("content-type", "text/xml").body(b"<x/>".to_vec()), 415),
        (call("/limited", "acme"), 429),
        (call("/batch", "acme").header("x-units", "11"), 400),
        // Two multipliers: which one a backend reads is anyone's guess.
        (call("/batch", "acme").header("x-units", "1").header("x-units", "9"), 400),
    ];
    for (request, status) in refused {
        let what = request.describe();
        assert_eq!(gw.send(request).status, status, "{what}");
    }
    assert_eq!(gw.metric("tollgate_credit_callouts"), before, "a refusal made a callout");
    assert_eq!(credits.kinds("acme"), ["topup", "reserve", "commit"]);
    assert_eq!(gw.send(call("/free", "acme")).header("x-credits-charged"), None, "unbilled policies say nothing");
}

#[test]
fn billing_cannot_be_dodged() {
    let credits = CreditService::start();
    credits.create_account("acme", 100);
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(&["acme", "auth0|42"])),
        credit_port: Some(credits.port()),
        ..GatewayOptions::default()
    });

    // An account id the credit service refuses is a refusal, even where an outage would be let
    // through unbilled.
    let resp = gw.send(call("/lenient/items", "auth0|42"));
    assert_problem(&resp, 403, "billing-refused");
    assert!(gw.upstream().requests().is_empty(), "served without being billed");

    // A usage report the client sends itself never reaches the upstream: the upstream reports.
    let resp = gw.send(call("/api/items", "acme").header("x-actual-cost", "0"));
    assert_eq!((resp.status, resp.header("x-credits-charged")), (200, Some("5")));
    assert_eq!(gw.upstream().wait_for(1, Duration::from_secs(5))[0].header("x-actual-cost"), None);
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 95);

    // A policy may bill what its API counts as served: here a 304 too.
    let resp = gw.send(call("/revalidated/items", "acme").header("x-upstream-status", "304"));
    assert_eq!((resp.status, resp.header("x-credits-charged")), (304, Some("5")));
    let resp = gw.send(call("/api/items", "acme").header("x-upstream-status", "304"));
    assert_eq!((resp.status, resp.header("x-credits-charged")), (304, Some("0")), "2xx only by default");
    assert_eq!(credits.settled("acme", Duration::from_secs(5)), 90);
}

#[test]
fn a_credit_service_crash_mid_load_neither_loses_nor_doubles_a_charge() {
    // Reservations left unanswered by the crash expire (TTL 10 s); commits it interrupted are
    // retried from each worker's root context until the restarted service takes them.
    let mut credits = CreditService::with_ttl(10);
    credits.create_account("acme", 1_000_000);
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(&["acme"])),
        credit_port: Some(credits.port()),
        ..GatewayOptions::default()
    });
    let end = Instant::now() + Duration::from_secs(3);
    let load = || {
        let mut statuses = Vec::new();
        while Instant::now() < end {
            statuses.push(gw.send(call("/api/items", "acme")).status);
        }
        statuses
    };
    let statuses: Vec<u16> = thread::scope(|s| {
        let workers: Vec<_> = (0..8).map(|_| s.spawn(load)).collect();
        thread::sleep(Duration::from_millis(800));
        credits.kill();
        thread::sleep(Duration::from_millis(700));
        credits.restart();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let unavailable = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(ok as usize + unavailable, statuses.len(), "only 200 and 503");
    assert!(unavailable > 0 && ok > 0, "{ok} ok, {unavailable} unavailable: the crash did not land mid-load");

    let balance = credits.settled("acme", Duration::from_secs(40));
    let committed = 1_000_000 - balance;
    println!("crash test: {ok} responses 2xx, {unavailable} 503, {committed} credits committed");
    let kinds = credits.kinds("acme");
    for kind in ["reserve", "commit", "release", "expire"] {
        println!("  {kind}: {}", kinds.iter().filter(|k| *k == kind).count());
    }
    assert_eq!(committed, ok * COST, "charged exactly the 2xx responses the clients saw");
}

#[test]
fn a_service_token_given_by_environment_variable_never_shows_in_the_config_dump() {
    let credits = CreditService::start();
    credits.create_account("acme", 100);
    let mut config: serde_json::Value = serde_json::from_str(&plugin_config(&["acme"])).unwrap();
    config["credits"]["service_token"] = json!({"env": "TOLLGATE_E2E_SERVICE_TOKEN"});
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(config.to_string()),
        credit_port: Some(credits.port()),
        env: vec![("TOLLGATE_E2E_SERVICE_TOKEN".to_owned(), SERVICE_TOKEN.to_owned())],
        mutate: Some(Box::new(|config| {
            tollgate_filter(config)["typed_config"]["config"]["vm_config"]["environment_variables"] =
                json!({"host_env_keys": ["TOLLGATE_E2E_SERVICE_TOKEN"]});
        })),
        ..GatewayOptions::default()
    });
    let resp = gw.send(call("/api/items", "acme"));
    assert_eq!((resp.status, resp.header("x-credits-charged")), (200, Some("5")), "{}", resp.text());
    assert!(!gw.admin("/config_dump").text().contains(SERVICE_TOKEN), "the token shows in /config_dump");
}
