//! Step 7, on the response headers: security headers, the rate-limit window, and the bill —
//! charged on a billed outcome (what the upstream reports, never more than was held), given back
//! otherwise: to the credit service for a reservation, to the grant for a request a grant paid.
//! An HTTP response's outcome is its status; a gRPC call's is its `grpc-status`, which a call that
//! streams a response sends in the trailers, so such a call settles there (or, if the stream ends
//! without them, is given back by `Stream::on_done`).

use crate::credits::{self, PolicyCredits};
use crate::grpc;
use crate::headers;
use crate::host::StreamHost;
use crate::{Billing, Phase, Stream};

/// How a response ended, as billing reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Http(u16),
    /// A gRPC call's `grpc-status`; `None`: it ended without a valid one (an HTTP error, say).
    Grpc(Option<u32>),
}

/// The one decision whether a response is charged: an HTTP response by the policy's
/// `bill_statuses`, a gRPC call only on `grpc-status: 0` (OK), whatever its HTTP status.
fn billed(credits: &PolicyCredits, outcome: Outcome) -> bool {
    match outcome {
        Outcome::Http(status) => credits.bills(status),
        Outcome::Grpc(status) => status == Some(0),
    }
}

pub(crate) fn headers(stream: &mut Stream, host: &mut dyn StreamHost) {
    if matches!(stream.phase, Phase::Answered) {
        // The filter's own answer already carries every header, and nothing was served.
        stream.settle(host, None);
        return;
    }
    let cache_control = match &stream.policy {
        Some(policy) => policy.cache_control.as_deref(),
        None => stream.config.security_headers.cache_control.as_deref(),
    };
    headers::secure_response(host, &stream.config.security_headers, cache_control, stream.https);
    if let Some((quota, counted_at)) = &stream.quota {
        for (name, value) in quota.headers(*counted_at) {
            host.set_response_header(name, &value);
        }
    }
    // The upstream's usage report is for the gateway only, billed or not.
    let usage_header = stream.config.credits.as_ref().and_then(|c| c.actual_cost_header.as_deref());
    // Reading a header costs a hostcall, so only a bill, which needs them, reads. One read of
    // each measured fewer instructions than one read of the whole map, which holds the security
    // headers by now.
    let reported = match (held(&stream.billing), usage_header) {
        (Some(_), Some(name)) => host.response_header(name),
        _ => None,
    };
    if let Some(name) = usage_header {
        host.remove_response_header(name);
    }
    if held(&stream.billing).is_none() {
        if matches!(stream.billing, Billing::Unbilled) {
            host.set_response_header("x-credits-charged", "0");
        }
        return;
    }
    match outcome(stream, &|name: &str| host.response_header(name)) {
        Some(outcome) => settle(stream, host, outcome, reported.as_deref(), false),
        None => {
            if let Some(call) = &mut stream.grpc {
                call.reported = reported;
            }
        }
    }
}

/// A gRPC call's trailers: its `grpc-status`, and perhaps the upstream's cost report. The
/// billing headers go to the client here, as trailing metadata.
pub(crate) fn trailers(stream: &mut Stream, host: &mut dyn StreamHost) {
    let usage_header = stream.config.credits.as_ref().and_then(|c| c.actual_cost_header.as_deref());
    let (Some(_), Some(call)) = (held(&stream.billing), &mut stream.grpc) else {
        if let Some(name) = usage_header {
            host.remove_response_trailer(name);
        }
        return;
    };
    let mut reported = call.reported.take();
    if let Some(name) = usage_header {
        reported = host.response_trailer(name).or(reported);
        host.remove_response_trailer(name);
    }
    let status = host.response_trailer("grpc-status").and_then(|s| grpc::status(&s));
    settle(stream, host, Outcome::Grpc(status), reported.as_deref(), true);
}

/// What a bill holds: a reservation's amount, or what a grant paid; `None` when nothing is billed.
fn held(billing: &Billing) -> Option<u64> {
    match billing {
        Billing::Reserved(reservation) => Some(reservation.amount),
        Billing::Granted(spend) => Some(spend.amount),
        Billing::None | Billing::Unbilled => None,
    }
}

/// The outcome the response headers tell; `None` for a gRPC call whose status is still to come
/// in the trailers.
fn outcome(stream: &Stream, header: &dyn Fn(&str) -> Option<String>) -> Option<Outcome> {
    let status = header(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    if stream.grpc.is_none() {
        return Some(Outcome::Http(status));
    }
    match header("grpc-status") {
        // Trailers-only: the call ended in its headers.
        Some(value) => Some(Outcome::Grpc(grpc::status(&value))),
        None if status == 200 => None,
        None => Some(Outcome::Grpc(None)),
    }
}

/// Charges or gives back on `outcome`, and tells the client in the headers or the trailers.
fn settle(stream: &mut Stream, host: &mut dyn StreamHost, outcome: Outcome, reported: Option<&str>, trailers: bool) {
    let Some(held) = held(&stream.billing) else { return };
    let served = stream.policy.as_ref().and_then(|p| p.credits.as_ref()).is_some_and(|c| billed(c, outcome));
    let charge = if served { credits::charge(held, reported) } else { 0 };
    let remaining = match &stream.billing {
        Billing::Reserved(reservation) => Some(credits::remaining(reservation, charge)),
        _ => None,
    };
    let remaining = stream.settle(host, served.then_some(charge)).or(remaining);
    let mut tell = |name: &str, value: &str| match trailers {
        true => host.set_response_trailer(name, value),
        false => host.set_response_header(name, value),
    };
    tell("x-credits-charged", &charge.to_string());
    if let Some(remaining) = remaining {
        tell("x-credits-remaining", &remaining.to_string());
    }
}
