//! `make bench`: what tollgate costs inside Envoy, next to Envoy alone and to the filter chain a
//! user would build from Envoy's own filters. Seven parts, all written to build/bench.md:
//!
//! 1. Throughput: requests/s, latency and Envoy CPU per request. Envoy (`--concurrency 1`, direct
//!    response, so no upstream is measured) is pinned to CPU 0 and wrk to CPU 1; scenarios
//!    alternate over rounds (each round in a rotated order) and medians are reported.
//! 2. Contention: how often the rate limiter's compare-and-swap loses when both workers count
//!    one caller.
//! 3. Memory: Envoy's RSS and heap after many distinct rate-limited clients, against the bound
//!    the rate-limit table promises.
//! 4. Start time: Envoy with a large plugin config (1,000 API keys, a 20-key JWKS), with and
//!    without the rate-limit table, against Envoy without the filter.
//! 5. Instructions: Envoy's instructions per request under callgrind, the figure that stays put
//!    on a machine whose CPU time others share.
//! 6. Hostcalls: the same count for a probe filter (benches/hostcall-probe) that only makes one
//!    kind of proxy-wasm call, which prices each kind.
//! 7. Billing: Envoy's CPU per request with a credit reservation and commit, against the same
//!    filter unbilled, both at one fixed request rate.
//!
//! Environment: `TOLLGATE_BENCH_ROUNDS` (default 3), `TOLLGATE_BENCH_SECONDS` per run (5),
//! `TOLLGATE_BENCH_CLIENTS` distinct clients for the memory part (2000000),
//! `TOLLGATE_BENCH_STARTS` per start-time variant (5), `TOLLGATE_BENCH_PARTS` (default
//! `throughput,billing,contention,memory,start,instructions,hostcalls`), `TOLLGATE_BENCH_ONLY`
//! (scenario names and hostcall kinds; plain, native and the noop probe always run; the
//! `tollgate-native*` rows run the dynamic module from `make native`), and
//! `TOLLGATE_BENCH_ALT_WASM`, a second module whose tollgate scenarios run alongside (to compare
//! builds, e.g. profiles).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "benchmark driver")]

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration as StdDuration, Instant};

use harness::*;
use jwt_simple::prelude::*;
use serde_json::{json, Value};

const CONNECTIONS: u32 = 16;
/// High enough never to refuse during a run, so every request pays for a full limiter update.
const NEVER: u64 = 1_000_000_000;
/// The security headers tollgate sets by default, for the native chain to set too.
const SECURITY_HEADERS: [(&str, &str); 6] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=(), usb=(), magnetometer=(), gyroscope=(), accelerometer=()",
    ),
    ("cache-control", "no-store"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
];
const HS_SECRET: [u8; 32] = [7; 32];

/// Whether `TOLLGATE_BENCH_ONLY`, when set, names this scenario or hostcall kind.
fn picked(name: &str) -> bool {
    std::env::var("TOLLGATE_BENCH_ONLY").map_or(true, |only| only.split(',').any(|o| o.trim() == name))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(bytes: &[u8]) -> String {
    use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Encoder};
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
}

fn sha256_hex(key: &str) -> String {
    hex(&hmac_sha256::Hash::hash(key.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Configs

/// The keys tokens are signed with.
struct Keys {
    es: ES256KeyPair,
    rs: RS256KeyPair,
}

impl Keys {
    fn generate() -> Keys {
        Keys { es: ES256KeyPair::generate(), rs: RS256KeyPair::generate(2048).unwrap() }
    }

    fn es_jwk(&self, kid: &str) -> Value {
        let point = self.es.public_key().public_key().to_bytes_uncompressed();
        json!({"kty": "EC", "kid": kid, "alg": "ES256", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})
    }

    fn rs_jwk(&self, kid: &str) -> Value {
        let rsa = self.rs.public_key().to_components();
        json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&rsa.n), "e": b64(&rsa.e)})
    }
}

/// How the plugin config of a tollgate scenario differs from the full one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plugin {
    /// Rate limits on (limits never reached), verified-token cache on: the full filter.
    Full,
    /// No `rate_limits` and no policy `rate_limit`: the difference to `Full` is the limiter.
    NoLimits,
    /// The token cache off, so every request verifies its signature.
    Uncached,
    /// The full filter with credits on: a reservation and a commit with the real credit service
    /// per request.
    Credits,
    /// The full filter with credits paid from a grant: no callout per request, a report a second.
    Grants,
}

/// The shipped plugin config with limits nobody reaches, one provider with HS256, ES256 and
/// RS256 keys, and one API key.
fn plugin_config(keys: &Keys, kind: Plugin) -> String {
    let mut config: Value = serde_json::from_str(&shipped_plugin_config()).unwrap();
    let never = json!({"per_second": NEVER, "per_minute": 60 * NEVER, "per_day": 86_400 * NEVER});
    config["rate_limits"]["tiers"] = json!({"free": never, "pro": never});
    config["rate_limits"]["anonymous"] = never;
    config["auth"] = json!({
        "jwt": {
            "cache_entries": if kind == Plugin::Uncached { 0 } else { 1024 },
            "providers": [{
                "issuer": "bench", "audiences": ["api"],
                "secrets": [{"kid": "hs", "alg": "HS256", "secret": b64(&HS_SECRET)}],
                "jwks": {"keys": [keys.es_jwk("es"), keys.rs_jwk("rs")]}
            }]
        },
        "api_keys": {"keys": [{"id": "bench", "account": "bench", "sha256": sha256_hex("bench-key")}]}
    });
    if kind == Plugin::NoLimits {
        without_rate_limits(&mut config);
    }
    match kind {
        Plugin::Credits | Plugin::Grants => {
            config["credits"]["service_token"] = SERVICE_TOKEN.into();
            let mode = if kind == Plugin::Credits { "per_request" } else { "grant" };
            for policy in config["policies"].as_object_mut().unwrap().values_mut() {
                if let Some(credits) = policy.get_mut("credits") {
                    credits["mode"] = mode.into();
                }
            }
        }
        _ => without_credits(&mut config),
    }
    config.to_string()
}

/// Credits off, as the scenarios other than tollgate-credits measure the filter.
fn without_credits(config: &mut Value) {
    config.as_object_mut().unwrap().remove("credits");
    for policy in config["policies"].as_object_mut().unwrap().values_mut() {
        policy.as_object_mut().unwrap().remove("credits");
    }
}

fn without_rate_limits(config: &mut Value) {
    config.as_object_mut().unwrap().remove("rate_limits");
    for policy in config["policies"].as_object_mut().unwrap().values_mut() {
        policy.as_object_mut().unwrap().remove("rate_limit");
    }
}

/// Every route answers 200 itself: the upstream is not part of what is measured.
fn direct_response(config: &mut Value) {
    hcm(config)["route_config"]["virtual_hosts"][0]["routes"] = json!([
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    ]);
}

