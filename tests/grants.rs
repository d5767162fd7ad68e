//! Credit grants through a real Envoy, the real credit service on a SQLite file, and a recording
//! upstream: the guarantees the README states, each tested. Requests are paid from a grant the
//! service made this Envoy ahead of time; the ledger must end up charging exactly what the
//! clients were served, whatever fails on the way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

const COST: u64 = 2;
/// Short, so that an abandoned grant expires (2 × lifetime) within a test.
const LIFETIME_SECONDS: u64 = 4;
const FLUSH_SECONDS: u64 = 1;

fn sha256(key: &str) -> String {
    hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// API key `key-<account>` for each account; `/api` billed `COST` from grants no smaller than
/// `min_grant` (a new grant's size: the service knows no rate yet).
fn plugin_config(accounts: &[&str], min_grant: u64) -> String {
    let keys: Vec<_> = accounts
        .iter()
        .map(|a| json!({"id": format!("key-{a}"), "sha256": sha256(&format!("key-{a}")), "account": a}))
        .collect();
    json!({
        "policies": {"api": {"access": "authenticated", "credits": {"cost": COST}}},
        "routes": [{"prefix": "/api", "policy": "api"}],
        "credits": {
            "cluster": "credits", "service_token": SERVICE_TOKEN, "timeout_ms": 1000,
            "actual_cost_header": "x-actual-cost",
            "grants": {"lifetime_seconds": LIFETIME_SECONDS, "flush_seconds": FLUSH_SECONDS,
                       "idle_seconds": 2, "min_grant": min_grant, "max_grant": 100000}
        },
        "auth": {"api_keys": {"keys": keys}}
    })
    .to_string()
}

fn gateway(accounts: &[&str], credit_port: u16) -> Gateway {
    gateway_with(accounts, credit_port, 10, 2)
}

fn gateway_with(accounts: &[&str], credit_port: u16, min_grant: u64, workers: u32) -> Gateway {
    Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(accounts, min_grant)),
        credit_port: Some(credit_port),
        concurrency: workers,
        ..GatewayOptions::default()
    })
}

fn call(account: &str) -> Request {
    Request::get("/api/items").header("x-api-key", format!("key-{account}"))
}

/// Waits until the account's grant exists at the credit service.
fn granted(credits: &CreditService, account: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !credits.kinds(account).iter().any(|k| k == "grant") {
        assert!(Instant::now() < deadline, "no grant for {account}: {:?}", credits.kinds(account));
        thread::sleep(Duration::from_millis(50));
    }
}

/// `threads` clients calling until `until` says stop; the statuses they saw (0: no answer).
fn load(gateways: &[&Gateway], account: &str, threads: usize, until: impl Fn(&[u16]) -> bool + Sync) -> Vec<u16> {
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let gw = gateways[i % gateways.len()];
                let until = &until;
                s.spawn(move || {
                    let mut statuses = Vec::new();
                    while !until(&statuses) {
                        statuses.push(gw.try_send(&call(account)).map_or(0, |r| r.status));
                    }
                    statuses
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    })
}

fn count(statuses: &[u16], status: u16) -> u64 {
    statuses.iter().filter(|&&s| s == status).count() as u64
}

#[test]
fn a_grant_pays_with_no_callout_and_the_ledger_charges_exactly_what_was_served() {
    let credits = CreditService::start();
    credits.create_account("acme", 10_000);
    // A first grant for 100 requests; one worker, whose view of the balance each response shows
    // (another worker's lags by up to its next sync).
    let gw = gateway_with(&["acme"], credits.port(), 100 * COST, 1);
    let first = gw.send(call("acme"));
    assert_eq!(first.status, 200, "{}", first.text());
    granted(&credits, "acme");

    let callouts = gw.metric("tollgate_credit_callouts");
    let mut served = 1;
    let mut last_remaining = u64::MAX;
    for i in 0..60 {
        let request = if i % 10 == 9 { call("acme").header("x-upstream-status", "500") } else { call("acme") };
        let resp = gw.send(request);
        if resp.status == 200 {
            served += 1;
            assert_eq!(resp.header("x-credits-charged"), Some("2"));
            // The grant's view: it lags what the service has not told it (the first, per-request
            // call's commit) but never shows more than what this gateway knows is left.
            let remaining: u64 = resp.header("x-credits-remaining").unwrap().parse().unwrap();
            assert!(remaining >= 10_000 - served * COST, "remaining {remaining} after {served} served");
            assert!(remaining + COST <= last_remaining, "remaining {remaining} after {last_remaining}");
            last_remaining = remaining;
        } else {
            assert_eq!((resp.status, resp.header("x-credits-charged")), (500, Some("0")));
        }
    }
    let reports = gw.metric("tollgate_credit_callouts") - callouts;
    assert!(reports <= 10, "{reports} callouts for 60 requests: the grant pays without one");

    let balance = credits.settled("acme", Duration::from_secs(20));
    assert_eq!(10_000 - balance, served * COST, "charged exactly the 2xx responses");
    let kinds = credits.kinds("acme");
    assert!(kinds.contains(&"grant_use".to_owned()) && kinds.contains(&"grant_close".to_owned()), "{kinds:?}");
    assert_eq!(gw.upstream().requests().len(), 61);

    let usage = credits.usage("acme");
    let api: u64 = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["policy"] == "api")
        .map(|u| u["credits"].as_u64().unwrap())
        .sum();
    assert_eq!(api, served * COST, "usage per policy: {usage}");
}

