//! Step 5: rate limiting. A caller is its account when authenticated, else its client address
//! (Envoy's resolved downstream address, IPv6 by prefix). A policy's `rate_limit` applies the
//! caller's tier limits, its own per-route limits, or both; every window of every limit must
//! allow the request, and then all of them count it in one compare-and-swap.

mod gcra;
mod table;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::rc::Rc;

use serde::Deserialize;

use crate::auth::Identity;
use crate::common::{default_true, ConfigError};
use crate::host::Host;
pub use gcra::Period;
use gcra::{ceil_seconds, Verdict, Window};
pub use table::{Layout, Table};

/// Tier windows take the first positions of a caller's state, one per period, shared by all
/// tiers (a caller has one tier at a time); route windows follow.
const TIER_POSITIONS: usize = Period::ALL.len();

/// `rate_limits`: the tiers and the shared table.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// Limits per tier name, the tier coming from the caller's identity (API key `tier`, JWT
    /// tier claim). Applied on policies whose `rate_limit.tiers` is true.
    #[serde(default)]
    pub tiers: BTreeMap<String, RawLimits>,
    /// The tier of callers whose identity names none, or one not in `tiers`. Required with `tiers`.
    #[serde(default)]
    pub default_tier: Option<String>,
    /// Limits for unauthenticated callers (public policies), per client address.
    #[serde(default)]
    pub anonymous: Option<RawLimits>,
    /// Callers tracked at once: the size of the table in Envoy's shared data, fixed at start. Each
    /// slot costs about 120 bytes plus 8 per window (measured: 158 bytes with 5 windows); see the README.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// IPv6 clients are limited per network of this prefix length (one host often owns a /64).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix_length: u8,
    /// A second, coarser limit on IPv6 clients: per network of `prefix_length` (a site is often
    /// given a /48, which holds 65,536 /64s), each limit multiplied by `factor`. `null` turns it off.
    #[serde(default = "default_ipv6_network")]
    pub ipv6_network: Option<RawIpv6Network>,
}

/// `rate_limits.ipv6_network`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawIpv6Network {
    /// Shorter than `ipv6_prefix_length`.
    #[serde(default = "default_ipv6_network_prefix")]
    pub prefix_length: u8,
    /// The network's limits are the address limits times this (at least 1).
    #[serde(default = "default_ipv6_network_factor")]
    pub factor: u64,
}

fn default_slots() -> u32 {
    65_536
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_ipv6_network() -> Option<RawIpv6Network> {
    Some(RawIpv6Network { prefix_length: default_ipv6_network_prefix(), factor: default_ipv6_network_factor() })
}
fn default_ipv6_network_prefix() -> u8 {
    48
}
fn default_ipv6_network_factor() -> u64 {
    16
}

/// Requests allowed per period; several periods may be set at once and all apply.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub per_second: Option<u64>,
    pub per_minute: Option<u64>,
    pub per_hour: Option<u64>,
    pub per_day: Option<u64>,
    /// The most requests allowed back to back. By default each period's whole limit may be spent
    /// at once; a smaller burst spreads it out. Must not exceed any limit set.
    pub burst: Option<u64>,
}

/// A policy's `rate_limit`. A policy without one is never limited (health checks, say).
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPolicyLimit {
    /// Apply the caller's tier limits (`rate_limits.tiers`; `rate_limits.anonymous` on public
    /// policies). They are one budget across every policy that applies them.
    #[serde(default = "default_true")]
    pub tiers: bool,
    /// Limits of this policy's own, per caller, on top of the tier limits (`/auth/login`: 5 per
    /// minute per client address, say).
    #[serde(default)]
    pub route: Option<RawLimits>,
}

/// A validated window with the name the `RateLimit` headers give it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Limit {
    window: Window,
    /// Shared with every `Quota` it reports, so a request copies no string.
    name: Rc<str>,
    /// The window's `RateLimit-Policy` value, which never changes: formatted once, not per request.
    policy: Rc<str>,
}

/// What a policy's requests are limited by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLimit {
    tiers: bool,
    route: Vec<Limit>,
    /// `route` widened for an IPv6 client's network (`RateLimits::network`); empty when off.
    network_route: Vec<Limit>,
}

