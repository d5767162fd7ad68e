//! tollgate: an API gateway filter for Envoy. This file is the table of contents of the request
//! pipeline, in the order of DESIGN.md: a stream is one `Phase` at a time, and each hook below is a
//! transition that says what the proxy must do next. The steps live in `request` (headers: steps
//! 1-6), `body` (the body limit and the signature over the body) and `response` (step 7 and
//! settling the bill); `wasm/` is the only code that talks to proxy-wasm, `native/` the only code
//! that talks to Envoy's dynamic-module ABI.

pub mod auth;
pub mod checks;
pub mod common;
pub mod config;
pub mod credits;
pub mod grants;
pub mod grpc;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod problem;
pub mod ratelimit;
pub mod refresh;
pub mod replay;
pub mod routes;
pub mod settle;
pub mod slots;
pub mod worker;

mod body;
#[cfg(any(feature = "native", test))]
mod native;
#[cfg(test)]
mod properties;
mod request;
mod response;
#[cfg(target_arch = "wasm32")]
mod wasm;

use std::rc::Rc;

use auth::BodyCheck;
use config::Config;
use credits::{FailurePolicy, Reservation, Settlement};
use host::{Callout, StreamHost};
use metrics::Metric;
use problem::Denial;
use ratelimit::Quota;
use routes::Policy;
use worker::Worker;

/// What the proxy should do with the request or response after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the request (and buffer its body): the filter answered it, or waits for something.
    Pause,
}

/// Where one request stands. Envoy holds the whole request (headers and body) in the `Await`
/// phases and the body in `VerifyBody`; the request goes on only from a phase with nothing
/// pending.
#[derive(Debug)]
enum Phase {
    /// The request headers have not been seen.
    Start,
    /// Held for a JWKS refetch (an unknown `kid`); authentication runs again, once, on its answer.
    AwaitKeys { token: u32, provider: usize },
    /// Held for the credit service's answer to a reservation.
    AwaitReservation(PendingReservation),
    /// Admitted; the head has gone on, and the body's end is held until the body passes its
    /// check (the signed `Content-Digest`, or the signature over the body, which holds all of
    /// it). Envoy hands a wasm filter no body while it holds the headers.
    VerifyBody,
    /// Gone on to the upstream.
    Forwarded,
    /// Answered by the filter itself.
    Answered,
}

/// A reservation sent and not yet answered.
#[derive(Debug)]
struct PendingReservation {
    token: u32,
    /// The call as sent: sending it again returns the same reservation (its key is idempotent),
    /// which is how a reservation whose answer never came is found and released.
    call: Callout,
    amount: u64,
    /// When it was sent (nanoseconds), for the latency histogram.
    sent: u64,
    on_failure: FailurePolicy,
}

/// What a header-time step leads to.
enum Step {
    /// Held: the phase says for what.
    Wait(Phase),
    /// Let on what Envoy holds (the head, a chunk) and stay in this phase: the body's end is still
    /// to be checked.
    Stream(Phase),
    /// Every check passed.
    Admitted,
}

/// Where a billed request stands with the credit service.
enum Billing {
    /// Not billed, or already settled.
    None,
    /// Paid from its account's grant, in flight until the response.
    Granted(grants::Spend),
    Reserved(Reservation),
    /// The credit service could not answer and the policy lets the request through unbilled.
    Unbilled,
}

/// One request's way through the filter.
pub struct Stream {
    config: Rc<Config>,
    worker: Rc<Worker>,
    phase: Phase,
    /// The request headers, read once when they arrive.
    request: Vec<(String, String)>,
    request_id: String,
    https: bool,
    policy: Option<Rc<Policy>>,
    body: body::Body,
    /// What a signed request's body must pass, checked as it arrives. Boxed: the hash state is
    /// large and most streams never sign.
    body_check: Option<Box<BodyCheck>>,
    billing: Billing,
    /// The rate-limit window the response reports, and when (Unix seconds) it was counted.
    quota: Option<(Quota, u64)>,
    /// `Some` for a gRPC call: refused in gRPC's terms, billed on its `grpc-status`.
    grpc: Option<grpc::Call>,
}

impl Stream {
    pub fn new(config: Rc<Config>, worker: Rc<Worker>) -> Stream {
        Stream {
            config,
            worker,
            phase: Phase::Start,
            request: Vec::new(),
            request_id: String::new(),
            https: false,
            policy: None,
            body: body::Body::default(),
            body_check: None,
            billing: Billing::None,
            quota: None,
            grpc: None,
        }
    }

    /// Steps 1-6: route policy, request checks, identity headers, authentication, rate limiting,
    /// credits.
    pub fn on_request_headers(&mut self, host: &mut dyn StreamHost, end_of_stream: bool) -> Flow {
        let step = request::headers(self, host, end_of_stream);
        self.advance(host, step)
    }

    /// The answer to a callout this stream made (`None`: none came, e.g. a timeout).
    pub fn on_http_call_response(&mut self, host: &mut dyn StreamHost, token: u32, answer: Option<(u16, Vec<u8>)>) {
        let step = match std::mem::replace(&mut self.phase, Phase::Start) {
            Phase::AwaitKeys { token: expected, provider } if expected == token => {
                request::keys_fetched(self, host, provider, answer)
            }
            Phase::AwaitReservation(pending) if pending.token == token => {
                request::reservation_answered(self, host, pending, answer)
            }
            other => {
                self.phase = other;
                return;
            }
        };
        if self.advance(host, step) == Flow::Continue {
            host.resume_request();
        }
    }

    /// Counts a body chunk against the limit, and feeds a pending signature.
    pub fn on_request_body(&mut self, host: &mut dyn StreamHost, body_size: usize, end_of_stream: bool) -> Flow {
        let step = body::arrived(self, host, body_size, end_of_stream);
        self.advance(host, step)
    }

