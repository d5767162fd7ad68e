//! Credit grants: a billed request is paid from a quota the credit service granted this Envoy
//! process ahead of time, with no callout on its way (RFC 4006's Granted-Service-Unit). The root
//! context reports usage and asks for more on a timer, every account in one call.
//!
//! One entry per account lives in a fixed table in Envoy's shared data (a `SlotStore`, like the
//! rate limiter's), so every worker spends from the same grant by compare-and-swap and a flood of
//! accounts cannot grow memory. An entry keeps what the service granted and what this process
//! spent, both **cumulative** over the grant's life: a report carries totals, never deltas, so a
//! retried, duplicated or reordered report charges nothing twice. What a request takes is *in
//! flight* until its response says whether it is spent; only what is spent is reported, so an
//! Envoy killed mid-load over-charges nothing and under-counts at most what it spent since its
//! last report.
//!
//! In the wasm build each worker also **leases** a slice of the grant (a sixteenth of it, at most
//! half of what is left) into its own memory and pays requests from that with no hostcall at all;
//! its root context moves what it spent into shared data every second, before the process's
//! report, and gives an idle lease back. Shared data costs a wasm VM thousands of instructions a
//! call; the native build's is plain memory, so its requests take from the shared grant directly
//! (its workers have no timer to sync a lease with).
//!
//! An account is billed per request, exactly as without grants, whenever its grant cannot pay: no
//! table entry free, the grant not open yet, spent, expired (the service unreachable for a
//! lifetime), or final (the service's answer near the end of the balance, so 402 stays exact).

use std::cell::RefCell;
use std::collections::HashMap;

use std::fmt::Write;

use serde::Deserialize;

use crate::common::ConfigError;
use crate::host::{Host, NANOS_PER_SECOND};
use crate::metrics::Metric;
use crate::slots::{self, Applied, Slot, SlotStore, Step};

/// `credits.grants`: how grants are sized, reported and kept.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawGrants {
    /// How long a grant may be spent after the report that last extended it. The credit service
    /// settles a grant nobody reported on for twice this long.
    #[serde(default = "default_lifetime_seconds")]
    pub lifetime_seconds: u64,
    /// How often usage is reported and grants topped up, every account in one call. An Envoy
    /// killed between two reports leaves at most this long of spending unbilled.
    #[serde(default = "default_flush_seconds")]
    pub flush_seconds: u64,
    /// The smallest grant worth holding; when less than this is left on an account, the service
    /// answers with a final grant and the account is billed per request.
    #[serde(default = "default_min_grant")]
    pub min_grant: u64,
    /// The most one grant holds: what other gateways cannot spend while this one holds it.
    #[serde(default = "default_max_grant")]
    pub max_grant: u64,
    /// An account with no billed request for this long has its grant reported and given back.
    #[serde(default = "default_idle_seconds")]
    pub idle_seconds: u64,
    /// How many accounts hold a grant in this process at once; others are billed per request.
    #[serde(default = "default_accounts")]
    pub accounts: u32,
}

impl Default for RawGrants {
    fn default() -> Self {
        RawGrants {
            lifetime_seconds: default_lifetime_seconds(),
            flush_seconds: default_flush_seconds(),
            min_grant: default_min_grant(),
            max_grant: default_max_grant(),
            idle_seconds: default_idle_seconds(),
            accounts: default_accounts(),
        }
    }
}

fn default_lifetime_seconds() -> u64 {
    60
}
fn default_flush_seconds() -> u64 {
    1
}
fn default_min_grant() -> u64 {
    100
}
fn default_max_grant() -> u64 {
    1_000_000
}
fn default_idle_seconds() -> u64 {
    30
}
fn default_accounts() -> u32 {
    1024
}

/// The validated `credits.grants`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantPolicy {
    lifetime_seconds: u64,
    flush_seconds: u64,
    min_grant: u64,
    max_grant: u64,
    idle_seconds: u64,
    accounts: u32,
}

impl GrantPolicy {
    pub fn build(raw: &RawGrants) -> Result<GrantPolicy, ConfigError> {
        let at = |field: &str, message: &str| ConfigError {
            path: format!("credits.grants.{field}"),
            message: message.into(),
        };
        if !(1..=3600).contains(&raw.lifetime_seconds) {
            return Err(at("lifetime_seconds", "must be between 1 and 3600"));
        }
        if raw.flush_seconds == 0 || raw.flush_seconds * 2 > raw.lifetime_seconds {
            return Err(at("flush_seconds", "must be at least 1 and at most half of lifetime_seconds"));
        }
        if raw.min_grant == 0 || raw.min_grant > raw.max_grant || raw.max_grant > MAX_AMOUNT {
            return Err(at("min_grant", "must be at least 1, at most max_grant, and max_grant at most 10^12"));
        }
        if raw.idle_seconds < raw.flush_seconds {
            return Err(at("idle_seconds", "must be at least flush_seconds"));
        }
        if !(1..=65_536).contains(&raw.accounts) {
            return Err(at("accounts", "must be between 1 and 65536"));
        }
        Ok(GrantPolicy {
            lifetime_seconds: raw.lifetime_seconds,
            flush_seconds: raw.flush_seconds,
            min_grant: raw.min_grant,
            max_grant: raw.max_grant,
            idle_seconds: raw.idle_seconds,
            accounts: raw.accounts,
        })
    }
}