/// The validated `rate_limits`, and the layout of the table the counts live in. The table itself
/// is per-VM state (`worker::Worker`): the configuration only says what it looks like.
#[derive(Debug)]
pub struct RateLimits {
    tiers: BTreeMap<String, Vec<Limit>>,
    default_tier: Option<String>,
    anonymous: Vec<Limit>,
    ipv6_prefix: u8,
    /// The coarser IPv6 network and `anonymous` widened for it.
    network: Option<(u8, Vec<Limit>)>,
    layout: Layout,
}

/// Who a request is counted against.
pub enum Caller<'a> {
    Identity(&'a Identity),
    /// Envoy's `source.address` (`ip:port`), or `None` when Envoy gave none.
    Address(Option<&'a str>),
}

/// The tightest window after this request: what the `X-RateLimit-*` and `RateLimit` headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub name: Rc<str>,
    /// The `RateLimit-Policy` value.
    pub policy: Rc<str>,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window's bucket is full again.
    pub reset: u64,
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    #[error("rate limit exceeded; retry after {retry_after} s")]
    Exceeded { quota: Quota, retry_after: u64 },
    /// Workers kept racing on the caller's count; refused rather than counted loosely.
    #[error("rate limit state is busy; retry shortly")]
    Contended,
    /// A rate-limited public route, and Envoy gave no client address to count it under.
    #[error("the gateway cannot tell which client sent this request")]
    UnknownAddress,
}

/// What a check did, for the caller and for the metrics.
pub struct Checked {
    pub result: Result<Option<Quota>, Limited>,
    pub retries: u32,
}

impl RateLimits {
    /// Validates `rate_limits` and every policy's `rate_limit`, and lays out the callers' state.
    pub fn build(
        raw: Option<&RawRateLimits>,
        policies: &BTreeMap<String, (crate::routes::Access, Option<&RawPolicyLimit>)>,
    ) -> Result<(Option<RateLimits>, BTreeMap<String, PolicyLimit>), ConfigError> {
        let empty = RawRateLimits {
            tiers: BTreeMap::new(),
            default_tier: None,
            anonymous: None,
            slots: default_slots(),
            ipv6_prefix_length: default_ipv6_prefix(),
            ipv6_network: None,
        };
        let raw_limits = raw.unwrap_or(&empty);
        let mut tiers = BTreeMap::new();
        for (name, limits) in &raw_limits.tiers {
            tiers.insert(name.clone(), limits_of(&format!("rate_limits.tiers.{name}"), limits, name, None)?);
        }
        match &raw_limits.default_tier {
            Some(name) if !tiers.contains_key(name) => {
                return Err(ConfigError { path: "rate_limits.default_tier".into(), message: no_tier(name) })
            }
            None if !tiers.is_empty() => {
                return Err(ConfigError {
                    path: "rate_limits.default_tier".into(),
                    message: "is required with tiers: it is the tier of callers whose identity names none".into(),
                })
            }
            _ => {}
        }
        let anonymous = match &raw_limits.anonymous {
            Some(limits) => limits_of("rate_limits.anonymous", limits, "anonymous", None)?,
            None => Vec::new(),
        };
        if !(1..=128).contains(&raw_limits.ipv6_prefix_length) {
            return Err(ConfigError {
                path: "rate_limits.ipv6_prefix_length".into(),
                message: "must be between 1 and 128".into(),
            });
        }
        if let Some(network) = &raw_limits.ipv6_network {
            if !(1..raw_limits.ipv6_prefix_length).contains(&network.prefix_length) {
                return Err(ConfigError {
                    path: "rate_limits.ipv6_network.prefix_length".into(),
                    message: "must be between 1 and ipv6_prefix_length - 1".into(),
                });
            }
            if network.factor == 0 {
                return Err(ConfigError {
                    path: "rate_limits.ipv6_network.factor".into(),
                    message: "must be > 0".into(),
                });
            }
        }
        let factor = raw_limits.ipv6_network.as_ref().map(|n| n.factor);
        if !(256..=4_194_304).contains(&raw_limits.slots) {
            return Err(ConfigError {
                path: "rate_limits.slots".into(),
                message: "must be between 256 and 4194304".into(),
            });
        }

        let mut width = TIER_POSITIONS;
        let mut by_policy = BTreeMap::new();
        for (name, (access, limit)) in policies {
            let Some(limit) = limit else { continue };
            let path = format!("policies.{name}.rate_limit");
            let at = |message: &str| ConfigError { path: path.clone(), message: message.to_owned() };
            if *access == crate::routes::Access::Deny {
                return Err(at("a deny policy answers 404 before any limit; remove rate_limit"));
            }
            if limit.tiers {
                let public = *access == crate::routes::Access::Public;
                if public && anonymous.is_empty() {
                    return Err(at("tier limits on a public policy need rate_limits.anonymous"));
                }
                if !public && tiers.is_empty() {
                    return Err(at("tier limits need rate_limits.tiers"));
                }
            }
            let route = match &limit.route {
                Some(limits) => limits_of(&format!("{path}.route"), limits, name, Some(&mut width))?,
                None if !limit.tiers => return Err(at("limits nothing: set route limits, or tiers: true")),
                None => Vec::new(),
            };
            let network_route = factor.map_or_else(Vec::new, |f| widened(&route, f));
            by_policy.insert(name.clone(), PolicyLimit { tiers: limit.tiers, route, network_route });
        }
        let mut windows = windows_digest(&tiers, raw_limits.default_tier.as_deref(), &anonymous, &by_policy);
        if let Some(network) = &raw_limits.ipv6_network {
            // The network's counts mean something else under another prefix or factor.
            let mut marked = windows.to_vec();
            marked.push(network.prefix_length);
            marked.extend_from_slice(&network.factor.to_le_bytes());
            windows = hmac_sha256::Hash::hash(&marked);
        }
        let network = raw_limits.ipv6_network.as_ref().map(|n| (n.prefix_length, widened(&anonymous, n.factor)));
        let limits = (!by_policy.is_empty()).then(|| RateLimits {
            tiers,
            default_tier: raw_limits.default_tier.clone(),
            anonymous,
            ipv6_prefix: raw_limits.ipv6_prefix_length,
            network,
            layout: Layout { slots: raw_limits.slots, width, windows },
        });
        Ok((limits, by_policy))
    }

