//! Rate limiting through a real Envoy with two workers: limits per tier and per route, exact
//! counts under concurrency, anonymous callers per client address, and the headers on the way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

fn sha256(key: &str) -> String {
    hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The `/quota` route's daily limit: GCRA refills it one request every 86.4 s.
const QUOTA: usize = 1_000;

/// Keys: `free-a` and `free-b` (two accounts on the free tier), `pro` (pro tier).
fn plugin_config(slots: u32) -> String {
    json!({
        "policies": {
            "health": {"access": "public"},
            "open": {"access": "public", "rate_limit": {}},
            "login": {"access": "public", "rate_limit": {"tiers": false, "route": {"per_minute": 2}}},
            "api": {"access": "authenticated", "rate_limit": {}},
            "search": {"access": "authenticated", "rate_limit": {"route": {"per_minute": 2}}},
            "quota": {"access": "authenticated", "rate_limit": {"tiers": false, "route": {"per_day": QUOTA}}}
        },
        "routes": [
            {"prefix": "/health", "policy": "health"},
            {"prefix": "/open", "policy": "open"},
            {"prefix": "/login", "policy": "login"},
            {"prefix": "/api", "policy": "api"},
            {"prefix": "/search", "policy": "search"},
            {"prefix": "/quota", "policy": "quota"}
        ],
        "rate_limits": {
            "tiers": {"free": {"per_second": 2, "per_hour": 1000}, "pro": {"per_minute": 8}},
            "default_tier": "free",
            "anonymous": {"per_minute": 3},
            "slots": slots
        },
        "auth": {"api_keys": {"keys": [
            {"id": "free-a", "sha256": sha256("key-free-a"), "account": "alpha", "tier": "free"},
            {"id": "free-b", "sha256": sha256("key-free-b"), "account": "beta", "tier": "free"},
            {"id": "pro", "sha256": sha256("key-pro"), "account": "gamma", "tier": "pro"}
        ]}}
    })
    .to_string()
}

fn gateway() -> Gateway {
    Gateway::start(GatewayOptions { plugin_config: Some(plugin_config(65_536)), ..GatewayOptions::default() })
}

fn with_key(path: &str, key: &str) -> Request {
    Request::get(path).header("x-api-key", key)
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// How many requests a window of `limit` per `period` gives back in `elapsed` (GCRA refills one
/// every `period / limit`): what a slow run may rightly let through beyond the limit, so the
/// assertions hold whatever the machine's speed and are exact on a fast one.
fn refills(elapsed: Duration, limit: usize, period: Duration) -> usize {
    (elapsed.as_secs_f64() * limit as f64 / period.as_secs_f64()) as usize
}

/// Whole seconds left of `wait` once `elapsed` has passed, rounded up as the filter rounds them.
fn seconds_left(wait: Duration, elapsed: Duration) -> u64 {
    wait.saturating_sub(elapsed).as_secs_f64().ceil() as u64
}

/// How many requests pass before the first refusal (at most `max`).
fn passes(gw: &Gateway, max: usize, request: impl Fn(usize) -> Request) -> usize {
    (0..max).take_while(|&i| gw.send(request(i)).status == 200).count()
}

#[test]
fn n_pass_then_429_with_consistent_headers_and_an_honest_retry_after() {
    let gw = gateway();
    // Two a second: a fast run passes exactly 2; a run slow enough to see the bucket refill
    // (every 0.5 s) passes those refills too, and the last pass still says 0 remain.
    let started = Instant::now();
    let mut remaining = Vec::new();
    let refused = loop {
        let resp = gw.send(with_key("/api/items", "key-free-a"));
        if resp.status != 200 || remaining.len() == 20 {
            break resp;
        }
        assert_eq!(resp.header("x-ratelimit-limit"), Some("2"));
        let left = resp.header("x-ratelimit-remaining").unwrap().to_owned();
        assert_eq!(resp.header("ratelimit-policy"), Some("\"free-per-second\";q=2;w=1"));
        assert_eq!(resp.header("ratelimit"), Some(format!("\"free-per-second\";r={left};t=1").as_str()));
        let reset: u64 = resp.header("x-ratelimit-reset").unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!((now..=now + 2).contains(&reset), "X-RateLimit-Reset {reset} is a Unix time about now ({now})");
        remaining.push(left);
    };
    let passed = remaining.len();
    assert!((2..=2 + refills(started.elapsed(), 2, SECOND)).contains(&passed), "{passed} passed");
    assert_eq!((remaining[0].as_str(), remaining[passed - 1].as_str()), ("1", "0"), "{remaining:?}");
    assert_problem(&refused, 429, "rate-limited");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(refused.header("ratelimit"), Some("\"free-per-second\";r=0;t=1"));
    assert_eq!(gw.upstream().requests().len(), passed, "the refused request never reached the upstream");

    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    thread::sleep(Duration::from_secs(wait));
    assert_eq!(gw.send(with_key("/api/items", "key-free-a")).status, 200, "a request right after Retry-After passes");
}

#[test]
fn concurrent_requests_across_both_workers_pass_exactly_the_limit() {
    // One account, 1,408 requests from 16 threads at once, each on its own connection, which
    // Envoy spreads over its two workers; the route allows 1,000 a day, so exactly 1,000 pass.
    // Without compare-and-swap, workers overwrite each other's counts and more get through.
    let gw = gateway();
    let started = Instant::now();
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| (0..88).map(|_| gw.send(with_key("/quota", "key-pro")).status).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // The window refills one request every 86.4 s, so a run that slow may rightly let through
    // one more per 86.4 s it took (with `per_hour`, one per 3.6 s made slow runs fail); a
    // faster run gets exactly the limit.
    let elapsed = started.elapsed();
    let refilled = refills(elapsed, QUOTA, DAY);
    let passed = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(statuses.len(), 1_408);
    assert!((QUOTA..=QUOTA + refilled).contains(&passed), "{passed} passed in {elapsed:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 1_408 - passed);
    assert_eq!(gw.upstream().requests().len(), passed);
}

#[test]
fn tiers_get_their_own_limits_and_route_limits_apply_on_top() {
    let gw = gateway();
    let started = Instant::now();
    let free = passes(&gw, 20, |_| with_key("/api/items", "key-free-b"));
    assert!((2..=2 + refills(started.elapsed(), 2, SECOND)).contains(&free), "free: 2 a second, {free} passed");

    let started = Instant::now();
    assert_eq!(passes(&gw, 20, |_| with_key("/search", "key-pro")), 2, "the search route: 2 a minute");
    let refused = gw.send(with_key("/search", "key-pro"));
    assert_problem(&refused, 429, "rate-limited");
    assert_eq!(refused.header("ratelimit-policy"), Some("\"search-per-minute\";q=2;w=60"));
    // The next request is 30 s after the first; less whatever time the requests took.
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    let earliest = seconds_left(Duration::from_secs(30), started.elapsed());
    assert!((earliest..=30).contains(&retry_after), "Retry-After {retry_after}");
    let resp = gw.send(with_key("/api/items", "key-pro"));
    // Pro: 8 a minute, 2 spent on search; full again 3 × 7.5 s after the first request.
    let ratelimit = resp.header("ratelimit").unwrap();
    let (left, reset) = ratelimit.strip_prefix("\"pro-per-minute\";r=").unwrap().split_once(";t=").unwrap();
    let (left, reset): (usize, u64) = (left.parse().unwrap(), reset.parse().unwrap());
    let refilled = refills(started.elapsed(), 8, MINUTE);
    assert!((5..=5 + refilled).contains(&left), "{ratelimit}");
    let earliest = seconds_left(Duration::from_millis(22_500), started.elapsed());
    assert!((earliest..=23).contains(&reset), "{ratelimit}");
    let pro = passes(&gw, 20, |_| with_key("/api/items", "key-pro"));
    assert!((left..=left + refills(started.elapsed(), 8, MINUTE)).contains(&pro), "{pro} more passed");
}

#[test]
fn a_limit_on_one_account_does_not_touch_another() {
    let gw = gateway();
    let started = Instant::now();
    let free = passes(&gw, 10, |_| with_key("/api/items", "key-free-a"));
    assert!((2..=2 + refills(started.elapsed(), 2, SECOND)).contains(&free), "{free} passed");
    let resp = gw.send(with_key("/api/items", "key-free-b"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-ratelimit-remaining"), Some("1"));
}

#[test]
fn anonymous_callers_are_limited_per_address_and_spoofed_forwarded_for_does_not_help() {
    let gw = gateway();
    // The shipped connection manager settings: use_remote_address, no trusted hops.
    let spoofed = |i: usize| Request::get("/open").header("x-forwarded-for", format!("198.51.100.{i}"));
    assert_eq!(passes(&gw, 10, spoofed), 3, "three a minute per address, whatever X-Forwarded-For says");
    let other = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(passes(&gw, 10, |_| Request::get("/open").sent_from(other)), 3, "another address has its own");
    let login = |_| Request::get("/login").sent_from(other);
    assert_eq!(passes(&gw, 10, login), 2, "the login route's own limit");
    for _ in 0..5 {
        let resp = gw.send(Request::get("/health"));
        assert_eq!(resp.status, 200, "health is never limited");
        assert_eq!(resp.header("x-ratelimit-limit"), None);
    }
}

#[test]
fn the_shipped_login_limit_holds_against_rotating_forwarded_for() {
    let gw = Gateway::start(GatewayOptions::default());
    let login = |i: usize| {
        Request::new("POST", "/auth/login")
            .header("content-type", "application/json")
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .body(b"{}".to_vec())
    };
    assert_eq!(passes(&gw, 10, login), 5, "5 a minute per client address");
}

#[test]
fn a_busy_caller_keeps_its_count_while_a_flood_of_addresses_churns_a_small_table() {
    // 256 slots, 1,500 new client addresses (3 a minute each: full again within 20 s):
    // newcomers evict the callers whose buckets refill soonest, never the one whose daily quota
    // takes 86.4 s to give back the request it spent.
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(plugin_config(256)), ..GatewayOptions::default() });
    let started = Instant::now();
    let quota_left = |resp: Response| -> usize { resp.header("x-ratelimit-remaining").unwrap().parse().unwrap() };
    assert_eq!(quota_left(gw.send(with_key("/quota", "key-pro"))), QUOTA - 1);
    let flood = |chunk: usize| {
        for i in (chunk * 300)..(chunk * 300 + 300) {
            let address = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
            let status = gw.send(Request::get("/open").sent_from(address)).status;
            assert_eq!(status, 200, "a new address starts with a full bucket");
        }
    };
    thread::scope(|s| (0..5).for_each(|chunk| drop(s.spawn(move || flood(chunk)))));
    // Kept: a second request leaves one less (plus what the elapsed time refilled); evicted, the
    // caller would start again with a full bucket and see QUOTA - 1 again.
    let left = quota_left(gw.send(with_key("/quota", "key-pro")));
    assert!((QUOTA - 2..=QUOTA - 2 + refills(started.elapsed(), QUOTA, DAY)).contains(&left), "{left} left");
}

#[test]
fn an_ipv6_network_is_limited_beside_each_of_its_addresses() {
    let mut config: serde_json::Value = serde_json::from_str(&plugin_config(65_536)).unwrap();
    config["rate_limits"]["ipv6_network"] = json!({"prefix_length": 48, "factor": 2});
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(config.to_string()),
        // Behind a trusted proxy: Envoy takes the client address from X-Forwarded-For, which is how
        // a test on loopback can speak for IPv6 clients.
        mutate: Some(Box::new(|config| {
            hcm(config)["use_remote_address"] = false.into();
        })),
        ..GatewayOptions::default()
    });
    let from = |address: &'static str| move |_| Request::get("/login").header("x-forwarded-for", address);
    assert_eq!(passes(&gw, 5, from("2001:db8:1:1::1")), 2, "the login limit per /64");
    assert_eq!(passes(&gw, 5, from("2001:db8:1:2::1")), 2, "a second /64 of the same /48");
    assert_eq!(passes(&gw, 5, from("2001:db8:1:3::1")), 0, "the /48 has spent its 2 x 2");
    let refused = gw.send(Request::get("/login").header("x-forwarded-for", "2001:db8:1:4::1"));
    assert_problem(&refused, 429, "rate-limited");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(passes(&gw, 5, from("2001:db8:2:1::1")), 2, "another /48");
}
