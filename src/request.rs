//! Steps 1-6, run when the request headers arrive: route policy, request checks, identity headers,
//! authentication, rate limiting and credits. A step that must wait for a callout hands back the
//! phase to wait in; the callout's answer comes back here to finish the steps after it.

use std::rc::Rc;

use crate::auth::{self, AuthError, BodyCheck, Identity, RequestCredentials, SignatureScheme};
use crate::body;
use crate::checks::{self, BodyCounter};
use crate::common::Method;
use crate::credits::{self, CreditError, CreditMode, FailurePolicy};
use crate::grants::Take;
use crate::grpc;
use crate::headers;
use crate::host::{Callout, StreamHost, NANOS_PER_MS, NANOS_PER_SECOND};
use crate::metrics::Metric;
use crate::problem::Denial;
use crate::ratelimit::{self, Caller};
use crate::refresh;
use crate::routes::{Access, Policy};
use crate::{Billing, PendingReservation, Phase, Step, Stream};

/// Where an operator attaches a policy to an Envoy route: `metadata.filter_metadata.tollgate.policy`.
pub(crate) const ROUTE_POLICY_PROPERTY: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "tollgate", "policy"];
/// The client address as Envoy resolved it: its trusted-proxy rules (`use_remote_address`,
/// `xff_num_trusted_hops`) decide, so a client cannot pick its own by sending `X-Forwarded-For`.
const CLIENT_ADDRESS_PROPERTY: [&str; 2] = ["source", "address"];

/// The request headers arrived.
pub(crate) fn headers(stream: &mut Stream, host: &mut dyn StreamHost, end_of_stream: bool) -> Result<Step, Denial> {
    stream.request = host.request_headers();
    stream.request_id = header(&stream.request, "x-request-id").unwrap_or_default().to_owned();
    // Envoy sets X-Forwarded-Proto by its own trust rules (use_remote_address,
    // xff_num_trusted_hops), so a client cannot claim https through it.
    stream.https = header(&stream.request, "x-forwarded-proto").or(header(&stream.request, ":scheme")) == Some("https");
    stream.body.start(end_of_stream);
    // Known before any check, so that every refusal reaches a gRPC caller as a gRPC status.
    let wire = grpc::Wire::of(header(&stream.request, "content-type"));
    stream.grpc = wire.map(|wire| grpc::Call { wire, reported: None });

    let method = header(&stream.request, ":method").and_then(Method::from_header);
    let raw_path = header(&stream.request, ":path").ok_or(checks::CheckError::MissingPath)?;

    // 1. Route policy, for the path as every backend reads it (so the path checks of step 2 come
    // first).
    let path = checks::path(raw_path)?;
    let policy = route_policy(stream, host, method, &path)?;
    stream.policy = Some(Rc::clone(&policy));

    // 2. Request checks.
    let length = checks::content_length(header(&stream.request, "content-length"), policy.max_body_bytes)?;
    // A route that takes no body refuses one before the head can go upstream, whatever its framing.
    if policy.max_body_bytes == 0 && !end_of_stream {
        return Err(checks::CheckError::BodyTooLarge { limit: 0 }.into());
    }
    stream.body.limit(BodyCounter::new(policy.max_body_bytes), length)?;
    if !(policy.grpc && wire.is_some()) {
        checks::content_type(method, header(&stream.request, "content-type"), &policy.content_types)?;
    }

    // 3. Identity headers: nothing downstream may trust what the client sent under them, nor the
    // upstream's usage report (an upstream that reflects request headers would report it).
    headers::strip_identity(&stream.request, &stream.config.identity_headers.strip, |name| {
        host.remove_request_header(name)
    })?;
    if let Some(usage) = stream.config.credits.as_ref().and_then(|c| c.actual_cost_header.as_deref()) {
        if header(&stream.request, usage).is_some() {
            host.remove_request_header(usage)?;
        }
    }

    admit(stream, host, &policy, true)
}

/// Steps 4 to 6; a request held for a JWKS refetch comes back here.
fn admit(stream: &mut Stream, host: &mut dyn StreamHost, policy: &Policy, may_refetch: bool) -> Result<Step, Denial> {
    // One reading of the clock for every step: each hostcall costs the request time.
    let now = host.now_nanos();

    // 4. Authentication and access.
    let identity = match policy.access {
        Access::Public => None,
        Access::Deny => return Err(Denial::NotFound),
        Access::Authenticated => match authenticate(stream, host, policy, may_refetch, now)? {
            Ok(identity) => Some(identity),
            Err(wait) => return Ok(wait),
        },
    };

    // 5. Rate limiting.
    rate_limit(stream, host, policy, identity.as_ref(), now)?;

    // 6. Credits.
    match identity {
        Some(identity) => reserve_credits(stream, host, policy, &identity, now),
        None => Ok(Step::Admitted),
    }
}

