//! tollgate: an API gateway filter for Envoy. This file is the request pipeline, step by step in
//! the order of DESIGN.md; each step's logic lives in its own module, and `wasm/` is the only
//! code that talks to proxy-wasm.

pub mod auth;
pub mod checks;
pub mod common;
pub mod config;
pub mod credits;
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

#[cfg(target_arch = "wasm32")]
mod wasm;

use std::rc::Rc;

use auth::{AuthError, Identity, PendingSignature, RequestCredentials};
use checks::BodyCounter;
use config::{Config, Method};
use credits::{CreditError, FailurePolicy, Reservation, Settlement};
use host::{Callout, Host, NANOS_PER_MS, NANOS_PER_SECOND};
use metrics::Metric;
use problem::Denial;
use ratelimit::{Caller, Quota};
use routes::{Access, Policy};
use worker::Worker;

/// Where an operator attaches a policy to an Envoy route: `metadata.filter_metadata.tollgate.policy`.
const ROUTE_POLICY_PROPERTY: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "tollgate", "policy"];
/// The client address as Envoy resolved it: its trusted-proxy rules (`use_remote_address`,
/// `xff_num_trusted_hops`) decide, so a client cannot pick its own by sending `X-Forwarded-For`.
const CLIENT_ADDRESS_PROPERTY: [&str; 2] = ["source", "address"];

/// What the proxy should do with the request or response after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the request (and buffer its body): the filter answered it, or waits for something.
    Pause,
}

/// The callout a held request waits for. Envoy holds the whole request meanwhile (proxy-wasm
/// pauses headers and body together).
enum Waiting {
    Nothing,
    /// A JWKS refetch for an unknown `kid`.
    Jwks {
        token: u32,
        provider: usize,
    },
    /// The credit service's answer to a reservation of `amount`, sent at `sent` (nanoseconds).
    Credits {
        token: u32,
        amount: u64,
        sent: u64,
        on_failure: FailurePolicy,
    },
}

/// Where a billed request stands with the credit service.
enum Billing {
    /// Not billed, or already settled.
    None,
    Reserved(Reservation),
    /// The credit service could not answer and the policy lets the request through unbilled.
    Unbilled,
}

/// One request's way through the filter.
pub struct Stream {
    config: Rc<Config>,
    worker: Rc<Worker>,
    policy: Option<Rc<Policy>>,
    body: BodyCounter,
    /// Body bytes Envoy holds for this filter because the last body callback paused; Envoy then
    /// reports the whole held size, not the new chunk.
    held: usize,
    body_complete: bool,
    waiting: Waiting,
    /// A request signature to check over the body as it arrives. Boxed: the HMAC state is large
    /// and most streams never sign.
    signature: Option<Box<PendingSignature>>,
    billing: Billing,
    https: bool,
    request_id: String,
    /// The filter answered this request itself; its response already carries every header.
    answered: bool,
    /// The request has passed every step and gone on to the upstream.
    allowed: bool,
    /// The rate-limit window the response reports, and when (Unix seconds) it was counted.
    quota: Option<(Quota, u64)>,
}

/// The request headers the pipeline reads, taken from one hostcall.
struct RequestView<'a> {
    all: &'a [(String, String)],
}