    /// With trailers the body callback never says `end_of_stream`: the body is complete here.
    /// Trailers can forge identity headers as well as headers can.
    pub fn on_request_trailers(&mut self, host: &mut dyn StreamHost) -> Flow {
        let trailers = host.request_trailers();
        let stripped = headers::strip_identity(&trailers, &self.config.identity_headers.strip, |name| {
            host.remove_request_trailer(name)
        });
        let step = match stripped {
            Ok(()) => body::arrived(self, host, self.body.held(), true),
            Err(err) => Err(err.into()),
        };
        self.advance(host, step)
    }

    /// Step 7: security, rate-limit and billing headers; the bill is settled on the status, or,
    /// for a gRPC call that has not ended yet, on its trailers.
    pub fn on_response_headers(&mut self, host: &mut dyn StreamHost) -> Flow {
        response::headers(self, host);
        Flow::Continue
    }

    /// A gRPC call's outcome, `grpc-status`, comes in the response trailers.
    pub fn on_response_trailers(&mut self, host: &mut dyn StreamHost) -> Flow {
        response::trailers(self, host);
        Flow::Continue
    }

    /// The stream has ended, whether answered, reset or abandoned by the client: whatever is
    /// still held at the credit service is given back.
    pub fn on_done(&mut self, host: &mut dyn StreamHost) {
        if let Phase::AwaitReservation(pending) = std::mem::replace(&mut self.phase, Phase::Answered) {
            self.reclaim(host, pending.call);
        }
        self.settle(host, None);
    }

    /// The one place a stream changes phase after a step, and the only one that lets a request go
    /// on: from a phase with nothing pending, once every check has passed.
    fn advance(&mut self, host: &mut dyn StreamHost, step: Result<Step, Denial>) -> Flow {
        let step = match step {
            Ok(Step::Admitted) => self.verify_body(host),
            other => other,
        };
        match step {
            Ok(Step::Wait(phase)) => {
                self.phase = phase;
                Flow::Pause
            }
            Ok(Step::Stream(phase)) => {
                self.phase = phase;
                self.body.went_on();
                Flow::Continue
            }
            Ok(Step::Admitted) => {
                if !matches!(self.phase, Phase::Forwarded) {
                    self.phase = Phase::Forwarded;
                    host.count(Metric::Allowed, 1);
                }
                self.body.went_on();
                Flow::Continue
            }
            Err(denial) => {
                self.answer(host, &denial);
                Flow::Pause
            }
        }
    }

    /// An admitted request whose body has a check to pass goes on only once it passed: the head
    /// first, then the body, its end held until the check is done.
    fn verify_body(&mut self, host: &mut dyn StreamHost) -> Result<Step, Denial> {
        let Some(check) = &self.body_check else { return Ok(Step::Admitted) };
        if self.body.is_complete() {
            body::finish_check(self, host)?;
            return Ok(Step::Admitted);
        }
        // A host that handed over body bytes while holding the headers would pass them on with
        // the head: a check that holds the whole body keeps holding them.
        if check.streams() || self.body.held() == 0 {
            Ok(Step::Stream(Phase::VerifyBody))
        } else {
            Ok(Step::Wait(Phase::VerifyBody))
        }
    }

    /// Answers the request with `denial`, once, and gives back what it held.
    fn answer(&mut self, host: &mut dyn StreamHost, denial: &Denial) {
        match std::mem::replace(&mut self.phase, Phase::Answered) {
            Phase::Answered => return,
            Phase::AwaitReservation(pending) => self.reclaim(host, pending.call),
            _ => {}
        }
        self.body_check = None;
        self.settle(host, None);
        let policy = self.policy.as_ref().map_or("", |p| p.name.as_str());
        let wire = self.grpc.as_ref().map(|call| call.wire);
        respond(host, denial, &self.request_id, policy, Some(&self.config), self.https, wire);
    }

    /// A reservation whose answer this stream will not wait for: the root context asks for it
    /// again by its key and releases it, so no hold is left until the service's expiry.
    fn reclaim(&mut self, host: &mut dyn StreamHost, reserve: Callout) {
        self.queue_settlement(host, Settlement::Reclaim { reserve });
    }

    /// Commits `charge`, or releases when `None`; once per stream. Answers what the client is told
    /// is left of a grant's view of the balance.
    fn settle(&mut self, host: &mut dyn StreamHost, charge: Option<u64>) -> Option<u64> {
        let reservation = match std::mem::replace(&mut self.billing, Billing::None) {
            Billing::Reserved(reservation) => reservation,
            Billing::Granted(spend) => {
                let grants = self.worker.grants.as_ref()?.try_borrow().ok()?;
                let policy = self.policy.as_ref().map_or("", |p| p.name.as_str());
                return Some(grants.spend(host, &spend, policy, charge));
            }
            Billing::None | Billing::Unbilled => return None,
        };
        let settlement = match charge {
            Some(amount) => Settlement::Commit { reservation_id: reservation.id, amount },
            None => Settlement::Release { reservation_id: reservation.id },
        };
        self.queue_settlement(host, settlement);
        None
    }

    /// The root context sends settlements, so that their answers, and any retry, do not depend on
    /// this stream still being there.
    fn queue_settlement(&mut self, host: &mut dyn StreamHost, settlement: Settlement) {
        match self.worker.settler.try_borrow_mut() {
            Ok(mut settler) => settler.queue(host, settlement),
            Err(_) => log::error!("tollgate: {settlement} dropped: settler busy"),
        }
        host.wake_root();
    }
}

/// Answers a request that reached a VM whose configuration never loaded. Envoy does not create
/// streams for such a plugin; this is the fail-closed answer should one appear anyway.
pub fn refuse_unconfigured(host: &mut dyn StreamHost) -> Flow {
    respond(host, &Denial::Unconfigured, "", "", None, false, None);
    Flow::Pause
}