    /// Whether `tier`, as an API key or JWT provider names it, is a configured tier.
    pub fn check_tier(raw: Option<&RawRateLimits>, tier: &str, path: &str) -> Result<(), ConfigError> {
        match raw {
            Some(raw) if !raw.tiers.is_empty() && !raw.tiers.contains_key(tier) => {
                Err(ConfigError { path: path.to_owned(), message: no_tier(tier) })
            }
            _ => Ok(()),
        }
    }

    /// The shared-data table the counts live in, as this configuration lays it out.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Counts one request in `table` (the worker's, opened with `layout()`) against every window
    /// that applies; refused, it counts nowhere. `now` is the proxy's clock in nanoseconds.
    pub fn check(
        &self,
        table: &Table,
        host: &mut dyn Host,
        policy: &PolicyLimit,
        caller: &Caller,
        now: u64,
    ) -> Checked {
        let tier = if policy.tiers { self.tier_limits(caller) } else { &[] };
        let limits: Vec<&Limit> = tier.iter().chain(&policy.route).collect();
        if limits.is_empty() {
            return Checked { result: Ok(None), retries: 0 };
        }
        let key = match caller {
            Caller::Identity(identity) => ["account:", identity.account.as_str()].concat(),
            Caller::Address(address) => match address.and_then(parse_ip) {
                Some(ip) => address_key(ip, self.ipv6_prefix),
                // Without an address every such client would share one count, each spending the
                // others' budget unseen: refused instead (see the README).
                None => return Checked { result: Err(Limited::UnknownAddress), retries: 0 },
            },
        };
        let mut checked = count(table, host, &key, &limits, now);
        // An IPv6 client also counts against its network, only once its own limits let it pass.
        if let (Caller::Address(Some(address)), Some((prefix, anonymous)), Ok(_)) =
            (caller, &self.network, &checked.result)
        {
            if let Some(ip @ IpAddr::V6(_)) = parse_ip(address) {
                let tier = if policy.tiers { anonymous.as_slice() } else { &[] };
                let wide: Vec<&Limit> = tier.iter().chain(&policy.network_route).collect();
                let network = count(table, host, &address_key(ip, *prefix), &wide, now);
                checked.retries += network.retries;
                if network.result.is_err() {
                    checked.result = network.result;
                }
            }
        }
        checked
    }

    fn tier_limits(&self, caller: &Caller) -> &[Limit] {
        match caller {
            Caller::Address(_) => &self.anonymous,
            Caller::Identity(identity) => identity
                .tier
                .as_ref()
                .and_then(|t| self.tiers.get(t))
                .or_else(|| self.default_tier.as_ref().and_then(|t| self.tiers.get(t)))
                .map_or(&[], Vec::as_slice),
        }
    }
}