/// What a user would build from Envoy's own filters in tollgate's place: `jwt_authn` (HS256, a
/// local JWKS, the verified-JWT cache on as tollgate's is), `local_ratelimit` with a bucket
/// nobody empties and the rate-limit headers, `buffer` for the body limit, and the security
/// headers and `server` removal on the route config.
fn native_filters(config: &mut Value) {
    remove_tollgate_filter(config);
    let jwks = json!({"keys": [{"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64(&HS_SECRET)}]}).to_string();
    let enabled =
        |key: &str| json!({"runtime_key": key, "default_value": {"numerator": 100, "denominator": "HUNDRED"}});
    let filters = json!([
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"bench": {
                    "issuer": "bench",
                    "audiences": ["api"],
                    "local_jwks": {"inline_string": jwks},
                    "claim_to_headers": [{"header_name": "x-tollgate-subject", "claim_name": "sub"}],
                    "jwt_cache_config": {"jwt_cache_size": 1024}
                }},
                "rules": [{"match": {"prefix": "/api/"}, "requires": {"provider_name": "bench"}}]
            }
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench",
                "token_bucket": {"max_tokens": NEVER, "tokens_per_fill": NEVER, "fill_interval": "1s"},
                "filter_enabled": enabled("bench.rl_enabled"),
                "filter_enforced": enabled("bench.rl_enforced"),
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03"
            }
        },
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 1_048_576
            }
        }
    ]);
    let hcm = hcm(config);
    let chain = hcm["http_filters"].as_array_mut().unwrap();
    for (at, filter) in filters.as_array().unwrap().iter().enumerate() {
        chain.insert(at, filter.clone());
    }
    let headers: Vec<Value> = SECURITY_HEADERS
        .iter()
        .map(|(k, v)| json!({"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}))
        .collect();
    hcm["route_config"]["response_headers_to_add"] = headers.into();
    hcm["route_config"]["response_headers_to_remove"] = json!(["server"]);
}

// ---------------------------------------------------------------------------------------------
// Part 1: throughput

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chain {
    Plain,
    Native,
    Tollgate(Plugin),
}

struct Scenario {
    name: String,
    what: &'static str,
    chain: Chain,
    /// The module a tollgate scenario loads, if not build/tollgate.wasm.
    wasm: Option<PathBuf>,
    /// Loads the native build (build/libtollgate.so) instead of a wasm module.
    native: bool,
    path: &'static str,
    headers: Vec<(String, String)>,
    /// A header every response of this scenario must carry: proof the step under test ran.
    expect: Option<&'static str>,
}

fn claims() -> JWTClaims<NoCustomClaims> {
    Claims::create(Duration::from_hours(2)).with_issuer("bench").with_audience("api").with_subject("user")
}

fn scenarios(keys: &Keys) -> Vec<Scenario> {
    let bearer = |token: String| vec![("authorization".to_owned(), format!("Bearer {token}"))];
    let hs = bearer(HS256Key::from_bytes(&HS_SECRET).with_key_id("hs").authenticate(claims()).unwrap());
    let es = bearer(ES256KeyPair::from_bytes(&keys.es.to_bytes()).unwrap().with_key_id("es").sign(claims()).unwrap());
    let rs =
        bearer(RS256KeyPair::from_der(&keys.rs.to_der().unwrap()).unwrap().with_key_id("rs").sign(claims()).unwrap());
    let apikey = vec![("x-api-key".to_owned(), "bench-key".to_owned())];
    let scenario = |name: &str, what, chain, path, headers: &Vec<(String, String)>, expect| Scenario {
        name: name.to_owned(),
        what,
        chain,
        wasm: None,
        native: false,
        path,
        headers: headers.clone(),
        expect,
    };
    let limited = Some("x-ratelimit-limit");
    let none = vec![];
    let mut list = vec![
        scenario("plain", "router only: the ceiling", Chain::Plain, "/api/items", &none, None),
        scenario(
            "native",
            "jwt_authn HS256 + local_ratelimit + buffer + security headers",
            Chain::Native,
            "/api/items",
            &hs,
            Some("x-ratelimit-limit"),
        ),
        scenario(
            "tollgate",
            "HS256 + rate limit: the full filter",
            Chain::Tollgate(Plugin::Full),
            "/api/items",
            &hs,
            limited,
        ),
        scenario(
            "tollgate-nolimit",
            "HS256, no rate limit",
            Chain::Tollgate(Plugin::NoLimits),
            "/api/items",
            &hs,
            Some("x-frame-options"),
        ),
        scenario(
            "tollgate-public",
            "public route: no auth, no limit",
            Chain::Tollgate(Plugin::Full),
            "/health",
            &none,
            Some("x-frame-options"),
        ),
        scenario(
            "tollgate-apikey",
            "API key + rate limit",
            Chain::Tollgate(Plugin::Full),
            "/api/items",
            &apikey,
            limited,
        ),
        scenario(
            "tollgate-credits",
            "API key + rate limit + a credit reservation and commit per request",
            Chain::Tollgate(Plugin::Credits),
            "/api/items",
            &apikey,
            Some("x-credits-charged"),
        ),
        scenario(
            "tollgate-credits-grant",
            "API key + rate limit + credits paid from a grant (a report a second, no callout per request)",
            Chain::Tollgate(Plugin::Grants),
            "/api/items",
            &apikey,
            Some("x-credits-charged"),
        ),
        scenario("tollgate-es256", "ES256 + rate limit", Chain::Tollgate(Plugin::Full), "/api/items", &es, limited),
        scenario("tollgate-rs256", "RS256 + rate limit", Chain::Tollgate(Plugin::Full), "/api/items", &rs, limited),
        scenario(
            "tollgate-hs256-uncached",
            "HS256 verified every request",
            Chain::Tollgate(Plugin::Uncached),
            "/api/items",
            &hs,
            limited,
        ),
        scenario(
            "tollgate-es256-uncached",
            "ES256 verified every request",
            Chain::Tollgate(Plugin::Uncached),
            "/api/items",
            &es,
            limited,
        ),
        scenario(
            "tollgate-rs256-uncached",
            "RS256 verified every request",
            Chain::Tollgate(Plugin::Uncached),
            "/api/items",
            &rs,
            limited,
        ),
    ];
    // The same filter as an Envoy dynamic module (`make native`), beside its wasm rows.
    let native_rows: Vec<Scenario> = ["tollgate", "tollgate-apikey", "tollgate-credits"]
        .iter()
        .filter_map(|name| list.iter().find(|s| s.name == *name))
        .map(|s| Scenario {
            name: s.name.replacen("tollgate", "tollgate-native", 1),
            what: match s.name.as_str() {
                "tollgate" => "HS256 + rate limit: the full filter, native build",
                "tollgate-apikey" => "API key + rate limit, native build",
                _ => "API key + rate limit + credits, native build",
            },
            native: true,
            wasm: None,
            headers: s.headers.clone(),
            ..*s
        })
        .collect();
    list.extend(native_rows);
    // plain and native stay: every other figure is relative to them.
    list.retain(|s| ["plain", "native"].contains(&s.name.as_str()) || picked(&s.name));
    if let Ok(alt) = std::env::var("TOLLGATE_BENCH_ALT_WASM") {
        let alt = PathBuf::from(alt).canonicalize().expect("TOLLGATE_BENCH_ALT_WASM: no such file");
        let extra: Vec<Scenario> = list
            .iter()
            .filter(|s| matches!(s.chain, Chain::Tollgate(_)) && !s.native)
            .map(|s| Scenario {
                name: format!("{} (alt)", s.name),
                what: "the same, with TOLLGATE_BENCH_ALT_WASM",
                wasm: Some(alt.clone()),
                headers: s.headers.clone(),
                ..*s
            })
            .collect();
        list.extend(extra);
    }
    list
}

fn start(scenario: &Scenario, keys: &Keys, credit_port: u16, wrapper: Vec<String>) -> Gateway {
    let chain = scenario.chain;
    let plugin = match chain {
        Chain::Tollgate(kind) => plugin_config(keys, kind),
        _ => plugin_config(keys, Plugin::Full),
    };
    // Under valgrind Envoy runs some fifty times slower, and a credit callout's deadlines must
    // stretch with it, or the first reservation times out while V8 still compiles.
    let slow = !wrapper.is_empty();
    let plugin = if slow { patient(&plugin) } else { plugin };
    Gateway::start(GatewayOptions {
        plugin_config: Some(plugin),
        concurrency: 1,
        wasm: scenario.wasm.clone(),
        native: scenario.native,
        credit_port: Some(credit_port),
        wrapper,
        env: vec![],
        mutate: Some(Box::new(move |config| {
            match chain {
                Chain::Plain => remove_tollgate_filter(config),
                Chain::Native => native_filters(config),
                Chain::Tollgate(_) => {}
            }
            direct_response(config);
            if slow {
                let clusters = config["static_resources"]["clusters"].as_array_mut().unwrap();
                for cluster in clusters.iter_mut().filter(|c| c["name"] == "credits") {
                    cluster["connect_timeout"] = "30s".into();
                }
            }
        })),
    })
}

/// `plugin` with the credit service's timeout at its maximum.
fn patient(plugin: &str) -> String {
    let mut config: Value = serde_json::from_str(plugin).unwrap();
    if let Some(credits) = config.get_mut("credits") {
        credits["timeout_ms"] = 60_000.into();
    }
    config.to_string()
}

/// A process's time on a CPU so far (user and system, all threads), in nanoseconds: finer than
/// /proc/PID/stat's 10 ms ticks, which a slow scenario's few thousand requests fill only a few
/// dozen times.
fn cpu_nanos(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
    /// Credit service callouts (reservations, settlements, grant reports) per request.
    callouts_per_request: f64,
}

/// Pins every thread of Envoy to CPU 0; the load generator gets CPU 1.
fn pin_envoy(gw: &Gateway) {
    let pinned = Command::new("taskset").args(["-a", "-cp", "0", &gw.envoy_pid().to_string()]).output().unwrap();
    assert!(pinned.status.success(), "taskset: {}", String::from_utf8_lossy(&pinned.stderr));
}

fn run(gw: &Gateway, scenario: &Scenario, seconds: u32) -> Sample {
    let pid = gw.envoy_pid();
    pin_envoy(gw);
    let url = format!("http://127.0.0.1:{}{}", gw.port(), scenario.path);
    let probe = scenario.headers.iter().fold(Request::get(scenario.path), |r, (n, v)| r.header(n, v));
    let probe = gw.send(probe);
    assert_eq!(probe.status, 200, "{}: the request is not accepted: {}", scenario.name, probe.text());
    if let Some(header) = scenario.expect {
        assert!(probe.header(header).is_some(), "{}: no {header} in {:?}", scenario.name, probe.headers);
    }
    if scenario.chain == Chain::Tollgate(Plugin::Grants) {
        // The probe was billed per request and asked for the grant: measure the steady state.
        thread::sleep(StdDuration::from_millis(1500));
    }
    if scenario.chain != Chain::Plain {
        assert!(probe.header("x-frame-options").is_some(), "{}: no security headers", scenario.name);
    }
    let mut wrk = Command::new("taskset");
    wrk.args(["-c", "1", "wrk", "-t1", &format!("-c{CONNECTIONS}"), &format!("-d{seconds}s"), "--latency"]);
    for (name, value) in &scenario.headers {
        wrk.args(["-H", &format!("{name}: {value}")]);
    }
    let callouts = gw.metric("tollgate_credit_callouts");
    let before = cpu_nanos(pid);
    let out = wrk.arg(&url).output().expect("wrk: run `make bench`, which installs it");
    let after = cpu_nanos(pid);
    let callouts = gw.metric("tollgate_credit_callouts") - callouts;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = field(&text, "requests in").unwrap_or(0.0);
    let non_2xx = field(&text, "Non-2xx or 3xx responses:").unwrap_or(0.0);
    assert!(requests > 0.0 && non_2xx == 0.0, "{}: wrk saw errors:\n{text}", scenario.name);
    Sample {
        rps: field(&text, "Requests/sec:").unwrap(),
        p50_us: latency(&text, "50%"),
        p99_us: latency(&text, "99%"),
        cpu_us_per_request: (after - before) as f64 / 1e3 / requests,
        callouts_per_request: callouts as f64 / requests,
    }
}

/// The number next to `label` in wrk's output (`Requests/sec: 1234.5`, `100 requests in 5s`).
fn field(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(label))?;
    if label == "requests in" {
        return line.split_whitespace().next()?.parse().ok();
    }
    line.split(label).nth(1)?.split_whitespace().next()?.parse().ok()
}

/// A latency percentile from wrk's `--latency` table, in microseconds.
fn latency(text: &str, percentile: &str) -> f64 {
    let line = text.lines().find(|l| l.trim_start().starts_with(percentile)).unwrap();
    let value = line.split_whitespace().nth(1).unwrap();
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let number: f64 = number.parse().unwrap();
    match unit {
        "us" => number,
        "ms" => number * 1000.0,
        "s" => number * 1_000_000.0,
        other => panic!("unknown unit {other}"),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn throughput(keys: &Keys) -> String {
    let rounds: usize = env_or("TOLLGATE_BENCH_ROUNDS", 3);
    let seconds: u32 = env_or("TOLLGATE_BENCH_SECONDS", 5);
    let scenarios = scenarios(keys);
    let n = scenarios.len();
    let mut samples: Vec<Vec<Sample>> = scenarios.iter().map(|_| Vec::new()).collect();
    // The release build (make bench builds it) on a SQLite file, with an account that never runs dry.
    let credits = CreditService::start();
    credits.create_account("bench", 1_000_000_000_000);
    for round in 0..rounds {
        // Each round starts one scenario later, so none always runs first or last.
        for i in (0..n).map(|i| (i + round) % n) {
            let scenario = &scenarios[i];
            let gw = start(scenario, keys, credits.port(), vec![]);
            let sample = run(&gw, scenario, seconds);
            eprintln!(
                "round {} {:<28} {:>7.0} req/s  p99 {:>6.0} µs  {:>5.1} CPU µs/req",
                round + 1,
                scenario.name,
                sample.rps,
                sample.p99_us,
                sample.cpu_us_per_request
            );
            samples[i].push(sample);
        }
    }
    let of = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    let index = |name: &str| scenarios.iter().position(|s| s.name == name).unwrap();
    let (plain, native) = (index("plain"), index("native"));
    let plain_cpu = of(plain, |s| s.cpu_us_per_request);
    let (native_rps, native_p99) = (of(native, |s| s.rps), of(native, |s| s.p99_us));
    let mut table = format!(
        "### Throughput\n\n\
         Envoy --concurrency 1 pinned to CPU 0, wrk -t1 -c{CONNECTIONS} -d{seconds}s pinned to CPU 1, direct \
         response; medians of {rounds} alternating rounds. CPU is Envoy's (user + system) per request; \
         \"added\" is that minus plain's; the ratios are to native (req/s: higher is better, p99: lower is \
         better).\n\n\
         | scenario | what runs | req/s | p50 µs | p99 µs | CPU µs/req | added vs plain µs/req | req/s ÷ native | p99 ÷ native |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (i, scenario) in scenarios.iter().enumerate() {
        let (rps, p99, cpu) = (of(i, |s| s.rps), of(i, |s| s.p99_us), of(i, |s| s.cpu_us_per_request));
        table.push_str(&format!(
            "| {} | {} | {rps:.0} | {:.0} | {p99:.0} | {cpu:.1} | {:.1} | {:.2} | {:.2} |\n",
            scenario.name,
            scenario.what,
            of(i, |s| s.p50_us),
            cpu - plain_cpu,
            rps / native_rps,
            p99 / native_p99,
        ));
    }
    // Paired per round: both ran moments apart, so the machine's mood mostly cancels out.
    let paired = |a: &str, b: &str| {
        let (a, b) = (scenarios.iter().position(|s| s.name == a)?, scenarios.iter().position(|s| s.name == b)?);
        Some(median(
            samples[a].iter().zip(&samples[b]).map(|(x, y)| x.cpu_us_per_request - y.cpu_us_per_request).collect(),
        ))
    };
    if let Some(limiter) = paired("tollgate", "tollgate-nolimit") {
        table.push_str(&format!(
            "\nThe rate limiter's own cost (tollgate − tollgate-nolimit, median of per-round differences): \
             {limiter:.1} CPU µs/request.\n"
        ));
    }
    if let (Some(credits), Some(apikey)) =
        (paired("tollgate-credits", "tollgate-apikey"), paired("tollgate-apikey", "plain"))
    {
        table.push_str(&format!(
            "\nCredits' cost (tollgate-credits − tollgate-apikey, per round): {credits:.1} CPU µs/request, \
             {:.1}× tollgate-apikey's added cost; its req/s is bounded by the credit service, which the \
             requests wait for.\n",
            (credits + apikey) / apikey.max(0.1)
        ));
    }
    if let (Some(grant), Some(apikey)) = (
        scenarios.iter().position(|s| s.name == "tollgate-credits-grant"),
        scenarios.iter().position(|s| s.name == "tollgate-apikey"),
    ) {
        table.push_str(&format!(
            "\nGrants (tollgate-credits-grant ÷ tollgate-apikey): req/s {:.2}× (target ≥ 0.9), p99 {:.2}× (target ≤ 1.2); \
             {:.5} credit callouts per billed request (target ≤ 0.02), against {:.2} per request for tollgate-credits.\n",
            of(grant, |s| s.rps) / of(apikey, |s| s.rps),
            of(grant, |s| s.p99_us) / of(apikey, |s| s.p99_us),
            of(grant, |s| s.callouts_per_request),
            scenarios.iter().position(|s| s.name == "tollgate-credits").map_or(0.0, |c| of(c, |s| s.callouts_per_request)),
        ));
    }
    table
}

// ---------------------------------------------------------------------------------------------
// Part 2: memory under many distinct clients

/// Envoy's resident memory and its heap as admin `/memory` reports it.
struct Memory {
    rss: u64,
    allocated: u64,
    heap_size: u64,
}

fn memory(gw: &Gateway) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.envoy_pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let stats = gw.admin("/memory").json();
    let number =
        |name: &str| stats[name].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("/memory: {stats}"));
    Memory { rss: rss_kb * 1024, allocated: number("allocated"), heap_size: number("heap_size") }
}

/// Envoy with tollgate (`--concurrency 2`), the shipped config's anonymous limit on `/auth/` and
/// the default 65,536 slots; or the same config without any rate limit.
fn memory_gateway(limits: bool) -> Gateway {
    let mut config: Value = serde_json::from_str(&shipped_plugin_config()).unwrap();
    assert!(config["rate_limits"].get("slots").is_none(), "the memory part measures the default slots");
    if !limits {
        without_rate_limits(&mut config);
    }
    Gateway::start(GatewayOptions {
        plugin_config: Some(config.to_string()),
        concurrency: 2,
        mutate: Some(Box::new(direct_response)),
        ..GatewayOptions::default()
    })
}

/// Client `i`'s loopback address: 127.1.0.0 onwards, one per client.
fn client_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7f01_0000 + i)
}

