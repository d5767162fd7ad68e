//! Authentication through a real Envoy: JWTs of every algorithm, the ways a token is refused, API
//! keys, scopes, request signatures, and a remote JWKS served through an Envoy cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::*;
use jwt_simple::prelude::*;
use serde_json::{json, Map, Value};

const ISSUER: &str = "https://issuer.test";
const REMOTE_ISSUER: &str = "https://remote.test";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn b64(bytes: &[u8]) -> String {
    use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Encoder};
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

static RSA: LazyLock<RS256KeyPair> = LazyLock::new(|| RS256KeyPair::generate(2048).unwrap());
static ES256: LazyLock<ES256KeyPair> = LazyLock::new(ES256KeyPair::generate);
static ES384: LazyLock<ES384KeyPair> = LazyLock::new(ES384KeyPair::generate);
static ED25519: LazyLock<Ed25519KeyPair> = LazyLock::new(Ed25519KeyPair::generate);
const HS_SECRETS: [(&str, &[u8]); 3] = [("HS256", &[1; 32]), ("HS384", &[2; 48]), ("HS512", &[3; 64])];

type Claims = JWTClaims<Map<String, Value>>;

fn claims(custom: Value) -> Claims {
    let Value::Object(custom) = custom else { panic!("claims must be an object") };
    JWTClaims {
        issued_at: Some(UnixTimeStamp::from_secs(now() - 10)),
        expires_at: Some(UnixTimeStamp::from_secs(now() + 300)),
        invalid_before: None,
        issuer: Some(ISSUER.to_owned()),
        subject: Some("user-1".to_owned()),
        audiences: Some(Audiences::AsString("api".to_owned())),
        jwt_id: None,
        nonce: None,
        custom,
    }
}

fn standard() -> Claims {
    claims(json!({"account": "acme", "tier": "pro", "scope": "read write"}))
}

/// A token signed with `alg`'s test key; the key id is the algorithm's name in lower case.
fn sign(alg: &str, claims: Claims) -> String {
    let kid = alg.to_ascii_lowercase();
    let der = RSA.to_der().unwrap();
    let hs = |i: usize| HS_SECRETS[i].1;
    match alg {
        "HS256" => HS256Key::from_bytes(hs(0)).with_key_id(&kid).authenticate(claims),
        "HS384" => HS384Key::from_bytes(hs(1)).with_key_id(&kid).authenticate(claims),
        "HS512" => HS512Key::from_bytes(hs(2)).with_key_id(&kid).authenticate(claims),
        "RS256" => RS256KeyPair::from_der(&der).unwrap().with_key_id(&kid).sign(claims),
        "RS384" => RS384KeyPair::from_der(&der).unwrap().with_key_id(&kid).sign(claims),
        "RS512" => RS512KeyPair::from_der(&der).unwrap().with_key_id(&kid).sign(claims),
        "PS256" => PS256KeyPair::from_der(&der).unwrap().with_key_id(&kid).sign(claims),
        "ES256" => ES256KeyPair::from_bytes(&ES256.to_bytes()).unwrap().with_key_id(&kid).sign(claims),
        "ES384" => ES384KeyPair::from_bytes(&ES384.to_bytes()).unwrap().with_key_id(&kid).sign(claims),
        "EdDSA" => ED25519.clone().with_key_id(&kid).sign(claims),
        other => panic!("no key for {other}"),
    }
    .unwrap()
}

fn rsa_jwk(alg: &str) -> Value {
    let c = RSA.public_key().to_components();
    json!({"kty": "RSA", "kid": alg.to_ascii_lowercase(), "alg": alg, "n": b64(&c.n), "e": b64(&c.e)})
}

fn ec_jwk(alg: &str, crv: &str, point: Vec<u8>) -> Value {
    let half = (point.len() - 1) / 2;
    json!({"kty": "EC", "kid": alg.to_ascii_lowercase(), "alg": alg, "crv": crv,
           "x": b64(&point[1..=half]), "y": b64(&point[half + 1..])})
}

