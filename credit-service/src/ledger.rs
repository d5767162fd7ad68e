//! The ledger's rules, without I/O: what a batch of operations does to accounts, reservations and
//! the journal, given the rows it touches.
//!
//! A backend runs each batch in one transaction: it locks and loads the rows that `Keys` names into a
//! `Snapshot`, lets `apply` decide every operation in order against it, then writes the `Changes` back
//! in a few statements. Each operation gets its own answer; a refused one (402, 404, 409, 422) changes
//! nothing and leaves its neighbours alone, because nothing reaches the database until the whole
//! batch is decided. Balances are checked here, against rows the transaction holds locked, so they
//! never go negative; the schema's `CHECK`s are the second line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::LedgerError;

/// The most credits one call may move: far above any real price, far below overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// The most credits an account may hold (available plus held), so sums never overflow an `i64`.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

/// Versioned schema changes, applied in order at startup; each runs once per database. Where the
/// dialects differ, the SQL names a `Dialect` field in braces.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    sql: &'static str,
}

/// What a migration's SQL says differently on each backend.
pub struct Dialect {
    /// `{ID}`: the auto-numbered journal id.
    pub id: &'static str,
    /// `{DROP_FOREIGN_KEYS}`: see migration 2.
    pub drop_foreign_keys: &'static str,
    /// `{GRANT_JOURNAL}`: lets the journal hold grant rows (new kinds, and the grant a row is
    /// about). SQLite cannot change a `CHECK` in place, so there the table is rebuilt.
    pub grant_journal: &'static str,
    /// `{BYTEWISE_KEYS}`: see migration 4.
    pub bytewise_keys: &'static str,
    /// `{CHECKS_AS_COMPARISONS}`: see migration 5.
    pub checks_as_comparisons: &'static str,
}

impl Migration {
    pub fn sql(&self, dialect: &Dialect) -> String {
        self.sql
            .replace("{ID}", dialect.id)
            .replace("{DROP_FOREIGN_KEYS}", dialect.drop_foreign_keys)
            .replace("{GRANT_JOURNAL}", dialect.grant_journal)
            .replace("{BYTEWISE_KEYS}", dialect.bytewise_keys)
            .replace("{CHECKS_AS_COMPARISONS}", dialect.checks_as_comparisons)
    }
}

/// The journal's kinds once grants exist; both dialects' `{GRANT_JOURNAL}` name this list.
#[macro_export]
macro_rules! journal_kinds {
    () => {
        "'topup', 'reserve', 'commit', 'release', 'expire', 'grant', 'grant_use', 'grant_close', 'grant_expire'"
    };
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts, reservations, journal",
        sql: "
CREATE TABLE accounts (
    id         TEXT PRIMARY KEY,
    balance    BIGINT NOT NULL CHECK (balance >= 0),
    held       BIGINT NOT NULL CHECK (held >= 0),
    created_at BIGINT NOT NULL
);
CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    request_id TEXT NOT NULL,
    route      TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount > 0),
    state      TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    charged    BIGINT,
    created_at BIGINT NOT NULL,
    settled_at BIGINT,
    UNIQUE (account_id, request_id)
);
CREATE INDEX reservations_held_by_age ON reservations (created_at) WHERE state = 'held';
CREATE TABLE ledger (
    id             {ID},
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    kind           TEXT NOT NULL CHECK (kind IN ('topup', 'reserve', 'commit', 'release', 'expire')),
    amount         BIGINT NOT NULL,
    balance_after  BIGINT NOT NULL,
    reservation_id TEXT REFERENCES reservations (id),
    reference      TEXT,
    created_at     BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_topup_reference ON ledger (account_id, reference) WHERE kind = 'topup';
CREATE INDEX ledger_by_account ON ledger (account_id, id);
",
    },
    Migration {
        // Profiled under load, PostgreSQL spent half its time in the foreign-key triggers: one
        // look-up per journal and reservation row, in the parent table the same transaction holds
        // locked. The writer only writes rows that reference accounts and reservations its batch
        // locked or made, and nothing is ever deleted, so the triggers could never fire; the tests
        // check the references after crashes and soaks. SQLite keeps them: there a check is one index
        // probe, and dropping a constraint means rebuilding the table.
        version: 2,
        name: "no foreign-key triggers on PostgreSQL",
        sql: "{DROP_FOREIGN_KEYS}",
    },
    Migration {
        // A grant is written once per account per gateway flush, not per request, so its foreign
        // keys cost nothing that matters and stay on both backends. At most one live grant per
        // (account, instance): the unique index is the second line behind `Batch::report`.
        // `usage` holds what grants reported, per account, policy and hour; per-request usage is
        // read from the committed reservations themselves, so a commit writes nothing more.
        version: 3,
        name: "grants and usage",
        sql: "
CREATE TABLE grants (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    instance       TEXT NOT NULL,
    granted_total  BIGINT NOT NULL,
    used_total     BIGINT NOT NULL CHECK (used_total >= 0 AND used_total <= granted_total),
    lifetime_ms    BIGINT NOT NULL CHECK (lifetime_ms > 0),
    status         TEXT NOT NULL CHECK (status IN ('live', 'closed', 'expired')),
    rate           BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    last_report_at BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    settled_at     BIGINT
);
CREATE UNIQUE INDEX grants_live ON grants (account_id, instance) WHERE status = 'live';
CREATE INDEX grants_live_by_expiry ON grants (expires_at) WHERE status = 'live';
CREATE TABLE grant_usage (
    grant_id TEXT NOT NULL REFERENCES grants (id),
    policy   TEXT NOT NULL,
    credits  BIGINT NOT NULL CHECK (credits >= 0),
    requests BIGINT NOT NULL CHECK (requests >= 0),
    PRIMARY KEY (grant_id, policy)
);
CREATE TABLE usage (
    account_id TEXT NOT NULL REFERENCES accounts (id),
    policy     TEXT NOT NULL,
    hour       BIGINT NOT NULL,
    credits    BIGINT NOT NULL,
    requests   BIGINT NOT NULL,
    PRIMARY KEY (account_id, policy, hour)
);
{GRANT_JOURNAL}
",
    },
    Migration {
        // Every comparison in a text index goes through the column's collation. A PostgreSQL
        // database made with a libc collation such as C.UTF-8 compares ids with strcoll, on copies
        // made to end in NUL; profiled under batches, about 15% of PostgreSQL's time went to
        // comparing keys while inserting into and probing the indexes, half that once bytewise
        // ("C", memcmp). Ids, account ids, request ids and names are compared for equality only,
        // so the answers stay the same; where order shows (usage by policy), it now matches
        // SQLite, whose BINARY collation was bytewise all along. The routes go with the policies,
        // as reads put them in one column. The upgrade rebuilds these tables' indexes, holding
        // their locks meanwhile: other instances wait for it.
        version: 4,
        name: "bytewise keys on PostgreSQL",
        sql: "{BYTEWISE_KEYS}",
    },
    Migration {
        // SQLite checks `x IN (a, b, c, …)` by building a temporary b-tree of the list, afresh for
        // every row written: profiled under batches, a fifth of the writer thread went to those
        // b-trees for the reservation state, the journal kind and the grant status. The same checks
        // written as `x = a OR x = b …` are a few comparisons. They accept exactly the same values,
        // so no row is rewritten: only the tables' definitions change. PostgreSQL compares the list
        // in place and keeps its definitions.
        version: 5,
        name: "membership checks as comparisons on SQLite",
        sql: "{CHECKS_AS_COMPARISONS}",
    },
];

