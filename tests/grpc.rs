//! gRPC through a real Envoy with the filter, with a gRPC client and server the project did not
//! write (grpcio from PyPI, driven by envoy/grpc_client.py and envoy/grpc_upstream.py, raw-bytes
//! messages) and the real credit service on SQLite: what a gRPC caller is told when refused, what
//! metadata it reads, and what the ledger charges — on `grpc-status`, once per call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

const COST: u64 = 5;
const SAY: &str = "/demo.Echo/Say";
const COUNT: &str = "/demo.Echo/Count";

fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    let ok = Command::new(&python).args(["-c", "import grpc"]).status().is_ok_and(|s| s.success());
    assert!(ok, "grpcio is not in .venv: run `make grpcio`");
    python
}

/// envoy/grpc_upstream.py on a port of its own, recording each call it gets.
struct GrpcUpstream {
    child: Child,
    port: u16,
    record: PathBuf,
}

impl GrpcUpstream {
    fn start() -> GrpcUpstream {
        let record = std::env::temp_dir().join(format!(
            "tollgate-grpc-{}-{:?}.jsonl",
            std::process::id(),
            thread::current().id()
        ));
        let _ = fs::remove_file(&record);
        let mut child = Command::new(python())
            .arg(repo().join("envoy/grpc_upstream.py"))
            .args(["0", record.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok());
        let port = port.unwrap_or_else(|| panic!("grpc_upstream.py did not start: {line:?}"));
        GrpcUpstream { child, port, record }
    }

    /// The calls that reached the upstream: method and request metadata.
    fn calls(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.record).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.record);
    }
}

fn sha256(key: &str) -> String {
    hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The `rpc` policy bills `demo.Echo` in `mode` (`per_request`: a reservation per call, whose
/// ledger rows a test can count; `grant`), limited to `per_minute` calls per route; `/rest` takes
/// no gRPC. API key `key-<account>` for each account.
fn plugin_config(accounts: &[&str], per_minute: u64, mode: &str) -> String {
    let keys: Vec<_> = accounts
        .iter()
        .map(|a| json!({"id": format!("key-{a}"), "sha256": sha256(&format!("key-{a}")), "account": a}))
        .collect();
    json!({
        "policies": {
            "rpc": {"access": "authenticated", "grpc": true, "credits": {"cost": COST, "mode": mode},
                    "rate_limit": {"tiers": false, "route": {"per_minute": per_minute}}},
            "rest": {"access": "public"}
        },
        "routes": [
            {"prefix": "/demo.Echo", "policy": "rpc"},
            {"prefix": "/rest", "policy": "rest"}
        ],
        // The tests start their Envoys, credit services and Python servers at once: a
        // reservation gets time to answer, so that a slow one is not read as an outage.
        "credits": {
            "cluster": "credits", "service_token": SERVICE_TOKEN, "timeout_ms": 2000,
            "actual_cost_header": "x-actual-cost", "retry_seconds": 60,
            "grants": {"lifetime_seconds": 4, "flush_seconds": 1, "idle_seconds": 2, "min_grant": 50}
        },
        "auth": {"api_keys": {"keys": keys}}
    })
    .to_string()
}

struct Setup {
    gw: Gateway,
    credits: CreditService,
    upstream: GrpcUpstream,
}

fn setup(accounts: &[(&str, u64)], per_minute: u64) -> Setup {
    setup_in(accounts, per_minute, "per_request")
}

fn setup_in(accounts: &[(&str, u64)], per_minute: u64, mode: &str) -> Setup {
    let credits = CreditService::start();
    for (account, balance) in accounts {
        credits.create_account(account, *balance);
    }
    let upstream = GrpcUpstream::start();
    let port = upstream.port;
    let names: Vec<&str> = accounts.iter().map(|(a, _)| *a).collect();
    let gw = Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(&names, per_minute, mode)),
        credit_port: Some(credits.port()),
        // The shipped config's `grpc` cluster (HTTP/2 to the upstream), pointed at this test's.
        mutate: Some(Box::new(move |config: &mut Value| {
            let clusters = config["static_resources"]["clusters"].as_array_mut().unwrap();
            let grpc = clusters.iter_mut().find(|c| c["name"] == "grpc").expect("no grpc cluster in envoy.yaml");
            grpc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] =
                json!({"address": "127.0.0.1", "port_value": port});
        })),
        ..GatewayOptions::default()
    });
    Setup { gw, credits, upstream }
}