fn public_jwks() -> Value {
    json!({"keys": [
        rsa_jwk("RS256"), rsa_jwk("RS384"), rsa_jwk("RS512"), rsa_jwk("PS256"),
        ec_jwk("ES256", "P-256", ES256.public_key().public_key().to_bytes_uncompressed()),
        ec_jwk("ES384", "P-384", ES384.public_key().public_key().to_bytes_uncompressed()),
        {"kty": "OKP", "kid": "eddsa", "crv": "Ed25519", "alg": "EdDSA", "x": b64(&ED25519.public_key().to_bytes())},
    ]})
}

fn sha256(key: &str) -> String {
    hex(&hmac_sha256::Hash::hash(key.as_bytes()))
}

const SIGNING_SECRET: &[u8] = b"signing-secret-of-at-least-32-bytes!";

fn plugin_config(remote: bool) -> String {
    let secrets: Vec<Value> = HS_SECRETS
        .iter()
        .map(|(alg, s)| {
            use jwt_simple::reexports::ct_codecs::{Base64, Encoder};
            json!({"kid": alg.to_ascii_lowercase(), "alg": alg, "secret": Base64::encode_to_string(s).unwrap()})
        })
        .collect();
    let mut providers = vec![json!({
        "issuer": ISSUER,
        "audiences": ["api"],
        "jwks": public_jwks(),
        "secrets": secrets,
        "sources": {"authorization": true, "cookie": "access_token", "query": "token"},
        "claims": {"account": "account", "tier": "tier"},
        // Its tokens and the API keys name the same accounts on purpose (acme signs with both).
        "account_prefix": ""
    })];
    if remote {
        providers.push(json!({
            "issuer": REMOTE_ISSUER,
            "audiences": ["api"],
            "remote_jwks": {"cluster": "jwks", "path": "/.well-known/jwks.json", "refresh_seconds": 3600, "timeout_ms": 1000},
            "claims": {"account": "account"},
            "account_prefix": ""
        }));
    }
    let signing_secret = {
        use jwt_simple::reexports::ct_codecs::{Base64, Encoder};
        Base64::encode_to_string(SIGNING_SECRET).unwrap()
    };
    let config = json!({
        "policies": {
            "public": {"access": "public"},
            "api": {"access": "authenticated"},
            "admin": {"access": "authenticated", "scopes": ["admin"]},
            "signed": {"access": "authenticated", "signature": true}
        },
        "routes": [
            {"prefix": "/health", "policy": "public"},
            {"prefix": "/api", "policy": "api"},
            {"prefix": "/admin", "policy": "admin"},
            {"prefix": "/signed", "policy": "signed"}
        ],
        "auth": {
            "jwt": {"providers": providers},
            "api_keys": {"keys": [
                {"id": "key-pro", "sha256": sha256("pro-key-123"), "account": "acme", "tier": "pro", "scopes": ["read"]},
                {"id": "key-old", "sha256": sha256("old-key-123"), "account": "acme", "expires_at": "2020-01-01T00:00:00Z"},
                {"id": "key-off", "sha256": sha256("off-key-123"), "account": "acme", "active": false}
            ]},
            "signatures": {"secrets": [{"account": "acme", "secret": signing_secret}]}
        }
    });
    config.to_string()
}

fn gateway() -> Gateway {
    Gateway::start(GatewayOptions { plugin_config: Some(plugin_config(false)), ..GatewayOptions::default() })
}

fn bearer(token: &str) -> Request {
    Request::get("/api/items").header("authorization", format!("Bearer {token}"))
}

/// The last request the upstream saw.
fn upstream_saw(gw: &Gateway) -> Recorded {
    gw.upstream().wait_for(1, Duration::from_secs(5)).pop().expect("the upstream saw no request")
}

#[test]
fn a_valid_token_of_every_algorithm_passes_with_the_identity_upstream() {
    let gw = gateway();
    for alg in ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"] {
        gw.upstream().clear();
        let resp = gw.send(bearer(&sign(alg, standard())));
        assert_eq!(resp.status, 200, "{alg}: {}", resp.text());
        let seen = upstream_saw(&gw);
        assert_eq!(seen.header("x-tollgate-subject"), Some("user-1"), "{alg}");
        assert_eq!(seen.header("x-tollgate-account"), Some("acme"));
        assert_eq!(seen.header("x-tollgate-tier"), Some("pro"));
        assert_eq!(seen.header("x-tollgate-auth-method"), Some("jwt"));
        assert_eq!(seen.header("x-tollgate-scopes"), Some("read write"));
        assert_eq!(seen.header("authorization"), None, "{alg}: the token went upstream");
    }
}