/// One write, as the HTTP API or the sweeper asks for it. Inputs are already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates the account with nothing on it, unless it exists.
    CreateAccount { account: String },
    /// Adds credits once per `(account, reference)`.
    TopUp { account: String, amount: i64, reference: String },
    /// Holds `amount` for one request, once per `(account, request_id)`.
    Reserve { account: String, amount: i64, request_id: String, route: String },
    /// Charges `amount` (default: all) of a held reservation and returns the rest.
    Commit { reservation: String, amount: Option<i64> },
    /// Returns a held reservation to the balance.
    Release { reservation: String },
    /// The sweeper's release of a reservation held too long.
    Expire { reservation: String },
    /// A gateway's report on its grant for one account: opens, charges, grows or closes it.
    Report(Report),
    /// The sweeper's settlement of a grant nobody reported on for twice its lifetime.
    ExpireGrant { account: String, grant: String },
}

/// One account's part of `POST /v1/grants`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub account: String,
    pub instance: String,
    /// None opens the live grant of (account, instance), or finds the one open.
    pub grant: Option<String>,
    /// Cumulative: credits spent on this grant since it opened.
    pub used_total: i64,
    /// Cumulative per policy.
    pub usage: BTreeMap<String, Usage>,
    /// The `granted_total` the gateway asks for.
    pub want_total: i64,
    pub min_grant: i64,
    pub max_grant: i64,
    pub lifetime_ms: i64,
    pub close: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub credits: i64,
    pub requests: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    Live,
    Closed,
    Expired,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Closed => "closed",
            Self::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Result<Self, LedgerError> {
        match text {
            "live" => Ok(Self::Live),
            "closed" => Ok(Self::Closed),
            "expired" => Ok(Self::Expired),
            _ => Err(LedgerError::Corrupt("a grant status")),
        }
    }
}

/// A grant as the batch sees it, and as the backend writes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub account: String,
    pub instance: String,
    pub granted_total: i64,
    pub used_total: i64,
    pub lifetime_ms: i64,
    pub status: GrantStatus,
    /// The grant's recent spending, in thousandths of a credit per second (see `Grant::charge`).
    pub rate: i64,
    pub created_at: i64,
    pub last_report_at: i64,
    pub expires_at: i64,
}

/// How far back a grant's rate looks: long enough to smooth one-second reports, short enough to
/// follow a burst within a few reports.
const RATE_WINDOW_MS: i64 = 5_000;

impl Grant {
    /// Charges `used` more credits of the hold, reported `elapsed_ms` after the previous report,
    /// and folds them into the rate: the rate decays over `RATE_WINDOW_MS` and each charge adds its
    /// credits spread over the window. A duplicate report (nothing new) only lets the rate decay.
    fn charge(&mut self, used: i64, now: i64) {
        let elapsed = (now - self.last_report_at).max(0);
        let added = i128::from(used) * 1_000_000;
        let rate = if elapsed >= RATE_WINDOW_MS {
            added / i128::from(elapsed)
        } else {
            let kept = i128::from(self.rate) * i128::from(RATE_WINDOW_MS - elapsed);
            (kept + added) / i128::from(RATE_WINDOW_MS)
        };
        self.rate = i64::try_from(rate).unwrap_or(i64::MAX);
        self.used_total += used;
    }

    /// The rate as of `now`: one that has not been reported on for a while fades out over the
    /// window, so a gateway that stopped spending stops counting towards the account's rate.
    fn recent_rate(&self, now: i64) -> i128 {
        let idle = (now - self.last_report_at).clamp(0, RATE_WINDOW_MS);
        i128::from(self.rate) * i128::from(RATE_WINDOW_MS - idle) / i128::from(RATE_WINDOW_MS)
    }

    /// The part of the hold not spent yet.
    pub fn unused(&self) -> i64 {
        self.granted_total - self.used_total
    }
}

/// What a report (or closing an ended grant) answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantAnswer {
    pub grant_id: String,
    pub granted_total: i64,
    pub used_total: i64,
    pub lifetime_ms: i64,
    /// Nothing more will be added: spend the rest, then bill this account per request.
    pub last: bool,
    /// Balance and holds together: what the account has not spent.
    pub balance: i64,
    /// What is left for new holds.
    pub available: i64,
}

/// The start (ms) of the UTC hour `at` falls in.
pub fn hour_of(at: i64) -> i64 {
    at - at.rem_euclid(3_600_000)
}

/// What a successful operation answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Account {
        account: Account,
        created: bool,
    },
    TopUp(TopUp),
    Hold(Hold),
    Committed {
        charged: i64,
        balance: i64,
    },
    Released {
        released: i64,
        balance: i64,
    },
    /// Whether the reservation was still held, and so expired now.
    Expired(bool),
    Grant(GrantAnswer),
    /// Whether the grant was still live and overdue, and so expired now.
    GrantExpired(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub balance: i64,
    pub held: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopUp {
    pub balance: i64,
    pub transaction_id: i64,
    /// True when the reference was seen before and this is the first top-up's result.
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub reservation_id: String,
    /// What is still available after the hold (for a replay: available now).
    pub balance: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub reservation_id: Option<String>,
    pub reference: Option<String>,
    pub created_at_ms: i64,
    pub grant_id: Option<String>,
    pub charged: Option<i64>,
}

/// One bucket of `GET /v1/accounts/{id}/usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub policy: String,
    /// The bucket's start, ms.
    pub start: i64,
    pub credits: i64,
    pub requests: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Held,
    Committed,
    Released,
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Result<Self, LedgerError> {
        match text {
            "held" => Ok(Self::Held),
            "committed" => Ok(Self::Committed),
            "released" => Ok(Self::Released),
            "expired" => Ok(Self::Expired),
            _ => Err(LedgerError::Corrupt("a reservation state")),
        }
    }
}

/// A reservation as the batch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub account: String,
    pub amount: i64,
    pub state: State,
    pub charged: Option<i64>,
}

/// The rows a batch touches, for the backend to lock and load.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keys {
    /// Accounts to create (if missing) before anything is locked, so the lock finds them.
    pub create: BTreeSet<String>,
    /// Accounts named by the operations; a backend adds those of `reservations`. Sorted: locking in
    /// one order keeps two instances' batches from deadlocking.
    pub accounts: BTreeSet<String>,
    pub reservations: BTreeSet<String>,
    /// `(account, request_id)` of each reservation asked for, to find replays.
    pub requests: BTreeSet<(String, String)>,
    /// `(account, reference)` of each top-up, to find replays.
    pub references: BTreeSet<(String, String)>,
    /// Grants named by id; a backend loads them with their per-policy usage.
    pub grants: BTreeSet<String>,
    /// Accounts whose live grants (all instances') a report needs: to find the one to open or
    /// report on, to count them for a fair share, and to sum their rates.
    pub grant_accounts: BTreeSet<String>,
}

