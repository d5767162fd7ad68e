//! Step 6: credits. A billed request reserves its cost with the credit service before it goes
//! upstream; its response commits the reservation (2xx, optionally for less, as the upstream
//! reports) or releases it (anything else, a reset, an abort). This module holds the config, the
//! callouts' requests and the reading of their answers; `settle` keeps commits and releases going
//! after the stream has ended.

use serde::Deserialize;

use crate::common::{header_name, ConfigError};
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
    pub service_token: String,
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
}

/// A policy's validated `credits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCredits {
    cost: u64,
    multiplier_header: Option<String>,
    max_multiplier: u64,
    pub on_failure: FailurePolicy,
    timeout_ms: Option<u64>,
}

/// Why a billed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("insufficient credits: this request costs {required}, the balance is {balance}")]
    Insufficient { required: u64, balance: u64 },
    #[error("the {header} header must be a whole number from 1 to {max}")]
    InvalidMultiplier { header: String, max: u64 },
    #[error("the credit service is unavailable; the request was not charged")]
    Unavailable,
}

impl Credits {
    pub fn build(raw: &RawCredits) -> Result<Credits, ConfigError> {
        let at = |field: &str, message: &str| ConfigError { path: format!("credits.{field}"), message: message.into() };
        if raw.cluster.is_empty() {
            return Err(at("cluster", "must name the credit service's Envoy cluster"));
        }
        if raw.service_token.is_empty() || !raw.service_token.bytes().all(|b| b.is_ascii_graphic()) {
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
            authorization: format!("Bearer {}", raw.service_token),
            timeout_ms: raw.timeout_ms,
            actual_cost_header,
            retry_seconds: raw.retry_seconds,
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

    /// `POST /v1/reservations/{id}/commit` or `…/release`.
    pub fn settle(&self, settlement: &Settlement) -> Callout {
        let body = match settlement.charge {
            Some(amount) => format!("{{\"amount\":{amount}}}"),
            None => "{}".to_owned(),
        };
        let path = format!("/v1/reservations/{}/{}", settlement.reservation_id, settlement.action());
        self.call(path, body, self.timeout_ms)
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
        Ok(PolicyCredits {
            cost: raw.cost,
            multiplier_header,
            max_multiplier: raw.max_multiplier,
            on_failure: raw.on_failure,
            timeout_ms: raw.timeout_ms,
        })
    }

    /// The amount to reserve for a request whose headers `get` reads.
    pub fn amount<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> Result<u64, CreditError> {
        let Some(header) = &self.multiplier_header else { return Ok(self.cost) };
        let Some(value) = get(header) else { return Ok(self.cost) };
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

/// A commit (`charge` set) or a release to send for a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub reservation_id: String,
    pub charge: Option<u64>,
}

impl Settlement {
    pub fn action(&self) -> &'static str {
        if self.charge.is_some() {
            "commit"
        } else {
            "release"
        }
    }
}

#[derive(Deserialize)]
struct Granted {
    reservation_id: String,
    balance: u64,
}

#[derive(Deserialize)]
struct Refused {
    #[serde(default)]
    balance: u64,
    #[serde(default)]
    required: u64,
}

/// Reads the credit service's answer to a reservation: granted, refused (402, or no such
/// account), or `Unavailable` for anything else, including no answer at all.
pub fn reservation(answer: Option<(u16, Vec<u8>)>, amount: u64) -> Result<Reservation, CreditError> {
    match answer {
        Some((200 | 201, body)) => match serde_json::from_slice::<Granted>(&body) {
            Ok(g) => Ok(Reservation { id: g.reservation_id, amount, balance: g.balance }),
            Err(_) => Err(CreditError::Unavailable),
        },
        Some((402, body)) => {
            let refused = serde_json::from_slice::<Refused>(&body).unwrap_or(Refused { balance: 0, required: amount });
            Err(CreditError::Insufficient { required: refused.required.max(amount), balance: refused.balance })
        }
        Some((404, _)) => Err(CreditError::Insufficient { required: amount, balance: 0 }),
        _ => Err(CreditError::Unavailable),
    }
}

/// What the client is told of the charge: `X-Credits-Charged` and `X-Credits-Remaining`.
pub fn response_headers(reservation: &Reservation, charged: u64) -> [(&'static str, String); 2] {
    let remaining = reservation.balance.saturating_add(reservation.amount - charged.min(reservation.amount));
    [("x-credits-charged", charged.to_string()), ("x-credits-remaining", remaining.to_string())]
}

/// How much to commit for a 2xx: the upstream's report if it gave a valid one, never more than
/// reserved; the whole reservation otherwise.
pub fn charge(reservation: &Reservation, reported: Option<&str>) -> u64 {
    reported.and_then(|v| v.trim().parse::<u64>().ok()).map_or(reservation.amount, |n| n.min(reservation.amount))
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
        assert_eq!(p.amount(|_| None), Ok(3));
        assert_eq!(p.amount(|h| (h == "x-units").then_some("4")), Ok(12));
        for bad in ["0", "11", "-1", "2.5", "many", ""] {
            assert!(matches!(p.amount(|_| Some(bad)), Err(CreditError::InvalidMultiplier { .. })), "{bad:?}");
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
    fn answers_map_to_reservations_and_refusals() {
        let granted = reservation(Some((201, br#"{"reservation_id": "res_1", "balance": 7}"#.to_vec())), 3);
        assert_eq!(granted, Ok(Reservation { id: "res_1".into(), amount: 3, balance: 7 }));
        let short =
            reservation(Some((402, br#"{"error": "insufficient_credits", "balance": 2, "required": 3}"#.to_vec())), 3);
        assert_eq!(short, Err(CreditError::Insufficient { required: 3, balance: 2 }));
        assert_eq!(reservation(Some((404, Vec::new())), 3), Err(CreditError::Insufficient { required: 3, balance: 0 }));
        for answer in [None, Some((503, Vec::new())), Some((201, b"garbage".to_vec())), Some((401, Vec::new()))] {
            assert_eq!(reservation(answer, 3), Err(CreditError::Unavailable));
        }
    }

    #[test]
    fn the_charge_is_the_report_capped_at_the_reservation() {
        let r = Reservation { id: "res_1".into(), amount: 10, balance: 90 };
        assert_eq!(charge(&r, None), 10);
        assert_eq!(charge(&r, Some(" 4 ")), 4);
        assert_eq!(charge(&r, Some("25")), 10);
        assert_eq!(charge(&r, Some("lots")), 10);
        assert_eq!(response_headers(&r, 4).map(|(_, v)| v), ["4", "96"]);
    }
}