/// Envoy route metadata, when the route carries it, wins over the prefix table: it is the
/// operator's statement about that very route.
fn route_policy(
    stream: &Stream,
    host: &dyn StreamHost,
    method: Option<Method>,
    path: &str,
) -> Result<Rc<Policy>, Denial> {
    if let Some(name) = host.property(&ROUTE_POLICY_PROPERTY) {
        let name = String::from_utf8_lossy(&name);
        return stream
            .config
            .routes
            .policy(&name)
            .cloned()
            .ok_or(Denial::UnknownRoutePolicy { name: name.into_owned() });
    }
    Ok(stream.config.routes.select(method, path).clone())
}

/// Step 4 for a route that needs a caller: the verified identity, or the step to wait in while a
/// JWKS refetch is under way.
fn authenticate(
    stream: &mut Stream,
    host: &mut dyn StreamHost,
    policy: &Policy,
    may_refetch: bool,
    now_nanos: u64,
) -> Result<Result<Identity, Step>, Denial> {
    let credentials = RequestCredentials::new(&stream.request);
    let now = now_nanos / NANOS_PER_SECOND;
    // An address past its failure budget is refused before a JWT costs a signature check. An API
    // key costs a hash and a cached token a lookup, so their address is looked up only when they
    // fail: a good one makes no hostcall for the budget.
    let failures = stream.config.auth.failures().zip(stream.worker.auth_failures.as_ref());
    let checked_first =
        failures.is_some() && !stream.config.auth.verifies_cheaply(&stream.worker.auth, &credentials, now);
    let mut address = None;
    if let (Some((budget, table)), true) = (failures, checked_first) {
        address = host.property(&CLIENT_ADDRESS_PROPERTY);
        budget.admits(table, host, address.as_deref().map(String::from_utf8_lossy).as_deref(), now_nanos)?;
    }
    let authenticated = stream.config.auth.authenticate(&stream.worker.auth, &credentials, now);
    if authenticated.is_err() {
        let remembered = stream.worker.auth.take_remembered_refusals();
        if remembered > 0 {
            host.count(Metric::AuthRefusalsRemembered, remembered);
        }
    }
    if let (Err(err), Some((budget, table))) = (&authenticated, failures) {
        // An unknown kid is counted once its refetch is done with, when it fails for good.
        let refetching = may_refetch && matches!(err, AuthError::UnknownKeyId { .. });
        if err.is_failure() && !refetching {
            if !checked_first {
                address = host.property(&CLIENT_ADDRESS_PROPERTY);
            }
            let address = address.as_deref().map(String::from_utf8_lossy);
            if !checked_first {
                budget.admits(table, host, address.as_deref(), now_nanos)?;
            }
            budget.spend(table, host, address.as_deref(), now_nanos);
        }
    }
    let identity = match authenticated {
        Ok(Some(identity)) => identity,
        Ok(None) => return Err(Denial::Unauthenticated),
        Err(AuthError::UnknownKeyId { provider }) if may_refetch => {
            return match refetch_jwks(stream, host, provider, now) {
                Some(token) => Ok(Err(Step::Wait(Phase::AwaitKeys { token, provider }))),
                None => Err(AuthError::UnknownKeyId { provider }.into()),
            };
        }
        Err(err) => return Err(err.into()),
    };
    auth::require_scopes(&identity, &policy.scopes)?;
    headers::forward_identity(host, &stream.request, &stream.config.identity_headers.set, &identity)?;

    if let Some(signatures) = stream.config.auth.signatures().filter(|_| policy.signature) {
        let check = match signatures.scheme() {
            SignatureScheme::ContentDigest => {
                let has_body = !stream.body.is_complete();
                let (accepted, digest) = signatures.verify_head(&credentials, Some(&identity), now, has_body)?;
                body::accept(stream, host, &accepted, now)?;
                digest.map(BodyCheck::Digest)
            }
            SignatureScheme::Body => {
                Some(BodyCheck::Signature(signatures.begin(&credentials, Some(&identity), now)?))
            }
        };
        if let Some(mut check) = check {
            // Envoy has held every body byte so far: the check starts from the first.
            stream.body.feed(host, &mut check)?;
            stream.body_check = Some(Box::new(check));
        }
    }
    Ok(Ok(identity))
}