impl Keys {
    pub fn of(ops: &[Op]) -> Self {
        let mut keys = Self::default();
        for op in ops {
            match op {
                Op::CreateAccount { account } => {
                    keys.create.insert(account.clone());
                    keys.accounts.insert(account.clone());
                }
                Op::TopUp { account, reference, .. } => {
                    keys.accounts.insert(account.clone());
                    keys.references.insert((account.clone(), reference.clone()));
                }
                Op::Reserve { account, request_id, .. } => {
                    keys.accounts.insert(account.clone());
                    keys.requests.insert((account.clone(), request_id.clone()));
                }
                Op::Commit { reservation, .. } | Op::Release { reservation } | Op::Expire { reservation } => {
                    keys.reservations.insert(reservation.clone());
                }
                Op::Report(report) => {
                    keys.accounts.insert(report.account.clone());
                    keys.grant_accounts.insert(report.account.clone());
                    if let Some(grant) = &report.grant {
                        keys.grants.insert(grant.clone());
                    }
                }
                Op::ExpireGrant { account, grant } => {
                    keys.accounts.insert(account.clone());
                    keys.grants.insert(grant.clone());
                }
            }
        }
        keys
    }
}

/// The rows a batch touches, as its transaction found them.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accounts: HashMap<String, Account>,
    /// Accounts this transaction created (`Keys::create` that were missing).
    pub created: BTreeSet<String>,
    pub reservations: HashMap<String, Reservation>,
    /// `(account, request_id)` → reservation id.
    pub requests: HashMap<(String, String), String>,
    /// `(account, reference)` → the top-up's journal id and the balance after it.
    pub references: HashMap<(String, String), (i64, i64)>,
    /// The grants `Keys::grants` names and the live grants of `Keys::grant_accounts`, by id. Only
    /// grants whose account the transaction holds locked.
    pub grants: HashMap<String, Grant>,
    /// `(grant, policy)` → the cumulative usage stored, for the grants in `grants`.
    pub grant_usage: HashMap<(String, String), Usage>,
}

/// A reservation made by this batch, in the state the batch left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReservation {
    pub id: String,
    pub account: String,
    pub request_id: String,
    pub route: String,
    pub amount: i64,
    pub state: State,
    pub charged: Option<i64>,
}

/// The new state of a reservation made before this batch, which the batch settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub id: String,
    pub state: State,
    pub charged: Option<i64>,
}

/// One journal row to append, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub account: String,
    pub kind: &'static str,
    pub amount: i64,
    pub balance_after: i64,
    pub reservation: Option<String>,
    pub reference: Option<String>,
    pub grant: Option<String>,
    /// `grant_use` only: the credits of the hold it charged. The balance (and so `amount`) does not
    /// change when a hold is spent, so without it the row would not say what was spent.
    pub charged: Option<i64>,
}

/// What the batch writes. Each row appears once, in its final state, so a backend may write all of
/// it in one statement: PostgreSQL's data-modifying `WITH` parts cannot see each other's rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The final `(balance, held)` of every account the batch changed.
    pub accounts: Vec<(String, Account)>,
    pub reservations: Vec<NewReservation>,
    pub settlements: Vec<Settlement>,
    pub journal: Vec<Row>,
    /// Grants this batch made (`true`) or changed, in their final state.
    pub grants: Vec<(Grant, bool)>,
    /// The final cumulative usage of each `(grant, policy)` the batch changed.
    pub grant_usage: Vec<(String, String, Usage)>,
    /// What the batch adds to each `(account, policy, hour)` of the usage analytics.
    pub usage: Vec<(String, String, i64, Usage)>,
}

/// Every operation's answer, in order. A top-up's `transaction_id` here is the index of its journal
/// row in `Changes::journal` until `resolve` turns it into the id the database gave that row.
pub struct Decided {
    pub answers: Vec<Result<Outcome, LedgerError>>,
    pub changes: Changes,
    /// Answers whose `transaction_id` is still a journal index: top-ups of this batch, and their
    /// replays within it.
    fresh_top_ups: Vec<usize>,
}

impl Decided {
    /// Puts the database's journal ids (one per `Changes::journal` row, in order) into the answers.
    pub fn resolve(mut self, journal_ids: &[i64]) -> Result<Vec<Result<Outcome, LedgerError>>, LedgerError> {
        for &i in &self.fresh_top_ups {
            if let Some(Ok(Outcome::TopUp(top_up))) = self.answers.get_mut(i) {
                let row = usize::try_from(top_up.transaction_id).unwrap_or(usize::MAX);
                top_up.transaction_id =
                    *journal_ids.get(row).ok_or(LedgerError::Corrupt("the journal ids of a batch"))?;
            }
        }
        Ok(self.answers)
    }
}

/// Decides each operation in order against `snapshot`, as if each ran in a transaction of its own,
/// at `now` (ms). `new_id` makes a new row's id with the given prefix.
pub fn apply(ops: Vec<Op>, mut snapshot: Snapshot, now: i64, new_id: &mut dyn FnMut(&str) -> String) -> Decided {
    let mut live = HashMap::new();
    let mut live_on: HashMap<String, BTreeSet<String>> = HashMap::new();
    for grant in snapshot.grants.values().filter(|g| g.status == GrantStatus::Live) {
        live.insert((grant.account.clone(), grant.instance.clone()), grant.id.clone());
        live_on.entry(grant.account.clone()).or_default().insert(grant.id.clone());
    }
    let mut batch = Batch {
        snapshot: &mut snapshot,
        changes: Changes::default(),
        touched: BTreeSet::new(),
        top_ups: HashMap::new(),
        made: HashMap::new(),
        names_a_row: false,
        now,
        live,
        live_on,
        grants_touched: BTreeMap::new(),
        usage_touched: BTreeSet::new(),
        usage_added: BTreeMap::new(),
    };
    let mut fresh_top_ups = Vec::new();
    let mut answers = Vec::with_capacity(ops.len());
    for (i, op) in ops.into_iter().enumerate() {
        batch.names_a_row = false;
        answers.push(batch.one(op, new_id));
        if batch.names_a_row {
            fresh_top_ups.push(i);
        }
    }
    let Batch { mut changes, touched, grants_touched, usage_touched, usage_added, .. } = batch;
    changes.accounts =
        touched.into_iter().filter_map(|id| snapshot.accounts.get(&id).map(|a| (id.clone(), *a))).collect();
    changes.grants = grants_touched
        .into_iter()
        .filter_map(|(id, made)| snapshot.grants.get(&id).map(|g| (g.clone(), made)))
        .collect();
    changes.grant_usage = usage_touched
        .into_iter()
        .filter_map(|key| snapshot.grant_usage.get(&key).map(|u| (key.0, key.1, *u)))
        .collect();
    changes.usage = usage_added.into_iter().map(|((account, policy, hour), u)| (account, policy, hour, u)).collect();
    Decided { answers, changes, fresh_top_ups }
}

