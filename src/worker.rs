//! State one Envoy worker keeps across requests: each worker runs its own VM, so nothing here is
//! shared between threads, and every stream of the worker sees the same values.

use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, RandomState};

use crate::auth::{AuthState, ReplayCache};
use crate::config::Config;
use crate::credits::CreditMode;
use crate::grants::Grants;
use crate::host::Host;
use crate::ratelimit::Table;
use crate::replay::SeenSignatures;
use crate::settle::Settler;
use crate::slots;

/// Everything mutable a worker keeps, so that `Config` stays what the operator wrote.
pub struct Worker {
    /// Per JWT provider: the remote key set and revocation list this worker loaded, and the
    /// tokens it verified.
    pub auth: AuthState,
    /// Where this worker counts requests; `None` when no policy is rate-limited.
    pub rate_table: Option<Table>,
    /// Where failed authentications are counted per client address; `None` when not limited.
    pub auth_failures: Option<Table>,
    /// Signatures accepted recently, so a replay inside the skew window is refused.
    pub replays: RefCell<ReplayCache>,
    /// Signatures any worker of the process accepted, in shared data.
    pub seen_signatures: SeenSignatures,
    /// Commits and releases in flight or waiting for a retry; the root context answers them.
    pub settler: RefCell<Settler>,
    /// The process's credit grants; `None` when no billed policy is paid from grants.
    pub grants: Option<RefCell<Grants>>,
    /// Random per VM (hex), so the reservation ids and queue names this worker makes are its own.
    id: String,
    reservations: Cell<u64>,
}

impl Worker {
    /// Opens what this worker shares with the others through `host` (the rate-limit table, the
    /// slot-hash secret); the root context calls this when the plugin starts.
    pub fn new(config: &Config, host: &mut dyn Host) -> Worker {
        let replays = config.auth.signatures().map_or_else(|| ReplayCache::new(0), |s| s.replay_cache());
        let secret = slots::secret(host);
        let granting = config
            .routes
            .policy_names()
            .filter_map(|name| config.routes.policy(name))
            .any(|policy| policy.credits.as_ref().is_some_and(|credits| credits.mode == CreditMode::Grant));
        let grants = match &config.credits {
            // Only a wasm worker has a timer to sync a lease with (see `grants`).
            Some(credits) if granting => {
                Some(RefCell::new(Grants::open(&credits.grants, secret, cfg!(target_arch = "wasm32"), host)))
            }
            _ => None,
        };
        Worker {
            auth: AuthState::new(&config.auth),
            rate_table: config.rate_limits.as_ref().map(|limits| Table::open(limits.layout(), secret, host)),
            auth_failures: config
                .auth
                .failures()
                .map(|budget| Table::open_named("tollgate.af", budget.layout(), secret, host)),
            replays: RefCell::new(replays),
            seen_signatures: SeenSignatures::new(secret),
            settler: RefCell::new(Settler::default()),
            grants,
            // RandomState is seeded from the OS (WASI random_get in Envoy).
            id: format!("{:016x}", RandomState::new().hash_one(0u8)),
            reservations: Cell::new(0),
        }
    }

    /// Unique to this VM: names what belongs to it among the process's shared data and queues.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The root context's part in grants, on its timer or when a stream woke it: report and top up
    /// when the process's turn is due.
    pub fn flush_grants(&self, host: &mut dyn Host, config: &Config) {
        if let (Some(credits), Some(Ok(mut grants))) =
            (&config.credits, self.grants.as_ref().map(RefCell::try_borrow_mut))
        {
            grants.sync(host);
            grants.flush(host, credits);
        }
    }

    /// Whether callout `token` is a grant report of this worker's.
    pub fn is_grant_report(&self, token: u32) -> bool {
        self.grants.as_ref().and_then(|g| g.try_borrow().ok()).is_some_and(|g| g.is_waiting_for(token))
    }

    /// The credit service's answer to a grant report.
    pub fn grant_answer(&self, host: &mut dyn Host, token: u32, answer: Option<(u16, Vec<u8>)>) {
        if let Some(Ok(mut grants)) = self.grants.as_ref().map(RefCell::try_borrow_mut) {
            grants.on_answer(host, token, answer);
        }
    }

    /// A reservation's idempotency key: the request id for the ledger's reader, and a suffix
    /// unique to this worker and request that no client can choose or repeat.
    pub fn reservation_key(&self, request_id: &str) -> String {
        let n = self.reservations.get().wrapping_add(1);
        self.reservations.set(n);
        let request_id: String = request_id.chars().filter(|c| c.is_ascii_graphic()).take(128).collect();
        format!("{request_id}~{}{n:x}", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::ratelimit::Caller;

    /// A public route limited to 3 per minute per address, and one API key per entry of `keys`.
    fn config(per_minute: u64, keys: &[&str]) -> Config {
        let sha256 =
            |id: &str| -> String { hmac_sha256::Hash::hash(id.as_bytes()).map(|b| format!("{b:02x}")).concat() };
        let keys: Vec<_> =
            keys.iter().map(|id| serde_json::json!({"id": id, "sha256": sha256(id), "account": id})).collect();
        let json = serde_json::json!({
            "policies": {"p": {"access": "public", "rate_limit": {}}},
            "routes": [{"prefix": "/", "policy": "p"}],
            "rate_limits": {"anonymous": {"per_minute": per_minute}, "slots": 256},
            "auth": {"api_keys": {"keys": keys}},
        });
        Config::from_json(json.to_string().as_bytes()).unwrap()
    }

    /// How many requests from one address the worker lets through now, up to 10.
    fn passes(config: &Config, worker: &Worker, host: &mut FakeHost) -> usize {
        let (Some(limits), Some(table)) = (&config.rate_limits, &worker.rate_table) else { panic!("not limited") };
        let policy = config.routes.policy("p").unwrap().rate_limit.as_ref().unwrap();
        let caller = Caller::Address(Some("203.0.113.7:4000"));
        (0..10)
            .take_while(|_| {
                let now = host.now_nanos();
                limits.check(table, host, policy, &caller, now).result.is_ok()
            })
            .count()
    }

    #[test]
    fn a_config_edit_keeps_the_counts_unless_it_changes_the_limits() {
        // After 3 of 3 a minute: what the same caller gets under the edited config.
        let cases = [
            ("adding an API key keeps the count", config(3, &["a", "b"]), 0),
            (
                "raising the limit starts afresh: a TAT counted under 3/min means something else under 5/min",
                config(5, &["a"]),
                5,
            ),
        ];
        for (edit, after, passing) in cases {
            // One process: the shared data outlives the VM of the old config.
            let mut host = FakeHost::default();
            let before = config(3, &["a"]);
            assert_eq!(passes(&before, &Worker::new(&before, &mut host), &mut host), 3);
            assert_eq!(passes(&after, &Worker::new(&after, &mut host), &mut host), passing, "{edit}");
        }
    }
}