fn refetch_jwks(stream: &Stream, host: &mut dyn StreamHost, provider: usize, now: u64) -> Option<u32> {
    let remote = stream.config.auth.providers().get(provider)?.remote_jwks()?;
    if !refresh::may_refetch(remote, host, now) {
        return None;
    }
    host.count(Metric::RemoteFetches, 1);
    let token = host.http_call(&Callout::get(&remote.cluster, &remote.authority, &remote.path, remote.timeout_ms));
    if token.is_none() {
        host.count(Metric::RemoteFetchFailures, 1);
    }
    token
}

/// The JWKS refetch answered (or did not): authentication runs again, once.
pub(crate) fn keys_fetched(
    stream: &mut Stream,
    host: &mut dyn StreamHost,
    provider: usize,
    answer: Option<(u16, Vec<u8>)>,
) -> Result<Step, Denial> {
    let state = stream.worker.auth.provider(provider);
    match (answer, stream.config.auth.providers().get(provider), state) {
        (Some((200, body)), Some(p), Some(state)) => refresh::load_refetched(p, state, &body, host),
        _ => host.count(Metric::RemoteFetchFailures, 1),
    }
    let Some(policy) = stream.policy.clone() else { return Err(Denial::Unauthenticated) };
    admit(stream, host, &policy, false)
}

/// Step 5: counts the request against the caller's limits, if the policy has any.
fn rate_limit(
    stream: &mut Stream,
    host: &mut dyn StreamHost,
    policy: &Policy,
    identity: Option<&Identity>,
    now: u64,
) -> Result<(), Denial> {
    let (Some(limits), Some(limit), Some(table)) =
        (&stream.config.rate_limits, &policy.rate_limit, &stream.worker.rate_table)
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
    stream.quota = checked.result?.map(|quota| (quota, now / NANOS_PER_SECOND));
    Ok(())
}

/// Step 6 for a billed policy: asks the credit service to hold the request's cost, and holds the
/// request until it answers.
fn reserve_credits(
    stream: &mut Stream,
    host: &mut dyn StreamHost,
    policy: &Policy,
    identity: &Identity,
    now: u64,
) -> Result<Step, Denial> {
    let (Some(credits), Some(billing)) = (&stream.config.credits, &policy.credits) else { return Ok(Step::Admitted) };
    let amount = billing.amount(&stream.request)?;
    if !credits::billable_account(&identity.account) {
        return Err(CreditError::Refused.into());
    }
    if let (CreditMode::Grant, Some(Ok(grants))) = (billing.mode, stream.worker.grants.as_ref().map(|g| g.try_borrow()))
    {
        if let Take::Granted(spend) = grants.take(host, &identity.account, amount, now) {
            stream.billing = Billing::Granted(spend);
            return Ok(Step::Admitted);
        }
    }
    let key = stream.worker.reservation_key(&stream.request_id);
    let call = credits.reserve(billing, &policy.name, &identity.account, amount, &key);
    host.count(Metric::CreditCallouts, 1);
    let Some(token) = host.http_call(&call) else {
        host.count(Metric::CreditCalloutFailures, 1);
        return credits_unavailable(stream, billing.on_failure);
    };
    let sent = host.now_nanos();
    Ok(Step::Wait(Phase::AwaitReservation(PendingReservation {
        token,
        call,
        amount,
        sent,
        on_failure: billing.on_failure,
    })))
}

/// The credit service answered the reservation (or did not).
pub(crate) fn reservation_answered(
    stream: &mut Stream,
    host: &mut dyn StreamHost,
    pending: PendingReservation,
    answer: Option<(u16, Vec<u8>)>,
) -> Result<Step, Denial> {
    host.count(Metric::CreditCalloutMilliseconds, host.now_nanos().saturating_sub(pending.sent) / NANOS_PER_MS);
    let unanswered = answer.is_none();
    match credits::reservation(answer, pending.amount) {
        Ok(reservation) => {
            stream.billing = Billing::Reserved(reservation);
            Ok(Step::Admitted)
        }
        Err(CreditError::Unavailable) => {
            host.count(Metric::CreditCalloutFailures, 1);
            // No answer is not "nothing held": the service may have made the reservation.
            if unanswered {
                stream.reclaim(host, pending.call);
            }
            credits_unavailable(stream, pending.on_failure)
        }
        Err(refused) => Err(refused.into()),
    }
}

fn credits_unavailable(stream: &mut Stream, on_failure: FailurePolicy) -> Result<Step, Denial> {
    match on_failure {
        FailurePolicy::Deny => Err(CreditError::Unavailable.into()),
        FailurePolicy::Allow => {
            stream.billing = Billing::Unbilled;
            Ok(Step::Admitted)
        }
    }
}

pub(crate) fn header<'a>(request: &'a [(String, String)], name: &str) -> Option<&'a str> {
    request.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}