struct Batch<'s> {
    snapshot: &'s mut Snapshot,
    changes: Changes,
    touched: BTreeSet<String>,
    /// `(account, reference)` of the top-ups this batch made → their journal row.
    top_ups: HashMap<(String, String), (usize, i64)>,
    /// Reservations this batch made → their place in `changes.reservations`.
    made: HashMap<String, usize>,
    /// Whether the current answer's `transaction_id` is a row of this batch's journal.
    names_a_row: bool,
    now: i64,
    /// `(account, instance)` → its live grant.
    live: HashMap<(String, String), String>,
    /// Account → its live grants.
    live_on: HashMap<String, BTreeSet<String>>,
    /// Grants this batch changed → whether it made them.
    grants_touched: BTreeMap<String, bool>,
    /// `(grant, policy)` whose cumulative usage this batch changed.
    usage_touched: BTreeSet<(String, String)>,
    /// `(account, policy, hour)` → usage this batch adds to the analytics.
    usage_added: BTreeMap<(String, String, i64), Usage>,
}

impl Batch<'_> {
    fn one(&mut self, op: Op, new_id: &mut dyn FnMut(&str) -> String) -> Result<Outcome, LedgerError> {
        match op {
            Op::CreateAccount { account } => {
                let found = *self.account(&account)?;
                // Only the first creation in the batch made it; a twin sees it existing.
                let created = self.snapshot.created.remove(&account);
                Ok(Outcome::Account { account: found, created })
            }
            Op::TopUp { account, amount, reference } => self.top_up(account, amount, reference),
            Op::Reserve { account, amount, request_id, route } => {
                self.reserve(account, amount, request_id, route, new_id)
            }
            Op::Commit { reservation, amount } => self.commit(reservation, amount),
            Op::Release { reservation } => match self.unhold(&reservation, State::Released) {
                Ok(released) => Ok(Outcome::Released { released, balance: self.balance_of(&reservation)? }),
                Err(LedgerError::ReservationReleased { .. }) => {
                    // Releasing again, or after expiry: the same answer, nothing changes.
                    let amount = self.reservation(&reservation)?.amount;
                    Ok(Outcome::Released { released: amount, balance: self.balance_of(&reservation)? })
                }
                Err(e) => Err(e),
            },
            Op::Expire { reservation } => match self.unhold(&reservation, State::Expired) {
                Ok(_) => Ok(Outcome::Expired(true)),
                // Settled (or gone) since the sweeper looked: nothing to do.
                Err(
                    LedgerError::ReservationNotFound(_)
                    | LedgerError::ReservationReleased { .. }
                    | LedgerError::ReservationCommitted,
                ) => Ok(Outcome::Expired(false)),
                Err(e) => Err(e),
            },
            Op::Report(report) => self.report(report, new_id),
            Op::ExpireGrant { account, grant } => Ok(Outcome::GrantExpired(self.expire_grant(&account, &grant)?)),
        }
    }

    fn account(&mut self, id: &str) -> Result<&mut Account, LedgerError> {
        self.snapshot.accounts.get_mut(id).ok_or_else(|| LedgerError::AccountNotFound(id.to_owned()))
    }

    fn reservation(&self, id: &str) -> Result<&Reservation, LedgerError> {
        self.snapshot.reservations.get(id).ok_or_else(|| LedgerError::ReservationNotFound(id.to_owned()))
    }

    /// The balance now of the account a reservation belongs to.
    fn balance_of(&mut self, reservation: &str) -> Result<i64, LedgerError> {
        let account = self.reservation(reservation)?.account.clone();
        Ok(self.account(&account)?.balance)
    }

    fn top_up(&mut self, account: String, amount: i64, reference: String) -> Result<Outcome, LedgerError> {
        let key = (account, reference);
        if let Some(&(transaction_id, balance)) = self.snapshot.references.get(&key) {
            return Ok(Outcome::TopUp(TopUp { balance, transaction_id, replayed: true }));
        }
        if let Some(&(row, balance)) = self.top_ups.get(&key) {
            return Ok(self.journal_row_top_up(row, balance, true));
        }
        let (account, reference) = key;
        let found = self.account(&account)?;
        if found.balance + found.held > MAX_BALANCE - amount {
            return Err(LedgerError::BalanceLimit { max: MAX_BALANCE });
        }
        found.balance += amount;
        let balance = found.balance;
        let row = self.changes.journal.len();
        self.top_ups.insert((account.clone(), reference.clone()), (row, balance));
        self.append(&account, "topup", amount, balance, None, Some(reference));
        Ok(self.journal_row_top_up(row, balance, false))
    }

    /// A top-up's answer whose transaction id is row `row` of this batch's journal, until `resolve`.
    fn journal_row_top_up(&mut self, row: usize, balance: i64, replayed: bool) -> Outcome {
        self.names_a_row = true;
        let transaction_id = i64::try_from(row).unwrap_or(i64::MAX);
        Outcome::TopUp(TopUp { balance, transaction_id, replayed })
    }

    fn reserve(
        &mut self,
        account: String,
        amount: i64,
        request_id: String,
        route: String,
        new_id: &mut dyn FnMut(&str) -> String,
    ) -> Result<Outcome, LedgerError> {
        let key = (account, request_id);
        if let Some(first) = self.snapshot.requests.get(&key) {
            // A retry, whatever the amount: the first reservation, the balance now.
            let reservation_id = first.clone();
            let balance = self.account(&key.0)?.balance;
            return Ok(Outcome::Hold(Hold { reservation_id, balance, replayed: true }));
        }
        let (account, request_id) = key;
        let found = self.account(&account)?;
        if found.balance < amount {
            // Refused, so not remembered: the same request id may reserve once the account can pay.
            return Err(LedgerError::InsufficientCredits { balance: found.balance, required: amount });
        }
        found.balance -= amount;
        found.held += amount;
        let balance = found.balance;
        let id = new_id("res");
        self.snapshot.requests.insert((account.clone(), request_id.clone()), id.clone());
        self.snapshot
            .reservations
            .insert(id.clone(), Reservation { account: account.clone(), amount, state: State::Held, charged: None });
        self.made.insert(id.clone(), self.changes.reservations.len());
        self.changes.reservations.push(NewReservation {
            id: id.clone(),
            account: account.clone(),
            request_id,
            route,
            amount,
            state: State::Held,
            charged: None,
        });
        self.append(&account, "reserve", -amount, balance, Some(id.clone()), None);
        Ok(Outcome::Hold(Hold { reservation_id: id, balance, replayed: false }))
    }

    fn commit(&mut self, id: String, amount: Option<i64>) -> Result<Outcome, LedgerError> {
        let found = self.reservation(&id)?.clone();
        match found.state {
            State::Committed => {
                // Again, with or without an amount: the first charge, nothing changes.
                let charged = found.charged.unwrap_or(found.amount);
                Ok(Outcome::Committed { charged, balance: self.account(&found.account)?.balance })
            }
            State::Released => Err(LedgerError::ReservationReleased { expired: false }),
            State::Expired => self.commit_late(id, &found, amount),
            State::Held => {
                let charged = amount.unwrap_or(found.amount);
                if charged > found.amount {
                    return Err(LedgerError::AmountExceedsReservation { amount: charged, reserved: found.amount });
                }
                let returned = found.amount - charged;
                let account = self.account(&found.account)?;
                account.held -= found.amount;
                account.balance += returned;
                let balance = account.balance;
                self.settle(&id, State::Committed, Some(charged));
                self.append(&found.account, "commit", returned, balance, Some(id), None);
                Ok(Outcome::Committed { charged, balance })
            }
        }
    }

    /// A commit that arrives after its reservation expired (a client that trickled its body past
    /// the TTL): the request was served, so it is charged what it owes, up to the reservation, as
    /// far as the balance now allows — never below zero. The expiry already gave the hold back, so
    /// this takes the charge from the available balance, journalled as a negative `commit`, and the
    /// journal still sums to the balance.
    fn commit_late(&mut self, id: String, found: &Reservation, amount: Option<i64>) -> Result<Outcome, LedgerError> {
        let owed = amount.unwrap_or(found.amount);
        if owed > found.amount {
            return Err(LedgerError::AmountExceedsReservation { amount: owed, reserved: found.amount });
        }
        let account = self.account(&found.account)?;
        let charged = owed.min(account.balance);
        account.balance -= charged;
        let balance = account.balance;
        self.settle(&id, State::Committed, Some(charged));
        self.append(&found.account, "commit", -charged, balance, Some(id), None);
        Ok(Outcome::Committed { charged, balance })
    }

    /// Moves a held reservation to `state` and its whole amount back to the balance; returns the
    /// amount. `ReservationReleased` when it was released or expired before.
    fn unhold(&mut self, id: &str, state: State) -> Result<i64, LedgerError> {
        let found = self.reservation(id)?.clone();
        match found.state {
            State::Held => {}
            State::Committed => return Err(LedgerError::ReservationCommitted),
            State::Released | State::Expired => {
                return Err(LedgerError::ReservationReleased { expired: found.state == State::Expired })
            }
        }
        let account = self.account(&found.account)?;
        account.held -= found.amount;
        account.balance += found.amount;
        let balance = account.balance;
        let kind = if state == State::Expired { "expire" } else { "release" };
        self.settle(id, state, None);
        self.append(&found.account, kind, found.amount, balance, Some(id.to_owned()), None);
        Ok(found.amount)
    }

    fn settle(&mut self, id: &str, state: State, charged: Option<i64>) {
        if let Some(r) = self.snapshot.reservations.get_mut(id) {
            r.state = state;
            r.charged = charged;
        }
        match self.made.get(id).and_then(|&i| self.changes.reservations.get_mut(i)) {
            Some(made) => {
                made.state = state;
                made.charged = charged;
            }
            None => self.changes.settlements.push(Settlement { id: id.to_owned(), state, charged }),
        }
    }

    fn append(
        &mut self,
        account: &str,
        kind: &'static str,
        amount: i64,
        balance_after: i64,
        reservation: Option<String>,
        reference: Option<String>,
    ) {
        if !self.touched.contains(account) {
            self.touched.insert(account.to_owned());
        }
        self.changes.journal.push(Row {
            account: account.to_owned(),
            kind,
            amount,
            balance_after,
            reservation,
            reference,
            grant: None,
            charged: None,
        });
    }

    /// A journal row about a grant.
    fn append_grant(&mut self, grant: &str, kind: &'static str, amount: i64, charged: Option<i64>) {
        let Some(account) = self.snapshot.grants.get(grant).map(|g| g.account.clone()) else { return };
        let balance_after = self.snapshot.accounts.get(&account).map_or(0, |a| a.balance);
        self.append(&account, kind, amount, balance_after, None, None);
        if let Some(row) = self.changes.journal.last_mut() {
            row.grant = Some(grant.to_owned());
            row.charged = charged;
        }
    }

    // ---- grants ----------------------------------------------------------------------------------

    /// Finds (or opens) the grant a report is about, charges the use it reports, then closes it or
    /// extends its lifetime and grows it. Charging comes first so a closing or growing report is
    /// decided on the account as it is after the use, as the gateway saw it.
    fn report(&mut self, report: Report, new_id: &mut dyn FnMut(&str) -> String) -> Result<Outcome, LedgerError> {
        self.account(&report.account)?;
        let pair = (report.account.clone(), report.instance.clone());
        let id = match &report.grant {
            // A retried open finds the grant the first one opened: it never holds twice.
            None => match self.live.get(&pair) {
                Some(id) => id.clone(),
                None if report.close => return Err(LedgerError::GrantEnded(None)),
                None => self.open(pair, report.lifetime_ms, new_id),
            },
            Some(id) => {
                // Another account's or instance's grant is not this caller's to report on: as
                // good as unknown, and an unknown grant is as good as ended (the gateway opens
                // a fresh one).
                let found = self
                    .snapshot
                    .grants
                    .get(id)
                    .filter(|g| g.account == report.account && g.instance == report.instance)
                    .ok_or_else(|| LedgerError::GrantEnded(Some(id.clone())))?;
                if found.status != GrantStatus::Live {
                    if report.close {
                        // Closing again: the figures it ended with.
                        let ended = found.clone();
                        return self.grant_answer(&ended, true);
                    }
                    return Err(LedgerError::GrantEnded(Some(id.clone())));
                }
                id.clone()
            }
        };
        self.grants_touched.entry(id.clone()).or_insert(false);
        self.charge(&id, &report)?;
        if report.close {
            self.settle_grant(&id, GrantStatus::Closed)?;
            let closed = self.grant(&id)?.clone();
            return self.grant_answer(&closed, true);
        }
        let now = self.now;
        let grant = self.grant_mut(&id)?;
        grant.lifetime_ms = report.lifetime_ms;
        grant.last_report_at = now;
        grant.expires_at = now + report.lifetime_ms;
        let last = self.grow(&id, &report)?;
        let grown = self.grant(&id)?.clone();
        self.grant_answer(&grown, last)
    }

    fn grant(&self, id: &str) -> Result<&Grant, LedgerError> {
        self.snapshot.grants.get(id).ok_or(LedgerError::Corrupt("a grant the batch holds"))
    }

    fn grant_mut(&mut self, id: &str) -> Result<&mut Grant, LedgerError> {
        self.snapshot.grants.get_mut(id).ok_or(LedgerError::Corrupt("a grant the batch holds"))
    }

    /// Opens an empty live grant for `(account, instance)`; returns its id.
    fn open(&mut self, pair: (String, String), lifetime_ms: i64, new_id: &mut dyn FnMut(&str) -> String) -> String {
        let id = new_id("gr");
        let (account, instance) = pair;
        let grant = Grant {
            id: id.clone(),
            account: account.clone(),
            instance: instance.clone(),
            granted_total: 0,
            used_total: 0,
            lifetime_ms,
            status: GrantStatus::Live,
            rate: 0,
            created_at: self.now,
            last_report_at: self.now,
            expires_at: self.now + lifetime_ms,
        };
        self.snapshot.grants.insert(id.clone(), grant);
        self.live_on.entry(account.clone()).or_default().insert(id.clone());
        self.live.insert((account, instance), id.clone());
        self.grants_touched.insert(id.clone(), true);
        id
    }

    /// Charges the increase of the reported cumulative use, at most the grant, and adds each
    /// policy's increase to the analytics. Smaller figures than stored (a late duplicate, or a
    /// reordered report) change nothing.
    fn charge(&mut self, id: &str, report: &Report) -> Result<(), LedgerError> {
        let now = self.now;
        let grant = self.grant_mut(id)?;
        let used = report.used_total.clamp(grant.used_total, grant.granted_total) - grant.used_total;
        grant.charge(used, now);
        if used > 0 {
            let account = self.account(&report.account)?;
            account.held -= used;
            self.append_grant(id, "grant_use", 0, Some(used));
        }
        let hour = hour_of(now);
        for (policy, reported) in &report.usage {
            let key = (id.to_owned(), policy.clone());
            let stored = self.snapshot.grant_usage.get(&key).copied().unwrap_or_default();
            let added = Usage {
                credits: (reported.credits - stored.credits).max(0),
                requests: (reported.requests - stored.requests).max(0),
            };
            if added == Usage::default() {
                continue;
            }
            let total = Usage { credits: stored.credits + added.credits, requests: stored.requests + added.requests };
            self.snapshot.grant_usage.insert(key.clone(), total);
            self.usage_touched.insert(key);
            let bucket = self.usage_added.entry((report.account.clone(), policy.clone(), hour)).or_default();
            bucket.credits += added.credits;
            bucket.requests += added.requests;
        }
        Ok(())
    }

    /// Grows the grant towards what the gateway wants, as far as the account's recent rate, the
    /// report's bounds and a fair share of what is available allow. Returns whether the answer is
    /// final: the service could add less than `min_grant` and the grant's rest is below it too.
    fn grow(&mut self, id: &str, report: &Report) -> Result<bool, LedgerError> {
        let available = self.account(&report.account)?.balance;
        let live: Vec<String> = self.live_on.get(&report.account).into_iter().flatten().cloned().collect();
        let sharers = i64::try_from(live.len().max(1)).unwrap_or(i64::MAX);
        let share = available / sharers;
        // The account's rate, in thousandths of a credit per second, over the report's lifetime.
        let now = self.now;
        let rate: i128 = live.iter().filter_map(|g| self.snapshot.grants.get(g)).map(|g| g.recent_rate(now)).sum();
        let expected = rate * i128::from(report.lifetime_ms) / 1_000_000;
        let size = i64::try_from(expected).unwrap_or(i64::MAX).clamp(report.min_grant, report.max_grant);
        let grant = self.grant(id)?;
        if share < report.min_grant && grant.unused() < report.min_grant {
            return Ok(true);
        }
        let target = report.want_total.min(grant.used_total.saturating_add(size));
        let add = (target - grant.granted_total).clamp(0, share);
        if add > 0 {
            self.grant_mut(id)?.granted_total += add;
            let account = self.account(&report.account)?;
            account.balance -= add;
            account.held += add;
            self.append_grant(id, "grant", -add, None);
        }
        Ok(false)
    }

    /// Ends a live grant at its used total and returns the rest of the hold to the balance.
    fn settle_grant(&mut self, id: &str, status: GrantStatus) -> Result<(), LedgerError> {
        let grant = self.grant_mut(id)?;
        grant.status = status;
        let (rest, account, instance) = (grant.unused(), grant.account.clone(), grant.instance.clone());
        let found = self.account(&account)?;
        found.held -= rest;
        found.balance += rest;
        self.live.remove(&(account.clone(), instance));
        if let Some(live) = self.live_on.get_mut(&account) {
            live.remove(id);
        }
        self.grants_touched.entry(id.to_owned()).or_insert(false);
        let kind = if status == GrantStatus::Expired { "grant_expire" } else { "grant_close" };
        self.append_grant(id, kind, rest, None);
        Ok(())
    }

    /// The sweeper's expiry: only a grant still live and still unreported for twice its lifetime
    /// (a report may have arrived since the sweeper looked).
    fn expire_grant(&mut self, account: &str, id: &str) -> Result<bool, LedgerError> {
        let overdue = self.snapshot.grants.get(id).is_some_and(|g| {
            g.account == account && g.status == GrantStatus::Live && g.last_report_at + 2 * g.lifetime_ms <= self.now
        });
        if overdue {
            self.settle_grant(id, GrantStatus::Expired)?;
        }
        Ok(overdue)
    }

    fn grant_answer(&mut self, grant: &Grant, last: bool) -> Result<Outcome, LedgerError> {
        let account = *self.account(&grant.account)?;
        Ok(Outcome::Grant(GrantAnswer {
            grant_id: grant.id.clone(),
            granted_total: grant.granted_total,
            used_total: grant.used_total,
            lifetime_ms: grant.lifetime_ms,
            last,
            balance: account.balance + account.held,
            available: account.balance,
        }))
    }
}