const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// The credit service takes at most this many reports in one call.
const MAX_REPORTS: usize = 1000;
/// A worker that asked for a grant and got no answer in this long may ask again.
const ASK_TIMEOUT: u64 = 5 * NANOS_PER_SECOND;

const LAYOUT_KEY: &str = "tollgate.grant.layout";
/// When the process last reported, and the last top-up request it served.
const FLUSH_KEY: &str = "tollgate.grant.flush";
/// Bumped by a request that wants a top-up before the next report is due.
const URGENT_KEY: &str = "tollgate.grant.urgent";
const INSTANCE_KEY: &str = "tollgate.grant.instance";
/// The slots that hold an entry, so a report reads those and not the whole table: a hostcall per
/// slot a second is what a busy VM notices.
const INDEX_KEY: &str = "tollgate.grant.index";
/// Every this many reports the whole table is read, for an entry the index missed (an index
/// update that kept losing races).
const FULL_SCAN_EVERY: u64 = 60;
/// Marks the encoding of an entry; anything else reads as a free slot.
const ENCODING: u8 = 1;

/// One account's grant as every worker of the process sees it. Times are the proxy's clock in
/// nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    /// Empty: a free slot.
    account: String,
    /// Empty: no grant yet (one has been asked for).
    grant_id: String,
    granted: u64,
    /// Spent on this grant, cumulative.
    used: u64,
    /// Taken by requests whose response has not come yet.
    in_flight: u64,
    /// The `used` the service has acknowledged.
    reported: u64,
    /// The account's balance in the service's last answer.
    balance: u64,
    /// Until when the grant may be spent.
    expires: u64,
    /// When a worker last asked for this grant to grow (0: nobody is asking).
    asked: u64,
    /// What the grant held unspent when it last grew: a request leaving less than half of it asks
    /// for more.
    size: u64,
    last_spent: u64,
    /// The service said no more will be granted: spend what is left, then bill per request.
    last: bool,
    /// Spent per policy on this grant, cumulative: (policy, credits, requests).
    usage: Vec<(String, u64, u64)>,
}

impl Entry {
    fn left(&self) -> u64 {
        self.granted.saturating_sub(self.used + self.in_flight)
    }

    /// What the client is told is left: the balance the service last saw, less what this process
    /// spent or holds since.
    fn remaining(&self) -> u64 {
        self.spent_view().saturating_sub(self.in_flight)
    }

    /// The balance the service last saw, less what this process spent since.
    fn spent_view(&self) -> u64 {
        self.balance.saturating_sub(self.used.saturating_sub(self.reported))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.account.len() + self.grant_id.len() + 24 * self.usage.len());
        out.push(ENCODING);
        out.push(u8::from(self.last));
        for word in [
            self.granted,
            self.used,
            self.in_flight,
            self.reported,
            self.balance,
            self.expires,
            self.asked,
            self.size,
            self.last_spent,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for text in [&self.account, &self.grant_id] {
            put_text(&mut out, text);
        }
        out.push(self.usage.len() as u8);
        for (policy, credits, requests) in &self.usage {
            put_text(&mut out, policy);
            out.extend_from_slice(&credits.to_le_bytes());
            out.extend_from_slice(&requests.to_le_bytes());
        }
        out
    }

    /// `None` for a free slot, or a value this version did not write.
    fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut r = Reader(bytes);
        if r.byte()? != ENCODING {
            return None;
        }
        let last = r.byte()? != 0;
        let mut words = [0u64; 9];
        for word in &mut words {
            *word = r.word()?;
        }
        let [granted, used, in_flight, reported, balance, expires, asked, size, last_spent] = words;
        let account = r.text()?;
        let grant_id = r.text()?;
        let usage = (0..r.byte()?).map(|_| Some((r.text()?, r.word()?, r.word()?))).collect::<Option<Vec<_>>>()?;
        if account.is_empty() {
            return None;
        }
        Some(Entry {
            account,
            grant_id,
            granted,
            used,
            in_flight,
            reported,
            balance,
            expires,
            asked,
            size,
            last_spent,
            last,
            usage,
        })
    }
}

/// The slots the index says hold an entry.
fn indexed(host: &dyn Host) -> Vec<u32> {
    let value = host.shared_get(INDEX_KEY).map(|(value, _)| value).unwrap_or_default();
    value.chunks_exact(4).filter_map(|c| c.try_into().ok()).map(u32::from_le_bytes).collect()
}

/// Adds spending to cumulative per-policy usage.
fn add_usage(usage: &mut Vec<(String, u64, u64)>, policy: &str, credits: u64, requests: u64) {
    match usage.iter_mut().find(|(p, _, _)| p == policy) {
        Some((_, c, r)) => {
            *c += credits;
            *r += requests;
        }
        None => usage.push((policy.to_owned(), credits, requests)),
    }
}

/// Account ids and policy names are at most 128 bytes, grant ids the service's: all fit a byte.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn word(&mut self) -> Option<u64> {
        let (word, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*word))
    }
    fn text(&mut self) -> Option<String> {
        let len = usize::from(self.byte()?);
        let (text, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        String::from_utf8(text.to_vec()).ok()
    }
}

/// What a billed request got from its account's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Paid from the grant: `amount` is in flight until `Grants::spend` says what it cost.
    Granted(Spend),
    /// The grant cannot pay; bill this request per request.
    PerRequest,
}

