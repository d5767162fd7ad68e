//! Step 7, on the response headers: security headers, the rate-limit window, and the bill —
//! charged on a billed status (what the upstream reports, never more than was held), given back
//! otherwise: to the credit service for a reservation, to the grant for a request a grant paid.

use crate::credits;
use crate::headers;
use crate::host::StreamHost;
use crate::{Billing, Phase, Stream};

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
    // Reading a header costs a hostcall, so only a bill, which needs them, reads.
    let held = match &stream.billing {
        Billing::Reserved(reservation) => Some(reservation.amount),
        Billing::Granted(spend) => Some(spend.amount),
        Billing::None | Billing::Unbilled => None,
    };
    let reported = match (held, usage_header) {
        (Some(_), Some(name)) => host.response_header(name),
        _ => None,
    };
    if let Some(name) = usage_header {
        host.remove_response_header(name);
    }
    let Some(held) = held else {
        if matches!(stream.billing, Billing::Unbilled) {
            host.set_response_header("x-credits-charged", "0");
        }
        return;
    };
    let status = host.response_header(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    let served = stream.policy.as_ref().and_then(|p| p.credits.as_ref()).is_some_and(|c| c.bills(status));
    let charge = if served { credits::charge(held, reported.as_deref()) } else { 0 };
    let remaining = match &stream.billing {
        Billing::Reserved(reservation) => Some(credits::remaining(reservation, charge)),
        _ => None,
    };
    let remaining = stream.settle(host, served.then_some(charge)).or(remaining);
    host.set_response_header("x-credits-charged", &charge.to_string());
    if let Some(remaining) = remaining {
        host.set_response_header("x-credits-remaining", &remaining.to_string());
    }
}
