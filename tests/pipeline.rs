//! The request pipeline's phases through a real Envoy: a request held for a callout (a credit
//! reservation, a JWKS refetch) while its body arrives. A gate in front of the credit service or
//! the JWKS server holds each callout until the test has sent what it wants sent meanwhile, so
//! these tests do not depend on how fast the machine runs them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::*;
use jwt_simple::prelude::*;
use serde_json::{json, Value};

const SIGNING_SECRET: &[u8] = b"signing-secret-of-at-least-32-bytes!";
const API_KEY: &str = "pipeline-key-123";
const ISSUER: &str = "https://remote.test";
const WAIT: Duration = Duration::from_secs(10);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(bytes: &[u8]) -> String {
    use jwt_simple::reexports::ct_codecs::{Base64, Encoder};
    Base64::encode_to_string(bytes).unwrap()
}

fn signature(method: &str, path: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac_sha256::HMAC::new(SIGNING_SECRET);
    for part in [method.as_bytes(), path.as_bytes(), timestamp.to_string().as_bytes()] {
        mac.update(part);
        mac.update(b":");
    }
    mac.update(body);
    hex(&mac.finalize())
}

fn plugin_config(credits: bool) -> String {
    // Per request: the phase that waits for the credit service is what these tests are about.
    let cost = json!({"cost": 5, "mode": "per_request"});
    let mut billed = json!({"access": "authenticated", "credits": cost});
    let mut signed = json!({"access": "authenticated", "signature": true, "credits": cost});
    if !credits {
        billed.as_object_mut().unwrap().remove("credits");
        signed.as_object_mut().unwrap().remove("credits");
    }
    let mut config = json!({
        "policies": {"billed": billed, "signed": signed},
        "routes": [{"prefix": "/billed", "policy": "billed"}, {"prefix": "/signed", "policy": "signed"}],
        "request_checks": {"max_body_bytes": 1000},
        "auth": {
            "api_keys": {"keys": [{"id": "k1", "sha256": hex(&hmac_sha256::Hash::hash(API_KEY.as_bytes())), "account": "acme"}]},
            "jwt": {"providers": [{
                "issuer": ISSUER, "audiences": ["api"], "claims": {"account": "account"}, "account_prefix": "",
                "remote_jwks": {"cluster": "jwks", "path": "/jwks.json", "refresh_seconds": 3600, "timeout_ms": 10000}
            }]},
            // The seeds' scheme, which holds the body until the signature over it verifies.
            "signatures": {"scheme": "body", "secrets": [{"account": "acme", "secret": b64(SIGNING_SECRET)}]}
        }
    });
    if credits {
        config["credits"] = json!({"cluster": "credits", "service_token": SERVICE_TOKEN, "timeout_ms": 10000});
    }
    config.to_string()
}

/// A gateway with a `jwks` cluster pointing at `jwks_port` and the credit service (if any) at
/// `credit_port`.
fn gateway(credits: bool, credit_port: Option<u16>, jwks_port: u16) -> Gateway {
    let cluster = json!({
        "name": "jwks", "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": "jwks", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": jwks_port}}}}]}]}
    });
    Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config(credits)),
        credit_port,
        // One worker: what these tests hold is a stream's phase, not who else serves.
        concurrency: 1,
        mutate: Some(Box::new(move |config| {
            config["static_resources"]["clusters"].as_array_mut().unwrap().push(cluster)
        })),
        ..GatewayOptions::default()
    })
}

/// Bytes Envoy has read from downstream connections on the gateway listener. Envoy hands what it
/// read to the filter chain in the same turn of the worker's event loop, before it can handle a
/// callout's answer.
fn read_by_envoy(gw: &Gateway) -> u64 {
    let text = gw.admin("/stats?filter=^http%5C.gateway%5C.downstream_cx_rx_bytes_total$").text();
    text.lines().find_map(|l| l.split_once(": ")?.1.trim().parse().ok()).unwrap_or(0)
}

