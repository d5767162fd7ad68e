//! `make bench`: requests/s, latency and Envoy CPU per request for Envoy alone and for tollgate's
//! pipeline with each kind of credential. Envoy (`--concurrency 1`, direct response, so no
//! upstream is measured) is pinned to CPU 0 and wrk to CPU 1; scenarios alternate over rounds
//! and the medians are reported, written to build/bench.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "benchmark driver")]

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::process::Command;

use harness::*;
use jwt_simple::prelude::*;
use serde_json::{json, Value};

const ROUNDS: usize = 3;
const SECONDS: u32 = 5;
const CONNECTIONS: u32 = 16;

struct Scenario {
    name: &'static str,
    tollgate: bool,
    path: &'static str,
    headers: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(bytes: &[u8]) -> String {
    use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Encoder};
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
}

/// The shipped plugin config plus one provider with HS256, ES256 and RS256 keys and one API key.
fn plugin_config(es: &ES256KeyPair, rs: &RS256KeyPair) -> String {
    let mut config: Value = serde_json::from_str(&shipped_plugin_config()).unwrap();
    let point = es.public_key().public_key().to_bytes_uncompressed();
    let rsa = rs.public_key().to_components();
    config["auth"] = json!({
        "jwt": {"providers": [{
            "issuer": "bench", "audiences": ["api"],
            "secrets": [{"kid": "hs", "alg": "HS256", "secret": b64(&[7; 32])}],
            "jwks": {"keys": [
                {"kty": "EC", "kid": "es", "alg": "ES256", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])},
                {"kty": "RSA", "kid": "rs", "alg": "RS256", "n": b64(&rsa.n), "e": b64(&rsa.e)}
            ]}
        }]},
        "api_keys": {"keys": [{"id": "bench", "account": "bench", "sha256": hex(&hmac_sha256::Hash::hash(b"bench-key"))}]}
    });
    config.to_string()
}

fn claims() -> JWTClaims<NoCustomClaims> {
    Claims::create(Duration::from_hours(2)).with_issuer("bench").with_audience("api").with_subject("user")
}

fn scenarios(es: &ES256KeyPair, rs: &RS256KeyPair) -> Vec<Scenario> {
    let bearer = |token: String| vec![("authorization".to_owned(), format!("Bearer {token}"))];
    let hs = HS256Key::from_bytes(&[7; 32]).with_key_id("hs").authenticate(claims()).unwrap();
    let es = ES256KeyPair::from_bytes(&es.to_bytes()).unwrap().with_key_id("es").sign(claims()).unwrap();
    let rs = RS256KeyPair::from_der(&rs.to_der().unwrap()).unwrap().with_key_id("rs").sign(claims()).unwrap();
    vec![
        Scenario { name: "plain", tollgate: false, path: "/api/items", headers: vec![] },
        Scenario { name: "tollgate-public", tollgate: true, path: "/health", headers: vec![] },
        Scenario {
            name: "tollgate-apikey",
            tollgate: true,
            path: "/api/items",
            headers: vec![("x-api-key".to_owned(), "bench-key".to_owned())],
        },
        Scenario { name: "tollgate-hs256", tollgate: true, path: "/api/items", headers: bearer(hs) },
        Scenario { name: "tollgate-es256", tollgate: true, path: "/api/items", headers: bearer(es) },
        Scenario { name: "tollgate-rs256", tollgate: true, path: "/api/items", headers: bearer(rs) },
    ]
}

fn start(scenario: &Scenario, plugin: &str) -> Gateway {
    let tollgate = scenario.tollgate;
    Gateway::start(GatewayOptions {
        plugin_config: Some(plugin.to_owned()),
        concurrency: 1,
        mutate: Some(Box::new(move |config| {
            if !tollgate {
                remove_tollgate_filter(config);
            }
            let hcm = hcm(config);
            hcm["route_config"]["virtual_hosts"][0]["routes"] = json!([
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
            ]);
        })),
        ..GatewayOptions::default()
    })
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
}

fn run(gw: &Gateway, scenario: &Scenario) -> Sample {
    let pid = gw.envoy_pid();
    let pinned = Command::new("taskset").args(["-a", "-cp", "0", &pid.to_string()]).output().unwrap();
    assert!(pinned.status.success(), "taskset: {}", String::from_utf8_lossy(&pinned.stderr));
    let url = format!("http://127.0.0.1:{}{}", gw.port(), scenario.path);
    let probe = scenario.headers.iter().fold(Request::get(scenario.path), |r, (n, v)| r.header(n, v));
    assert_eq!(gw.send(probe).status, 200, "{}: the request is not accepted", scenario.name);
    let mut wrk = Command::new("taskset");
    wrk.args(["-c", "1", "wrk", "-t1", &format!("-c{CONNECTIONS}"), &format!("-d{SECONDS}s"), "--latency"]);
    for (name, value) in &scenario.headers {
        wrk.args(["-H", &format!("{name}: {value}")]);
    }
    let before = cpu_ticks(pid);
    let out = wrk.arg(&url).output().expect("wrk: run `make bench`, which installs it");
    let after = cpu_ticks(pid);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = field(&text, "requests in").unwrap_or(0.0);
    let non_2xx = field(&text, "Non-2xx or 3xx responses:").unwrap_or(0.0);
    assert!(requests > 0.0 && non_2xx == 0.0, "{}: wrk saw errors:\n{text}", scenario.name);
    Sample {
        rps: field(&text, "Requests/sec:").unwrap(),
        p50_us: latency(&text, "50%"),
        p99_us: latency(&text, "99%"),
        cpu_us_per_request: (after - before) as f64 * 10_000.0 / requests,
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
    values[values.len() / 2]
}

fn main() {
    let es = ES256KeyPair::generate();
    let rs = RS256KeyPair::generate(2048).unwrap();
    let plugin = plugin_config(&es, &rs);
    let scenarios = scenarios(&es, &rs);
    let mut samples: Vec<Vec<Sample>> = scenarios.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        for (scenario, samples) in scenarios.iter().zip(&mut samples) {
            let gw = start(scenario, &plugin);
            let sample = run(&gw, scenario);
            eprintln!("round {round} {:<16} {:>9.0} req/s", scenario.name, sample.rps);
            samples.push(sample);
        }
    }
    let plain_cpu = median(samples[0].iter().map(|s| s.cpu_us_per_request).collect());
    let wasm = std::fs::metadata(repo().join("build/tollgate.wasm")).map(|m| m.len()).unwrap_or(0);
    let mut table = format!(
        "Envoy --concurrency 1 pinned to CPU 0, wrk -t1 -c{CONNECTIONS} -d{SECONDS}s on CPU 1, direct response; \
         medians of {ROUNDS} alternating rounds. tollgate.wasm: {wasm} bytes.\n\n\
         | scenario | req/s | p50 µs | p99 µs | Envoy CPU µs/req | added vs plain µs/req |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (scenario, samples) in scenarios.iter().zip(&samples) {
        let cpu = median(samples.iter().map(|s| s.cpu_us_per_request).collect());
        table.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            scenario.name,
            median(samples.iter().map(|s| s.rps).collect()),
            median(samples.iter().map(|s| s.p50_us).collect()),
            median(samples.iter().map(|s| s.p99_us).collect()),
            cpu,
            cpu - plain_cpu,
        ));
    }
    std::fs::create_dir_all(repo().join("build")).unwrap();
    std::fs::write(repo().join("build/bench.md"), &table).unwrap();
    println!("{table}");
}
