//! Step 6: credits. A billed request reserves its cost with the credit service before it goes
//! upstream; its response commits the reservation (2xx, optionally for less, as the upstream
//! reports) or releases it (anything else, a reset, an abort). This module holds the config, the
//! callouts' requests and the reading of their answers; `settle` keeps commits and releases going
//! after the stream has ended.

use std::fmt;

use serde::Deserialize;

use crate::common::{header_name, ConfigError, Secret};
use crate::grants::{GrantPolicy, RawGrants};
use crate::host::Callout;

/// `credits`: where the credit service is and how to call it.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCredits {
    /// The Envoy cluster of the credit service.
    pub cluster: String,
    /// The `:authority` of callouts; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// The credit service's service token, sent as `Authorization: Bearer`.
    pub service_token: Secret,
    /// How long a reservation callout may take before the failure policy applies.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A response header in which the upstream reports what a request actually cost; the filter
    /// commits that much (never more than reserved) and removes the header.
    #[serde(default)]
    pub actual_cost_header: Option<String>,
    /// How long a commit or release that failed is retried, with backoff. Keep it below the
    /// credit service's `--reservation-ttl-seconds`.
    #[serde(default = "default_retry_seconds")]
    pub retry_seconds: u64,
    /// How credit grants are sized, reported and kept (policies in `grant` mode).
    #[serde(default)]
    pub grants: RawGrants,
}

fn default_timeout_ms() -> u64 {
    1_000
}
fn default_retry_seconds() -> u64 {
    240
}

/// A policy's `credits`: what its requests cost.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPolicyCredits {
    /// Credits reserved per request.
    pub cost: u64,
    /// A request header whose whole-number value multiplies the cost (e.g. items in a batch).
    #[serde(default)]
    pub multiplier_header: Option<String>,
    /// The largest multiplier accepted; a larger, zero or malformed one is refused with 400.
    #[serde(default = "default_max_multiplier")]
    pub max_multiplier: u64,
    /// When the credit service cannot answer in time: `deny` (503) or `allow` (unbilled).
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// This policy's reservation timeout; defaults to `credits.timeout_ms`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The upstream statuses that are charged: codes (`304`, `101`) or classes (`"2xx"`). Any
    /// other status, a reset, or a client that leaves gives the reservation back.
    #[serde(default = "default_bill_statuses")]
    pub bill_statuses: Vec<BilledStatus>,
    /// `grant` (default): paid from a quota the credit service granted this Envoy ahead of time,
    /// with no callout per request. `per_request`: every request reserves with the credit
    /// service and waits for its answer.
    #[serde(default)]
    pub mode: CreditMode,
}

/// How a billed policy's requests are paid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CreditMode {
    /// From the account's grant; per request only when the grant cannot pay.
    #[default]
    Grant,
    /// A reservation per request, committed or released on its response.
    PerRequest,
}

/// A status, or a class of them, that a billed policy charges for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum BilledStatus {
    /// One status code, e.g. `304`.
    Code(u16),
    /// A class: `"1xx"` to `"5xx"`.
    Class(String),
}

fn default_bill_statuses() -> Vec<BilledStatus> {
    vec![BilledStatus::Class("2xx".to_owned())]
}

fn default_max_multiplier() -> u64 {
    100
}

/// What a billed request does when the credit service is down or slow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Refuse with 503: nothing goes upstream unpaid.
    #[default]
    Deny,
    /// Let the request through without a charge.
    Allow,
}

/// Whether the credit service accepts `account` as an account id (its `account_id` rule): checked
/// before the callout, so an identity it would refuse is a refusal, not an outage.
pub fn billable_account(account: &str) -> bool {
    !account.is_empty()
        && account.len() <= MAX_ACCOUNT_ID
        && account.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b))
}

const MAX_ACCOUNT_ID: usize = 128;

/// Amounts the credit service accepts: 1 to 10^12.
const MAX_AMOUNT: u64 = 1_000_000_000_000;

/// The validated `credits`.
#[derive(Debug)]
pub struct Credits {
    cluster: String,
    authority: String,
    authorization: String,
    timeout_ms: u64,
    pub actual_cost_header: Option<String>,
    pub retry_seconds: u64,
    pub grants: GrantPolicy,
}