/// One `GET /auth/…` from `source` on a new connection; the status code.
fn one_request(port: u16, source: Ipv4Addr) -> std::io::Result<u16> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(StdDuration::from_secs(10)))?;
    stream.write_all(b"GET /auth/bench HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    // Read the whole response and close: waiting for Envoy to close instead would wait out its
    // delayed_close_timeout (1 s) on every connection.
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        response.extend_from_slice(&chunk[..n]);
        if n == 0 || complete(&response) {
            break;
        }
    }
    let status = response.get(9..12).and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
    Ok(status.unwrap_or(0))
}

/// Whether `response` holds a whole response head and the `content-length` bytes after it.
fn complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
    response.len() >= end + 4 + length.unwrap_or(0)
}

/// Sends one request from each of the clients `from..to`, on many threads; returns how many got
/// something other than 200.
fn drive_clients(port: u16, from: u32, to: u32) -> u64 {
    let next = AtomicU32::new(from);
    let failed = AtomicU64::new(0);
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..32 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    break;
                }
                if !matches!(one_request(port, client_address(i)), Ok(200)) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("memory: clients {from}..{to} in {seconds:.0} s ({:.0}/s)", f64::from(to - from) / seconds);
    failed.into_inner()
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
}

fn memory_part() -> String {
    let clients: u32 = env_or("TOLLGATE_BENCH_CLIENTS", 2_000_000);
    let slots = 65_536.0;
    // Let each Envoy settle (workers finish configuring their VMs) before reading it.
    let settle = || thread::sleep(StdDuration::from_secs(2));
    let baseline = {
        let gw = memory_gateway(false);
        settle();
        memory(&gw)
    };
    let gw = memory_gateway(true);
    settle();
    let created = memory(&gw);
    let mut rows = vec![("no rate limits".to_owned(), &baseline), ("rate limits, table created".to_owned(), &created)];
    let mut checkpoints: Vec<u32> = vec![200_000.min(clients)];
    if clients > 200_000 {
        checkpoints.push(clients);
    }
    let mut measured = Vec::new();
    let mut done = 0;
    let mut failed = 0;
    for &checkpoint in &checkpoints {
        failed += drive_clients(gw.port(), done, checkpoint);
        done = checkpoint;
        measured.push((format!("after {checkpoint} distinct clients"), memory(&gw)));
    }
    assert!(
        failed * 1000 <= u64::from(done),
        "memory: {failed} of {done} requests failed or were refused:\n{}",
        gw.envoy_log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    rows.extend(measured.iter().map(|(name, m)| (name.clone(), m)));
    let mut out = format!(
        "### Memory\n\n\
         Envoy --concurrency 2, the shipped plugin config (anonymous limit on /auth/, default 65,536 slots), each \
         client one request on its own connection from its own 127.x.y.z address. {failed} of {done} requests \
         did not get 200.\n\n\
         | state | RSS MiB | allocated MiB | heap_size MiB |\n| --- | ---: | ---: | ---: |\n"
    );
    for (name, m) in &rows {
        out.push_str(&format!("| {name} | {} | {} | {} |\n", mib(m.rss), mib(m.allocated), mib(m.heap_size)));
    }
    let per_slot = |m: &Memory| (m.allocated as f64 - baseline.allocated as f64) / slots;
    let first = &measured[0].1;
    out.push_str(&format!(
        "\nPer slot, (allocated − allocated without rate limits) / 65,536: {:.0} bytes when the table is created, \
         {:.0} bytes once clients have filled it.",
        per_slot(&created),
        per_slot(first),
    ));
    if let [(_, first), .., (name, last)] = &measured[..] {
        out.push_str(&format!(
            " From the first checkpoint to {name}: allocated {:+.1} MiB, RSS {:+.1} MiB.",
            (last.allocated as f64 - first.allocated as f64) / 1_048_576.0,
            (last.rss as f64 - first.rss as f64) / 1_048_576.0,
        ));
    }
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------------
// Part 3: start time

/// A large plugin config: 1,000 API keys and a 20-key JWKS (RSA, EC P-256 and P-384, oct).
fn large_plugin_config(keys: &Keys, limits: bool) -> String {
    let mut config: Value = serde_json::from_str(&shipped_plugin_config()).unwrap();
    let p384 = ES384KeyPair::generate();
    let p384_point = p384.public_key().public_key().to_bytes_uncompressed();
    let jwks: Vec<Value> = (0..20)
        .map(|i| match i % 4 {
            0 => keys.rs_jwk(&format!("rsa-{i}")),
            1 => keys.es_jwk(&format!("ec-{i}")),
            2 => json!({"kty": "EC", "kid": format!("p384-{i}"), "alg": "ES384", "crv": "P-384",
                        "x": b64(&p384_point[1..49]), "y": b64(&p384_point[49..])}),
            _ => json!({"kty": "oct", "kid": format!("oct-{i}"), "alg": "HS256", "k": b64(&[i as u8; 32])}),
        })
        .collect();
    let api_keys: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"id": format!("key-{i}"), "account": format!("account-{i}"), "tier": "free", "scopes": ["read"],
                   "sha256": sha256_hex(&format!("secret-key-{i}"))})
        })
        .collect();
    config["auth"] = json!({
        "jwt": {"providers": [{"issuer": "bench", "audiences": ["api"], "jwks": {"keys": jwks}}]},
        "api_keys": {"keys": api_keys}
    });
    if !limits {
        without_rate_limits(&mut config);
    }
    config.to_string()
}