/// A request's claim on its account's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    slot: u32,
    account: String,
    pub amount: u64,
    /// Paid from this worker's lease, not from the shared entry.
    leased: bool,
}

/// The slice of an account's grant one worker holds, to pay requests with no hostcall. The shared
/// entry counts all of it as in flight until the worker's next sync.
#[derive(Debug, Default)]
struct Lease {
    slot: u32,
    /// Leased and not taken by a request.
    held: u64,
    /// Taken by requests whose response has not come.
    in_flight: u64,
    /// Spent since the last sync, in all and per policy.
    used: u64,
    usage: Vec<(String, u64, u64)>,
    /// The grant's deadline as of the last sync.
    expires: u64,
    /// What the client is told is left, as of the last sync, less what was spent here since.
    view: u64,
    /// A request took from it since the last sync.
    busy: bool,
}

/// The grants one worker spends from and, from its root context, reports on.
#[derive(Debug)]
pub struct Grants {
    policy: GrantPolicy,
    store: SlotStore,
    /// This Envoy process, as the credit service knows it: one grant per account and instance.
    instance: String,
    /// Reports sent and not yet answered, by callout token.
    sent: HashMap<u32, Sent>,
    /// Reports this worker sent, for the occasional full scan.
    flushes: u64,
    /// Whether this worker leases slices of grants (the wasm build), and its leases by account.
    leasing: bool,
    leases: RefCell<HashMap<String, Lease>>,
}

/// One report call in flight: when it was sent, and what each report said.
#[derive(Debug)]
struct Sent {
    at: u64,
    reports: Vec<Sent1>,
}

#[derive(Debug)]
struct Sent1 {
    slot: u32,
    account: String,
    used: u64,
    close: bool,
}

#[derive(Deserialize)]
struct Answer {
    results: Vec<Result1>,
}

/// One report's result: a grant, or a problem document, whose fields all default.
#[derive(Deserialize)]
struct Result1 {
    status: u16,
    body: Granted,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Granted {
    grant_id: String,
    granted_total: u64,
    used_total: u64,
    lifetime_seconds: u64,
    #[serde(rename = "final")]
    last: bool,
    balance: u64,
}

impl Grants {
    /// Opens the process's grant table, creating its slots once per process and size (as the
    /// rate-limit table does), and the process's instance id.
    pub fn open(policy: &GrantPolicy, secret: [u8; 16], leasing: bool, host: &mut dyn Host) -> Grants {
        let store = SlotStore::new("tollgate.grant", policy.accounts, secret);
        let marker = policy.accounts.to_le_bytes();
        if host.shared_get(LAYOUT_KEY).is_none_or(|(value, _)| value != marker) {
            store.fill(host, &[]);
            host.shared_set(INDEX_KEY, &[]);
            host.shared_set(LAYOUT_KEY, &marker);
        }
        if host.shared_get(FLUSH_KEY).is_none() {
            host.shared_set(FLUSH_KEY, &[0; 16]);
        }
        if host.shared_get(INDEX_KEY).is_none() {
            host.shared_set(INDEX_KEY, &[]);
        }
        let id = slots::process_random(host, INSTANCE_KEY);
        let instance = format!("gw-{}", id[..8].iter().map(|b| format!("{b:02x}")).collect::<String>());
        Grants {
            policy: policy.clone(),
            store,
            instance,
            sent: HashMap::new(),
            flushes: 0,
            leasing,
            leases: RefCell::new(HashMap::new()),
        }
    }

    /// The account's two candidate slots.
    fn locate(&self, account: &str) -> (u32, u32) {
        let (_, h2) = self.store.hash(account.as_bytes());
        let slots = self.store.count();
        let first = ((h2 & 0xffff_ffff) % u64::from(slots)) as u32;
        let second = ((h2 >> 32) % u64::from(slots)) as u32;
        (first, if second == first { (first + 1) % slots } else { second })
    }

    fn read(&self, host: &dyn Host, index: u32) -> (Slot, Option<Entry>) {
        let slot = self.store.read(host, index);
        let entry = Entry::decode(&slot.value);
        (slot, entry)
    }