/// A policy's validated `credits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCredits {
    cost: u64,
    multiplier_header: Option<String>,
    max_multiplier: u64,
    pub on_failure: FailurePolicy,
    pub mode: CreditMode,
    timeout_ms: Option<u64>,
    /// Billed statuses as ranges, e.g. 200..=299.
    bill_statuses: Vec<std::ops::RangeInclusive<u16>>,
}

/// Why a billed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("insufficient credits: this request costs {required}, the balance is {balance}")]
    Insufficient { required: u64, balance: u64 },
    #[error("the {header} header must be a whole number from 1 to {max}")]
    InvalidMultiplier { header: String, max: u64 },
    #[error("the {header} header must be sent once")]
    DuplicateMultiplier { header: String },
    #[error("the credit service is unavailable; the request was not charged")]
    Unavailable,
    /// The service looked at the reservation and refused it (an account id it does not accept,
    /// say): a refusal, never "unavailable", so `on_failure: allow` cannot serve it free.
    #[error("the credit service refused to bill this account")]
    Refused,
}

impl Credits {
    pub fn build(raw: &RawCredits) -> Result<Credits, ConfigError> {
        let at = |field: &str, message: &str| ConfigError { path: format!("credits.{field}"), message: message.into() };
        if raw.cluster.is_empty() {
            return Err(at("cluster", "must name the credit service's Envoy cluster"));
        }
        let token = raw.service_token.expose();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(at("service_token", "must be the credit service's service token (printable, no spaces)"));
        }
        if !(1..=60_000).contains(&raw.timeout_ms) {
            return Err(at("timeout_ms", "must be between 1 and 60000"));
        }
        if !(1..=86_400).contains(&raw.retry_seconds) {
            return Err(at("retry_seconds", "must be between 1 and 86400"));
        }
        let actual_cost_header =
            raw.actual_cost_header.as_deref().map(|h| header_name(h, "credits.actual_cost_header")).transpose()?;
        Ok(Credits {
            cluster: raw.cluster.clone(),
            authority: raw.authority.clone().unwrap_or_else(|| raw.cluster.clone()),
            authorization: format!("Bearer {token}"),
            timeout_ms: raw.timeout_ms,
            actual_cost_header,
            retry_seconds: raw.retry_seconds,
            grants: GrantPolicy::build(&raw.grants)?,
        })
    }

    /// `POST /v1/reservations`. `request_id` is the gateway's, made unique per stream, so a
    /// client's `x-request-id` cannot replay someone's reservation.
    pub fn reserve(
        &self,
        policy: &PolicyCredits,
        route: &str,
        account: &str,
        amount: u64,
        request_id: &str,
    ) -> Callout {
        let body = serde_json::json!({"account": account, "amount": amount, "request_id": request_id, "route": route});
        self.call("/v1/reservations".to_owned(), body.to_string(), policy.timeout_ms.unwrap_or(self.timeout_ms))
    }

    /// `POST /v1/reservations/{id}/commit` or `…/release`, or the reservation call again.
    pub fn settle(&self, settlement: &Settlement) -> Callout {
        match settlement {
            Settlement::Commit { reservation_id, amount } => self.call(
                format!("/v1/reservations/{reservation_id}/commit"),
                format!("{{\"amount\":{amount}}}"),
                self.timeout_ms,
            ),
            Settlement::Release { reservation_id } => {
                self.call(format!("/v1/reservations/{reservation_id}/release"), "{}".to_owned(), self.timeout_ms)
            }
            Settlement::Reclaim { reserve } => Callout { timeout_ms: self.timeout_ms, ..reserve.clone() },
        }
    }

    /// `POST /v1/batch`: commits and releases in one call, each with its own result. Written by
    /// hand: the service's reservation ids need no escaping, and serde's derive would cost the
    /// module more.
    pub fn settle_batch<'a>(&self, settlements: impl Iterator<Item = &'a Settlement>) -> Callout {
        let mut body = String::from("{\"operations\":[");
        for (i, settlement) in settlements.enumerate() {
            if i > 0 {
                body.push(',');
            }
            match settlement {
                Settlement::Commit { reservation_id, amount } => body.push_str(&format!(
                    "{{\"op\":\"commit\",\"reservation_id\":\"{reservation_id}\",\"amount\":{amount}}}"
                )),
                Settlement::Release { reservation_id } => {
                    body.push_str(&format!("{{\"op\":\"release\",\"reservation_id\":\"{reservation_id}\"}}"))
                }
                // Never batched: a reclaim reads the reservation its answer carries.
                Settlement::Reclaim { .. } => {}
            }
        }
        body.push_str("]}");
        self.call("/v1/batch".to_owned(), body, self.timeout_ms)
    }

    /// `POST /v1/grants`: the process's usage reports and grant requests, many accounts at once.
    pub fn grant_call(&self, body: Vec<u8>) -> Callout {
        Callout { body, ..self.call("/v1/grants".to_owned(), String::new(), self.timeout_ms) }
    }

    fn call(&self, path: String, body: String, timeout_ms: u64) -> Callout {
        Callout {
            cluster: self.cluster.clone(),
            method: "POST",
            path,
            authority: self.authority.clone(),
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("authorization", self.authorization.clone()),
            ],
            body: body.into_bytes(),
            timeout_ms,
        }
    }
}