fn forged(header: Value, payload: &Claims, signature: &[u8]) -> String {
    let payload = serde_json::to_vec(payload).unwrap();
    format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(&payload), b64(signature))
}

#[test]
fn bad_tokens_are_refused_with_401_invalid_token() {
    let gw = gateway();
    let mut expired = standard();
    expired.expires_at = Some(UnixTimeStamp::from_secs(now() - 3600));
    let mut early = standard();
    early.invalid_before = Some(UnixTimeStamp::from_secs(now() + 3600));
    let mut wrong_iss = standard();
    wrong_iss.issuer = Some("https://evil.test".to_owned());
    let mut wrong_aud = standard();
    wrong_aud.audiences = Some(Audiences::AsString("other".to_owned()));
    let good = sign("RS256", standard());
    let mut bad_signature = good.clone();
    bad_signature.replace_range(good.len() - 6.., "AAAAAA");
    // HS/RS confusion: an HS256 token "signed" with the RSA public key, naming the RSA key.
    let public_pem = RSA.public_key().to_pem().unwrap();
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": "rs256"});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(&serde_json::to_vec(&standard()).unwrap()));
    let confused = format!("{input}.{}", b64(&hmac_sha256::HMAC::mac(input.as_bytes(), public_pem.as_bytes())));
    let cases = [
        ("expired", sign("ES256", expired)),
        ("not yet valid", sign("ES256", early)),
        ("wrong iss", sign("ES256", wrong_iss)),
        ("wrong aud", sign("ES256", wrong_aud)),
        ("bad signature", bad_signature),
        ("alg none", forged(json!({"alg": "none", "kid": "hs256"}), &standard(), b"")),
        ("HS/RS confusion", confused),
        ("unknown kid", forged(json!({"alg": "RS256", "kid": "nobody"}), &standard(), b"sig")),
        ("unknown alg", forged(json!({"alg": "XX999", "kid": "rs256"}), &standard(), b"sig")),
        ("malformed base64", "e30.%%%.abc".to_owned()),
        ("malformed json", format!("{}.{}.{}", b64(b"{not json"), b64(b"{}"), b64(b"x"))),
    ];
    for (what, token) in cases {
        let resp = gw.send(bearer(&token));
        assert_problem(&resp, 401, "invalid-credentials");
        let challenge = resp.header("www-authenticate").unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{what}: {challenge}");
        assert!(!resp.text().contains(&token), "{what}: the token was echoed");
    }
    let huge = format!("{}.{}.{}", b64(b"{}"), "a".repeat(9000), "b");
    let resp = gw.send(bearer(&huge));
    assert_problem(&resp, 401, "invalid-credentials");
    assert!(resp.header("www-authenticate").unwrap().contains("error=\"invalid_request\""));
    assert_eq!(gw.upstream().requests().len(), 0, "a refused token reached the upstream");
}

#[test]
fn tokens_from_a_cookie_or_the_query_are_taken_and_removed() {
    let gw = gateway();
    let token = sign("EdDSA", standard());
    let resp = gw.send(Request::get("/api/items").header("cookie", format!("theme=dark; access_token={token}")));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = upstream_saw(&gw);
    assert_eq!(seen.header("cookie"), Some("theme=dark"));
    gw.upstream().clear();
    let resp = gw.send(Request::get(&format!("/api/ws?room=1&token={token}")));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream_saw(&gw).path, "/api/ws?room=1");
}