fn respond(
    host: &mut dyn StreamHost,
    denial: &Denial,
    request_id: &str,
    policy: &str,
    config: Option<&Config>,
    https: bool,
    grpc: Option<grpc::Wire>,
) {
    let kind = denial.problem_type();
    host.count(Metric::denied(kind.status), 1);
    // One logfmt line per denial: what and where, never a header value, a credential or a path
    // (a query may carry a token).
    log::info!(
        "denied status={} type={} policy={:?} request_id={:?} detail={:?}",
        kind.status,
        kind.slug,
        policy,
        request_id,
        log_detail(denial)
    );
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(config) = config {
        // An error is never cacheable, whatever the route allows for its successes.
        headers.extend(headers::security(&config.security_headers, Some("no-store"), https));
    }
    let challenge = denial.www_authenticate();
    if let Some(challenge) = &challenge {
        headers.push(("www-authenticate", challenge));
    }
    let limits = denial.rate_limit_headers(host.now());
    headers.extend(limits.iter().map(|(name, value)| (*name, value.as_str())));
    match grpc {
        Some(wire) => grpc::refuse(host, wire, grpc::Code::of(kind.status), denial, request_id, headers),
        None => {
            headers.push(("content-type", "application/problem+json"));
            host.send_response(kind.status, &headers, &problem::body(denial, request_id));
        }
    }
}