impl<'a> RequestView<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.all.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Stream {
    pub fn new(config: Rc<Config>, worker: Rc<Worker>) -> Stream {
        Stream {
            body: BodyCounter::new(u64::MAX),
            config,
            worker,
            policy: None,
            held: 0,
            body_complete: false,
            waiting: Waiting::Nothing,
            signature: None,
            billing: Billing::None,
            https: false,
            request_id: String::new(),
            answered: false,
            allowed: false,
            quota: None,
        }
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        let all = host.request_headers();
        let request = RequestView { all: &all };
        self.request_id = request.get("x-request-id").unwrap_or_default().to_owned();
        // Envoy sets X-Forwarded-Proto by its own trust rules (use_remote_address,
        // xff_num_trusted_hops), so a client cannot claim https through it.
        self.https = request.get("x-forwarded-proto").or(request.get(":scheme")) == Some("https");
        self.body_complete = end_of_stream;
        let flow = self.request_headers(host, &request);
        self.outcome(host, flow)
    }

    fn request_headers(&mut self, host: &mut dyn Host, request: &RequestView) -> Result<Flow, Denial> {
        let method = request.get(":method").and_then(Method::from_header);
        let raw_path = request.get(":path").ok_or(checks::CheckError::MissingPath)?;

        // 1. Route policy.
        let policy = self.route_policy(host, method, raw_path)?;
        self.policy = Some(Rc::clone(&policy));

        // 2. Request checks.
        checks::path(raw_path)?;
        checks::content_length(request.get("content-length"), policy.max_body_bytes)?;
        self.body = BodyCounter::new(policy.max_body_bytes);
        checks::content_type(method, request.get("content-type"), &policy.content_types)?;

        // 3. Identity headers: nothing downstream may trust what the client sent under them.
        headers::strip_identity(host, request.all, &self.config.identity_headers);

        self.admit(host, request.all, &policy, true)
    }

    /// Steps 4 and 5; a request held for a JWKS refetch comes back here.
    fn admit(
        &mut self,
        host: &mut dyn Host,
        request: &[(String, String)],
        policy: &Policy,
        may_refetch: bool,
    ) -> Result<Flow, Denial> {
        // One reading of the clock for every step: each hostcall costs the request time.
        let now = host.now_nanos();

        // 4. Authentication and access.
        let identity = match policy.access {
            Access::Public => None,
            Access::Deny => return Err(Denial::NotFound),
            Access::Authenticated => match self.authenticate(host, request, policy, may_refetch, now)? {
                Some(identity) => Some(identity),
                None => return Ok(Flow::Pause),
            },
        };

        // 5. Rate limiting.
        self.rate_limit(host, policy, identity.as_ref(), now)?;

        // 6. Credits.
        match identity {
            Some(identity) => self.reserve_credits(host, request, policy, &identity),
            None => Ok(Flow::Continue),
        }
    }

    /// Envoy route metadata, when the route carries it, wins over the prefix table: it is the
    /// operator's statement about that very route.
    fn route_policy(&self, host: &dyn Host, method: Option<Method>, raw_path: &str) -> Result<Rc<Policy>, Denial> {
        if let Some(name) = host.property(&ROUTE_POLICY_PROPERTY) {
            let name = String::from_utf8_lossy(&name);
            return self
                .config
                .routes
                .policy(&name)
                .cloned()
                .ok_or(Denial::UnknownRoutePolicy { name: name.into_owned() });
        }
        let path = raw_path.split(['?', '#']).next().unwrap_or_default();
        Ok(self.config.routes.select(method, path).clone())
    }

    /// Step 4 for a route that needs a caller: the verified identity, or `None` while the request
    /// waits for a JWKS refetch.
    fn authenticate(
        &mut self,
        host: &mut dyn Host,
        request: &[(String, String)],
        policy: &Policy,
        may_refetch: bool,
        now_nanos: u64,
    ) -> Result<Option<Identity>, Denial> {
        let credentials = RequestCredentials::new(request);
        let now = now_nanos / NANOS_PER_SECOND;
        let identity = match self.config.auth.authenticate(&self.worker.auth, &credentials, now) {
            Ok(Some(identity)) => identity,
            Ok(None) => return Err(Denial::Unauthenticated),
            Err(AuthError::UnknownKeyId { provider }) if may_refetch => {
                return match self.refetch_jwks(host, provider, now) {
                    Some(()) => Ok(None),
                    None => Err(AuthError::UnknownKeyId { provider }.into()),
                };
            }
            Err(err) => return Err(err.into()),
        };
        auth::require_scopes(&identity, &policy.scopes)?;
        headers::forward_identity(host, request, &self.config.identity_headers, &identity);

        if let Some(signatures) = self.config.auth.signatures().filter(|_| policy.signature) {
            let pending = signatures.begin(&credentials, Some(&identity), now)?;
            if self.body_complete {
                self.finish_signature(host, pending)?;
            } else {
                // The headers go on: proxy-wasm only hands a filter the body of a request whose
                // headers continued. The body is held until the signature over it verifies, so
                // the upstream never gets a body, nor a complete request, that failed.
                self.signature = Some(Box::new(pending));
            }
        }
        Ok(Some(identity))
    }

    fn refetch_jwks(&mut self, host: &mut dyn Host, provider: usize, now: u64) -> Option<()> {
        let remote = self.config.auth.providers().get(provider)?.remote_jwks()?;
        if !self.worker.may_refetch(provider, now) {
            return None;
        }
        host.count(Metric::RemoteFetches, 1);
        let token = host.http_call(&Callout::get(&remote.cluster, &remote.authority, &remote.path, remote.timeout_ms));
        if token.is_none() {
            host.count(Metric::RemoteFetchFailures, 1);
        }
        self.waiting = Waiting::Jwks { token: token?, provider };
        Some(())
    }

    /// Step 5: counts the request against the caller's limits, if the policy has any.
    fn rate_limit(
        &mut self,
        host: &mut dyn Host,
        policy: &Policy,
        identity: Option<&Identity>,
        now: u64,
    ) -> Result<(), Denial> {
        let (Some(limits), Some(limit), Some(table)) =
            (&self.config.rate_limits, &policy.rate_limit, &self.worker.rate_table)
        else {
            return Ok(());
        };
        let address = match identity {
            Some(_) => None,
            None => host.property(&CLIENT_ADDRESS_PROPERTY),
        };
        let address = address.as_deref().map(String::from_utf8_lossy);
        let caller = match identity {
            Some(identity) => Caller::Identity(identity),
            None => Caller::Address(address.as_deref()),
        };
        let checked = limits.check(table, host, limit, &caller, now);
        host.count(Metric::RateLimitCasRetries, u64::from(checked.retries));
        if checked.result == Err(ratelimit::Limited::Contended) {
            host.count(Metric::RateLimitContended, 1);
        }
        self.quota = checked.result?.map(|quota| (quota, now / NANOS_PER_SECOND));
        Ok(())
    }

    /// Step 6 for a billed policy: asks the credit service to hold the request's cost, and holds
    /// the request until it answers.
    fn reserve_credits(
        &mut self,
        host: &mut dyn Host,
        request: &[(String, String)],
        policy: &Policy,
        identity: &Identity,
    ) -> Result<Flow, Denial> {
        let (Some(credits), Some(billing)) = (&self.config.credits, &policy.credits) else { return Ok(Flow::Continue) };
        let amount = billing.amount(|name| request.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()))?;
        let key = self.worker.reservation_key(&self.request_id);
        let call = credits.reserve(billing, &policy.name, &identity.account, amount, &key);
        host.count(Metric::CreditCallouts, 1);
        let Some(token) = host.http_call(&call) else {
            host.count(Metric::CreditCalloutFailures, 1);
            return self.credits_unavailable(billing.on_failure);
        };
        self.waiting = Waiting::Credits { token, amount, sent: host.now_nanos(), on_failure: billing.on_failure };
        Ok(Flow::Pause)
    }

    fn credits_unavailable(&mut self, on_failure: FailurePolicy) -> Result<Flow, Denial> {
        match on_failure {
            FailurePolicy::Deny => Err(CreditError::Unavailable.into()),
            FailurePolicy::Allow => {
                self.billing = Billing::Unbilled;
                Ok(Flow::Continue)
            }
        }
    }

    /// The answer to a callout this stream made (`None`: no answer, e.g. a timeout): a JWKS
    /// refetch, after which authentication runs again, once; or a credit reservation.
    pub fn on_http_call_response(&mut self, host: &mut dyn Host, token: u32, answer: Option<(u16, Vec<u8>)>) {
        if self.answered {
            return;
        }
        let flow = match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
            Waiting::Jwks { token: expected, provider } if expected == token => {
                match (answer, self.config.auth.providers().get(provider), self.worker.auth.provider(provider)) {
                    (Some((200, body)), Some(p), Some(state)) => refresh::load_refetched(p, state, &body, host),
                    _ => host.count(Metric::RemoteFetchFailures, 1),
                }
                let Some(policy) = self.policy.clone() else { return };
                let request = host.request_headers();
                self.admit(host, &request, &policy, false)
            }
            Waiting::Credits { token: expected, amount, sent, on_failure } if expected == token => {
                host.count(Metric::CreditCalloutMilliseconds, host.now_nanos().saturating_sub(sent) / NANOS_PER_MS);
                match credits::reservation(answer, amount) {
                    Ok(reservation) => {
                        self.billing = Billing::Reserved(reservation);
                        Ok(Flow::Continue)
                    }
                    Err(CreditError::Unavailable) => {
                        host.count(Metric::CreditCalloutFailures, 1);
                        self.credits_unavailable(on_failure)
                    }
                    Err(refused) => Err(refused.into()),
                }
            }
            other => {
                self.waiting = other;
                return;
            }
        };
        if self.outcome(host, flow) == Flow::Continue {
            host.resume_request();
        }
    }

    /// Counts a body chunk, and feeds it to a pending signature check.
    pub fn on_request_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Flow {
        if self.answered {
            return Flow::Pause;
        }
        let new = if self.held > 0 { body_size.saturating_sub(self.held) } else { body_size };
        let start = self.held;
        self.body_complete = end_of_stream;
        let flow = match self.body.add(new) {
            Err(err) => Err(Denial::from(err)),
            Ok(()) if !matches!(self.waiting, Waiting::Nothing) => Ok(Flow::Pause),
            Ok(()) => match &mut self.signature {
                None => Ok(Flow::Continue),
                Some(pending) => {
                    pending.update(&host.request_body(start, new));
                    if end_of_stream {
                        self.finish_pending(host)
                    } else {
                        Ok(Flow::Pause)
                    }
                }
            },
        };
        let flow = self.outcome(host, flow);
        self.held = if flow == Flow::Pause { body_size } else { 0 };
        flow
    }

    /// With trailers the body callback never says `end_of_stream`; the body is complete here.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Flow {
        if self.answered {
            return Flow::Pause;
        }
        self.body_complete = true;
        let flow = if matches!(self.waiting, Waiting::Nothing) { self.finish_pending(host) } else { Ok(Flow::Pause) };
        self.outcome(host, flow)
    }

    /// The body is complete: checks the request signature over it, if one is pending.
    fn finish_pending(&mut self, host: &mut dyn Host) -> Result<Flow, Denial> {
        match self.signature.take() {
            Some(pending) => self.finish_signature(host, *pending).map(|()| Flow::Continue),
            None => Ok(Flow::Continue),
        }
    }

    fn finish_signature(&mut self, host: &mut dyn Host, pending: PendingSignature) -> Result<(), Denial> {
        let now = host.now();
        let accepted = {
            let mut replays = self.worker.replays.try_borrow_mut().map_err(|_| AuthError::ReplayCacheFull)?;
            pending.finish(&mut replays, now)?
        };
        self.worker.seen_signatures.record(host, &accepted, now)?;
        Ok(())
    }

    pub fn on_response_headers(&mut self, host: &mut dyn Host) -> Flow {
        if self.answered {
            // The filter's own answer (a 413 or 401 after the reservation): nothing was served.
            self.settle(host, None);
            return Flow::Continue;
        }
        let cache_control = match &self.policy {
            Some(policy) => policy.cache_control.as_deref(),
            None => self.config.security_headers.cache_control.as_deref(),
        };
        headers::secure_response(host, &self.config.security_headers, cache_control, self.https);
        if let Some((quota, counted_at)) = &self.quota {
            for (name, value) in quota.headers(*counted_at) {
                host.set_response_header(name, &value);
            }
        }
        // The upstream's usage report is for the gateway only, billed or not.
        let usage_header = self.config.credits.as_ref().and_then(|c| c.actual_cost_header.as_deref());
        // Reading a header costs a hostcall, so only a reservation, which needs them, reads.
        let reported = match (&self.billing, usage_header) {
            (Billing::Reserved(_), Some(name)) => host.response_header(name),
            _ => None,
        };
        if let Some(name) = usage_header {
            host.remove_response_header(name);
        }
        match &self.billing {
            Billing::Reserved(reservation) => {
                let status = host.response_header(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
                let served = (200..300).contains(&status);
                let charge = if served { credits::charge(reservation, reported.as_deref()) } else { 0 };
                for (name, value) in credits::response_headers(reservation, charge) {
                    host.set_response_header(name, &value);
                }
                self.settle(host, served.then_some(charge));
            }
            Billing::Unbilled => host.set_response_header("x-credits-charged", "0"),
            Billing::None => {}
        }
        Flow::Continue
    }

    /// The stream has ended. A reservation still open means no response went out (the client
    /// left, the upstream reset): release it.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        self.settle(host, None);
    }

    /// Commits `charge`, or releases when `None`; once per stream. The root context sends it,
    /// so that its answer, and any retry, do not depend on this stream still being there.
    fn settle(&mut self, host: &mut dyn Host, charge: Option<u64>) {
        let Billing::Reserved(reservation) = std::mem::replace(&mut self.billing, Billing::None) else { return };
        let settlement = Settlement { reservation_id: reservation.id, charge };
        match self.worker.settler.try_borrow_mut() {
            Ok(mut settler) => settler.queue(settlement, host.now_nanos()),
            Err(_) => log::error!("tollgate: settlement for {} dropped: settler busy", settlement.reservation_id),
        }
        host.wake_root();
    }

    /// Turns a step's result into what the proxy does, answering the request on a denial.
    fn outcome(&mut self, host: &mut dyn Host, result: Result<Flow, Denial>) -> Flow {
        match result {
            Ok(flow) => {
                let held = !matches!(self.waiting, Waiting::Nothing) || self.signature.is_some();
                if flow == Flow::Continue && !held && !self.allowed {
                    self.allowed = true;
                    host.count(Metric::Allowed, 1);
                }
                flow
            }
            Err(denial) => {
                self.answered = true;
                let policy = self.policy.as_ref().map_or("", |p| p.name.as_str());
                respond(host, &denial, &self.request_id, policy, Some(&self.config), self.https);
                Flow::Pause
            }
        }
    }
}