#[test]
fn api_keys_valid_unknown_expired_inactive_and_doubled() {
    let gw = gateway();
    let resp = gw.send(Request::get("/api/items").header("x-api-key", "pro-key-123"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = upstream_saw(&gw);
    assert_eq!(seen.header("x-tollgate-auth-method"), Some("api_key"));
    assert_eq!(seen.header("x-tollgate-key-id"), Some("key-pro"));
    assert_eq!(seen.header("x-tollgate-account"), Some("acme"));
    assert_eq!(seen.header("x-api-key"), None, "the key went upstream");

    let resp = gw.send(Request::get("/api/items").header("authorization", "ApiKey pro-key-123"));
    assert_eq!(resp.status, 200);

    for (request, detail) in [
        (Request::get("/api/items").header("x-api-key", "nope"), "not valid"),
        (Request::get("/api/items").header("x-api-key", "old-key-123"), "expired"),
        (Request::get("/api/items").header("x-api-key", "off-key-123"), "deactivated"),
        (
            Request::get("/api/items").header("x-api-key", "pro-key-123").header("x-api-key", "pro-key-123"),
            "more than one",
        ),
        (
            Request::get("/api/items").header("x-api-key", "pro-key-123").header("authorization", "ApiKey pro-key-123"),
            "more than one",
        ),
    ] {
        let resp = gw.send(request);
        assert_problem(&resp, 401, "invalid-credentials");
        let body = resp.json();
        assert!(body["detail"].as_str().unwrap().contains(detail), "{body}");
        assert!(!resp.text().contains("key-123"), "the key was echoed: {body}");
    }
}

#[test]
fn a_jwt_wins_over_an_api_key_and_both_are_removed() {
    let gw = gateway();
    let resp = gw.send(bearer(&sign("HS256", standard())).header("x-api-key", "pro-key-123"));
    assert_eq!(resp.status, 200);
    let seen = upstream_saw(&gw);
    assert_eq!(seen.header("x-tollgate-auth-method"), Some("jwt"));
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("authorization"), None);
}

#[test]
fn two_authorization_headers_are_refused() {
    let gw = gateway();
    let token = sign("HS256", standard());
    let resp = gw.send(bearer(&token).header("authorization", format!("Bearer {token}")));
    assert_problem(&resp, 401, "invalid-credentials");
}

#[test]
fn a_missing_scope_is_403_and_forged_identity_never_passes() {
    let gw = gateway();
    let resp = gw.send(Request::get("/admin/users").header("x-api-key", "pro-key-123"));
    assert_problem(&resp, 403, "insufficient-scope");
    assert!(resp.header("www-authenticate").unwrap().contains("error=\"insufficient_scope\""));
    let admin = sign("ES384", claims(json!({"account": "acme", "scope": "admin"})));
    let resp = gw.send(
        Request::get("/admin/users")
            .header("authorization", format!("Bearer {admin}"))
            .header("x-tollgate-account", "someone-else")
            .header("x-tollgate-key-id", "forged"),
    );
    assert_eq!(resp.status, 200);
    let seen = upstream_saw(&gw);
    assert_eq!(seen.header("x-tollgate-account"), Some("acme"));
    assert_eq!(seen.header("x-tollgate-key-id"), None);
    assert_eq!(seen.headers.iter().filter(|(n, _)| n == "x-tollgate-account").count(), 1);
}

/// RFC 9530 `Content-Digest` of a body: its sha-256, as a structured-field byte sequence.
fn content_digest(body: &[u8]) -> String {
    use jwt_simple::reexports::ct_codecs::{Base64, Encoder};
    format!("sha-256=:{}:", Base64::encode_to_string(hmac_sha256::Hash::hash(body)).unwrap())
}

/// The default scheme's signature: `METHOD:path:timestamp:` and the body's sha-256, base64.
fn signature(method: &str, path: &str, timestamp: u64, body: &[u8]) -> String {
    let digest = content_digest(body);
    let b64 = digest.trim_start_matches("sha-256=:").trim_end_matches(':');
    hex(&hmac_sha256::HMAC::mac(format!("{method}:{path}:{timestamp}:{b64}").as_bytes(), SIGNING_SECRET))
}

/// A request signed over `signed_body`, carrying `body`.
fn signed(method: &str, path: &str, timestamp: u64, signed_body: &[u8], body: &[u8]) -> Request {
    Request::new(method, path)
        .header("x-api-key", "pro-key-123")
        .header("content-type", "application/json")
        .header("x-timestamp", timestamp.to_string())
        .header("x-signature", signature(method, path, timestamp, signed_body))
        .header("content-digest", content_digest(signed_body))
        .body(body.to_vec())
}

#[test]
fn request_signatures_valid_stale_tampered_and_replayed() {
    let gw = gateway();
    let body = br#"{"amount": 5}"#;
    let ts = now();
    let resp = gw.send(signed("POST", "/signed/pay", ts, body, body));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream_saw(&gw).body, body.to_vec(), "the upstream got the signed body whole");

    // Replays on fresh connections, which Envoy spreads over both workers: each is refused.
    for _ in 0..6 {
        let replay = gw.send(signed("POST", "/signed/pay", ts, body, body));
        assert_problem(&replay, 401, "invalid-credentials");
        assert!(replay.json()["detail"].as_str().unwrap().contains("already used"));
    }

    let stale = now() - 3600;
    let resp = gw.send(signed("POST", "/signed/pay", stale, body, body));
    assert_problem(&resp, 401, "invalid-credentials");

    // A body other than the one signed: the head verified and went on, the body's end did not.
    let resp = gw.send(signed("POST", "/signed/pay", ts - 1, body, br#"{"amount": 9}"#));
    assert_problem(&resp, 401, "invalid-credentials");
    assert!(resp.json()["detail"].as_str().unwrap().contains("Content-Digest"), "{}", resp.text());

    let ts = now();
    let chunks: Vec<Vec<u8>> = vec![b"{\"amount\":".to_vec(), b" 7}".to_vec()];
    let whole = b"{\"amount\": 7}";
    let resp = gw.send(
        Request::new("POST", "/signed/pay")
            .header("x-api-key", "pro-key-123")
            .header("content-type", "application/json")
            .header("x-timestamp", ts.to_string())
            .header("x-signature", signature("POST", "/signed/pay", ts, whole))
            .header("content-digest", content_digest(whole))
            .chunked(chunks),
    );
    assert_eq!(resp.status, 200, "a chunked signed body: {}", resp.text());
    // The tampered request's head verified and may have reached the upstream; its body never ended.
    let seen = gw.upstream().wait_for(2, Duration::from_secs(5));
    let complete: Vec<&[u8]> = seen.iter().filter(|r| r.complete).map(|r| r.body.as_slice()).collect();
    assert_eq!(complete, [&body[..], &whole[..]], "only the two good requests reached the upstream whole: {seen:?}");
}

#[test]
fn a_badly_signed_request_never_reaches_the_upstream_not_even_its_head() {
    let gw = gateway();
    let body = br#"{"confirm": true}"#;
    let zero = "0".repeat(64);
    let ts = now();
    let forged = [
        Request::new("DELETE", "/signed/items/42")
            .header("x-api-key", "pro-key-123")
            .header("content-type", "application/json")
            .header("x-timestamp", ts.to_string())
            .header("x-signature", zero.clone())
            .header("content-digest", content_digest(body))
            .body(body.to_vec()),
        // A captured request replayed: its signature was already accepted once.
        signed("DELETE", "/signed/items/43", ts, body, body),
        signed("DELETE", "/signed/items/43", ts, body, body),
        // Signed, but with the digest left out: the body is not covered.
        Request::new("DELETE", "/signed/items/44")
            .header("x-api-key", "pro-key-123")
            .header("content-type", "application/json")
            .header("x-timestamp", ts.to_string())
            .header("x-signature", zero)
            .body(body.to_vec()),
    ];
    let statuses: Vec<u16> = forged.into_iter().map(|r| gw.send(r).status).collect();
    assert_eq!(statuses, [401, 200, 401, 401]);
    let seen = gw.upstream().wait_for(1, Duration::from_secs(5));
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/signed/items/43"], "only the one good request reached the upstream, once");
}

/// A gateway whose Envoy has a cluster `name` for each server.
fn gateway_with_clusters(plugin_config: String, servers: &[(&str, &Upstream)]) -> Gateway {
    let clusters: Vec<Value> = servers
        .iter()
        .map(|(name, server)| {
            json!({
                "name": name, "connect_timeout": "1s", "type": "STATIC",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"socket_address": {"address": "127.0.0.1", "port_value": server.port()}}}}]}]}
            })
        })
        .collect();
    Gateway::start(GatewayOptions {
        plugin_config: Some(plugin_config),
        mutate: Some(Box::new(move |config| {
            config["static_resources"]["clusters"].as_array_mut().unwrap().extend(clusters);
        })),
        ..GatewayOptions::default()
    })
}