fn wait_read(gw: &Gateway, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    while read_by_envoy(gw) < at_least {
        assert!(Instant::now() < deadline, "Envoy did not read what was sent");
        thread::sleep(Duration::from_millis(5));
    }
}

fn head(path: &str, headers: &[(&str, String)]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends `head`, waits until its callout is held at `gate`, sends `during` and lets Envoy read it,
/// then opens the gate; `after` runs next (it may send more).
fn across_the_callout(
    gw: &Gateway,
    gate: &Gate,
    head: &[u8],
    during: &[u8],
    after: impl FnOnce(&mut Conversation),
) -> Response {
    let mut conversation = Conversation::open(gw.port());
    let before = read_by_envoy(gw);
    conversation.send(head);
    gate.wait_for_request(WAIT);
    conversation.send(during);
    wait_read(gw, before + (head.len() + during.len()) as u64);
    gate.open();
    after(&mut conversation);
    conversation.response().unwrap()
}

/// A billed gateway whose credit service (account `acme`, 100 credits) sits behind a closed gate.
fn billed_gateway() -> (CreditService, Gate, Gateway) {
    let credits = CreditService::start();
    credits.create_account("acme", 100);
    let gate = Gate::start(credits.port());
    let jwks = Upstream::start();
    let gw = gateway(true, Some(gate.port()), jwks.port());
    (credits, gate, gw)
}

fn settled(credits: &CreditService, account: &str) -> (u64, u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (balance, held) = credits.balance(account);
        if held == 0 || Instant::now() > deadline {
            return (balance, held);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signed_body_sent_during_the_reservation_is_verified_before_the_upstream_sees_it() {
    let (credits, gate, gw) = billed_gateway();

    let body = br#"{"amount": 5}"#;
    let ts = now();
    let bogus = "0".repeat(64);
    let headers = |sig: String| {
        vec![
            ("x-api-key", API_KEY.to_owned()),
            ("content-type", "application/json".to_owned()),
            ("content-length", body.len().to_string()),
            ("x-timestamp", ts.to_string()),
            ("x-signature", sig),
        ]
    };
    let resp = across_the_callout(&gw, &gate, &head("/signed/pay", &headers(bogus)), body, |_| {});
    assert_problem(&resp, 401, "invalid-credentials");
    // Envoy hands a wasm filter the body only once the head has gone on: the upstream may have
    // seen the head (DESIGN's header-time signature closes that), never the body.
    let seen = gw.upstream().requests();
    assert!(seen.iter().all(|r| !r.complete && r.body.is_empty()), "a body that failed its signature went upstream");
    assert_eq!(settled(&credits, "acme"), (100, 0), "the reservation was released");

    gate.close();
    let good = signature("POST", "/signed/pay", ts, body);
    let resp = across_the_callout(&gw, &gate, &head("/signed/pay", &headers(good)), body, |_| {});
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = gw.upstream().wait_until(WAIT, |r| r.iter().any(|r| r.complete));
    assert_eq!(seen.iter().find(|r| r.complete).unwrap().body, body.to_vec());
    assert_eq!(settled(&credits, "acme"), (95, 0), "the good request was charged");
}

#[test]
fn the_body_limit_counts_chunks_sent_after_the_reservation_resumed_the_request() {
    let (credits, gate, gw) = billed_gateway();

    let headers = [("x-api-key", API_KEY.to_owned()), ("transfer-encoding", "chunked".to_owned())];
    let resp =
        across_the_callout(&gw, &gate, &head("/billed/upload", &headers), &chunk(&[b'a'; 600]), |conversation| {
            // The reservation let the request go on: its head reached the upstream.
            assert_eq!(gw.upstream().wait_until(WAIT, |r| !r.is_empty()).len(), 1);
            conversation.send(&chunk(&[b'b'; 600]));
            conversation.send(b"0\r\n\r\n");
        });
    assert_problem(&resp, 413, "payload-too-large");
    let seen = gw.upstream().requests();
    assert!(seen.iter().all(|r| !r.complete && r.body.len() <= 600), "1,200 bytes went past a 1,000-byte limit");
    assert_eq!(settled(&credits, "acme"), (100, 0), "a refused request is not charged");
}

#[test]
fn a_signature_checks_the_body_that_arrived_during_a_jwks_refetch() {
    let jwks = Upstream::start();
    let (first, second) = (ES256KeyPair::generate(), ES256KeyPair::generate());
    let set = |keys: &[(&ES256KeyPair, &str)]| -> Value {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(k, kid)| {
                let point = k.public_key().public_key().to_bytes_uncompressed();
                use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Encoder};
                json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
                    "x": Base64UrlSafeNoPadding::encode_to_string(&point[1..33]).unwrap(),
                    "y": Base64UrlSafeNoPadding::encode_to_string(&point[33..]).unwrap()})
            })
            .collect();
        json!({ "keys": keys })
    };
    jwks.set_reply(Some((200, set(&[(&first, "k1")]))));
    let gate = Gate::start(jwks.port());
    gate.open();
    let gw = gateway(false, None, gate.port());
    let token = |key: &ES256KeyPair, kid: &str| {
        let claims =
            Claims::with_custom_claims(json!({"account": "acme"}), jwt_simple::prelude::Duration::from_mins(5))
                .with_issuer(ISSUER)
                .with_audience("api")
                .with_subject("user-1");
        ES256KeyPair::from_bytes(&key.to_bytes()).unwrap().with_key_id(kid).sign(claims).unwrap()
    };
    // The provider's keys load at start.
    let deadline = Instant::now() + WAIT;
    let first_token = token(&first, "k1");
    while gw.send(Request::get("/billed/x").header("authorization", format!("Bearer {first_token}"))).status != 200 {
        assert!(Instant::now() < deadline, "the JWKS never loaded");
        thread::sleep(Duration::from_millis(50));
    }

    // The provider rotates: a token with a new `kid` makes the gateway fetch the keys again.
    jwks.set_reply(Some((200, set(&[(&first, "k1"), (&second, "k2")]))));
    gate.close();
    let body = br#"{"amount": 7}"#;
    let ts = now();
    let headers = [
        ("authorization", format!("Bearer {}", token(&second, "k2"))),
        ("content-type", "application/json".to_owned()),
        ("content-length", body.len().to_string()),
        ("x-timestamp", ts.to_string()),
        ("x-signature", signature("POST", "/signed/pay", ts, body)),
    ];
    let resp = across_the_callout(&gw, &gate, &head("/signed/pay", &headers), body, |_| {});
    assert_eq!(resp.status, 200, "a good signature over a body held during the refetch: {}", resp.text());
    let seen = gw.upstream().wait_until(WAIT, |r| r.iter().any(|r| r.path == "/signed/pay" && r.complete));
    assert_eq!(seen.iter().find(|r| r.path == "/signed/pay").unwrap().body, body.to_vec());
}