    /// Takes `amount` from the account's grant, or says to bill per request. A grant running low
    /// (or none yet) is asked for now rather than at the next report, by one worker at a time.
    /// `now` is the proxy's clock in nanoseconds, as the request's other steps read it.
    pub fn take(&self, host: &mut dyn Host, account: &str, amount: u64, now: u64) -> Take {
        if let Some(spend) = self.take_leased(account, amount, now) {
            return Take::Granted(spend);
        }
        let (first, second) = self.locate(account);
        let mut ask = false;
        let mut lease = None;
        let mut created = None;
        let applied = self.store.update(host, |host| {
            ask = false;
            let (slot, found) = match self.read(host, first) {
                (slot, Some(entry)) if entry.account == account => (slot, Some(entry)),
                (first_slot, first_entry) => match self.read(host, second) {
                    (slot, Some(entry)) if entry.account == account => (slot, Some(entry)),
                    (second_slot, second_entry) => {
                        // A newcomer takes a free slot; an entry with a grant or usage is never
                        // dropped, so with none free the account is billed per request.
                        let slot = match (first_entry, second_entry) {
                            (None, _) => first_slot,
                            (_, None) => second_slot,
                            _ => return Step::Done(Take::PerRequest),
                        };
                        (slot, None)
                    }
                },
            };
            let existing = found.is_some();
            let mut entry = found.unwrap_or_else(|| Entry { account: account.to_owned(), ..Entry::default() });
            let live = !entry.grant_id.is_empty() && now < entry.expires;
            lease = None;
            let result = if live && entry.left() >= amount {
                // A slice for this worker's later requests too, leaving the other workers most.
                let slice = if self.leasing { (entry.size / 16).min(entry.left() / 2).max(amount) } else { amount };
                entry.in_flight += slice;
                if self.leasing {
                    lease = Some((slice - amount, entry.expires, entry.spent_view()));
                }
                Take::Granted(Spend { slot: slot.index, account: account.to_owned(), amount, leased: self.leasing })
            } else {
                Take::PerRequest
            };
            let fresh = now.saturating_sub(entry.last_spent) < NANOS_PER_SECOND;
            entry.last_spent = now;
            // Asks before the grant runs out: when less than half of what it held when it last
            // grew is left. A final grant is not asked again until the service says.
            let low = entry.left() < entry.size / 2;
            if (!live || low) && !entry.last && now.saturating_sub(entry.asked) > ASK_TIMEOUT {
                entry.asked = now;
                ask = true;
            }
            // A request billed per request writes only to keep the entry from looking idle.
            if result == Take::PerRequest && !ask && existing && fresh {
                return Step::Done(result);
            }
            created = (!existing).then_some(slot.index);
            Step::Write { slot, value: entry.encode(), result }
        });
        let take = match applied {
            Ok(applied) => applied.value,
            Err(_) => Take::PerRequest,
        };
        if let Some(slot) = created {
            self.index(host, slot, true);
        }
        if let (Take::Granted(spend), Some((held, expires, view)), Ok(mut leases)) =
            (&take, lease, self.leases.try_borrow_mut())
        {
            let lease = leases.entry(account.to_owned()).or_default();
            lease.slot = spend.slot;
            lease.held += held;
            lease.in_flight += amount;
            lease.expires = expires;
            lease.view = view.saturating_sub(lease.used);
            lease.busy = true;
        }
        if ask {
            self.hurry(host);
        }
        take
    }

    /// Pays from this worker's lease, when it holds enough of a grant still live.
    fn take_leased(&self, account: &str, amount: u64, now: u64) -> Option<Spend> {
        let mut leases = self.leases.try_borrow_mut().ok()?;
        let lease = leases.get_mut(account)?;
        if now >= lease.expires || lease.held < amount {
            return None;
        }
        lease.held -= amount;
        lease.in_flight += amount;
        lease.busy = true;
        Some(Spend { slot: lease.slot, account: account.to_owned(), amount, leased: true })
    }

    /// Settles a request paid from the grant: `charge` spent (its response was billed), or
    /// nothing (anything else); the rest goes back to the grant, or to the lease it came from.
    /// Answers what the client is told is left.
    pub fn spend(&self, host: &mut dyn Host, spend: &Spend, policy: &str, charge: Option<u64>) -> u64 {
        if spend.leased {
            let Ok(mut leases) = self.leases.try_borrow_mut() else { return 0 };
            let Some(lease) = leases.get_mut(&spend.account) else { return 0 };
            lease.in_flight = lease.in_flight.saturating_sub(spend.amount);
            let billed = charge.map(|c| c.min(spend.amount));
            lease.held += spend.amount - billed.unwrap_or(0);
            if let Some(charge) = billed {
                lease.used += charge;
                lease.view = lease.view.saturating_sub(charge);
                add_usage(&mut lease.usage, policy, charge, 1);
            }
            return lease.view.saturating_sub(lease.in_flight);
        }
        let applied = self.store.update(host, |host| {
            let (slot, Some(mut entry)) = self.read(host, spend.slot) else { return Step::Done(0) };
            if entry.account != spend.account {
                return Step::Done(0);
            }
            entry.in_flight = entry.in_flight.saturating_sub(spend.amount);
            if let Some(charge) = charge {
                let charge = charge.min(spend.amount);
                entry.used += charge;
                add_usage(&mut entry.usage, policy, charge, 1);
            }
            Step::Write { slot, value: entry.encode(), result: entry.remaining() }
        });
        match applied {
            Ok(applied) => applied.value,
            Err(_) => {
                // An entry contended for 32 tries keeps the request in flight: its credits stay
                // held until the grant ends, never charged.
                log::warn!("tollgate: the grant of {} stayed contended; one request's spending is lost", spend.account);
                0
            }
        }
    }

    /// From this worker's root context, every second, before any report: moves what each lease
    /// spent into the shared entry, refreshes the lease's deadline, and gives back the slice of a
    /// lease no request used since the last sync.
    pub fn sync(&self, host: &mut dyn Host) {
        let Ok(mut leases) = self.leases.try_borrow_mut() else { return };
        let now = host.now_nanos();
        leases.retain(|account, lease| {
            let synced = self.store.update(host, |host| {
                let (slot, Some(mut entry)) = self.read(host, lease.slot) else { return Step::Done(None) };
                if entry.account != *account {
                    return Step::Done(None);
                }
                let returned = if lease.busy { 0 } else { lease.held };
                entry.used += lease.used;
                entry.in_flight = entry.in_flight.saturating_sub(lease.used + returned);
                for (policy, credits, requests) in &lease.usage {
                    add_usage(&mut entry.usage, policy, *credits, *requests);
                }
                if lease.busy {
                    entry.last_spent = now;
                }
                let refreshed = (returned, entry.expires, entry.spent_view());
                Step::Write { slot, value: entry.encode(), result: Some(refreshed) }
            });
            match synced {
                Ok(Applied { value: Some((returned, expires, view)), .. }) => {
                    lease.held -= returned;
                    lease.used = 0;
                    lease.usage.clear();
                    lease.expires = expires;
                    lease.view = view;
                    lease.busy = false;
                    lease.held + lease.in_flight > 0
                }
                // The entry is gone or another account's: what the lease spent cannot be
                // reported, an under-count.
                Ok(_) => false,
                // Contended: the next second tries again.
                Err(_) => true,
            }
        });
    }