/// Milliseconds since midnight of an Envoy log line (`[2026-11-23 12:09:38.740][…`).
fn log_ms(line: &str) -> Option<f64> {
    let time = line.get(12..24)?;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(((h * 60.0 + m) * 60.0 + s) * 1000.0)
}

/// From Envoy's log: the module's load and compile (from "loading 1 listener(s)" to the first VM's
/// start), and the plugin's first configuration (to the next VM's start: Envoy configures the
/// plugin once on a VM it then throws away, which parses the config and creates the rate-limit
/// table, and the next VM finds the table made).
fn start_phases(log: &str) -> Option<(f64, f64)> {
    let listeners = log.lines().find(|l| l.contains("loading 1 listener(s)")).and_then(log_ms)?;
    let mut vm_starts = log.lines().filter(|l| l.contains("tollgate: tollgate") && l.contains("starting"));
    let first = vm_starts.next().and_then(log_ms)?;
    let second = vm_starts.next().and_then(log_ms)?;
    Some((first - listeners, second - first))
}

fn start_part(keys: &Keys) -> String {
    let starts: usize = env_or("TOLLGATE_BENCH_STARTS", 5);
    let variants: [(&str, Option<String>); 4] = [
        ("without the filter", None),
        ("tollgate, shipped config", Some(shipped_plugin_config())),
        ("tollgate, large config, no rate limits", Some(large_plugin_config(keys, false))),
        ("tollgate, large config, rate limits (65,536 slots)", Some(large_plugin_config(keys, true))),
    ];
    let mut times: Vec<Vec<(f64, f64, f64)>> = variants.iter().map(|_| Vec::new()).collect();
    for _ in 0..starts {
        for ((_, plugin), times) in variants.iter().zip(&mut times) {
            let filter = plugin.is_some();
            let started = Instant::now();
            let gw = Gateway::start(GatewayOptions {
                plugin_config: plugin.clone(),
                concurrency: 2,
                mutate: Some(Box::new(move |config| {
                    if !filter {
                        remove_tollgate_filter(config);
                    }
                })),
                ..GatewayOptions::default()
            });
            let ready = started.elapsed().as_secs_f64() * 1000.0;
            let (compile, configure) = start_phases(&gw.envoy_log()).unwrap_or((0.0, 0.0));
            times.push((ready, compile, configure));
            drop(gw);
        }
    }
    let of = |times: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(times.iter().map(f).collect());
    let base = of(&times[0], |t| t.0);
    let mut out = format!(
        "### Start time\n\n\
         Envoy --concurrency 2; medians of {starts} starts each, alternating. \"ready\": from spawning Envoy to admin \
         /ready answering 200 and the listener accepting. From Envoy's log (ms resolution): \"compile\", loading \
         and compiling the module (V8) up to the first VM's start; \"configure\", the plugin's first configuration \
         (parsing and validating the config, creating the rate-limit table) up to the next VM's start. The large \
         config has 1,000 API keys and a 20-key JWKS (RSA, EC P-256 and P-384, oct).\n\n\
         | Envoy | ready ms | added ms | compile ms | configure ms |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for ((name, plugin), times) in variants.iter().zip(&times) {
        let ready = of(times, |t| t.0);
        let phases = if plugin.is_some() {
            format!("{:.0} | {:.0}", of(times, |t| t.1), of(times, |t| t.2))
        } else {
            "– | –".to_owned()
        };
        out.push_str(&format!("| {name} | {ready:.0} | {:.0} | {phases} |\n", ready - base));
    }
    out
}

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Part 4: contention on one caller's count