/// Answers a request that reached a VM whose configuration never loaded. Envoy does not create
/// streams for such a plugin; this is the fail-closed answer should one appear anyway.
pub fn refuse_unconfigured(host: &mut dyn Host) -> Flow {
    respond(host, &Denial::Unconfigured, "", "", None, false);
    Flow::Pause
}

fn respond(host: &mut dyn Host, denial: &Denial, request_id: &str, policy: &str, config: Option<&Config>, https: bool) {
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
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/problem+json")];
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
    host.send_response(kind.status, &headers, &problem::body(denial, request_id));
}

/// The log may say more than the client is told, never a credential.
fn log_detail(denial: &Denial) -> String {
    match denial {
        Denial::UnknownRoutePolicy { name } => format!("route metadata names unknown policy {name:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        host.properties.insert(ROUTE_POLICY_PROPERTY.join("."), b"closed".to_vec());
        run(&mut host);
        assert_eq!(host.sent.as_ref().unwrap().0, 404);

        let mut host = FakeHost::request("GET", "/health", &[]);
        host.properties.insert(ROUTE_POLICY_PROPERTY.join("."), b"missing".to_vec());
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
                "signatures": {{"secrets": [{{"account": "acme", "secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}}]}}
            }}
        }}"#,
            sha256_hex("key-one")
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
            assert_eq!(flow, Flow::Continue, "headers go on; the body is held");
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
                "credits": {{"cost": 5, "multiplier_header": "x-units", "on_failure": "{on_failure}"}}}}}},
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
        let credits = stream.config.credits.as_ref().unwrap();
        stream.worker.settler.borrow_mut().send_due(host, credits);
        host.sent_calls.iter().filter(|c| c.path != "/v1/reservations").cloned().collect()
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
}