/// What the gRPC client saw of one call.
struct Call(Value);

impl Call {
    fn code(&self) -> u64 {
        self.0["code"].as_u64().unwrap()
    }

    /// A metadata value, initial or trailing.
    fn metadata(&self, name: &str) -> Option<&str> {
        let all = self.0["initial"].as_array().unwrap().iter().chain(self.0["trailing"].as_array().unwrap());
        all.into_iter().find(|kv| kv[0] == name).map(|kv| kv[1].as_str().unwrap())
    }

    fn trailing(&self, name: &str) -> Option<&str> {
        self.0["trailing"].as_array().unwrap().iter().find(|kv| kv[0] == name).map(|kv| kv[1].as_str().unwrap())
    }

    fn messages(&self) -> Vec<&str> {
        self.0["messages"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect()
    }
}

/// Calls `method` through the gateway with envoy/grpc_client.py; `stream`: a server-streaming one.
fn call(gw: &Gateway, method: &str, stream: bool, metadata: &[&str]) -> Call {
    let mut command = Command::new(python());
    command.arg(repo().join("envoy/grpc_client.py")).args([&format!("127.0.0.1:{}", gw.port()), method, "--json"]);
    if stream {
        command.arg("--stream");
    }
    for m in metadata {
        command.args(["-H", m]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "grpc_client.py failed: {}", String::from_utf8_lossy(&output.stderr));
    Call(
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout))),
    )
}

#[test]
fn a_unary_call_is_allowed_and_charged_exactly_once_with_its_billing_in_the_metadata() {
    let s = setup(&[("acme", 100)], 100);
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-acme"]);
    assert_eq!((reply.code(), reply.messages()), (0, vec!["hello, world"]), "{}", reply.0);
    assert_eq!(reply.trailing("x-credits-charged"), Some("5"), "{}", reply.0);
    assert_eq!(reply.trailing("x-credits-remaining"), Some("95"));
    assert_eq!(reply.metadata("x-ratelimit-limit"), Some("100"));
    assert_eq!(reply.metadata("x-ratelimit-remaining"), Some("99"));
    assert_eq!(s.credits.settled("acme", Duration::from_secs(5)), 95);
    assert_eq!(s.credits.kinds("acme"), ["topup", "reserve", "commit"]);

    let upstream = s.upstream.calls();
    assert_eq!(upstream.len(), 1);
    let metadata = upstream[0]["metadata"].as_array().unwrap();
    let got = |name: &str| metadata.iter().find(|kv| kv[0] == name).map(|kv| kv[1].as_str().unwrap().to_owned());
    assert_eq!(got("x-tollgate-account").as_deref(), Some("acme"), "the verified caller reaches the upstream");
    assert_eq!(got("x-api-key"), None, "the credential does not");

    // The upstream reports the call's real cost in its trailers: that much is charged.
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-acme", "x-upstream-trailer: x-actual-cost: 2"]);
    assert_eq!(reply.code(), 0);
    assert_eq!(reply.trailing("x-credits-charged"), Some("2"));
    assert_eq!(reply.metadata("x-actual-cost"), None, "the upstream's report is not the caller's business");
    assert_eq!(s.credits.settled("acme", Duration::from_secs(5)), 93);
}

#[test]
fn refusals_are_grpc_statuses_with_a_short_message_and_never_reach_the_upstream() {
    let s = setup(&[("acme", 100)], 100);
    let cases: [(&str, &[&str], u64, &str); 3] = [
        (SAY, &[], 16, "this route requires authentication"),
        (SAY, &["x-api-key: not-a-key"], 16, ""),
        // A route whose policy does not take gRPC: to gRPC, a method this server does not have.
        ("/rest.Svc/Get", &[], 12, "content type \"application/grpc\" is not accepted"),
    ];
    for (method, metadata, code, message) in cases {
        let reply = call(&s.gw, method, false, metadata);
        assert_eq!(reply.code(), code, "{method} {metadata:?}: {}", reply.0);
        let details = reply.0["details"].as_str().unwrap();
        assert!(details.contains(message) && !details.contains('{'), "not JSON, and human: {details:?}");
        assert_eq!(reply.metadata("x-content-type-options"), Some("nosniff"));
    }
    assert!(s.upstream.calls().is_empty());
    assert_eq!(s.credits.kinds("acme"), ["topup"], "nothing was held");
}