/// Both workers hammer one account's rate-limit slot; how often a compare-and-swap loses.
fn contention_part(keys: &Keys) -> String {
    let seconds: u32 = env_or("TOLLGATE_BENCH_SECONDS", 5);
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(keys, Plugin::Full)),
        concurrency: 2,
        mutate: Some(Box::new(direct_response)),
        ..GatewayOptions::default()
    });
    let url = format!("http://127.0.0.1:{}/api/items", gw.port());
    let out = Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{seconds}s"), "-H", "x-api-key: bench-key", &url])
        .output()
        .expect("wrk: run `make bench`, which installs it");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = field(&text, "Requests/sec:").unwrap_or(0.0);
    let allowed = gw.metric("tollgate_requests_allowed");
    let retries = gw.metric("tollgate_ratelimit_cas_retries");
    let contended = gw.metric("tollgate_ratelimit_contended");
    format!(
        "### Contention\n\nEnvoy --concurrency 2, wrk -t2 -c32 -d{seconds}s, every request the same API key (one \
         account, one shared-data slot): {allowed} requests counted at {rps:.0} req/s, {retries} \
         compare-and-swaps lost and retried ({:.2} per 1,000 updates), {contended} refused after 32 lost races.\n",
        retries as f64 * 1000.0 / allowed.max(1) as f64
    )
}