impl PolicyCredits {
    pub fn build(path: &str, raw: &RawPolicyCredits, configured: bool) -> Result<PolicyCredits, ConfigError> {
        let at = |field: &str, message: &str| ConfigError { path: format!("{path}.{field}"), message: message.into() };
        if !configured {
            return Err(ConfigError { path: path.to_owned(), message: "needs the credits section".into() });
        }
        if !(1..=MAX_AMOUNT).contains(&raw.cost) {
            return Err(at("cost", "must be between 1 and 10^12"));
        }
        if raw.max_multiplier == 0 || raw.cost.saturating_mul(raw.max_multiplier) > MAX_AMOUNT {
            return Err(at("max_multiplier", "must be at least 1, and cost × max_multiplier at most 10^12"));
        }
        if raw.timeout_ms.is_some_and(|t| !(1..=60_000).contains(&t)) {
            return Err(at("timeout_ms", "must be between 1 and 60000"));
        }
        let multiplier_header = raw
            .multiplier_header
            .as_deref()
            .map(|h| header_name(h, &format!("{path}.multiplier_header")))
            .transpose()?;
        if raw.bill_statuses.is_empty() {
            return Err(at("bill_statuses", "must name at least one status, e.g. \"2xx\""));
        }
        let mut bill_statuses = Vec::with_capacity(raw.bill_statuses.len());
        for (i, status) in raw.bill_statuses.iter().enumerate() {
            let range = match status {
                BilledStatus::Code(code @ 100..=599) => *code..=*code,
                BilledStatus::Class(class) => match class.as_bytes() {
                    [digit @ b'1'..=b'5', b'x', b'x'] => {
                        let first = u16::from(digit - b'0') * 100;
                        first..=first + 99
                    }
                    _ => {
                        return Err(at(&format!("bill_statuses[{i}]"), "must be a status code or a class like \"2xx\""))
                    }
                },
                BilledStatus::Code(_) => {
                    return Err(at(&format!("bill_statuses[{i}]"), "must be a status code from 100 to 599"))
                }
            };
            bill_statuses.push(range);
        }
        Ok(PolicyCredits {
            cost: raw.cost,
            multiplier_header,
            max_multiplier: raw.max_multiplier,
            on_failure: raw.on_failure,
            mode: raw.mode,
            timeout_ms: raw.timeout_ms,
            bill_statuses,
        })
    }

    /// Whether a response with this status is charged.
    pub fn bills(&self, status: u16) -> bool {
        self.bill_statuses.iter().any(|range| range.contains(&status))
    }

    /// The amount to reserve for a request with these headers. The multiplier header must be
    /// sent once: with two, which one a backend reads is anyone's guess.
    pub fn amount(&self, request: &[(String, String)]) -> Result<u64, CreditError> {
        let Some(header) = &self.multiplier_header else { return Ok(self.cost) };
        let mut values = request.iter().filter(|(n, _)| n == header).map(|(_, v)| v.as_str());
        let Some(value) = values.next() else { return Ok(self.cost) };
        if values.next().is_some() {
            return Err(CreditError::DuplicateMultiplier { header: header.clone() });
        }
        match value.trim().parse::<u64>() {
            Ok(n) if (1..=self.max_multiplier).contains(&n) => Ok(self.cost * n),
            _ => Err(CreditError::InvalidMultiplier { header: header.clone(), max: self.max_multiplier }),
        }
    }
}