    /// Adds `slot` to the index of slots in use, or (`add: false`) removes it if it is still free.
    fn index(&self, host: &mut dyn Host, slot: u32, add: bool) {
        for _ in 0..slots::MAX_ATTEMPTS {
            let (value, version) = host.shared_get(INDEX_KEY).unwrap_or_default();
            let mut slots: Vec<u32> =
                value.chunks_exact(4).filter_map(|c| c.try_into().ok()).map(u32::from_le_bytes).collect();
            let at = slots.iter().position(|s| *s == slot);
            match (add, at) {
                (true, Some(_)) | (false, None) => return,
                (true, None) => slots.push(slot),
                (false, Some(at)) => {
                    // A newcomer may have taken the slot since it was freed.
                    if self.read(host, slot).1.is_some() {
                        return;
                    }
                    slots.swap_remove(at);
                }
            }
            let value: Vec<u8> = slots.iter().flat_map(|s| s.to_le_bytes()).collect();
            if host.shared_swap(INDEX_KEY, &value, Some(version)) {
                return;
            }
        }
        log::warn!("tollgate: the grant index stayed contended; the next full scan finds slot {slot}");
    }

    /// Tells the root contexts a grant wants topping up before the next report is due.
    fn hurry(&self, host: &mut dyn Host) {
        let seq = host.shared_get(URGENT_KEY).and_then(|(v, _)| v.try_into().ok()).map_or(0, u64::from_le_bytes);
        host.shared_set(URGENT_KEY, &(seq + 1).to_le_bytes());
        host.wake_root();
    }

    /// From a root context, on its timer or when woken: one worker of the process, when a report
    /// is due (every `flush_seconds`, or at once when a request asked), reports every account
    /// that has something to say and asks for its grant's next size. Returns the calls made.
    pub fn flush(&mut self, host: &mut dyn Host, credits: &crate::credits::Credits) -> usize {
        let now = host.now_nanos();
        if !self.claim_flush(host, now) {
            return 0;
        }
        self.flushes += 1;
        let slots = match self.flushes % FULL_SCAN_EVERY {
            1 => (0..self.store.count()).collect(),
            _ => indexed(host),
        };
        let mut reports: Vec<(u32, Entry)> = Vec::new();
        for index in slots {
            let (_, Some(entry)) = self.read(host, index) else { continue };
            if self.wants_report(&entry, now) {
                reports.push((index, entry));
            }
        }
        let mut calls = 0;
        for chunk in reports.chunks(MAX_REPORTS) {
            let sent: Vec<Sent1> = chunk
                .iter()
                .map(|(slot, e)| Sent1 {
                    slot: *slot,
                    account: e.account.clone(),
                    used: e.used,
                    close: self.closes(e, now),
                })
                .collect();
            let mut body = format!("{{\"instance\":\"{}\",\"reports\":[", self.instance);
            for (i, ((_, entry), sent)) in chunk.iter().zip(&sent).enumerate() {
                if i > 0 {
                    body.push(',');
                }
                self.report(&mut body, entry, sent.close);
            }
            body.push_str("]}");
            host.count(Metric::CreditCallouts, 1);
            match host.http_call(&credits.grant_call(body.into_bytes())) {
                Some(token) => {
                    self.sent.insert(token, Sent { at: now, reports: sent });
                    calls += 1;
                }
                None => host.count(Metric::CreditCalloutFailures, 1),
            }
        }
        calls
    }

    /// Takes the process's turn to report, if it is due: the interval has passed, or a request
    /// asked since the last report.
    fn claim_flush(&self, host: &mut dyn Host, now: u64) -> bool {
        let urgent = host.shared_get(URGENT_KEY).and_then(|(v, _)| v.try_into().ok()).map_or(0, u64::from_le_bytes);
        let Some((value, version)) = host.shared_get(FLUSH_KEY) else { return false };
        let word = |i: usize| value.get(i..i + 8).and_then(|w| w.try_into().ok()).map_or(0, u64::from_le_bytes);
        let (last, served) = (word(0), word(8));
        let due = now.saturating_sub(last) >= self.policy.flush_seconds * NANOS_PER_SECOND || urgent > served;
        if !due {
            return false;
        }
        let mut value = now.to_le_bytes().to_vec();
        value.extend_from_slice(&urgent.to_le_bytes());
        // One worker wins the turn; the others find it taken.
        host.shared_swap(FLUSH_KEY, &value, Some(version))
    }