// ---------------------------------------------------------------------------------------------
// Part 5: instructions per request

/// Requests per scenario before counting (V8 tiers hot functions up to TurboFan), and counted.
const WARM_UP: u32 = 500;
const COUNTED: u32 = 2000;

/// `count` requests, one after another on one keep-alive connection, each checked for a 200.
fn keep_alive(port: u16, scenario: &Scenario, count: u32) {
    let head = request_head(scenario);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(StdDuration::from_secs(60))).unwrap();
    for _ in 0..count {
        exchange(&mut stream, &head, &scenario.name);
    }
}

/// The scenario's request, as bytes on the wire.
fn request_head(scenario: &Scenario) -> String {
    let mut head = format!("GET {} HTTP/1.1\r\nhost: bench\r\n", scenario.path);
    for (name, value) in &scenario.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Sends `head` on a keep-alive connection and reads the whole response, which must be a 200.
fn exchange(stream: &mut TcpStream, head: &str, scenario: &str) {
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while !complete(&response) {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "{scenario}: Envoy closed the connection");
        response.extend_from_slice(&chunk[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"), "{scenario}: {}", String::from_utf8_lossy(&response));
}

fn callgrind_control(args: &[&str]) {
    let out = Command::new("callgrind_control").args(args).output().expect("callgrind_control: install valgrind");
    assert!(out.status.success(), "callgrind_control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts Envoy (through `start`, given the callgrind wrapper) and counts its instructions per
/// request of `scenario`, after a warm-up; the dump goes to `dumps`.
fn count_instructions(scenario: &Scenario, dumps: &Path, start: impl FnOnce(Vec<String>) -> Gateway) -> Count {
    let file = dumps.join(format!("{}.out", scenario.name.replace([' ', '(', ')', ':'], "")));
    let wrapper = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--dump-instr=yes"]
        .into_iter()
        .map(String::from)
        .chain([format!("--callgrind-out-file={}", file.display())])
        .collect();
    let gw = start(wrapper);
    let pid = gw.envoy_pid().to_string();
    keep_alive(gw.port(), scenario, WARM_UP);
    if scenario.chain == Chain::Tollgate(Plugin::Grants) {
        // The grant opens on the root context's next tick, some seconds under valgrind.
        thread::sleep(StdDuration::from_secs(5));
        keep_alive(gw.port(), scenario, WARM_UP);
    }
    callgrind_control(&["--zero", &pid]);
    keep_alive(gw.port(), scenario, COUNTED);
    callgrind_control(&["--dump", &pid]);
    drop(gw);
    // The requested dump is `<file>.1`; the exit adds `<file>` itself.
    let dump = std::fs::read_to_string(format!("{}.1", file.display())).unwrap();
    let total: f64 = dump.lines().find_map(|l| l.strip_prefix("totals: ")?.trim().parse().ok()).unwrap();
    let per_request = total / f64::from(COUNTED);
    let generated = generated_instructions(&dump) as f64 / f64::from(COUNTED);
    eprintln!(
        "instructions {:<28} {per_request:>9.0} per request, {generated:>7.0} in V8-generated code",
        scenario.name
    );
    Count { per_request, generated }
}

/// Envoy's instructions per request, and how many of them ran in code V8 generated.
struct Count {
    per_request: f64,
    generated: f64,
}

/// Of a callgrind dump's instructions, those in code V8 generated at run time: the module's own
/// compiled functions and V8's wrapper around each hostcall. The rest is Envoy's binary (its
/// handling of every hostcall included) and libc. Callgrind names no object for generated code
/// (`???`), which sits in V8's code space, far above where valgrind loads Envoy; some code of
/// Envoy's own, low down, is unnamed too.
fn generated_instructions(dump: &str) -> u64 {
    // Compressed names: `ob=(3) /path` defines id 3, and a later `ob=(3)` means the same.
    fn resolve(names: &mut HashMap<String, String>, field: &str) -> String {
        let (id, name) = field.split_once(' ').unwrap_or((field, ""));
        if !name.is_empty() {
            names.insert(id.to_owned(), name.to_owned());
        }
        names.get(id).cloned().unwrap_or_else(|| field.to_owned())
    }
    let (mut objects, mut functions) = (HashMap::new(), HashMap::new());
    let (mut unnamed, mut high, mut inclusive) = (false, false, false);
    let mut total = 0;
    for line in dump.lines() {
        if let Some(field) = line.strip_prefix("ob=") {
            unnamed = resolve(&mut objects, field) == "???";
        } else if let Some(field) = line.strip_prefix("cob=") {
            resolve(&mut objects, field);
        } else if let Some(field) = line.strip_prefix("fn=") {
            let name = resolve(&mut functions, field);
            let address = name.strip_prefix("0x").and_then(|hex| u64::from_str_radix(hex, 16).ok());
            high = address.is_some_and(|a| a >= 1 << 32);
        } else if let Some(field) = line.strip_prefix("cfn=") {
            resolve(&mut functions, field);
        } else if line.starts_with("calls=") {
            // The next cost line is the call's inclusive cost, counted where it was spent.
            inclusive = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            let cost: u64 = line.split_whitespace().last().and_then(|c| c.parse().ok()).unwrap_or(0);
            if !std::mem::take(&mut inclusive) && unnamed && high {
                total += cost;
            }
        }
    }
    total
}

/// Envoy's instructions per request under callgrind: the same count on every run of the same
/// build, however busy the machine is, where CPU time on a shared machine is not. Dumps stay in
/// build/callgrind/ for `callgrind_annotate`.
fn instructions_part(keys: &Keys) -> String {
    let dumps = repo().join("build/callgrind");
    let _ = std::fs::remove_dir_all(&dumps);
    std::fs::create_dir_all(&dumps).unwrap();
    let credits = CreditService::start();
    credits.create_account("bench", 1_000_000_000_000);
    // The cached ES256 and RS256 paths are HS256's but for the key; the uncached ones are slow
    // enough under callgrind to need minutes each, and the throughput part times them.
    let scenarios: Vec<Scenario> = scenarios(keys)
        .into_iter()
        .filter(|s| !["uncached", "es256", "rs256"].iter().any(|skip| s.name.contains(skip)))
        .collect();
    let mut rows = Vec::new();
    for scenario in &scenarios {
        let count = count_instructions(scenario, &dumps, |wrapper| start(scenario, keys, credits.port(), wrapper));
        rows.push((scenario, count));
    }
    let of = |name: &str| rows.iter().find(|(s, _)| s.name == name).map_or(0.0, |(_, c)| c.per_request);
    let (plain, native) = (of("plain"), of("native"));
    let mut out = format!(
        "### Instructions per request\n\n\
         Envoy --concurrency 1 under `valgrind --tool=callgrind`, one keep-alive connection, {WARM_UP} requests to \
         warm up, then {COUNTED} counted; all of Envoy's threads. A count, not a time: it repeats run after run \
         whatever else the machine does, and ranks the scenarios as their cost does, but leaves out cache misses \
         and system calls' time in the kernel. \"In V8-generated code\": the module's compiled code and V8's \
         wrappers around its hostcalls; the rest of what a tollgate scenario adds is Envoy's own code (answering \
         those hostcalls, running the VM) and libc. Dumps: build/callgrind/.\n\n\
         | scenario | instructions/request | added vs plain | added ÷ native's added | in V8-generated code |\n\
         | --- | ---: | ---: | ---: | ---: |\n"
    );
    for (scenario, count) in &rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} |\n",
            scenario.name,
            count.per_request,
            count.per_request - plain,
            (count.per_request - plain) / (native - plain).max(1.0),
            count.generated
        ));
    }
    let (credits, apikey, grant) = (of("tollgate-credits"), of("tollgate-apikey"), of("tollgate-credits-grant"));
    if grant > 0.0 && apikey > 0.0 {
        out.push_str(&format!(
            "\nA request paid from a grant runs {:.3}× the instructions of an unbilled one (tollgate-credits-grant ÷ \
             tollgate-apikey; the target is ≤ 1.15).\n",
            grant / apikey
        ));
    }
    if credits > 0.0 && apikey > 0.0 {
        out.push_str(&format!(
            "\nA billed request adds {:.2}× what an unbilled one does (tollgate-credits ÷ tollgate-apikey, added vs \
             plain; the target is 2×).\n",
            (credits - plain) / (apikey - plain)
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Part 6: what one hostcall costs

/// Calls per request of each kind: enough that the per-call figure stands out of the noise.
const PROBE_CALLS: u32 = 10;

/// Builds benches/hostcall-probe for wasm32.
fn probe_module() -> PathBuf {
    let target = repo().join("target/probe");
    let status = Command::new("cargo")
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--target-dir"])
        .arg(&target)
        .current_dir(repo().join("benches/hostcall-probe"))
        .status()
        .unwrap();
    assert!(status.success(), "building benches/hostcall-probe failed");
    target.join("wasm32-wasip1/release/tollgate_hostcall_probe.wasm")
}

/// The price of each kind of hostcall in Envoy's instructions, from a filter that makes nothing
/// but those calls: what any proxy-wasm filter pays for what tollgate's contract makes it do.
fn hostcalls_part() -> String {
    let dumps = repo().join("build/callgrind");
    std::fs::create_dir_all(&dumps).unwrap();
    let module = probe_module();
    let kinds = [
        ("request-headers", "read all request headers", PROBE_CALLS),
        ("request-header", "read one request header", PROBE_CALLS),
        ("route-metadata", "read route metadata that is absent", PROBE_CALLS),
        ("time", "read the clock", PROBE_CALLS),
        ("shared-get", "read a shared-data value", PROBE_CALLS),
        ("response-set", "set a response header", PROBE_CALLS),
        ("response-remove", "remove a response header that is absent", PROBE_CALLS),
        // One, as a credit reservation: the request pauses for it and resumes on the answer.
        ("http-call", "an HTTP callout the request waits for (to the recording upstream)", 1),
    ];
    let scenario = |name: String| Scenario {
        name,
        what: "",
        chain: Chain::Plain,
        wasm: None,
        native: false,
        path: "/api/items",
        headers: vec![],
        expect: None,
    };
    let measure = |config: Option<String>| {
        let filter = config.is_some();
        let name = format!("probe-{}", config.as_deref().unwrap_or("none"));
        let count = count_instructions(&scenario(name), &dumps, |wrapper| {
            Gateway::start(GatewayOptions {
                plugin_config: config,
                concurrency: 1,
                wasm: Some(module.clone()),
                // The probe is a proxy-wasm module.
                native: false,
                credit_port: None,
                wrapper,
                env: vec![],
                mutate: Some(Box::new(move |config| {
                    if !filter {
                        remove_tollgate_filter(config);
                    }
                    direct_response(config);
                })),
            })
        });
        count.per_request
    };
    let plain = measure(None);
    let noop = measure(Some("noop".to_owned()));
    let mut out = format!(
        "### What one hostcall costs\n\n\
         benches/hostcall-probe, a proxy-wasm filter that makes {PROBE_CALLS} calls of one kind per request (one \
         callout) and nothing else, counted as in the part above. Per call: (probe − noop) / calls.\n\n\
         | filter | instructions/request | per call |\n| --- | ---: | ---: |\n\
         | none (plain) | {plain:.0} | |\n\
         | noop: a wasm filter that does nothing | {noop:.0} | {:.0} added vs plain |\n",
        noop - plain
    );
    for (kind, what, calls) in kinds.into_iter().filter(|(kind, _, _)| picked(kind)) {
        let per_request = measure(Some(format!("{kind}:{calls}")));
        out.push_str(&format!("| {what} | {per_request:.0} | {:.0} |\n", (per_request - noop) / f64::from(calls)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Part 7: what a billed request costs, at one request rate for all

/// Requests per second in the billing part, the same for every scenario: Envoy's CPU per request
/// depends on the rate (the busier its event loop, the more requests each wake-up serves), and
/// the throughput part runs tollgate-credits at the credit service's pace, the others at Envoy's.
/// Well inside what the service answers on SQLite (make bench-credit), so nothing queues for it.
const BILLING_RATE: u32 = 250;
const BILLING_CONNECTIONS: u32 = 5;

/// `rate` requests per second for `seconds` over `BILLING_CONNECTIONS` keep-alive connections, each
/// on a fixed schedule; every request's latency in µs, counted from when it was due, so a slow
/// answer also shows in the requests it held up.
fn paced(port: u16, scenario: &Scenario, rate: u32, seconds: u32) -> Vec<f64> {
    let interval = StdDuration::from_secs(1) * BILLING_CONNECTIONS / rate;
    let each = rate * seconds / BILLING_CONNECTIONS;
    let head = request_head(scenario);
    let start = Instant::now();
    thread::scope(|scope| {
        let connections: Vec<_> = (0..BILLING_CONNECTIONS)
            .map(|c| {
                let head = &head;
                scope.spawn(move || {
                    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    stream.set_read_timeout(Some(StdDuration::from_secs(10))).unwrap();
                    // Staggered, so that the connections' requests interleave.
                    let first = start + interval * c / BILLING_CONNECTIONS;
                    (0..each)
                        .map(|i| {
                            let due = first + interval * i;
                            thread::sleep(due.saturating_duration_since(Instant::now()));
                            exchange(&mut stream, head, &scenario.name);
                            due.elapsed().as_secs_f64() * 1e6
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        connections.into_iter().flat_map(|c| c.join().unwrap()).collect()
    })
}

/// One paced run: Envoy's and the credit service's CPU µs per request, p50 and p99 µs.
struct Paced {
    envoy_us: f64,
    service_us: f64,
    p50_us: f64,
    p99_us: f64,
}

/// tollgate-credits against tollgate-apikey, the same filter unbilled, with both at one request
/// rate: the "a billed request within 2× of an unbilled one", measured in Envoy's CPU.
fn billing_part(keys: &Keys) -> String {
    let rounds: usize = env_or("TOLLGATE_BENCH_ROUNDS", 3);
    let seconds: u32 = 2 * env_or("TOLLGATE_BENCH_SECONDS", 5);
    let all = scenarios(keys);
    let compared: Vec<&Scenario> = ["plain", "tollgate-apikey", "tollgate-credits"]
        .iter()
        .map(|name| {
            let found = all.iter().find(|s| s.name == *name);
            found.unwrap_or_else(|| panic!("the billing part needs {name}; TOLLGATE_BENCH_ONLY left it out"))
        })
        .collect();
    let credits = CreditService::start();
    credits.create_account("bench", 1_000_000_000_000);
    let mut samples: Vec<Vec<Paced>> = compared.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in (0..compared.len()).map(|i| (i + round) % compared.len()) {
            let scenario = compared[i];
            let gw = start(scenario, keys, credits.port(), vec![]);
            pin_envoy(&gw);
            keep_alive(gw.port(), scenario, WARM_UP);
            let (envoy, service) = (cpu_nanos(gw.envoy_pid()), cpu_nanos(credits.pid()));
            let mut latencies = paced(gw.port(), scenario, BILLING_RATE, seconds);
            let per_request = |pid: u32, before: u64| (cpu_nanos(pid) - before) as f64 / 1e3 / latencies.len() as f64;
            let (envoy_us, service_us) = (per_request(gw.envoy_pid(), envoy), per_request(credits.pid(), service));
            latencies.sort_by(f64::total_cmp);
            let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
            let sample = Paced { envoy_us, service_us, p50_us: at(0.5), p99_us: at(0.99) };
            eprintln!(
                "billing round {} {:<18} {:>6.1} Envoy CPU µs/req  {:>6.1} service  p50 {:>6.0} µs  p99 {:>6.0} µs",
                round + 1,
                scenario.name,
                sample.envoy_us,
                sample.service_us,
                sample.p50_us,
                sample.p99_us
            );
            samples[i].push(sample);
        }
    }
    let of = |i: usize, f: fn(&Paced) -> f64| median(samples[i].iter().map(f).collect());
    let plain = of(0, |s| s.envoy_us);
    let mut out = format!(
        "### What a billed request costs\n\n\
         Every scenario at {BILLING_RATE} requests/s ({BILLING_CONNECTIONS} keep-alive connections on fixed \
         schedules, {seconds} s, after {WARM_UP} requests to warm up), Envoy --concurrency 1 pinned to CPU 0; \
         the credit service on SQLite. CPU from /proc/PID/task/*/schedstat (user + system, ns); latency from \
         when each request was due; medians of {rounds} alternating rounds.\n\n\
         | scenario | Envoy CPU µs/req | added vs plain | credit service CPU µs/req | p50 µs | p99 µs |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (i, scenario) in compared.iter().enumerate() {
        let envoy = of(i, |s| s.envoy_us);
        out.push_str(&format!(
            "| {} | {envoy:.1} | {:.1} | {:.1} | {:.0} | {:.0} |\n",
            scenario.name,
            envoy - plain,
            of(i, |s| s.service_us),
            of(i, |s| s.p50_us),
            of(i, |s| s.p99_us)
        ));
    }
    // Per round, against the plain run of the same round.
    let ratios = (0..rounds)
        .map(|r| (samples[2][r].envoy_us - samples[0][r].envoy_us) / (samples[1][r].envoy_us - samples[0][r].envoy_us))
        .collect();
    out.push_str(&format!(
        "\nA billed request's added Envoy CPU is {:.2}× an unbilled one's (tollgate-credits ÷ tollgate-apikey, \
         added vs plain, median of per-round ratios; the target is 2×).\n",
        median(ratios)
    ));
    out
}

fn main() {
    let parts = std::env::var("TOLLGATE_BENCH_PARTS")
        .unwrap_or_else(|_| "throughput,billing,contention,memory,start,instructions,hostcalls".to_owned());
    let wanted = |part: &str| parts.split(',').any(|p| p.trim() == part);
    let keys = Keys::generate();
    let wasm = std::fs::metadata(repo().join("build/tollgate.wasm")).map(|m| m.len()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut report = format!(
        "## tollgate benchmarks\n\nbuild/tollgate.wasm: {wasm} bytes ({:.3} MiB). Load average at start: {}.\n\n",
        wasm as f64 / 1_048_576.0,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let parts: [(&str, &dyn Fn() -> String); 7] = [
        ("throughput", &|| throughput(&keys)),
        ("billing", &|| billing_part(&keys)),
        ("contention", &|| contention_part(&keys)),
        ("memory", &memory_part),
        ("start", &|| start_part(&keys)),
        ("instructions", &|| instructions_part(&keys)),
        ("hostcalls", &hostcalls_part),
    ];
    let written = repo().join("build/bench.md");
    std::fs::create_dir_all(repo().join("build")).unwrap();
    for (_, part) in parts.iter().filter(|(name, _)| wanted(name)) {
        report.push_str(&part());
        report.push('\n');
        // Written after every part: a later part that fails loses only itself.
        std::fs::write(&written, &report).unwrap();
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.push_str(&format!(
        "Load average at the end: {}.\n",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    std::fs::write(&written, &report).unwrap();
    println!("{report}");
}