#[test]
fn a_rate_limited_call_is_resource_exhausted_with_retry_advice() {
    let s = setup(&[("acme", 100)], 1);
    assert_eq!(call(&s.gw, SAY, false, &["x-api-key: key-acme"]).code(), 0);
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-acme"]);
    assert_eq!(reply.code(), 8, "RESOURCE_EXHAUSTED, not UNAVAILABLE (which clients retry at once): {}", reply.0);
    let retry_after: u64 = reply.metadata("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(reply.metadata("grpc-retry-pushback-ms"), Some(format!("{retry_after}000").as_str()));
    assert_eq!(reply.metadata("x-ratelimit-remaining"), Some("0"));
    assert_eq!(s.upstream.calls().len(), 1);
    assert_eq!(s.credits.settled("acme", Duration::from_secs(5)), 100 - COST, "the refused call cost nothing");
}

#[test]
fn out_of_credits_is_failed_precondition_and_the_ledger_shows_no_charge() {
    let s = setup(&[("poor", 3)], 100);
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-poor"]);
    assert_eq!(reply.code(), 9, "FAILED_PRECONDITION: not worth retrying before a top-up: {}", reply.0);
    assert!(reply.0["details"].as_str().unwrap().contains("insufficient credits"), "{}", reply.0);
    assert!(s.upstream.calls().is_empty());
    assert_eq!(s.credits.settled("poor", Duration::from_secs(5)), 3);
    assert_eq!(s.credits.kinds("poor"), ["topup"]);
}

#[test]
fn a_failed_call_is_not_charged_whatever_its_http_status() {
    let s = setup(&[("acme", 100)], 100);
    // The upstream answers HTTP 200, sends its headers, then fails the call in its trailers.
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-acme", "x-upstream-status: 13"]);
    assert_eq!(reply.code(), 13, "{}", reply.0);
    assert_eq!(reply.trailing("x-credits-charged"), Some("0"), "{}", reply.0);
    let reply = call(&s.gw, COUNT, true, &["x-api-key: key-acme", "x-upstream-status: 14"]);
    assert_eq!((reply.code(), reply.messages().len()), (14, 3), "failed after its messages: {}", reply.0);
    assert_eq!(s.credits.settled("acme", Duration::from_secs(5)), 100);
    assert_eq!(s.credits.kinds("acme"), ["topup", "reserve", "release", "reserve", "release"]);
    assert_eq!(s.upstream.calls().len(), 2);
}

#[test]
fn a_server_streaming_call_is_allowed_and_charged_once() {
    let s = setup(&[("acme", 100)], 100);
    let reply = call(&s.gw, COUNT, true, &["x-api-key: key-acme"]);
    assert_eq!((reply.code(), reply.messages()), (0, vec!["1: world", "2: world", "3: world"]), "{}", reply.0);
    assert_eq!(reply.trailing("x-credits-charged"), Some("5"));
    assert_eq!(s.credits.settled("acme", Duration::from_secs(5)), 95);
    assert_eq!(s.credits.kinds("acme"), ["topup", "reserve", "commit"], "one charge for the whole stream");
}

#[test]
fn calls_a_grant_pays_are_spent_on_grpc_status_as_well() {
    let s = setup_in(&[("acme", 100)], 100, "grant");
    // The first call has no grant yet: it reserves, and the gateway asks for a grant.
    assert_eq!(call(&s.gw, SAY, false, &["x-api-key: key-acme"]).code(), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.credits.kinds("acme").iter().any(|k| k == "grant") {
        assert!(Instant::now() < deadline, "no grant: {:?}", s.credits.kinds("acme"));
        thread::sleep(Duration::from_millis(50));
    }
    let reply = call(&s.gw, SAY, false, &["x-api-key: key-acme", "x-upstream-status: 13"]);
    assert_eq!((reply.code(), reply.trailing("x-credits-charged")), (13, Some("0")), "{}", reply.0);
    let reply = call(&s.gw, COUNT, true, &["x-api-key: key-acme"]);
    assert_eq!((reply.code(), reply.trailing("x-credits-charged")), (0, Some("5")), "{}", reply.0);
    // Idle, the grant is reported and given back: two calls served, two charged.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.credits.balance("acme").1 > 0 {
        assert!(Instant::now() < deadline, "still held: {:?}", s.credits.kinds("acme"));
        thread::sleep(Duration::from_millis(100));
    }
    let kinds = s.credits.kinds("acme");
    assert_eq!(s.credits.balance("acme").0, 100 - 2 * COST, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "reserve").count(), 1, "only the first call reserved: {kinds:?}");
}