    fn wants_report(&self, e: &Entry, now: u64) -> bool {
        let opening = e.grant_id.is_empty() && e.asked != 0;
        let renewing = !e.grant_id.is_empty()
            && e.expires.saturating_sub(now) < self.policy.lifetime_seconds * NANOS_PER_SECOND / 2;
        opening || renewing || e.used != e.reported || e.asked != 0 || self.closes(e, now)
    }

    /// Whether this report gives the grant back: the account went idle, or its final grant cannot
    /// pay for anything more and nothing is in flight.
    fn closes(&self, e: &Entry, now: u64) -> bool {
        let idle = now.saturating_sub(e.last_spent) >= self.policy.idle_seconds * NANOS_PER_SECOND;
        e.in_flight == 0 && (idle || (e.last && e.left() < self.policy.min_grant))
    }

    /// One account's report, as JSON. Written by hand: serde's derive for it costs the module
    /// more than this does. Account ids and grant ids are the credit service's charset; policy
    /// names are escaped.
    fn report(&self, out: &mut String, e: &Entry, close: bool) {
        let want = if e.last || close { e.used } else { e.used + e.in_flight + self.policy.max_grant };
        let grant_id = if e.grant_id.is_empty() { "null".to_owned() } else { format!("\"{}\"", e.grant_id) };
        let _ = write!(
            out,
            "{{\"account\":\"{}\",\"grant_id\":{grant_id},\"used_total\":{},\"want_total\":{want},\
             \"min_grant\":{},\"max_grant\":{},\"lifetime_seconds\":{},\"close\":{close},\"usage\":{{",
            e.account, e.used, self.policy.min_grant, self.policy.max_grant, self.policy.lifetime_seconds
        );
        for (i, (policy, credits, requests)) in e.usage.iter().enumerate() {
            let name = serde_json::to_string(policy).unwrap_or_default();
            let comma = if i > 0 { "," } else { "" };
            let _ = write!(out, "{comma}{name}:{{\"credits\":{credits},\"requests\":{requests}}}");
        }
        out.push_str("}}");
    }

    pub fn is_waiting_for(&self, token: u32) -> bool {
        self.sent.contains_key(&token)
    }

    /// The credit service's answer to a report call (`None`: none came). Each account's result
    /// updates its entry; a failed call leaves every entry to the next report.
    pub fn on_answer(&mut self, host: &mut dyn Host, token: u32, answer: Option<(u16, Vec<u8>)>) {
        let Some(sent) = self.sent.remove(&token) else { return };
        let results = match answer {
            Some((200, body)) => serde_json::from_slice::<Answer>(&body).ok().map(|a| a.results),
            _ => None,
        };
        let Some(results) = results.filter(|r| r.len() == sent.reports.len()) else {
            host.count(Metric::CreditCalloutFailures, 1);
            return;
        };
        for (report, result) in sent.reports.iter().zip(results) {
            self.apply(host, sent.at, report, result);
        }
    }