/// The log may say more than the client is told, never a credential.
fn log_detail(denial: &Denial) -> String {
    match denial {
        Denial::UnknownRoutePolicy { name } => format!("route metadata names unknown policy {name:?}"),
        Denial::Host(err) => err.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::BodyCounter;
    use crate::host::fake::FakeHost;

    const CONFIG: &str = r#"{
        "policies": {
            "public": {"access": "public", "max_body_bytes": 8},
            "api": {"access": "authenticated"},
            "cached": {"access": "public", "cache_control": "public, max-age=60"},
            "closed": {"access": "deny"}
        },
        "routes": [
            {"prefix": "/health", "policy": "public"},
            {"prefix": "/api", "policy": "api"},
            {"prefix": "/static", "policy": "cached"}
        ]
    }"#;

    const NOW: u64 = crate::host::fake::NOW;

    fn run(host: &mut FakeHost) -> (Stream, Flow) {
        run_with(CONFIG, host, true)
    }

    fn run_with(config: &str, host: &mut FakeHost, end_of_stream: bool) -> (Stream, Flow) {
        let config = Rc::new(Config::from_json(config.as_bytes()).unwrap());
        let worker = Rc::new(Worker::new(&config, host));
        let mut stream = Stream::new(config, worker);
        let flow = stream.on_request_headers(host, end_of_stream);
        (stream, flow)
    }

    #[test]
    #[allow(clippy::type_complexity, reason = "a table of requests reads best inline")]
    fn denials_by_request() {
        let cases: &[(&str, &str, &[(&str, &str)], u16, &str)] = &[
            ("GET", "/health/../api", &[], 400, "invalid-path"),
            ("POST", "/health", &[("content-length", "9")], 413, "payload-too-large"),
            ("POST", "/health", &[("content-type", "text/xml")], 415, "unsupported-media-type"),
            ("GET", "/api/items", &[], 401, "unauthenticated"),
            ("GET", "/nowhere", &[], 404, "not-found"),
        ];
        for (method, path, extra, status, slug) in cases {
            let mut host = FakeHost::request(method, path, extra);
            let (_, flow) = run(&mut host);
            assert_eq!(flow, Flow::Pause, "{method} {path}");
            let (got, _, body) = host.sent.as_ref().unwrap();
            assert_eq!(
                (*got, body["type"].as_str().unwrap()),
                (*status, format!("urn:tollgate:problem:{slug}").as_str())
            );
            assert_eq!(body["request_id"], "rid-1");
            assert_eq!(host.sent_header("content-type"), Some("application/problem+json"));
            assert_eq!(host.sent_header("x-frame-options"), Some("DENY"));
            assert_eq!(host.sent_header("cache-control"), Some("no-store"));
            assert_eq!((host.metric(Metric::denied(*status)), host.metric(Metric::Allowed)), (1, 0));
        }
    }

    #[test]
    fn unauthenticated_carries_www_authenticate() {
        let mut host = FakeHost::request("GET", "/api/items", &[]);
        run(&mut host);
        assert_eq!(host.sent_header("www-authenticate"), Some("Bearer realm=\"tollgate\""));
    }

    #[test]
    fn a_public_request_passes_with_identity_headers_removed() {
        let mut host = FakeHost::request("GET", "/health", &[("x-tollgate-account", "acme"), ("x-other", "1")]);
        let (_, flow) = run(&mut host);
        assert_eq!(flow, Flow::Continue);
        assert!(host.sent.is_none());
        assert_eq!(host.removed, ["x-tollgate-account"]);
        assert_eq!(host.metric(Metric::Allowed), 1);
    }

    #[test]
    fn a_streamed_body_is_stopped_at_the_limit() {
        let mut host = FakeHost::request("POST", "/health", &[("transfer-encoding", "chunked")]);
        let (mut stream, flow) = run_with(CONFIG, &mut host, false);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 5, false), Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 4, true), Flow::Pause);
        assert_eq!(host.sent.as_ref().unwrap().0, 413);
    }

    #[test]
    fn route_metadata_wins_over_the_prefix_table() {
        let mut host = FakeHost::request("GET", "/health", &[]);
        host.properties.insert(request::ROUTE_POLICY_PROPERTY.join("."), b"closed".to_vec());
        run(&mut host);
        assert_eq!(host.sent.as_ref().unwrap().0, 404);

        let mut host = FakeHost::request("GET", "/health", &[]);
        host.properties.insert(request::ROUTE_POLICY_PROPERTY.join("."), b"missing".to_vec());
        run(&mut host);
        assert_eq!(host.sent.as_ref().unwrap().0, 500);
    }

    #[test]
    fn responses_get_security_headers_and_lose_server() {
        let mut host = FakeHost::request("GET", "/static/app.js", &[("x-forwarded-proto", "https")]);
        let (mut stream, _) = run(&mut host);
        host.response =
            vec![("server".to_owned(), "gunicorn".to_owned()), ("x-frame-options".to_owned(), "ALLOW".to_owned())];
        stream.on_response_headers(&mut host);
        let get = |name: &str| host.response.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("server"), None);
        assert_eq!(get("x-frame-options"), Some("DENY"));
        assert_eq!(get("x-content-type-options"), Some("nosniff"));
        assert_eq!(get("cache-control"), Some("public, max-age=60"));
        assert_eq!(get("strict-transport-security"), Some("max-age=31536000; includeSubDomains"));
    }

    #[test]
    fn no_hsts_over_plain_http() {
        let mut host = FakeHost::request("GET", "/health", &[]);
        let (mut stream, _) = run(&mut host);
        stream.on_response_headers(&mut host);
        assert!(host.response.iter().all(|(n, _)| n != "strict-transport-security"));
        assert!(host.response.iter().any(|(n, v)| n == "cache-control" && v == "no-store"));
    }

    fn sha256_hex(key: &str) -> String {
        hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn auth_config() -> String {
        auth_config_with("body")
    }

    fn auth_config_with(scheme: &str) -> String {
        format!(
            r#"{{
            "policies": {{
                "api": {{"access": "authenticated"}},
                "admin": {{"access": "authenticated", "scopes": ["admin"]}},
                "signed": {{"access": "authenticated", "signature": true}}
            }},
            "routes": [
                {{"prefix": "/api", "policy": "api"}},
                {{"prefix": "/admin", "policy": "admin"}},
                {{"prefix": "/signed", "policy": "signed"}}
            ],
            "auth": {{
                "api_keys": {{"keys": [
                    {{"id": "k1", "sha256": "{}", "account": "acme", "tier": "pro", "scopes": ["read", "write"]}}
                ]}},
                "signatures": {{"scheme": "{scheme}", "secrets": [{{"account": "acme", "secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}}]}}
            }}
        }}"#,
            sha256_hex("key-one"),
            scheme = scheme
        )
    }

    #[test]
    fn an_api_key_caller_reaches_the_upstream_as_its_identity_without_the_key() {
        let mut host = FakeHost::request("GET", "/api/items", &[("x-api-key", "key-one"), ("x-tollgate-tier", "free")]);
        let (_, flow) = run_with(&auth_config(), &mut host, true);
        assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
        assert_eq!(host.upstream_header("x-tollgate-account"), Some("acme"));
        assert_eq!(host.upstream_header("x-tollgate-tier"), Some("pro"));
        assert_eq!(host.upstream_header("x-tollgate-auth-method"), Some("api_key"));
        assert_eq!(host.upstream_header("x-tollgate-key-id"), Some("k1"));
        assert_eq!(host.upstream_header("x-tollgate-scopes"), Some("read write"));
        assert_eq!(host.upstream_header("x-api-key"), None);
    }

    #[test]
    #[allow(clippy::type_complexity, reason = "a table of requests reads best inline")]
    fn auth_failures_map_to_401_and_403() {
        let cases: [(&str, &[(&str, &str)], u16, &str); 4] = [
            ("/api/items", &[("x-api-key", "wrong")], 401, "invalid-credentials"),
            (
                "/api/items",
                &[("x-api-key", "key-one"), ("authorization", "ApiKey key-one")],
                401,
                "invalid-credentials",
            ),
            ("/admin/users", &[("x-api-key", "key-one")], 403, "insufficient-scope"),
            ("/api/items", &[], 401, "unauthenticated"),
        ];
        for (path, extra, status, slug) in cases {
            let mut host = FakeHost::request("GET", path, extra);
            run_with(&auth_config(), &mut host, true);
            let (got, _, body) = host.sent.as_ref().unwrap();
            assert_eq!(
                (*got, body["type"].as_str().unwrap()),
                (status, format!("urn:tollgate:problem:{slug}").as_str())
            );
            assert!(host.sent_header("www-authenticate").unwrap().starts_with("Bearer realm=\"tollgate\""));
            assert!(!body.to_string().contains("key-one"), "the key leaked: {body}");
        }
    }

    /// Requests from `address` one after the other through one worker, as a proxy's shared data
    /// keeps them: each answer's status.
    fn statuses_from(config: &str, requests: &[(&str, &str)]) -> Vec<u16> {
        let config = Rc::new(Config::from_json(config.as_bytes()).unwrap());
        let mut shared = FakeHost::default();
        let worker = Rc::new(Worker::new(&config, &mut shared));
        let mut statuses = Vec::new();
        for (address, key) in requests {
            let mut host = FakeHost::request("GET", "/api/items", &[("x-api-key", key)]);
            host.shared = std::mem::take(&mut shared.shared);
            host.properties.insert("source.address".to_owned(), address.as_bytes().to_vec());
            let mut stream = Stream::new(Rc::clone(&config), Rc::clone(&worker));
            stream.on_request_headers(&mut host, true);
            statuses.push(host.sent.as_ref().map_or(200, |s| s.0));
            if host.sent.as_ref().is_some_and(|s| s.0 == 429) {
                assert!(host.sent_header("retry-after").is_some(), "a 429 says when to come back");
            }
            shared.shared = host.shared;
        }
        statuses
    }

    #[test]
    fn an_address_that_keeps_failing_is_refused_before_its_credentials_are_checked() {
        let config = auth_config().replace(r#""auth": {"#, r#""auth": {"failures": {"per_minute": 2},"#);
        let (a, b) = ("10.0.0.1:5000", "10.0.0.2:5000");
        let statuses =
            statuses_from(&config, &[(a, "wrong"), (a, "wrong"), (a, "key-one"), (a, "wrong"), (b, "key-one")]);
        // A key costs a hash, so a good one still passes; a wrong one is 429 from there.
        assert_eq!(statuses, [401, 401, 200, 429, 200], "failures wait; another address does not");

        let successes = statuses_from(&config, &[(a, "key-one"), (a, "key-one"), (a, "key-one"), (a, "wrong")]);
        assert_eq!(successes, [200, 200, 200, 401], "only failures are counted");

        let off = auth_config().replace(r#""auth": {"#, r#""auth": {"failures": null,"#);
        assert_eq!(statuses_from(&off, &[(a, "wrong"); 40]), [401; 40]);
        assert_eq!(statuses_from(&auth_config(), &[(a, "wrong"); 31])[30], 429, "on by default: 30 a minute");
    }

    fn signed(method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
        let secret = b"signing-secret-of-at-least-32-bytes";
        let mut mac = hmac_sha256::HMAC::new(secret);
        for part in [method.as_bytes(), path.as_bytes(), timestamp.to_string().as_bytes()] {
            mac.update(part);
            mac.update(b":");
        }
        mac.update(body);
        mac.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_signed_request_is_held_until_its_body_verifies() {
        let body = br#"{"amount": 5}"#;
        for (tampered, want) in [(false, Flow::Continue), (true, Flow::Pause)] {
            let signature = signed("POST", "/signed/pay", body, NOW);
            let ts = NOW.to_string();
            let mut host = FakeHost::request(
                "POST",
                "/signed/pay",
                &[("x-api-key", "key-one"), ("x-signature", &signature), ("x-timestamp", &ts)],
            );
            let (mut stream, flow) = run_with(&auth_config(), &mut host, false);
            assert_eq!(flow, Flow::Continue, "the head goes on; the body is held until it verifies");
            host.body = body[..6].to_vec();
            assert_eq!(stream.on_request_body(&mut host, 6, false), Flow::Pause);
            host.body = body.to_vec();
            if tampered {
                host.body[11] = b'9';
            }
            assert_eq!(stream.on_request_body(&mut host, body.len(), true), want, "tampered: {tampered}");
            assert_eq!(host.metric(Metric::Allowed), u64::from(!tampered), "counted once, when the body verified");
            assert_eq!(host.sent.as_ref().map(|s| s.0), if tampered { Some(401) } else { None });
        }
    }

    fn billed_config(on_failure: &str) -> String {
        format!(
            r#"{{
            "policies": {{"api": {{"access": "authenticated",
                "credits": {{"cost": 5, "multiplier_header": "x-units", "on_failure": "{on_failure}",
                    "mode": "per_request"}}}}}},
            "routes": [{{"prefix": "/api", "policy": "api"}}],
            "credits": {{"cluster": "credits", "service_token": "s3cret", "actual_cost_header": "x-cost"}},
            "auth": {{"api_keys": {{"keys": [{{"id": "k1", "sha256": "{}", "account": "acme"}}]}}}}
        }}"#,
            sha256_hex("key-one")
        )
    }

    fn billed(on_failure: &str, extra: &[(&str, &str)]) -> (Stream, FakeHost, Flow) {
        let mut headers = vec![("x-api-key", "key-one")];
        headers.extend_from_slice(extra);
        let mut host = FakeHost::request("GET", "/api/items", &headers);
        let (stream, flow) = run_with(&billed_config(on_failure), &mut host, true);
        (stream, host, flow)
    }

    fn answer(status: u16, body: &str) -> Option<(u16, Vec<u8>)> {
        Some((status, body.as_bytes().to_vec()))
    }

    /// What the worker's root context sends once the stream has woken it: the settlement calls.
    fn settlements(stream: &Stream, host: &mut FakeHost) -> Vec<host::Callout> {
        settlements_all(stream, host).into_iter().filter(|c| c.path != "/v1/reservations").collect()
    }

    /// Every callout made, the stream's and then its root context's.
    fn settlements_all(stream: &Stream, host: &mut FakeHost) -> Vec<host::Callout> {
        let credits = stream.config.credits.as_ref().unwrap();
        stream.worker.settler.borrow_mut().send_due(host, credits);
        host.sent_calls.clone()
    }

    #[test]
    fn a_request_the_grant_pays_goes_on_at_once_and_is_spent_on_its_response() {
        let config = billed_config("deny").replace(r#""mode": "per_request""#, r#""mode": "grant""#);
        let mut host = FakeHost::request("GET", "/api/items", &[("x-api-key", "key-one")]);
        let (mut first, flow) = run_with(&config, &mut host, true);
        assert_eq!(flow, Flow::Pause, "no grant yet: the first request reserves");
        assert_eq!(host.sent_calls[0].path, "/v1/reservations");
        first.on_done(&mut host);
        // The root context asks for the grant at once; the service grants 100.
        let worker = Rc::clone(&first.worker);
        worker.flush_grants(&mut host, &first.config);
        let report = host.sent_calls.last().unwrap().clone();
        assert_eq!(report.path, "/v1/grants");
        let token = u32::try_from(host.sent_calls.len()).unwrap();
        worker.grant_answer(
            &mut host,
            token,
            answer(
                200,
                r#"{"results": [{"status": 200, "body": {"grant_id": "gr_1",
            "granted_total": 100, "used_total": 0, "lifetime_seconds": 60, "final": false, "balance": 500}}]}"#,
            ),
        );

        let calls = host.sent_calls.len();
        let mut stream = Stream::new(Rc::clone(&first.config), Rc::clone(&worker));
        // The first stream removed the key it used.
        host.request = FakeHost::request("GET", "/api/items", &[("x-api-key", "key-one")]).request;
        assert_eq!(stream.on_request_headers(&mut host, true), Flow::Continue, "paid from the grant");
        host.response = vec![(":status".into(), "200".into()), ("x-cost".into(), "4".into())];
        stream.on_response_headers(&mut host);
        let header = |name: &str| host.response.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-credits-charged").as_deref(), Some("4"));
        assert_eq!(header("x-credits-remaining").as_deref(), Some("496"));
        stream.on_done(&mut host);
        assert_eq!(host.sent_calls.len(), calls, "no callout for a request the grant paid");
    }

    #[test]
    fn a_billed_request_waits_for_its_reservation_then_commits_what_the_upstream_reports() {
        let (mut stream, mut host, flow) = billed("deny", &[("x-units", "3")]);
        assert_eq!(flow, Flow::Pause, "held until the credit service answers");
        assert_eq!(host.calls, ["credits/v1/reservations"]);
        stream.on_http_call_response(&mut host, 1, answer(201, r#"{"reservation_id": "res_9", "balance": 85}"#));
        assert!(host.resumed);
        assert_eq!(host.metric(Metric::Allowed), 1);

        host.response = vec![(":status".into(), "200".into()), ("x-cost".into(), "4".into())];
        stream.on_response_headers(&mut host);
        let header = |name: &str| host.response.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-credits-charged").as_deref(), Some("4"));
        assert_eq!(header("x-credits-remaining").as_deref(), Some("96"), "85 left after holding 15, 11 returned");
        assert_eq!(header("x-cost"), None, "the upstream's report stays inside");
        assert_eq!(host.root_woken, 1);
        let sent = settlements(&stream, &mut host);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].path, "/v1/reservations/res_9/commit");
        assert_eq!(sent[0].body, br#"{"amount":4}"#);
        stream.on_done(&mut host);
        assert_eq!(settlements(&stream, &mut host).len(), 1, "settled once");
    }

    #[test]
    fn a_short_balance_is_402_with_what_was_needed_and_nothing_goes_upstream() {
        let (mut stream, mut host, _) = billed("deny", &[]);
        stream.on_http_call_response(&mut host, 1, answer(402, r#"{"balance": 2, "required": 5}"#));
        assert!(!host.resumed);
        let (status, _, body) = host.sent.as_ref().unwrap();
        assert_eq!((*status, &body["required"], &body["balance"]), (402, &5.into(), &2.into()));
        assert_eq!(body["type"], "urn:tollgate:problem:insufficient-credits");
    }

    #[test]
    fn an_unanswered_reservation_follows_the_failure_policy() {
        let (mut stream, mut host, _) = billed("deny", &[]);
        stream.on_http_call_response(&mut host, 1, None);
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(503));

        let (mut stream, mut host, _) = billed("allow", &[]);
        stream.on_http_call_response(&mut host, 1, answer(500, "{}"));
        assert!(host.resumed && host.sent.is_none());
        host.response = vec![(":status".into(), "200".into())];
        stream.on_response_headers(&mut host);
        assert!(host.response.contains(&("x-credits-charged".into(), "0".into())));
        assert!(settlements(&stream, &mut host).is_empty(), "nothing to settle");
    }

    #[test]
    fn anything_but_a_2xx_releases_and_so_does_a_stream_that_ends_unanswered() {
        let (mut stream, mut host, _) = billed("deny", &[]);
        stream.on_http_call_response(&mut host, 1, answer(201, r#"{"reservation_id": "res_1", "balance": 0}"#));
        host.response = vec![(":status".into(), "503".into())];
        stream.on_response_headers(&mut host);
        assert_eq!(settlements(&stream, &mut host)[0].path, "/v1/reservations/res_1/release");
        assert!(host.response.contains(&("x-credits-charged".into(), "0".into())));

        let (mut stream, mut host, _) = billed("deny", &[]);
        stream.on_http_call_response(&mut host, 1, answer(201, r#"{"reservation_id": "res_2", "balance": 0}"#));
        stream.on_done(&mut host);
        assert_eq!(settlements(&stream, &mut host)[0].path, "/v1/reservations/res_2/release");
    }

    #[test]
    fn a_bad_multiplier_is_400_before_any_callout() {
        let (_, host, _) = billed("deny", &[("x-units", "1000")]);
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(400));
        assert!(host.calls.is_empty());
    }

    /// Signed and billed, with a body limit: where the three bugs of the flag-based pipeline met.
    fn signed_billed_config() -> String {
        let scheme = "body";
        format!(
            r#"{{
            "policies": {{"pay": {{"access": "authenticated", "signature": true, "max_body_bytes": 1000,
                "credits": {{"cost": 5}}}}}},
            "routes": [{{"prefix": "/signed", "policy": "pay"}}],
            "credits": {{"cluster": "credits", "service_token": "s3cret"}},
            "auth": {{
                "api_keys": {{"keys": [{{"id": "k1", "sha256": "{}", "account": "acme"}}]}},
                "signatures": {{"scheme": "{scheme}", "secrets": [{{"account": "acme", "secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}}]}}
            }}
        }}"#,
            sha256_hex("key-one"),
            scheme = scheme
        )
    }

    fn signed_billed(signature: &str) -> (Stream, FakeHost) {
        let ts = NOW.to_string();
        let mut host = FakeHost::request(
            "POST",
            "/signed/pay",
            &[("x-api-key", "key-one"), ("x-signature", signature), ("x-timestamp", &ts)],
        );
        let (stream, flow) = run_with(&signed_billed_config(), &mut host, false);
        assert_eq!(flow, Flow::Pause, "held for the reservation");
        assert!(matches!(stream.phase, Phase::AwaitReservation(_)));
        (stream, host)
    }

    const GRANTED: &str = r#"{"reservation_id": "res_1", "balance": 10}"#;

    #[test]
    fn a_body_that_arrives_during_the_reservation_is_verified_before_anything_goes_on() {
        let body = br#"{"amount": 5}"#;
        let (mut stream, mut host) = signed_billed(&"0".repeat(64));
        host.body = body.to_vec();
        assert_eq!(stream.on_request_body(&mut host, body.len(), true), Flow::Pause);
        stream.on_http_call_response(&mut host, 1, answer(201, GRANTED));
        assert!(!host.resumed, "a bogus signature must not go upstream");
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(401));
        assert_eq!(settlements(&stream, &mut host)[0].path, "/v1/reservations/res_1/release");

        let (mut stream, mut host) = signed_billed(&signed("POST", "/signed/pay", body, NOW));
        host.body = body.to_vec();
        stream.on_request_body(&mut host, body.len(), true);
        stream.on_http_call_response(&mut host, 1, answer(201, GRANTED));
        assert!(host.resumed && host.sent.is_none(), "{:?}", host.sent);
        assert!(matches!(stream.phase, Phase::Forwarded));
        assert_eq!(host.metric(Metric::Allowed), 1);
    }

    #[test]
    fn a_body_split_around_the_reservation_is_verified_whole() {
        let body = br#"{"amount": 5, "to": "bob"}"#;
        let (mut stream, mut host) = signed_billed(&signed("POST", "/signed/pay", body, NOW));
        host.body = body[..9].to_vec();
        assert_eq!(stream.on_request_body(&mut host, 9, false), Flow::Pause);
        stream.on_http_call_response(&mut host, 1, answer(201, GRANTED));
        assert!(!host.resumed, "body bytes already held stay held until the body verifies");
        assert!(matches!(stream.phase, Phase::VerifyBody));
        assert_eq!(host.metric(Metric::Allowed), 0, "not before the body verifies");
        host.body = body.to_vec();
        assert_eq!(stream.on_request_body(&mut host, body.len(), true), Flow::Continue);
        assert!(host.sent.is_none(), "{:?}", host.sent);
    }

    #[test]
    fn the_body_limit_counts_every_chunk_after_a_callout_resumed_the_request() {
        let (mut stream, mut host, flow) = billed("deny", &[]);
        assert_eq!(flow, Flow::Pause);
        stream.body.start(false);
        stream.body.limit(BodyCounter::new(1000), None).unwrap();
        assert_eq!(stream.on_request_body(&mut host, 600, false), Flow::Pause);
        stream.on_http_call_response(&mut host, 1, answer(201, GRANTED));
        assert!(host.resumed);
        // Envoy passed the 600 held bytes on; the next callback reports only the new chunk.
        assert_eq!(stream.on_request_body(&mut host, 600, false), Flow::Pause);
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(413));
    }

    #[test]
    fn a_reservation_left_unanswered_is_reclaimed_by_its_key_then_released() {
        let (mut stream, mut host, _) = billed("deny", &[]);
        stream.on_done(&mut host);
        let sent = settlements_all(&stream, &mut host);
        assert_eq!(sent.len(), 2, "the reservation and its reclaim: {sent:?}");
        assert_eq!(sent[1], host::Callout { timeout_ms: 1000, ..sent[0].clone() }, "the same key, so the same hold");
        let credits = stream.config.credits.as_ref().unwrap();
        let mut settler = stream.worker.settler.borrow_mut();
        settler.on_answer(&mut host, credits, 2, answer(200, GRANTED));
        assert_eq!(host.sent_calls.last().unwrap().path, "/v1/reservations/res_1/release");
    }

    #[test]
    fn a_forged_identity_header_that_cannot_be_removed_denies_the_request() {
        let mut host = FakeHost::request("GET", "/health", &[("x-tollgate-account", "acme")]);
        host.locked.push("x-tollgate-account".to_owned());
        let (stream, flow) = run(&mut host);
        assert_eq!(flow, Flow::Pause);
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(500));
        assert!(matches!(stream.phase, Phase::Answered));
    }

    #[test]
    fn a_request_is_counted_allowed_once_however_many_chunks_its_body_has() {
        let mut host = FakeHost::request("POST", "/health", &[("transfer-encoding", "chunked")]);
        let (mut stream, flow) = run_with(CONFIG, &mut host, false);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 2, false), Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 2, true), Flow::Continue);
        assert_eq!(host.metric(Metric::Allowed), 1);
    }

    #[test]
    fn nothing_goes_on_from_a_phase_with_something_pending() {
        let (mut stream, mut host, _) = billed("deny", &[]);
        assert_eq!(stream.on_request_body(&mut host, 3, true), Flow::Pause, "held for the reservation");
        assert_eq!(stream.on_request_trailers(&mut host), Flow::Pause);
        stream.on_http_call_response(&mut host, 99, answer(201, GRANTED));
        assert!(!host.resumed, "an answer to another callout moves nothing");
        stream.on_http_call_response(&mut host, 1, answer(402, r#"{"balance": 0, "required": 5}"#));
        assert!(matches!(stream.phase, Phase::Answered));
        assert_eq!(stream.on_request_body(&mut host, 10, true), Flow::Pause, "an answered request stays answered");
        assert!(!host.resumed);
    }

    /// A POST to the signed route with the `content-digest` scheme's headers.
    fn digest_request(signature: &str, digest: &str, extra: &[(&str, &str)]) -> FakeHost {
        let ts = NOW.to_string();
        let mut headers = vec![
            ("x-api-key", "key-one"),
            ("x-signature", signature),
            ("x-timestamp", &ts),
            ("content-digest", digest),
        ];
        headers.extend_from_slice(extra);
        FakeHost::request("POST", "/signed/pay", &headers)
    }

    fn digest_header(body: &[u8]) -> String {
        use ct_codecs::{Base64, Encoder};
        format!("sha-256=:{}:", Base64::encode_to_string(hmac_sha256::Hash::hash(body)).unwrap())
    }

    /// The `content-digest` scheme's signature: over `METHOD:path:timestamp:` and the digest.
    fn digest_signed(method: &str, path: &str, digest: &str, timestamp: u64) -> String {
        let b64 = digest.trim_start_matches("sha-256=:").trim_end_matches(':');
        let message = format!("{method}:{path}:{timestamp}:{b64}");
        hmac_sha256::HMAC::mac(message.as_bytes(), b"signing-secret-of-at-least-32-bytes")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_content_digest_signature_is_checked_before_the_head_goes_on() {
        let body = br#"{"amount": 5}"#;
        let digest = digest_header(body);
        let ts = NOW.to_string();
        let cases = [
            (digest_signed("POST", "/signed/pay", &digest, NOW), digest.clone(), Flow::Continue, None),
            ("0".repeat(64), digest.clone(), Flow::Pause, Some(401)),
            (digest_signed("POST", "/signed/other", &digest, NOW), digest.clone(), Flow::Pause, Some(401)),
            (
                digest_signed("POST", "/signed/pay", "sha-256=:AAAA:", NOW),
                "sha-256=:AAAA:".to_owned(),
                Flow::Pause,
                Some(401),
            ),
        ];
        for (signature, digest, flow, status) in cases {
            let mut host = digest_request(&signature, &digest, &[]);
            let (_, got) = run_with(&auth_config_with("content-digest"), &mut host, false);
            assert_eq!((got, host.sent.as_ref().map(|s| s.0)), (flow, status), "{signature} {digest}");
        }

        let mut host = FakeHost::request(
            "POST",
            "/signed/pay",
            &[("x-api-key", "key-one"), ("x-signature", &"0".repeat(64)), ("x-timestamp", &ts)],
        );
        run_with(&auth_config_with("content-digest"), &mut host, false);
        let (_, _, problem) = host.sent.as_ref().unwrap();
        assert!(problem["detail"].as_str().unwrap().contains("Content-Digest"), "{problem}");
    }

    #[test]
    fn a_body_that_does_not_match_its_signed_digest_never_ends_upstream() {
        let body = br#"{"amount": 5}"#;
        let digest = digest_header(body);
        for tampered in [false, true] {
            let signature = digest_signed("POST", "/signed/pay", &digest, NOW);
            let mut host = digest_request(&signature, &digest, &[]);
            let (mut stream, flow) = run_with(&auth_config_with("content-digest"), &mut host, false);
            assert_eq!(flow, Flow::Continue, "the head goes on: its signature verified");
            host.body = body[..6].to_vec();
            assert_eq!(stream.on_request_body(&mut host, 6, false), Flow::Continue, "the body streams");
            host.body = body[6..].to_vec();
            if tampered {
                host.body[5] = b'9';
            }
            let end = stream.on_request_body(&mut host, body.len() - 6, true);
            assert_eq!(end, if tampered { Flow::Pause } else { Flow::Continue }, "tampered: {tampered}");
            assert_eq!(host.sent.as_ref().map(|s| s.0), tampered.then_some(401));
            assert_eq!(host.metric(Metric::Allowed), u64::from(!tampered));
        }
    }

    #[test]
    fn the_bytes_that_complete_a_declared_length_wait_for_the_digest() {
        let body = br#"{"amount": 5}"#;
        let digest = digest_header(body);
        let signature = digest_signed("POST", "/signed/pay", &digest, NOW);
        let length = body.len().to_string();
        let mut host = digest_request(&signature, &digest, &[("content-length", &length)]);
        let (mut stream, _) = run_with(&auth_config_with("content-digest"), &mut host, false);
        host.body = br#"{"amount": 9}"#.to_vec();
        // Envoy may hand over all the bytes first and the end of the stream in a callback of its own.
        assert_eq!(
            stream.on_request_body(&mut host, body.len(), false),
            Flow::Pause,
            "the upstream would take it whole"
        );
        assert_eq!(stream.on_request_body(&mut host, body.len(), true), Flow::Pause);
        assert_eq!(host.sent.as_ref().map(|s| s.0), Some(401));
    }

    #[test]
    fn a_route_that_takes_no_body_refuses_a_streamed_one_before_the_head_goes_on() {
        let config = CONFIG.replace(r#""max_body_bytes": 8"#, r#""max_body_bytes": 0"#);
        let mut host = FakeHost::request("POST", "/health", &[("transfer-encoding", "chunked")]);
        let (_, flow) = run_with(&config, &mut host, false);
        assert_eq!((flow, host.sent.as_ref().map(|s| s.0)), (Flow::Pause, Some(413)));
    }

    #[test]
    fn forged_identity_headers_are_stripped_in_every_spelling_and_from_trailers() {
        let config = CONFIG.replacen(
            r#""policies": {"#,
            r#""identity_headers": {"also_strip": ["X-User-Id"]}, "policies": {"#,
            1,
        );
        let forged = [
            ("x_tollgate_account", "admin"),
            ("x-tollgate-account", "admin"),
            ("x_user_id", "1"),
            ("x-user-id", "1"),
            ("x-tollgate_tier", "pro"),
            ("x-other", "kept"),
        ];
        let mut host = FakeHost::request("POST", "/health", &forged);
        let (mut stream, flow) = run_with(&config, &mut host, false);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(
            host.removed,
            ["x_tollgate_account", "x-tollgate-account", "x_user_id", "x-user-id", "x-tollgate_tier"]
        );
        host.trailers = vec![("x_tollgate_account".into(), "admin".into()), ("x-checksum".into(), "1".into())];
        assert_eq!(stream.on_request_trailers(&mut host), Flow::Continue);
        assert_eq!(host.trailers, [("x-checksum".to_owned(), "1".to_owned())]);
    }
}