/// A reservation the credit service granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub amount: u64,
    /// What the account could still spend once this was held.
    pub balance: u64,
}

/// What the root context sends the credit service once a billed stream is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Commit {
        reservation_id: String,
        amount: u64,
    },
    Release {
        reservation_id: String,
    },
    /// A reservation whose answer never reached its stream (a timeout, a client gone): the same
    /// reservation call again, which the service answers with the reservation it made under that
    /// key (or makes it now), to release it.
    Reclaim {
        reserve: Callout,
    },
}

impl fmt::Display for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Settlement::Commit { reservation_id, .. } => write!(f, "commit of reservation {reservation_id}"),
            Settlement::Release { reservation_id } => write!(f, "release of reservation {reservation_id}"),
            Settlement::Reclaim { .. } => f.write_str("release of an unanswered reservation"),
        }
    }
}

#[derive(Deserialize)]
struct Granted {
    reservation_id: String,
    balance: u64,
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(Deserialize)]
struct BatchResult {
    status: u16,
}

/// Each operation's status in the answer to `POST /v1/batch`, in order.
pub fn batch_statuses(body: &[u8]) -> Option<Vec<u16>> {
    serde_json::from_slice::<BatchAnswer>(body).ok().map(|a| a.results.into_iter().map(|r| r.status).collect())
}

/// The reservation id and balance of a 201 (or a repeated request's 200).
pub fn granted_id(body: &[u8]) -> Option<(String, u64)> {
    serde_json::from_slice::<Granted>(body).ok().map(|g| (g.reservation_id, g.balance))
}

#[derive(Deserialize)]
struct Refused {
    #[serde(default)]
    balance: u64,
    #[serde(default)]
    required: u64,
}

/// Reads the credit service's answer to a reservation: granted, short (402, or no such account),
/// refused (any other 4xx), or `Unavailable` for anything else, including no answer at all.
pub fn reservation(answer: Option<(u16, Vec<u8>)>, amount: u64) -> Result<Reservation, CreditError> {
    match answer {
        Some((200 | 201, body)) => {
            granted_id(&body).map(|(id, balance)| Reservation { id, amount, balance }).ok_or(CreditError::Unavailable)
        }
        Some((402, body)) => {
            let refused = serde_json::from_slice::<Refused>(&body).unwrap_or(Refused { balance: 0, required: amount });
            Err(CreditError::Insufficient { required: refused.required.max(amount), balance: refused.balance })
        }
        Some((404, _)) => Err(CreditError::Insufficient { required: amount, balance: 0 }),
        Some((400..=499, _)) => Err(CreditError::Refused),
        _ => Err(CreditError::Unavailable),
    }
}

/// What the client is told is left (`X-Credits-Remaining`) once a reservation is settled.
pub fn remaining(reservation: &Reservation, charged: u64) -> u64 {
    reservation.balance.saturating_add(reservation.amount - charged.min(reservation.amount))
}