    fn apply(&self, host: &mut dyn Host, sent_at: u64, report: &Sent1, result: Result1) {
        let granted = (result.status == 200 && !result.body.grant_id.is_empty()).then_some(result.body);
        let outcome = self.store.update(host, |host| {
            let (slot, Some(mut entry)) = self.read(host, report.slot) else { return Step::Done(false) };
            if entry.account != report.account {
                return Step::Done(false);
            }
            match (&granted, result.status) {
                (Some(g), _) if report.close && entry.in_flight == 0 && entry.used == report.used.min(g.used_total) => {
                    // Given back with nothing spent since: the slot is free again.
                    return Step::Write { slot, value: Vec::new(), result: true };
                }
                (Some(g), _) => {
                    if g.grant_id != entry.grant_id {
                        // A grant this entry did not know: only an open's answer may start one.
                        if !entry.grant_id.is_empty() {
                            return Step::Done(false);
                        }
                        entry.grant_id = g.grant_id.clone();
                    }
                    if g.granted_total > entry.granted {
                        entry.granted = g.granted_total;
                        entry.size = entry.granted.saturating_sub(entry.used);
                        // Answered: the next request running low may ask again at once. An answer
                        // that did not grow the grant keeps the ask throttled.
                        entry.asked = 0;
                    }
                    entry.reported = entry.reported.max(g.used_total.min(entry.used));
                    entry.expires = entry.expires.max(sent_at + g.lifetime_seconds * NANOS_PER_SECOND);
                    entry.last = g.last;
                    entry.balance = g.balance;
                }
                (None, 409) => {
                    // The grant ended at the service (expired while unreachable): whatever was not
                    // reported on it is lost, an under-count. The next report opens a new one.
                    entry = Entry {
                        account: entry.account,
                        in_flight: entry.in_flight,
                        last_spent: entry.last_spent,
                        ..Entry::default()
                    };
                }
                (None, 404) => {
                    // No such account: billed per request, which answers 402.
                    entry.last = true;
                }
                (None, _) => {}
            }
            Step::Write { slot, value: entry.encode(), result: false }
        });
        if let Ok(Applied { value: true, .. }) = outcome {
            self.index(host, report.slot, false);
        }
        if outcome.is_err() {
            log::warn!("tollgate: the grant of {} stayed contended; its report is applied next time", report.account);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn grants(host: &mut FakeHost) -> Grants {
        let policy = GrantPolicy::build(&RawGrants { accounts: 8, min_grant: 10, ..RawGrants::default() }).unwrap();
        Grants::open(&policy, [7; 16], false, host)
    }

    fn granted(grant_id: &str, granted: u64, used: u64, last: bool) -> serde_json::Value {
        serde_json::json!({"status": 200, "body": {"grant_id": grant_id, "granted_total": granted,
            "used_total": used, "lifetime_seconds": 60, "final": last, "balance": 1000 - used, "available": 0}})
    }

    fn answer(results: &[serde_json::Value]) -> Option<(u16, Vec<u8>)> {
        Some((200, serde_json::json!({"results": results}).to_string().into_bytes()))
    }

    fn last_report(host: &FakeHost) -> serde_json::Value {
        serde_json::from_slice(&host.sent_calls.last().unwrap().body).unwrap()
    }

    /// Takes at the fake proxy's time.
    fn take(g: &Grants, host: &mut FakeHost, account: &str, amount: u64) -> Take {
        let now = host.now_nanos();
        g.take(host, account, amount, now)
    }

    fn credits() -> crate::credits::Credits {
        let raw = serde_json::from_str(r#"{"cluster": "credits", "service_token": "t"}"#).unwrap();
        crate::credits::Credits::build(&raw).unwrap()
    }

    /// Opens acme's grant: the first request is billed per request and asks.
    fn opened(host: &mut FakeHost, g: &mut Grants, size: u64) -> u32 {
        assert_eq!(take(g, host, "acme", 5), Take::PerRequest);
        assert_eq!(g.flush(host, &credits()), 1, "an ask reports at once");
        let report = last_report(host);
        assert_eq!(report["reports"][0]["grant_id"], serde_json::Value::Null);
        let token = *g.sent.keys().next().unwrap();
        g.on_answer(host, token, answer(&[granted("gr_1", size, 0, false)]));
        token
    }

    #[test]
    fn an_entry_survives_its_encoding() {
        let e = Entry {
            account: "acme".into(),
            grant_id: "gr_1".into(),
            granted: 9,
            used: 3,
            usage: vec![("api".into(), 3, 1)],
            last: true,
            ..Entry::default()
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[]), None);
        assert_eq!(Entry::decode(&[9, 0, 0]), None, "another encoding reads as free");
    }

    #[test]
    fn requests_are_paid_from_the_grant_and_only_billed_ones_are_reported() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        let Take::Granted(a) = take(&g, &mut host, "acme", 5) else { panic!("the grant pays") };
        let Take::Granted(b) = take(&g, &mut host, "acme", 5) else { panic!("the grant pays") };
        assert_eq!(g.spend(&mut host, &a, "api", Some(3)), 1000 - 3 - 5, "b still held");
        assert_eq!(g.spend(&mut host, &b, "api", None), 1000 - 3);
        host.nanos += 2 * NANOS_PER_SECOND;
        assert_eq!(g.flush(&mut host, &credits()), 1);
        let report = &last_report(&host)["reports"][0];
        assert_eq!(report["grant_id"], "gr_1");
        assert_eq!(report["used_total"], 3);
        assert_eq!(report["usage"]["api"], serde_json::json!({"credits": 3, "requests": 1}));
        assert_eq!(report["want_total"], 3 + 1_000_000);
    }

    #[test]
    fn a_grant_that_cannot_pay_bills_per_request_and_asks_once() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 12);
        assert!(matches!(take(&g, &mut host, "acme", 10), Take::Granted(_)));
        let calls = host.calls.len();
        assert_eq!(take(&g, &mut host, "acme", 10), Take::PerRequest, "2 left");
        assert_eq!(take(&g, &mut host, "acme", 10), Take::PerRequest);
        assert_eq!(g.flush(&mut host, &credits()), 1, "asked at once");
        assert_eq!(g.flush(&mut host, &credits()), 0, "and once");
        assert_eq!(host.calls.len(), calls + 1);
    }