#[test]
fn a_client_that_leaves_while_its_reservation_is_in_flight_holds_nothing() {
    let (credits, gate, gw) = billed_gateway();

    let mut conversation = Conversation::open(gw.port());
    conversation.send(&head("/billed/items", &[("x-api-key", API_KEY.to_owned()), ("content-length", "0".to_owned())]));
    gate.wait_for_request(WAIT);
    drop(conversation);
    // Envoy ends the stream when the client leaves; then the reservation goes through.
    let deadline = Instant::now() + WAIT;
    while gw.metric("envoy_http_downstream_rq_rx_reset") == 0
        && gw.metric("envoy_http_downstream_cx_destroy_remote") == 0
    {
        assert!(Instant::now() < deadline, "Envoy never saw the client leave");
        thread::sleep(Duration::from_millis(5));
    }
    gate.open();
    let kinds = || -> Vec<String> {
        credits.transactions("acme").iter().map(|t| t["kind"].as_str().unwrap().to_owned()).collect()
    };
    let deadline = Instant::now() + WAIT;
    while kinds().len() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kinds(), ["topup", "reserve", "release"], "the hold was released, not left to the service's expiry");
    assert_eq!(credits.balance("acme"), (100, 0));
    assert!(gw.upstream().requests().is_empty());
}