/// How much a billed response costs of the `held` amount: the upstream's report if it gave a
/// valid one, never more than held; all of it otherwise.
pub fn charge(held: u64, reported: Option<&str>) -> u64 {
    reported.and_then(|v| v.trim().parse::<u64>().ok()).map_or(held, |n| n.min(held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Result<PolicyCredits, String> {
        let raw: RawPolicyCredits = serde_json::from_str(json).map_err(|e| e.to_string())?;
        PolicyCredits::build("policies.api.credits", &raw, true).map_err(|e| e.to_string())
    }

    #[test]
    fn the_multiplier_header_scales_the_cost_within_its_bound() {
        let p = policy(r#"{"cost": 3, "multiplier_header": "X-Units", "max_multiplier": 10}"#).unwrap();
        let units = |values: &[&str]| -> Vec<(String, String)> {
            values.iter().map(|v| ("x-units".to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(p.amount(&[]), Ok(3));
        assert_eq!(p.amount(&units(&["4"])), Ok(12));
        for bad in ["0", "11", "-1", "2.5", "many", ""] {
            assert!(matches!(p.amount(&units(&[bad])), Err(CreditError::InvalidMultiplier { .. })), "{bad:?}");
        }
        assert!(matches!(p.amount(&units(&["1", "4"])), Err(CreditError::DuplicateMultiplier { .. })));
    }

    #[test]
    fn bill_statuses_are_codes_or_classes() {
        let p = policy(r#"{"cost": 1, "bill_statuses": ["2xx", 304, 101]}"#).unwrap();
        let billed: Vec<u16> = [101, 199, 200, 299, 304, 404, 500].into_iter().filter(|s| p.bills(*s)).collect();
        assert_eq!(billed, [101, 200, 299, 304]);
        assert!(policy(r#"{"cost": 1}"#).unwrap().bills(204) && !policy(r#"{"cost": 1}"#).unwrap().bills(304));
        for (json, want) in [
            (r#"{"cost": 1, "bill_statuses": []}"#, "bill_statuses: must name"),
            (r#"{"cost": 1, "bill_statuses": ["6xx"]}"#, "bill_statuses[0]: must be a status code or a class"),
            (r#"{"cost": 1, "bill_statuses": [200, 99]}"#, "bill_statuses[1]: must be a status code from 100"),
        ] {
            let got = policy(json).err().unwrap_or_default();
            assert!(got.contains(want), "{json}: {got}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (r#"{"cost": 0}"#, "policies.api.credits.cost: must be between 1"),
            (r#"{"cost": 1000000000000, "max_multiplier": 2}"#, "policies.api.credits.max_multiplier:"),
            (r#"{"cost": 1, "multiplier_header": "bad header"}"#, "policies.api.credits.multiplier_header:"),
            (r#"{"cost": 1, "on_failure": "retry"}"#, "unknown variant `retry`"),
            (r#"{"cost": 1, "timeout_ms": 0}"#, "policies.api.credits.timeout_ms: must be between"),
        ];
        for (json, want) in cases {
            let got = policy(json).err().unwrap_or_default();
            assert!(got.contains(want), "{json}: {got}");
        }
    }

    #[test]
    fn a_4xx_is_a_refusal_and_only_service_faults_are_unavailable() {
        for status in [400, 401, 403, 409, 422] {
            assert_eq!(reservation(Some((status, b"{}".to_vec())), 3), Err(CreditError::Refused), "{status}");
        }
        for answer in [None, Some((500, Vec::new())), Some((503, Vec::new()))] {
            assert_eq!(reservation(answer, 3), Err(CreditError::Unavailable));
        }
        assert!(billable_account("auth0.user-42@example.com") && !billable_account("auth0|42"));
        assert!(!billable_account("") && !billable_account(&"a".repeat(129)));
    }

    #[test]
    fn answers_map_to_reservations_and_refusals() {
        let granted = reservation(Some((201, br#"{"reservation_id": "res_1", "balance": 7}"#.to_vec())), 3);
        assert_eq!(granted, Ok(Reservation { id: "res_1".into(), amount: 3, balance: 7 }));
        let short =
            reservation(Some((402, br#"{"error": "insufficient_credits", "balance": 2, "required": 3}"#.to_vec())), 3);
        assert_eq!(short, Err(CreditError::Insufficient { required: 3, balance: 2 }));
        assert_eq!(reservation(Some((404, Vec::new())), 3), Err(CreditError::Insufficient { required: 3, balance: 0 }));
        for answer in [None, Some((503, Vec::new())), Some((201, b"garbage".to_vec()))] {
            assert_eq!(reservation(answer, 3), Err(CreditError::Unavailable));
        }
    }

    #[test]
    fn the_charge_is_the_report_capped_at_the_reservation() {
        let r = Reservation { id: "res_1".into(), amount: 10, balance: 90 };
        assert_eq!(charge(r.amount, None), 10);
        assert_eq!(charge(r.amount, Some(" 4 ")), 4);
        assert_eq!(charge(r.amount, Some("25")), 10);
        assert_eq!(charge(r.amount, Some("lots")), 10);
        assert_eq!(remaining(&r, 4), 96);
    }
}