pub fn now_ms() -> i64 {
    millis(SystemTime::now())
}

pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(accounts: &[(&str, i64, i64)]) -> Snapshot {
        Snapshot {
            accounts: accounts
                .iter()
                .map(|(id, balance, held)| (id.to_string(), Account { balance: *balance, held: *held }))
                .collect(),
            ..Snapshot::default()
        }
    }

    fn ids() -> impl FnMut(&str) -> String {
        let mut n = 0;
        move |prefix| {
            n += 1;
            format!("{prefix}_{n}")
        }
    }

    fn reserve(account: &str, amount: i64, request_id: &str) -> Op {
        Op::Reserve { account: account.into(), amount, request_id: request_id.into(), route: "/".into() }
    }

    #[test]
    fn a_refused_operation_leaves_its_neighbours_alone() {
        let ops = vec![
            reserve("acme", 7, "a"),
            reserve("acme", 5, "b"),
            reserve("nobody", 1, "c"),
            Op::Commit { reservation: "res_1".into(), amount: Some(8) },
            Op::Commit { reservation: "res_1".into(), amount: Some(4) },
            Op::Release { reservation: "res_1".into() },
            reserve("acme", 1, "a"),
        ];
        let decided = apply(ops, snapshot(&[("acme", 10, 0)]), 0, &mut ids());
        let answers: Vec<_> = decided.answers.iter().map(|a| a.as_ref().map_err(ToString::to_string)).collect();
        assert_eq!(
            answers[0],
            Ok(&Outcome::Hold(Hold { reservation_id: "res_1".into(), balance: 3, replayed: false }))
        );
        assert!(matches!(decided.answers[1], Err(LedgerError::InsufficientCredits { balance: 3, required: 5 })));
        assert!(matches!(decided.answers[2], Err(LedgerError::AccountNotFound(_))));
        assert!(matches!(decided.answers[3], Err(LedgerError::AmountExceedsReservation { amount: 8, reserved: 7 })));
        assert_eq!(answers[4], Ok(&Outcome::Committed { charged: 4, balance: 6 }));
        assert!(matches!(decided.answers[5], Err(LedgerError::ReservationCommitted)));
        assert_eq!(answers[6], Ok(&Outcome::Hold(Hold { reservation_id: "res_1".into(), balance: 6, replayed: true })));
        let changes = &decided.changes;
        assert_eq!(changes.accounts, [("acme".to_owned(), Account { balance: 6, held: 0 })]);
        assert_eq!(changes.reservations.len(), 1);
        assert_eq!((changes.reservations[0].state, changes.reservations[0].charged), (State::Committed, Some(4)));
        assert_eq!(changes.settlements, [], "made and settled in one batch: written once, settled");
        let journal: Vec<_> = changes.journal.iter().map(|r| (r.kind, r.amount, r.balance_after)).collect();
        assert_eq!(journal, [("reserve", -7, 3), ("commit", 3, 6)]);
    }

    #[test]
    fn top_ups_get_their_journal_ids_and_replay_within_a_batch() {
        let ops = vec![
            Op::TopUp { account: "acme".into(), amount: 5, reference: "r1".into() },
            Op::TopUp { account: "acme".into(), amount: 9, reference: "r1".into() },
            Op::TopUp { account: "acme".into(), amount: MAX_BALANCE, reference: "r2".into() },
            Op::TopUp { account: "acme".into(), amount: 1, reference: "old".into() },
        ];
        let mut before = snapshot(&[("acme", 1, 0)]);
        before.references.insert(("acme".into(), "old".into()), (41, 1));
        let answers = apply(ops, before, 0, &mut ids()).resolve(&[77]).unwrap();
        assert_eq!(
            answers[0].as_ref().unwrap(),
            &Outcome::TopUp(TopUp { balance: 6, transaction_id: 77, replayed: false })
        );
        assert_eq!(
            answers[1].as_ref().unwrap(),
            &Outcome::TopUp(TopUp { balance: 6, transaction_id: 77, replayed: true })
        );
        assert!(matches!(answers[2], Err(LedgerError::BalanceLimit { .. })));
        assert_eq!(
            answers[3].as_ref().unwrap(),
            &Outcome::TopUp(TopUp { balance: 1, transaction_id: 41, replayed: true })
        );
    }

    #[test]
    fn expiry_and_release_are_idempotent() {
        let mut before = snapshot(&[("acme", 0, 10)]);
        before.reservations.insert(
            "res_x".into(),
            Reservation { account: "acme".into(), amount: 10, state: State::Held, charged: None },
        );
        let ops = vec![
            Op::Expire { reservation: "res_x".into() },
            Op::Expire { reservation: "res_x".into() },
            Op::Release { reservation: "res_x".into() },
            Op::Expire { reservation: "res_gone".into() },
        ];
        let decided = apply(ops, before, 0, &mut ids());
        assert_eq!(decided.answers[0].as_ref().unwrap(), &Outcome::Expired(true));
        assert_eq!(decided.answers[1].as_ref().unwrap(), &Outcome::Expired(false));
        assert_eq!(decided.answers[2].as_ref().unwrap(), &Outcome::Released { released: 10, balance: 10 });
        assert_eq!(decided.answers[3].as_ref().unwrap(), &Outcome::Expired(false));
        assert_eq!(decided.changes.journal.len(), 1);
        assert_eq!(decided.changes.accounts, [("acme".to_owned(), Account { balance: 10, held: 0 })]);
    }

    #[test]
    fn a_commit_after_expiry_still_charges_what_the_balance_allows() {
        let held = |amount| Reservation { account: "acme".into(), amount, state: State::Held, charged: None };
        let mut before = snapshot(&[("acme", 4, 16)]);
        before.reservations.insert("res_a".into(), held(10));
        before.reservations.insert("res_b".into(), held(6));
        let ops = vec![
            Op::Expire { reservation: "res_a".into() },
            Op::Expire { reservation: "res_b".into() },
            Op::Commit { reservation: "res_a".into(), amount: Some(7) },
            // More than was reserved is refused, late as on time.
            Op::Commit { reservation: "res_b".into(), amount: Some(20) },
            Op::Commit { reservation: "res_b".into(), amount: None },
            Op::Release { reservation: "res_a".into() },
        ];
        let decided = apply(ops, before, 0, &mut ids());
        assert_eq!(decided.answers[2].as_ref().unwrap(), &Outcome::Committed { charged: 7, balance: 13 });
        assert!(matches!(decided.answers[3], Err(LedgerError::AmountExceedsReservation { .. })));
        assert_eq!(decided.answers[4].as_ref().unwrap(), &Outcome::Committed { charged: 6, balance: 7 });
        assert!(matches!(decided.answers[5], Err(LedgerError::ReservationCommitted)), "charged, so no release");
        assert_eq!(decided.changes.accounts, [("acme".to_owned(), Account { balance: 7, held: 0 })]);
        let kinds: Vec<(&str, i64, i64)> =
            decided.changes.journal.iter().map(|r| (r.kind, r.amount, r.balance_after)).collect();
        assert_eq!(kinds, [("expire", 10, 14), ("expire", 6, 20), ("commit", -7, 13), ("commit", -6, 7)]);

        // An account that has nothing left is charged nothing, not overdrawn.
        let mut broke = snapshot(&[("acme", 0, 0)]);
        broke.reservations.insert(
            "res_c".into(),
            Reservation { account: "acme".into(), amount: 5, state: State::Expired, charged: None },
        );
        let decided = apply(vec![Op::Commit { reservation: "res_c".into(), amount: None }], broke, 0, &mut ids());
        assert_eq!(decided.answers[0].as_ref().unwrap(), &Outcome::Committed { charged: 0, balance: 0 });
    }

    #[test]
    fn keys_name_every_row_a_batch_touches() {
        let ops = vec![
            Op::CreateAccount { account: "new".into() },
            reserve("acme", 1, "q"),
            Op::TopUp { account: "acme".into(), amount: 1, reference: "r".into() },
            Op::Commit { reservation: "res_1".into(), amount: None },
        ];
        let keys = Keys::of(&ops);
        assert_eq!(keys.create.into_iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(keys.accounts.into_iter().collect::<Vec<_>>(), ["acme", "new"]);
        assert_eq!(keys.reservations.into_iter().collect::<Vec<_>>(), ["res_1"]);
        assert_eq!(keys.requests.into_iter().collect::<Vec<_>>(), [("acme".to_owned(), "q".to_owned())]);
        assert_eq!(keys.references.into_iter().collect::<Vec<_>>(), [("acme".to_owned(), "r".to_owned())]);
    }

    fn report(grant: Option<&str>, used_total: i64, want_total: i64) -> Report {
        Report {
            account: "acme".into(),
            instance: "gw-1".into(),
            grant: grant.map(Into::into),
            used_total,
            usage: BTreeMap::new(),
            want_total,
            min_grant: 10,
            max_grant: 100_000,
            lifetime_ms: 60_000,
            close: false,
        }
    }

    fn granted(outcome: &Result<Outcome, LedgerError>) -> GrantAnswer {
        match outcome {
            Ok(Outcome::Grant(answer)) => answer.clone(),
            other => panic!("not a grant: {other:?}"),
        }
    }

    /// Runs `ops` at `now` on `before`, then carries the batch's changes into the next snapshot.
    fn step(before: &mut Snapshot, ops: Vec<Op>, now: i64, ids: &mut dyn FnMut(&str) -> String) -> Decided {
        let carried = Snapshot {
            accounts: before.accounts.clone(),
            grants: before.grants.clone(),
            grant_usage: before.grant_usage.clone(),
            ..Snapshot::default()
        };
        let decided = apply(ops, carried, now, ids);
        before.accounts.extend(decided.changes.accounts.iter().cloned());
        before.grants.extend(decided.changes.grants.iter().map(|(g, _)| (g.id.clone(), g.clone())));
        before.grant_usage.extend(decided.changes.grant_usage.iter().map(|(g, p, u)| ((g.clone(), p.clone()), *u)));
        decided
    }

    #[test]
    fn a_grant_grows_with_the_rate_charges_once_and_closes() {
        let mut ids = ids();
        let mut state = snapshot(&[("acme", 1000, 0)]);
        // A new grant has no rate yet: the smallest grant, however much is wanted. A retried open
        // in the same batch finds it.
        let open =
            step(&mut state, vec![Op::Report(report(None, 0, 500)), Op::Report(report(None, 0, 500))], 0, &mut ids);
        let first = granted(&open.answers[0]);
        assert_eq!((first.grant_id.as_str(), first.granted_total, first.last), ("gr_1", 10, false));
        assert_eq!((first.balance, first.available), (1000, 990));
        assert_eq!(granted(&open.answers[1]), first);
        assert_eq!(open.changes.grants.len(), 1);
        assert!(open.changes.grants[0].1, "made by this batch");

        // 10 credits in one second: 2 credits/s over the 5 s window, 120 over a 60 s lifetime.
        let mut used = report(Some("gr_1"), 10, 500);
        used.usage.insert("api".into(), Usage { credits: 10, requests: 4 });
        let grown = step(&mut state, vec![Op::Report(used.clone())], 1000, &mut ids);
        let answer = granted(&grown.answers[0]);
        assert_eq!((answer.granted_total, answer.used_total, answer.balance, answer.available), (130, 10, 990, 870));
        let rows: Vec<_> =
            grown.changes.journal.iter().map(|r| (r.kind, r.amount, r.balance_after, r.charged)).collect();
        assert_eq!(rows, [("grant_use", 0, 990, Some(10)), ("grant", -120, 870, None)]);
        assert_eq!(grown.changes.usage, [("acme".to_owned(), "api".to_owned(), 0, Usage { credits: 10, requests: 4 })]);

        // The same report again, and an older one arriving late: nothing changes, nothing charged.
        let mut older = report(Some("gr_1"), 4, 130);
        older.usage.insert("api".into(), Usage { credits: 4, requests: 1 });
        let replayed = step(&mut state, vec![Op::Report(used), Op::Report(older)], 1000, &mut ids);
        assert!(replayed.changes.journal.is_empty(), "{:?}", replayed.changes.journal);
        assert!(replayed.changes.usage.is_empty());
        assert_eq!(granted(&replayed.answers[1]).used_total, 10);

        // More than was granted is charged as the grant, never beyond it.
        let mut close = report(Some("gr_1"), 500, 0);
        close.close = true;
        let closed = step(&mut state, vec![Op::Report(close.clone())], 2000, &mut ids);
        let answer = granted(&closed.answers[0]);
        assert_eq!((answer.used_total, answer.balance, answer.available, answer.last), (130, 870, 870, true));
        let rows: Vec<_> = closed.changes.journal.iter().map(|r| (r.kind, r.amount, r.charged)).collect();
        assert_eq!(rows, [("grant_use", 0, Some(120)), ("grant_close", 0, None)]);
        assert_eq!(closed.changes.accounts, [("acme".to_owned(), Account { balance: 870, held: 0 })]);

        // Closing again answers the same figures; reporting on it is refused.
        let again =
            step(&mut state, vec![Op::Report(close), Op::Report(report(Some("gr_1"), 130, 200))], 3000, &mut ids);
        assert_eq!(granted(&again.answers[0]), answer);
        assert!(matches!(again.answers[1], Err(LedgerError::GrantEnded(Some(_)))));
        assert!(again.changes.journal.is_empty());
    }

    #[test]
    fn a_fair_share_then_a_final_grant() {
        let mut ids = ids();
        let mut state = snapshot(&[("acme", 1000, 0)]);
        // Grants of 300 exactly, unless `min_grant` says otherwise.
        let sized = |instance: &str, grant: Option<&str>, used_total: i64, min_grant: i64| {
            let mut r = report(grant, used_total, 10_000);
            r.instance = instance.into();
            (r.min_grant, r.max_grant) = (min_grant, 300);
            Op::Report(r)
        };
        let a = granted(&step(&mut state, vec![sized("gw-a", None, 0, 300)], 0, &mut ids).answers[0]);
        let b = granted(&step(&mut state, vec![sized("gw-b", None, 0, 300)], 0, &mut ids).answers[0]);
        assert_eq!((a.granted_total, b.granted_total, b.available), (300, 300, 400));
        // `a` spent its grant and wants 300 more: two grants share the 400 left, 200 each.
        let a = granted(&step(&mut state, vec![sized("gw-a", Some(&a.grant_id), 300, 100)], 1000, &mut ids).answers[0]);
        assert_eq!((a.granted_total, a.available, a.last), (500, 200, false));
        // `b` spent its grant too: a share of 100 is below its 300 minimum, and nothing is left
        // of its grant: final, nothing added.
        let b = granted(&step(&mut state, vec![sized("gw-b", Some(&b.grant_id), 300, 300)], 1000, &mut ids).answers[0]);
        assert_eq!((b.granted_total, b.available, b.last), (300, 200, true));
    }

    #[test]
    fn only_an_overdue_live_grant_expires() {
        let mut ids = ids();
        let mut state = snapshot(&[("acme", 100, 0)]);
        step(&mut state, vec![Op::Report(report(None, 0, 50))], 0, &mut ids);
        step(&mut state, vec![Op::Report(report(Some("gr_1"), 4, 50))], 1000, &mut ids);
        let expire = || Op::ExpireGrant { account: "acme".into(), grant: "gr_1".into() };
        // Reported at 1 s with a 60 s lifetime: overdue from 121 s.
        let early = step(&mut state, vec![expire()], 120_999, &mut ids);
        assert_eq!(early.answers[0].as_ref().unwrap(), &Outcome::GrantExpired(false));
        let due = step(&mut state, vec![expire(), expire()], 121_000, &mut ids);
        assert_eq!(due.answers[0].as_ref().unwrap(), &Outcome::GrantExpired(true));
        assert_eq!(due.answers[1].as_ref().unwrap(), &Outcome::GrantExpired(false));
        let rows: Vec<_> = due.changes.journal.iter().map(|r| (r.kind, r.amount, r.balance_after)).collect();
        assert_eq!(rows, [("grant_expire", 46, 96)], "settled at the 4 reported, the other 46 back");
        assert_eq!(due.changes.grants[0].0.status, GrantStatus::Expired);
    }

    #[test]
    fn a_new_grant_is_sized_by_the_accounts_recent_rate() {
        let mut ids = ids();
        let mut state = snapshot(&[("acme", 100_000, 0)]);
        let on = |instance: &str, grant: Option<&str>, used_total: i64| {
            let mut r = report(grant, used_total, 10_000);
            r.instance = instance.into();
            Op::Report(r)
        };
        step(&mut state, vec![on("gw-a", None, 0)], 0, &mut ids);
        // `gw-a` spends 10 in a second: 2 credits/s, 120 over a lifetime.
        step(&mut state, vec![on("gw-a", Some("gr_1"), 10)], 1000, &mut ids);
        // A gateway joining the account gets what the account spends, not the minimum.
        let b = granted(&step(&mut state, vec![on("gw-b", None, 0)], 1000, &mut ids).answers[0]);
        assert_eq!(b.granted_total, 120);
        // Half a window without a report from `gw-a`: its rate counts half.
        let c = granted(&step(&mut state, vec![on("gw-c", None, 0)], 3500, &mut ids).answers[0]);
        assert_eq!(c.granted_total, 60);
        // A full window: nobody has spent lately, the minimum again.
        let d = granted(&step(&mut state, vec![on("gw-d", None, 0)], 6000, &mut ids).answers[0]);
        assert_eq!(d.granted_total, 10);
    }
}
