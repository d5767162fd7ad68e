//! The ledger's rules, without I/O: what a batch of operations does to accounts, reservations and
//! the journal, given the rows it touches.
//!
//! A backend runs each batch in one transaction: it locks and loads the rows that `Keys` names into a
//! `Snapshot`, lets `apply` decide every operation in order against it, then writes the `Changes` back
//! in a few statements. Each operation gets its own answer; a refused one (402, 404, 409, 422) changes
//! nothing and leaves its neighbours alone, because nothing reaches the database until the whole
//! batch is decided. Balances are checked here, against rows the transaction holds locked, so they
//! never go negative; the schema's `CHECK`s are the second line.

use std::collections::{BTreeSet, HashMap};
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
}

impl Migration {
    pub fn sql(&self, dialect: &Dialect) -> String {
        self.sql.replace("{ID}", dialect.id).replace("{DROP_FOREIGN_KEYS}", dialect.drop_foreign_keys)
    }
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

/// Decides each operation in order against `snapshot`, as if each ran in a transaction of its own.
pub fn apply(ops: Vec<Op>, mut snapshot: Snapshot, new_id: &mut dyn FnMut() -> String) -> Decided {
    let mut batch = Batch {
        snapshot: &mut snapshot,
        changes: Changes::default(),
        touched: BTreeSet::new(),
        top_ups: HashMap::new(),
        made: HashMap::new(),
        names_a_row: false,
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
    let Batch { mut changes, touched, .. } = batch;
    changes.accounts =
        touched.into_iter().filter_map(|id| snapshot.accounts.get(&id).map(|a| (id.clone(), *a))).collect();
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
}

impl Batch<'_> {
    fn one(&mut self, op: Op, new_id: &mut dyn FnMut() -> String) -> Result<Outcome, LedgerError> {
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
        new_id: &mut dyn FnMut() -> String,
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
        let id = new_id();
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
            State::Released | State::Expired => {
                Err(LedgerError::ReservationReleased { expired: found.state == State::Expired })
            }
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
        });
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

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("res_{n}")
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
        let decided = apply(ops, snapshot(&[("acme", 10, 0)]), &mut ids());
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
        let answers = apply(ops, before, &mut ids()).resolve(&[77]).unwrap();
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
            Op::Commit { reservation: "res_x".into(), amount: None },
            Op::Expire { reservation: "res_gone".into() },
        ];
        let decided = apply(ops, before, &mut ids());
        assert_eq!(decided.answers[0].as_ref().unwrap(), &Outcome::Expired(true));
        assert_eq!(decided.answers[1].as_ref().unwrap(), &Outcome::Expired(false));
        assert_eq!(decided.answers[2].as_ref().unwrap(), &Outcome::Released { released: 10, balance: 10 });
        assert!(matches!(decided.answers[3], Err(LedgerError::ReservationReleased { expired: true })));
        assert_eq!(decided.answers[4].as_ref().unwrap(), &Outcome::Expired(false));
        assert_eq!(decided.changes.journal.len(), 1);
        assert_eq!(decided.changes.accounts, [("acme".to_owned(), Account { balance: 10, held: 0 })]);
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
}