#[test]
fn two_gateways_on_one_low_balance_account_never_spend_more_than_it_has() {
    const BALANCE: u64 = 300;
    let credits = CreditService::start();
    credits.create_account("acme", BALANCE);
    let (one, two) = (gateway(&["acme"], credits.port()), gateway(&["acme"], credits.port()));
    // Until each client has seen ten 402s in a row.
    let statuses =
        load(&[&one, &two], "acme", 6, |seen| seen.len() >= 10 && seen.iter().rev().take(10).all(|&s| s == 402));
    assert_eq!(count(&statuses, 200) + count(&statuses, 402), statuses.len() as u64, "only 200 and 402");
    let mut served = count(&statuses, 200);
    assert!(served * COST <= BALANCE, "{served} served at {COST} each from {BALANCE}");

    // Once the grants are given back, what is left is served per request, to the credit.
    let mut balance = credits.settled("acme", Duration::from_secs(30));
    while balance >= COST {
        assert_eq!(one.send(call("acme")).status, 200, "{balance} left");
        served += 1;
        balance = credits.settled("acme", Duration::from_secs(10));
    }
    let resp = one.send(call("acme"));
    assert_problem(&resp, 402, "insufficient-credits");
    assert_eq!(served * COST + balance, BALANCE, "every credit spent once, and none more");
}

/// A credit service in front of the real one that sends every grant report twice, then the
/// previous one again: duplicated and reordered reports.
struct Replaying {
    port: u16,
}

impl Replaying {
    fn start(service: u16) -> Replaying {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let previous = std::sync::Arc::new(Mutex::new(None::<Request>));
            for conn in listener.incoming().flatten() {
                let previous = std::sync::Arc::clone(&previous);
                thread::spawn(move || relay(conn, service, &previous));
            }
        });
        Replaying { port }
    }
}

fn relay(conn: TcpStream, service: u16, previous: &Mutex<Option<Request>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned());
        let mut request = Request::new(&method, &path);
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_owned());
            match name.as_str() {
                "content-length" => length = value.parse().unwrap(),
                "authorization" | "content-type" => request = request.header(name, value),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let request = request.body(body);
        let Ok(answer) = send_to(service, &request) else { return };
        if path == "/v1/grants" {
            let _ = send_to(service, &request);
            if let Some(stale) = previous.lock().unwrap().replace(request) {
                let _ = send_to(service, &stale);
            }
        }
        let head = format!(
            "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            answer.status,
            answer.body.len()
        );
        if conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&answer.body)).is_err() {
            return;
        }
    }
}

#[test]
fn duplicated_and_reordered_reports_charge_nothing_twice() {
    let credits = CreditService::start();
    credits.create_account("acme", 100_000);
    let replaying = Replaying::start(credits.port());
    let gw = gateway(&["acme"], replaying.port);
    let end = Instant::now() + Duration::from_secs(4);
    let statuses = load(&[&gw], "acme", 4, |_| Instant::now() > end);
    assert_eq!(count(&statuses, 200), statuses.len() as u64, "all served");
    let balance = credits.settled("acme", Duration::from_secs(30));
    assert_eq!(100_000 - balance, count(&statuses, 200) * COST, "each report counted once");
}

#[test]
fn a_credit_service_killed_mid_load_and_restarted_loses_nothing() {
    // A reservation the crash left unanswered (a request the grant could not pay) expires in 10 s.
    let mut credits = CreditService::with_ttl(10);
    credits.create_account("acme", 1_000_000);
    let gw = gateway(&["acme"], credits.port());
    gw.send(call("acme"));
    granted(&credits, "acme");
    let end = Instant::now() + Duration::from_secs(4);
    let statuses = thread::scope(|s| {
        let load = s.spawn(|| load(&[&gw], "acme", 6, |_| Instant::now() > end));
        thread::sleep(Duration::from_millis(1000));
        credits.kill();
        thread::sleep(Duration::from_millis(1500));
        credits.restart();
        load.join().unwrap()
    });
    let ok = count(&statuses, 200) + 1;
    let unavailable = count(&statuses, 503);
    assert_eq!(ok - 1 + unavailable, statuses.len() as u64, "only 200 and 503: {statuses:?}");
    let balance = credits.settled("acme", Duration::from_secs(40));
    println!("service crash: {ok} served, {unavailable} 503, {} credits charged", 1_000_000 - balance);
    assert_eq!(1_000_000 - balance, ok * COST, "after the reports caught up: exactly the 2xx responses");
}

#[test]
fn an_envoy_killed_mid_load_over_charges_nothing_and_under_counts_at_most_a_flush() {
    let credits = CreditService::start();
    credits.create_account("acme", 1_000_000);
    let mut gw = gateway(&["acme"], credits.port());
    gw.send(call("acme"));
    granted(&credits, "acme");
    let start = Instant::now();
    let end = start + Duration::from_secs(3);
    let statuses = load(&[&gw], "acme", 4, |_| Instant::now() > end);
    // Killed right after its clients stop: what it spent since its last report is never reported.
    gw.kill();
    let ok = count(&statuses, 200) + 1;
    let rate = ok as f64 / start.elapsed().as_secs_f64();
    // The service settles the abandoned grant at its last report after 2 × its lifetime.
    let balance = credits.settled("acme", Duration::from_secs(4 * LIFETIME_SECONDS + 10));
    let charged = 1_000_000 - balance;
    let under = (ok * COST).saturating_sub(charged);
    // A worker's lease syncs every second and the process reports every flush: what was spent in
    // the last of each, and a report in flight when Envoy died.
    let bound = ((1.0 + 2.0 * FLUSH_SECONDS as f64) * rate) as u64 * COST + 4 * COST;
    println!("envoy crash: {ok} served ({rate:.0}/s), {charged} charged, under-count {under} credits (bound {bound})");
    assert!(charged <= ok * COST, "never more than served");
    assert!(under <= bound, "under-count {under} above the bound {bound}");
    assert!(credits.kinds("acme").contains(&"grant_expire".to_owned()));
}