    #[test]
    fn an_expired_grant_pays_nothing() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        host.nanos += 61 * NANOS_PER_SECOND;
        assert_eq!(take(&g, &mut host, "acme", 1), Take::PerRequest);
    }

    #[test]
    fn answers_out_of_order_never_lower_what_was_granted_or_reported() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        for _ in 0..4 {
            let Take::Granted(s) = take(&g, &mut host, "acme", 5) else { panic!() };
            g.spend(&mut host, &s, "api", Some(5));
        }
        host.nanos += 2 * NANOS_PER_SECOND;
        g.flush(&mut host, &credits());
        let older = *g.sent.keys().max().unwrap();
        g.on_answer(&mut host, older, answer(&[granted("gr_1", 300, 20, false)]));
        let (_, entry) = g.read(&host, g.locate("acme").0);
        let entry = entry.or_else(|| g.read(&host, g.locate("acme").1).1).unwrap();
        assert_eq!((entry.granted, entry.reported), (300, 20));
        // A late answer to the opening report changes nothing.
        g.sent.insert(
            99,
            Sent { at: 0, reports: vec![Sent1 { slot: 0, account: "acme".into(), used: 0, close: false }] },
        );
        g.on_answer(&mut host, 99, answer(&[granted("gr_1", 100, 0, false)]));
        let again = g.read(&host, g.locate("acme").0).1.or_else(|| g.read(&host, g.locate("acme").1).1).unwrap();
        assert_eq!((again.granted, again.reported), (300, 20));
    }

    #[test]
    fn an_idle_grant_is_given_back_and_its_slot_freed() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        let Take::Granted(s) = take(&g, &mut host, "acme", 5) else { panic!() };
        g.spend(&mut host, &s, "api", Some(5));
        host.nanos += 31 * NANOS_PER_SECOND;
        g.flush(&mut host, &credits());
        let report = &last_report(&host)["reports"][0];
        assert_eq!((report["close"].as_bool(), report["want_total"].as_u64()), (Some(true), Some(5)));
        let token = *g.sent.keys().max().unwrap();
        g.on_answer(&mut host, token, answer(&[granted("gr_1", 100, 5, false)]));
        let (a, b) = g.locate("acme");
        assert!(g.read(&host, a).1.is_none() && g.read(&host, b).1.is_none(), "the slot is free");
    }

    #[test]
    fn a_full_table_bills_per_request_and_drops_no_grant() {
        let mut host = FakeHost::default();
        let policy = GrantPolicy::build(&RawGrants { accounts: 1, ..RawGrants::default() }).unwrap();
        let g = Grants::open(&policy, [7; 16], false, &mut host);
        assert_eq!(take(&g, &mut host, "acme", 1), Take::PerRequest);
        assert_eq!(take(&g, &mut host, "globex", 1), Take::PerRequest);
        let (slot, entry) = g.read(&host, 0);
        assert_eq!(entry.map(|e| e.account), Some("acme".to_owned()), "{:?}", slot.value);
    }

    #[test]
    fn an_ended_grant_is_opened_afresh() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        host.nanos += 40 * NANOS_PER_SECOND;
        take(&g, &mut host, "acme", 1);
        g.flush(&mut host, &credits());
        let token = *g.sent.keys().max().unwrap();
        g.on_answer(&mut host, token, answer(&[serde_json::json!({"status": 409, "body": {}})]));
        host.nanos += 6 * NANOS_PER_SECOND;
        assert_eq!(take(&g, &mut host, "acme", 1), Take::PerRequest);
        g.flush(&mut host, &credits());
        assert_eq!(last_report(&host)["reports"][0]["grant_id"], serde_json::Value::Null);
    }

    #[test]
    fn a_worker_pays_from_its_lease_with_no_hostcall_and_syncs_it_every_second() {
        let mut host = FakeHost::default();
        let policy = GrantPolicy::build(&RawGrants { accounts: 8, min_grant: 10, ..RawGrants::default() }).unwrap();
        let mut g = Grants::open(&policy, [7; 16], true, &mut host);
        opened(&mut host, &mut g, 160);
        let Take::Granted(first) = take(&g, &mut host, "acme", 5) else { panic!("the grant pays") };
        let shared = host.shared.clone();
        let Take::Granted(second) = take(&g, &mut host, "acme", 5) else { panic!("the lease pays") };
        assert!(second.leased, "a sixteenth of 160 leased: 5 for the first request, 5 held");
        assert_eq!(g.spend(&mut host, &first, "api", Some(5)), 1000 - 5 - 5);
        g.spend(&mut host, &second, "api", None);
        assert_eq!(host.shared, shared, "the second request and both responses wrote no shared data");

        g.sync(&mut host);
        let entry = |host: &FakeHost| {
            let (a, b) = g.locate("acme");
            g.read(host, a).1.or_else(|| g.read(host, b).1).unwrap()
        };
        assert_eq!((entry(&host).used, entry(&host).in_flight), (5, 5), "spent moved; the idle-free slice stays");
        assert_eq!(entry(&host).usage, [("api".to_owned(), 5, 1)]);
        g.sync(&mut host);
        assert_eq!(entry(&host).in_flight, 0, "a lease no request used since the last sync is given back");
        assert!(g.leases.borrow().is_empty());
    }

    #[test]
    fn a_report_reads_only_the_slots_in_use() {
        let mut host = FakeHost::default();
        let mut g = grants(&mut host);
        opened(&mut host, &mut g, 100);
        let (a, b) = g.locate("acme");
        let slot = if g.read(&host, a).1.is_some() { a } else { b };
        assert_eq!(indexed(&host), [slot]);
        // An entry the index missed is still found by the full scan.
        let stray = (0..8).find(|s| *s != slot).unwrap();
        let entry = Entry { account: "globex".into(), asked: 1, ..Entry::default() };
        host.shared_set(&format!("tollgate.grant.{stray}"), &entry.encode());
        let reported = |host: &FakeHost| last_report(host)["reports"].as_array().unwrap().len();
        for _ in 1..FULL_SCAN_EVERY {
            host.nanos += NANOS_PER_SECOND;
            g.flush(&mut host, &credits());
        }
        assert_eq!(reported(&host), 1, "acme only");
        host.nanos += NANOS_PER_SECOND;
        g.flush(&mut host, &credits());
        assert_eq!(reported(&host), 2, "the full scan finds globex");
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (RawGrants { lifetime_seconds: 0, ..RawGrants::default() }, "credits.grants.lifetime_seconds"),
            (RawGrants { flush_seconds: 40, ..RawGrants::default() }, "credits.grants.flush_seconds"),
            (RawGrants { min_grant: 10, max_grant: 5, ..RawGrants::default() }, "credits.grants.min_grant"),
            (RawGrants { accounts: 0, ..RawGrants::default() }, "credits.grants.accounts"),
        ];
        for (raw, path) in cases {
            assert_eq!(GrantPolicy::build(&raw).unwrap_err().path, path);
        }
    }
}