/// Counts one request under `key` (the bytes the slot hash is taken over; an address never
/// reaches shared data as such) against `limits`.
fn count(table: &Table, host: &mut dyn Host, key: &str, limits: &[&Limit], now: u64) -> Checked {
    match table.update(host, key.as_bytes(), now, |tats| decide(limits, tats, now)) {
        Ok(applied) => Checked { result: applied.value.map(Some), retries: applied.retries },
        Err(table::Contended) => Checked { result: Err(Limited::Contended), retries: 0 },
    }
}

/// `limits` for a whole network: each limit and burst times `factor`, at the same positions (the
/// network has a slot of its own), named apart in the `RateLimit` headers.
fn widened(limits: &[Limit], factor: u64) -> Vec<Limit> {
    limits
        .iter()
        .map(|l| {
            let w = &l.window;
            let limit = w.limit.saturating_mul(factor);
            let window = Window::new(w.period, limit, w.capacity.saturating_mul(factor), w.position);
            let name = format!("{}-ipv6-network", l.name);
            let policy = format!("\"{name}\";q={limit};w={}", w.period.seconds()).into();
            Limit { window, name: name.into(), policy }
        })
        .collect()
}

/// A client address as the slot hash takes it: IPv4 whole, IPv6 by network.
fn address_key(ip: IpAddr, ipv6_prefix: u8) -> String {
    match ip {
        IpAddr::V6(v6) => format!("ip:{}/{ipv6_prefix}", mask(v6, ipv6_prefix)),
        IpAddr::V4(v4) => format!("ip:{v4}"),
    }
}

/// Limits on something other than requests, per client address, in a table of their own:
/// authentication failures. A request first asks whether the address has budget left (`admits`,
/// which counts nothing), and only what failed is counted (`spend`). A client without an address
/// is not counted: one shared count would let any such client lock out all the others.
#[derive(Debug)]
pub struct AddressBudget {
    limits: Vec<Limit>,
    layout: Layout,
}