fn jwks_gateway() -> (Gateway, Upstream) {
    let jwks = Upstream::start();
    jwks.set_reply(Some((500, json!({"error": "not yet"}))));
    let gw = gateway_with_clusters(plugin_config(true), &[("jwks", &jwks)]);
    (gw, jwks)
}

fn remote_token(key: &ES256KeyPair, kid: &str) -> String {
    let mut c = claims(json!({"account": "remote-acct"}));
    c.issuer = Some(REMOTE_ISSUER.to_owned());
    ES256KeyPair::from_bytes(&key.to_bytes()).unwrap().with_key_id(kid).sign(c).unwrap()
}

fn es256_jwks(keys: &[(&ES256KeyPair, &str)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(k, kid)| {
            let mut jwk = ec_jwk("ES256", "P-256", k.public_key().public_key().to_bytes_uncompressed());
            jwk["kid"] = (*kid).into();
            jwk
        })
        .collect();
    json!({ "keys": keys })
}

/// Sends until the status is `want` or ten seconds pass (the root context retries with backoff).
fn eventually(gw: &Gateway, request: impl Fn() -> Request, want: u16) -> Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = gw.send(request());
        if resp.status == want || std::time::Instant::now() > deadline {
            return resp;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_remote_jwks_is_503_until_loaded_then_rotates_and_survives_its_server() {
    let (gw, mut jwks) = jwks_gateway();
    let first = ES256KeyPair::generate();
    let token = remote_token(&first, "k1");

    let resp = gw.send(bearer(&token));
    assert_problem(&resp, 503, "auth-unavailable");

    jwks.set_reply(Some((200, es256_jwks(&[(&first, "k1")]))));
    let resp = eventually(&gw, || bearer(&token), 200);
    assert_eq!(resp.status, 200, "the JWKS never loaded: {}", resp.text());
    assert_eq!(upstream_saw(&gw).header("x-tollgate-account"), Some("remote-acct"));

    // Rotation: the server adds k2; a k2 token makes the filter refetch, without a restart.
    let second = ES256KeyPair::generate();
    jwks.set_reply(Some((200, es256_jwks(&[(&first, "k1"), (&second, "k2")]))));
    let rotated = remote_token(&second, "k2");
    let resp = eventually(&gw, || bearer(&rotated), 200);
    assert_eq!(resp.status, 200, "the rotated key was not picked up: {}", resp.text());

    // A kid the server does not have: refused after the refetch. A worker that has not yet picked
    // the key set up from shared data (within a tick) answers 503 meanwhile, as for any token.
    let stranger = remote_token(&ES256KeyPair::generate(), "k9");
    assert_problem(&eventually(&gw, || bearer(&stranger), 401), 401, "invalid-credentials");

    // The JWKS server goes down: the keys already loaded keep working.
    // Every worker picks a set up from shared data within a tick (1 s).
    std::thread::sleep(Duration::from_millis(1500));
    jwks.stop();
    for t in [&token, &rotated] {
        assert_eq!(gw.send(bearer(t)).status, 200);
    }
}

#[test]
fn a_remote_revocation_list_is_503_until_loaded_then_refuses_revoked_tokens() {
    let revocations = Upstream::start();
    revocations.set_reply(Some((503, json!({}))));
    let mut config: Value = serde_json::from_str(&plugin_config(false)).unwrap();
    config["auth"]["jwt"]["providers"][0]["revoked_jti_remote"] =
        json!({"cluster": "revocations", "path": "/revoked.json", "refresh_seconds": 1, "timeout_ms": 1000});
    let gw = gateway_with_clusters(config.to_string(), &[("revocations", &revocations)]);
    let with_jti = |jti: &str| {
        let mut c = standard();
        c.jwt_id = Some(jti.to_owned());
        sign("HS256", c)
    };
    let (stolen, fine) = (with_jti("stolen"), with_jti("fine"));

    assert_problem(&gw.send(bearer(&fine)), 503, "auth-unavailable");

    revocations.set_reply(Some((200, json!({"revoked_jti": ["stolen"]}))));
    assert_eq!(eventually(&gw, || bearer(&fine), 200).status, 200, "the list never loaded");
    // The other worker may still be a tick behind: it picks the list up from shared data.
    let resp = eventually(&gw, || bearer(&stolen), 401);
    assert_problem(&resp, 401, "invalid-credentials");
    assert!(resp.json()["detail"].as_str().unwrap().contains("revoked"));

    // A token verified (and cached) before is refused once a newer list revokes it.
    revocations.set_reply(Some((200, json!(["stolen", "fine"]))));
    assert_eq!(eventually(&gw, || bearer(&fine), 401).status, 401, "the new list was not applied");

    // Every fetch counts, and the 503 answers as failures.
    let (fetches, failures) = (gw.metric("tollgate_remote_fetches"), gw.metric("tollgate_remote_fetch_failures"));
    let served = revocations.requests().len() as u64;
    // Each VM (two workers, and the main thread's) may have one fetch on its way.
    assert!((served..=served + 3).contains(&fetches), "{fetches} fetches counted, {served} served");
    assert!(failures >= 1 && failures < fetches, "{failures} of {fetches} failed");
}

#[test]
fn a_token_that_never_expires_or_signed_with_a_published_hmac_key_is_refused() {
    let (gw, jwks) = jwks_gateway();
    let es = ES256KeyPair::generate();
    let hmac = [9u8; 32];
    let mut keys = es256_jwks(&[(&es, "es")]);
    // An identity provider that (wrongly) publishes an HMAC key: anyone who reads it can sign.
    keys["keys"].as_array_mut().unwrap().push(json!({"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64(&hmac)}));
    jwks.set_reply(Some((200, keys)));
    let good = remote_token(&es, "es");
    assert_eq!(eventually(&gw, || bearer(&good), 200).status, 200, "the JWKS never loaded");

    let mut c = claims(json!({"account": "remote-acct"}));
    c.issuer = Some(REMOTE_ISSUER.to_owned());
    let forged = HS256Key::from_bytes(&hmac).with_key_id("hs").authenticate(c).unwrap();
    assert_problem(&gw.send(bearer(&forged)), 401, "invalid-credentials");

    let mut c = claims(json!({"account": "remote-acct"}));
    c.issuer = Some(REMOTE_ISSUER.to_owned());
    c.expires_at = None;
    let forever = ES256KeyPair::from_bytes(&es.to_bytes()).unwrap().with_key_id("es").sign(c).unwrap();
    let resp = gw.send(bearer(&forever));
    assert_problem(&resp, 401, "invalid-credentials");
    assert!(resp.json()["detail"].as_str().unwrap().contains("exp"), "{}", resp.text());
}

/// `plugin_config(false)` with `edit` applied to its `auth` section.
fn auth_config_with(edit: impl FnOnce(&mut Value)) -> String {
    let mut config: Value = serde_json::from_str(&plugin_config(false)).unwrap();
    edit(&mut config["auth"]);
    config.to_string()
}

#[test]
fn an_address_that_keeps_failing_is_refused_before_any_credential_is_verified() {
    let config = auth_config_with(|auth| auth["failures"] = json!({"per_minute": 3}));
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 7);
    let mut bad = sign("RS256", standard());
    bad.replace_range(bad.len() - 6.., "AAAAAA");
    for _ in 0..3 {
        assert_problem(&gw.send(bearer(&bad).sent_from(attacker)), 401, "invalid-credentials");
    }
    let resp = gw.send(bearer(&bad).sent_from(attacker));
    assert_problem(&resp, 429, "rate-limited");
    let retry_after: u64 = resp.header("retry-after").expect("429 without Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Not even a good credential is looked at from there, so a flood costs no verification.
    assert_problem(&gw.send(bearer(&sign("RS256", standard())).sent_from(attacker)), 429, "rate-limited");
    let neighbour = std::net::Ipv4Addr::new(127, 0, 0, 8);
    assert_eq!(gw.send(bearer(&sign("RS256", standard())).sent_from(neighbour)).status, 200);
}

#[test]
fn a_token_without_kid_is_tried_against_a_few_keys_at_most() {
    let keys: Vec<ES256KeyPair> = (0..5).map(|_| ES256KeyPair::generate()).collect();
    let jwks: Vec<Value> = keys
        .iter()
        .map(|k| {
            let mut jwk = ec_jwk("ES256", "P-256", k.public_key().public_key().to_bytes_uncompressed());
            jwk.as_object_mut().unwrap().remove("kid");
            jwk
        })
        .collect();
    let token = keys[4].sign(standard()).unwrap();
    for (cap, status) in [(None, 401), (Some(5), 200)] {
        let config = auth_config_with(|auth| {
            auth["jwt"]["providers"][0]["jwks"] = json!({"keys": jwks});
            auth["jwt"]["providers"][0]["secrets"] = json!([]);
            if let Some(cap) = cap {
                auth["jwt"]["max_keys_without_kid"] = json!(cap);
            }
        });
        let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
        let resp = gw.send(bearer(&token));
        assert_eq!(resp.status, status, "cap {cap:?}: {}", resp.text());
        if status == 401 {
            assert!(resp.header("www-authenticate").unwrap().contains("names no key id"), "{:?}", resp.headers);
        }
    }
}

#[test]
fn one_accounts_flood_of_signed_requests_does_not_lock_out_the_others() {
    let config = auth_config_with(|auth| {
        auth["signatures"]["replay_cache_entries"] = json!(2);
        let secret = auth["signatures"]["secrets"][0]["secret"].clone();
        auth["signatures"]["secrets"].as_array_mut().unwrap().push(json!({"account": "globex", "secret": secret}));
        auth["api_keys"]["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": "key-globex", "sha256": sha256("globex-key-123"), "account": "globex"}));
    });
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
    let body = br#"{"amount": 5}"#;
    let ts = now();
    let first = || signed("POST", "/signed/pay/0", ts, body, body);
    assert_eq!(gw.send(first()).status, 200);
    // Far more signatures than a worker remembers: none is refused for want of room.
    for n in 1..8 {
        let resp = gw.send(signed("POST", &format!("/signed/pay/{n}"), ts, body, body));
        assert_eq!(resp.status, 200, "acme's request {n}: {}", resp.text());
    }
    let globex = Request::new("POST", "/signed/pay/g")
        .header("x-api-key", "globex-key-123")
        .header("content-type", "application/json")
        .header("x-timestamp", ts.to_string())
        .header("x-signature", signature("POST", "/signed/pay/g", ts, body))
        .header("content-digest", content_digest(body))
        .body(body.to_vec());
    assert_eq!(gw.send(globex).status, 200, "another account's signed request");
    // What a worker forgot, the process-wide record still refuses.
    for _ in 0..4 {
        assert_problem(&gw.send(first()), 401, "invalid-credentials");
    }
}

#[test]
fn a_token_and_an_api_key_naming_the_same_account_are_billed_apart_by_default() {
    let config = auth_config_with(|auth| {
        auth["jwt"]["providers"][0].as_object_mut().unwrap().remove("account_prefix");
    });
    let gw = Gateway::start(GatewayOptions { plugin_config: Some(config), ..GatewayOptions::default() });
    let accounts: Vec<String> =
        [bearer(&sign("ES256", standard())), Request::get("/api/items").header("x-api-key", "pro-key-123")]
            .into_iter()
            .map(|request| {
                gw.upstream().clear();
                assert_eq!(gw.send(request).status, 200);
                upstream_saw(&gw).header("x-tollgate-account").unwrap().to_owned()
            })
            .collect();
    assert_eq!(accounts, ["issuer.test:acme", "acme"], "the token's `acme` is its issuer's, not the key's");
}

#[test]
fn a_refused_token_sent_again_is_refused_without_another_signature_check() {
    let gw = gateway();
    let mut bad = sign("RS256", standard());
    bad.replace_range(bad.len() - 6.., "AAAAAA");
    // Two workers, each with its own memory: of four sends, one worker sees the token twice.
    for _ in 0..4 {
        assert_problem(&gw.send(bearer(&bad)), 401, "invalid-credentials");
    }
    let remembered = gw.metric("tollgate_auth_refusals_remembered");
    assert!((2..=3).contains(&remembered), "{remembered} of 4 refused from memory");
    assert_eq!(gw.send(bearer(&sign("RS256", standard()))).status, 200, "a good token is still checked");
}