impl AddressBudget {
    /// `raw` validated at `path`; `label` names its windows in the `RateLimit` headers.
    pub fn new(path: &str, raw: &RawLimits, label: &str, slots: u32) -> Result<AddressBudget, ConfigError> {
        let limits = limits_of(path, raw, label, None)?;
        if !(256..=4_194_304).contains(&slots) {
            return Err(ConfigError {
                path: format!("{path}.slots"),
                message: "must be between 256 and 4194304".into(),
            });
        }
        let windows = windows_digest(&BTreeMap::new(), None, &limits, &BTreeMap::new());
        Ok(AddressBudget { limits, layout: Layout { slots, width: TIER_POSITIONS, windows } })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Refused when the address has spent its budget; counts nothing. `now` in nanoseconds.
    pub fn admits(&self, table: &Table, host: &mut dyn Host, address: Option<&str>, now: u64) -> Result<(), Limited> {
        let Some(ip) = address.and_then(parse_ip) else { return Ok(()) };
        let limits: Vec<&Limit> = self.limits.iter().collect();
        let key = address_key(ip, BUDGET_IPV6_PREFIX);
        match table.update(host, key.as_bytes(), now, |tats| (decide(&limits, tats, now).0, None)) {
            Ok(applied) => applied.value.map(drop),
            Err(table::Contended) => Err(Limited::Contended),
        }
    }

    /// Counts one against the address's budget.
    pub fn spend(&self, table: &Table, host: &mut dyn Host, address: Option<&str>, now: u64) {
        let Some(ip) = address.and_then(parse_ip) else { return };
        let limits: Vec<&Limit> = self.limits.iter().collect();
        let key = address_key(ip, BUDGET_IPV6_PREFIX);
        // A lost race or a full budget counts nothing more: the next request is refused anyway.
        let _ = table.update(host, key.as_bytes(), now, |tats| decide(&limits, tats, now));
    }
}

/// An `AddressBudget` counts IPv6 clients per /64, the network one host is usually given.
const BUDGET_IPV6_PREFIX: u8 = 64;

/// What the stored TATs mean: every window's name, position, period, limit and capacity. Counts
/// survive a config edit exactly when this digest (and the table's size) stays the same.
fn windows_digest(
    tiers: &BTreeMap<String, Vec<Limit>>,
    default_tier: Option<&str>,
    anonymous: &[Limit],
    policies: &BTreeMap<String, PolicyLimit>,
) -> [u8; 32] {
    fn put(out: &mut Vec<u8>, word: u64) {
        out.extend_from_slice(&word.to_le_bytes());
    }
    fn text(out: &mut Vec<u8>, s: &str) {
        put(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    let mut encoded = Vec::new();
    text(&mut encoded, default_tier.unwrap_or_default());
    let tiers = tiers.iter().map(|(name, limits)| (name.as_str(), limits.as_slice()));
    // Policies that only apply tier limits add no window: adding or dropping one keeps the counts.
    let routes = policies
        .iter()
        .filter(|(_, policy)| !policy.route.is_empty())
        .map(|(name, policy)| (name.as_str(), policy.route.as_slice()));
    // The anonymous limits go between the tiers and the routes, under the empty name.
    for (name, limits) in tiers.chain([("", anonymous)]).chain(routes) {
        text(&mut encoded, name);
        put(&mut encoded, limits.len() as u64);
        for Limit { window, .. } in limits {
            for word in [window.position as u64, window.period.seconds(), window.limit, window.capacity] {
                put(&mut encoded, word);
            }
        }
    }
    hmac_sha256::Hash::hash(&encoded)
}

fn no_tier(name: &str) -> String {
    format!("no tier named {name:?} in rate_limits.tiers")
}

/// Validates one set of limits into windows. Route windows (`width` given) take new positions
/// in the caller's state; tier windows share the fixed first ones.
fn limits_of(path: &str, raw: &RawLimits, label: &str, width: Option<&mut usize>) -> Result<Vec<Limit>, ConfigError> {
    let set: Vec<(Period, u64)> = Period::ALL
        .into_iter()
        .zip([raw.per_second, raw.per_minute, raw.per_hour, raw.per_day])
        .filter_map(|(period, limit)| limit.map(|l| (period, l)))
        .collect();
    if set.is_empty() {
        return Err(ConfigError {
            path: path.to_owned(),
            message: "set at least one of per_second, per_minute, per_hour, per_day".into(),
        });
    }
    for (period, limit) in &set {
        if *limit == 0 {
            return Err(ConfigError {
                path: format!("{path}.{}", period.field()),
                message: "must be > 0; leave it out for no limit, or use a deny policy".into(),
            });
        }
    }
    if let Some(burst) = raw.burst {
        if burst == 0 {
            return Err(ConfigError { path: format!("{path}.burst"), message: "must be > 0".into() });
        }
        if let Some((period, limit)) = set.iter().find(|(_, limit)| burst > *limit) {
            return Err(ConfigError {
                path: format!("{path}.burst"),
                message: format!("must not exceed {} ({limit})", period.field()),
            });
        }
    }
    let mut next = width;
    Ok(set
        .into_iter()
        .map(|(period, limit)| {
            let position = match next.as_deref_mut() {
                Some(width) => {
                    *width += 1;
                    *width - 1
                }
                None => period as usize,
            };
            let window = Window::new(period, limit, raw.burst.unwrap_or(limit), position);
            let name = format!("{label}-{}", period.field().replace('_', "-"));
            let policy = format!("\"{name}\";q={limit};w={}", period.seconds()).into();
            Limit { window, name: name.into(), policy }
        })
        .collect())
}

/// Every window decides; all must allow. Refused: nothing is stored, and the client is told the
/// longest wait. Allowed: the window with the fewest requests left is the one reported.
fn decide(limits: &[&Limit], tats: &[u64], now: u64) -> (Result<Quota, Limited>, Option<Vec<u64>>) {
    let mut next = tats.to_vec();
    let mut tightest: Option<(u64, u64, &Limit)> = None;
    let mut refused: Option<(u64, u64, &Limit)> = None;
    for limit in limits {
        let tat = tats.get(limit.window.position).copied().unwrap_or(0);
        match limit.window.check(tat, now) {
            Verdict::Allow { tat, remaining, full_in } => {
                if let Some(slot) = next.get_mut(limit.window.position) {
                    *slot = tat;
                }
                if tightest.is_none_or(|(r, f, _)| remaining < r || (remaining == r && full_in > f)) {
                    tightest = Some((remaining, full_in, limit));
                }
            }
            Verdict::Deny { wait, full_in } => {
                if refused.is_none_or(|(w, _, _)| wait > w) {
                    refused = Some((wait, full_in, limit));
                }
            }
        }
    }
    let quota = |remaining: u64, full_in: u64, limit: &Limit| Quota {
        name: limit.name.clone(),
        policy: limit.policy.clone(),
        limit: limit.window.limit,
        remaining,
        reset: ceil_seconds(full_in),
    };
    match (refused, tightest) {
        (Some((wait, full_in, limit)), _) => {
            (Err(Limited::Exceeded { quota: quota(0, full_in, limit), retry_after: ceil_seconds(wait) }), None)
        }
        (None, Some((remaining, full_in, limit))) => (Ok(quota(remaining, full_in, limit)), Some(next)),
        (None, None) => (Err(Limited::Contended), None),
    }
}

/// `ip:port`, `[v6]:port` or a bare address, as Envoy writes `source.address`. An IPv4 client on
/// a dual-stack listener counts as its IPv4 address.
fn parse_ip(address: &str) -> Option<IpAddr> {
    let ip: IpAddr = if let Some(rest) = address.strip_prefix('[') {
        rest.split(']').next()?.parse().ok()?
    } else if let Ok(ip) = address.parse() {
        ip
    } else {
        address.rsplit_once(':')?.0.parse().ok()?
    };
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    })
}

fn mask(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(ip);
    let kept = if prefix >= 128 { u128::MAX } else { !(u128::MAX >> prefix) };
    Ipv6Addr::from(bits & kept)
}

impl Quota {
    /// The response headers for this quota: the de-facto `X-RateLimit-*` trio (reset as a Unix
    /// time, as GitHub and the seeds send it) and the IETF `RateLimit-Policy` / `RateLimit` fields
    /// (draft-ietf-httpapi-ratelimit-headers), all describing the same window.
    pub fn headers(&self, now_seconds: u64) -> [(&'static str, String); 5] {
        let remaining = self.remaining.to_string();
        let reset = self.reset.to_string();
        // Built by hand: `format!` costs several times as much, on every limited response.
        let mut ratelimit = String::with_capacity(self.name.len() + remaining.len() + reset.len() + 8);
        for part in ["\"", &self.name, "\";r=", &remaining, ";t=", &reset] {
            ratelimit.push_str(part);
        }
        [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset", (now_seconds + self.reset).to_string()),
            ("ratelimit-policy", self.policy.to_string()),
            ("ratelimit", ratelimit),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use crate::host::fake::FakeHost;
    use crate::host::NANOS_PER_SECOND;
    use crate::problem::Denial;
    use crate::routes::Access;

    fn limits(
        raw: &str,
        policies: &[(&str, Access, &str)],
    ) -> Result<(RateLimits, BTreeMap<String, PolicyLimit>), String> {
        let raw: RawRateLimits = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        let parsed: Vec<(String, Access, RawPolicyLimit)> =
            policies.iter().map(|(n, a, l)| ((*n).to_owned(), *a, serde_json::from_str(l).unwrap())).collect();
        let by_name = parsed.iter().map(|(n, a, l)| (n.clone(), (*a, Some(l)))).collect();
        let (limits, policies) = RateLimits::build(Some(&raw), &by_name).map_err(|e| e.to_string())?;
        Ok((limits.unwrap(), policies))
    }

    const TIERS: &str = r#"{"tiers": {"free": {"per_minute": 3}, "pro": {"per_minute": 10, "per_hour": 100}},
        "default_tier": "free", "anonymous": {"per_second": 2}, "slots": 256}"#;

    fn identity(account: &str, tier: Option<&str>) -> Identity {
        Identity {
            subject: account.to_owned(),
            account: account.to_owned(),
            tier: tier.map(str::to_owned),
            method: AuthMethod::ApiKey,
            key_id: None,
            scopes: Vec::new(),
            remove_upstream: Vec::new(),
        }
    }

    fn setup() -> (RateLimits, BTreeMap<String, PolicyLimit>, FakeHost, Table) {
        let (limits, policies) = limits(
            TIERS,
            &[
                ("api", Access::Authenticated, "{}"),
                ("login", Access::Public, r#"{"tiers": false, "route": {"per_minute": 5}}"#),
                ("search", Access::Authenticated, r#"{"route": {"per_minute": 2}}"#),
            ],
        )
        .unwrap();
        let mut host = FakeHost::default();
        let table = Table::open(limits.layout(), [9; 16], &mut host);
        (limits, policies, host, table)
    }

    fn passes(limits: &RateLimits, table: &Table, policy: &PolicyLimit, host: &mut FakeHost, caller: &Caller) -> usize {
        (0..50)
            .take_while(|_| {
                let now = host.now_nanos();
                limits.check(table, host, policy, caller, now).result.is_ok()
            })
            .count()
    }

    #[test]
    fn each_tier_gets_its_own_limit_and_unknown_tiers_the_default() {
        let (limits, policies, mut host, table) = setup();
        let api = &policies["api"];
        let cases = [("a", Some("free"), 3), ("b", Some("pro"), 10), ("c", None, 3), ("d", Some("gold"), 3)];
        for (account, tier, want) in cases {
            let id = identity(account, tier);
            assert_eq!(passes(&limits, &table, api, &mut host, &Caller::Identity(&id)), want, "{account} {tier:?}");
        }
    }

    #[test]
    fn a_route_limit_applies_on_top_of_the_tier_and_a_refusal_spends_nothing() {
        let (limits, policies, mut host, table) = setup();
        let pro = identity("acme", Some("pro"));
        let caller = Caller::Identity(&pro);
        assert_eq!(passes(&limits, &table, &policies["search"], &mut host, &caller), 2);
        assert_eq!(
            passes(&limits, &table, &policies["api"], &mut host, &caller),
            8,
            "10 per minute, 2 spent on search"
        );
    }

    #[test]
    fn the_tightest_window_is_reported_and_a_refusal_says_how_long_to_wait() {
        let (limits, policies, mut host, table) = setup();
        let pro = identity("acme", Some("pro"));
        let caller = Caller::Identity(&pro);
        let now = host.now_nanos();
        let first = limits.check(&table, &mut host, &policies["search"], &caller, now).result.unwrap().unwrap();
        let policy = "\"search-per-minute\";q=2;w=60".into();
        assert_eq!(first, Quota { name: "search-per-minute".into(), policy, limit: 2, remaining: 1, reset: 30 });
        limits.check(&table, &mut host, &policies["search"], &caller, now).result.unwrap();
        let Err(Limited::Exceeded { quota, retry_after }) =
            limits.check(&table, &mut host, &policies["search"], &caller, now).result
        else {
            panic!("not refused")
        };
        assert_eq!((quota.remaining, quota.reset, retry_after), (0, 60, 30));
        let later = now + retry_after * NANOS_PER_SECOND;
        assert!(
            limits.check(&table, &mut host, &policies["search"], &caller, later).result.is_ok(),
            "Retry-After is honest"
        );
    }

    #[test]
    fn anonymous_callers_are_limited_per_address_and_ipv6_per_prefix() {
        let (limits, policies, mut host, table) = setup();
        let login = &policies["login"];
        let one = Caller::Address(Some("203.0.113.7:5000"));
        assert_eq!(passes(&limits, &table, login, &mut host, &one), 5);
        assert_eq!(
            passes(&limits, &table, login, &mut host, &Caller::Address(Some("203.0.113.7:6001"))),
            0,
            "port ignored"
        );
        assert_eq!(passes(&limits, &table, login, &mut host, &Caller::Address(Some("203.0.113.8:5000"))), 5);
        assert_eq!(passes(&limits, &table, login, &mut host, &Caller::Address(Some("[2001:db8:1:2::1]:443"))), 5);
        assert_eq!(passes(&limits, &table, login, &mut host, &Caller::Address(Some("[2001:db8:1:2:ffff::9]:80"))), 0);
        assert_eq!(passes(&limits, &table, login, &mut host, &Caller::Address(Some("[2001:db8:1:3::1]:80"))), 5);
    }

    #[test]
    fn an_ipv6_network_has_a_coarser_limit_beside_its_addresses() {
        let raw =
            TIERS.replace(r#""slots": 256"#, r#""slots": 256, "ipv6_network": {"prefix_length": 48, "factor": 2}"#);
        let (limits, policies) =
            limits(&raw, &[("login", Access::Public, r#"{"tiers": false, "route": {"per_minute": 5}}"#)]).unwrap();
        let mut host = FakeHost::default();
        let table = Table::open(limits.layout(), [9; 16], &mut host);
        let login = &policies["login"];
        let from = |address: &'static str| Caller::Address(Some(address));
        assert_eq!(passes(&limits, &table, login, &mut host, &from("[2001:db8:1:2::1]:443")), 5);
        assert_eq!(passes(&limits, &table, login, &mut host, &from("[2001:db8:1:3::1]:443")), 5);
        assert_eq!(
            passes(&limits, &table, login, &mut host, &from("[2001:db8:1:4::1]:443")),
            0,
            "the /48's 10 are spent"
        );
        let now = host.now_nanos();
        let refused = limits.check(&table, &mut host, login, &from("[2001:db8:1:5::1]:443"), now);
        let Err(Limited::Exceeded { quota, .. }) = refused.result else { panic!("{:?}", refused.result) };
        assert_eq!((&*quota.name, quota.limit), ("login-per-minute-ipv6-network", 10));
        assert_eq!(passes(&limits, &table, login, &mut host, &from("[2001:db8:2:1::1]:443")), 5, "another /48");
        assert_eq!(passes(&limits, &table, login, &mut host, &from("198.51.100.1:80")), 5, "IPv4 has no network limit");
    }

    #[test]
    fn a_client_without_an_address_is_refused_rather_than_pooled() {
        let (limits, policies, mut host, table) = setup();
        let checked = limits.check(&table, &mut host, &policies["login"], &Caller::Address(None), 0);
        assert_eq!(checked.result, Err(Limited::UnknownAddress));
        let checked = limits.check(&table, &mut host, &policies["login"], &Caller::Address(Some("@unix")), 0);
        assert_eq!(checked.result, Err(Limited::UnknownAddress));
        assert_eq!(Denial::from(Limited::UnknownAddress).problem_type().status, 500);
    }

    #[test]
    fn headers_agree_with_each_other() {
        let policy = "\"pro-per-minute\";q=10;w=60".into();
        let quota = Quota { name: "pro-per-minute".into(), policy, limit: 10, remaining: 4, reset: 36 };
        let headers = quota.headers(1_000);
        assert_eq!(
            headers.map(|(_, v)| v),
            ["10", "4", "1036", "\"pro-per-minute\";q=10;w=60", "\"pro-per-minute\";r=4;t=36"].map(String::from)
        );
    }

    #[test]
    #[allow(clippy::type_complexity, reason = "a table of configs reads best inline")]
    fn config_errors_name_the_field() {
        let api = [("api", Access::Authenticated, "{}")];
        let cases: [(&str, &[(&str, Access, &str)], &str); 9] = [
            (
                r#"{"tiers": {"free": {"per_minute": 0}}, "default_tier": "free"}"#,
                &api,
                "rate_limits.tiers.free.per_minute: must be > 0",
            ),
            (
                r#"{"tiers": {"free": {"burst": 3}}, "default_tier": "free"}"#,
                &api,
                "rate_limits.tiers.free: set at least one",
            ),
            (
                r#"{"tiers": {"free": {"per_second": 2, "burst": 3}}, "default_tier": "free"}"#,
                &api,
                "rate_limits.tiers.free.burst: must not exceed per_second (2)",
            ),
            (r#"{"tiers": {"free": {"per_second": 2}}}"#, &api, "rate_limits.default_tier: is required"),
            (
                r#"{"tiers": {"free": {"per_second": 2}}, "default_tier": "gold"}"#,
                &api,
                "rate_limits.default_tier: no tier named \"gold\"",
            ),
            (r#"{}"#, &api, "policies.api.rate_limit: tier limits need rate_limits.tiers"),
            (r#"{}"#, &[("p", Access::Public, "{}")], "policies.p.rate_limit: tier limits on a public policy need"),
            (r#"{}"#, &[("p", Access::Public, r#"{"tiers": false}"#)], "policies.p.rate_limit: limits nothing"),
            (
                r#"{"slots": 10}"#,
                &[("p", Access::Public, r#"{"tiers": false, "route": {"per_day": 1}}"#)],
                "rate_limits.slots: must be between",
            ),
        ];
        for (raw, policies, want) in cases {
            let got = limits(raw, policies).err().unwrap_or_default();
            assert!(got.starts_with(want), "{raw}\n  got:  {got}\n  want: {want}");
        }
    }

    #[test]
    fn addresses_parse_as_envoy_writes_them() {
        assert_eq!(parse_ip("10.0.0.1:80"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("[::1]:80"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("[::ffff:10.0.0.1]:80"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("::1"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("garbage"), None);
    }
}
