//! The ledger: accounts, reservations and an append-only journal, on SQLite or PostgreSQL.
//!
//! One set of queries serves both backends through sqlx's `Any` driver. Every balance change is a
//! conditional `UPDATE` in the same transaction as the journal row that records it, so the balance can
//! never go negative and the journal always explains it. Within an account, journal ids follow commit
//! order: every write transaction updates the account row (taking its lock) before it appends.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::{AnyConnection, AnyPool, Row, Transaction};

use crate::error::LedgerError;

/// The most credits one call may move: far above any real price, far below overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// The most credits an account may hold (available plus held), so sums never overflow an `i64`.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

type Result<T> = std::result::Result<T, LedgerError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Versioned schema changes, applied in order at startup; each runs once per database. `{ID}` is the
/// one spot where the dialects differ: the auto-numbered journal id.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
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
}];

/// An arbitrary constant: the PostgreSQL advisory lock that keeps two instances starting at once from
/// migrating the same database together.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub balance: i64,
    pub held: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

/// How a held reservation ends without being charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unhold {
    Release,
    Expire,
}

impl Unhold {
    fn state(self) -> &'static str {
        match self {
            Self::Release => "released",
            Self::Expire => "expired",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Expire => "expire",
        }
    }
}

pub struct Ledger {
    backend: Backend,
    /// Every write goes through here. On SQLite this pool has one connection: writers queue in the
    /// process instead of spinning on SQLITE_BUSY, and `BEGIN IMMEDIATE` plus the busy timeout cover
    /// another process on the same file.
    writer: AnyPool,
    /// Reads that need no transaction. On SQLite, separate connections that WAL lets run beside the
    /// writer; on PostgreSQL, the same pool.
    reader: AnyPool,
}

impl Ledger {
    /// Opens (for SQLite: creates) the database and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalize_url(url)?;
        let acquire = Duration::from_secs(5);
        let (writer, reader) = match backend {
            Backend::Sqlite => {
                let options = || AnyPoolOptions::new().acquire_timeout(acquire).after_connect(sqlite_pragmas);
                let writer = options().max_connections(1).connect(&url).await?;
                let reader = options().max_connections(4).connect(&url).await?;
                (writer, reader)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new().acquire_timeout(acquire).max_connections(16).connect(&url).await?;
                (pool.clone(), pool)
            }
        };
        let ledger = Self { backend, writer, reader };
        ledger.migrate().await?;
        Ok(ledger)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            // Take the write lock up front: a deferred transaction that reads first can fail with
            // SQLITE_BUSY when it tries to write, whatever the busy timeout.
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        })
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        if self.backend == Backend::Postgres {
            // As text: the lock function returns `void`, a type the Any driver cannot carry.
            sqlx::query("SELECT pg_advisory_xact_lock($1)::text").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
        }
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(&mut *tx).await?;
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let id = match self.backend {
                Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
                Backend::Postgres => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            };
            let sql = m.sql.replace("{ID}", id);
            let failed = |source| LedgerError::Migration { version: m.version, name: m.name, source };
            sqlx::raw_sql(&sql).execute(&mut *tx).await.map_err(failed)?;
            sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                .bind(m.version)
                .bind(m.name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            log::info!("applied migration {} ({})", m.version, m.name);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Creates the account with nothing on it; `false` when it already existed.
    pub async fn create_account(&self, id: &str) -> Result<(Account, bool)> {
        let created = sqlx::query(
            "INSERT INTO accounts (id, balance, held, created_at) VALUES ($1, 0, 0, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.writer)
        .await?
        .rows_affected()
            == 1;
        Ok((self.account(id).await?, created))
    }

    pub async fn account(&self, id: &str) -> Result<Account> {
        let row = sqlx::query("SELECT balance, held FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| LedgerError::AccountNotFound(id.to_owned()))?;
        Ok(Account { balance: row.try_get(0)?, held: row.try_get(1)? })
    }

    /// Adds credits once per `(account, reference)`: a repeated reference returns the first result.
    pub async fn top_up(&self, id: &str, amount: i64, reference: &str) -> Result<TopUp> {
        let mut tx = self.begin().await?;
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance + $2 WHERE id = $1 AND balance + held <= $3 - $2 RETURNING balance",
        )
        .bind(id)
        .bind(amount)
        .bind(MAX_BALANCE)
        .fetch_optional(&mut *tx)
        .await?;
        // Looked up after the account row is locked, so a concurrent twin has committed by now.
        if let Some(first) = earlier_top_up(&mut tx, id, reference).await? {
            return Ok(first);
        }
        let Some(balance) = balance else {
            drop(tx);
            self.account(id).await?;
            return Err(LedgerError::BalanceLimit { max: MAX_BALANCE });
        };
        let transaction_id = append(&mut tx, id, "topup", amount, balance, None, Some(reference)).await?;
        tx.commit().await?;
        Ok(TopUp { balance, transaction_id, replayed: false })
    }

    /// Journal rows of one account, oldest first, with ids above `after`.
    pub async fn transactions(&self, id: &str, after: i64, limit: i64) -> Result<Vec<Entry>> {
        self.account(id).await?;
        let rows = sqlx::query(
            "SELECT id, kind, amount, balance_after, reservation_id, reference, created_at FROM ledger \
             WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(entry).collect()
    }

    /// Holds `amount` on the account for one request. The same `(account, request_id)` again returns
    /// the first reservation and holds nothing more, whatever the amount.
    pub async fn reserve(&self, account: &str, amount: i64, request_id: &str, route: &str) -> Result<Hold> {
        let mut tx = self.begin().await?;
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance - $2, held = held + $2 WHERE id = $1 AND balance >= $2 \
             RETURNING balance",
        )
        .bind(account)
        .bind(amount)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(balance) = balance else {
            drop(tx);
            if let Some(first) = self.earlier_hold(account, request_id).await? {
                return Ok(first);
            }
            let balance = self.account(account).await?.balance;
            return Err(LedgerError::InsufficientCredits { balance, required: amount });
        };
        let reservation_id = format!("res_{}", uuid::Uuid::new_v4().simple());
        // A twin with the same request id that committed while this one waited for the account lock
        // shows up here as a conflict.
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO reservations (id, account_id, request_id, route, amount, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'held', $6) ON CONFLICT (account_id, request_id) DO NOTHING RETURNING id",
        )
        .bind(&reservation_id)
        .bind(account)
        .bind(request_id)
        .bind(route)
        .bind(amount)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            drop(tx);
            return self
                .earlier_hold(account, request_id)
                .await?
                .ok_or_else(|| LedgerError::ReservationNotFound(request_id.to_owned()));
        }
        append(&mut tx, account, "reserve", -amount, balance, Some(&reservation_id), None).await?;
        tx.commit().await?;
        Ok(Hold { reservation_id, balance, replayed: false })
    }

    async fn earlier_hold(&self, account: &str, request_id: &str) -> Result<Option<Hold>> {
        let row = sqlx::query(
            "SELECT r.id, a.balance FROM reservations r JOIN accounts a ON a.id = r.account_id \
             WHERE r.account_id = $1 AND r.request_id = $2",
        )
        .bind(account)
        .bind(request_id)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| Ok(Hold { reservation_id: row.try_get(0)?, balance: row.try_get(1)?, replayed: true }))
            .transpose()
    }

    /// Charges `amount` (default: all of it) of a held reservation and returns the rest. Returns
    /// `(charged, balance)`; committing again returns the first charge and changes nothing.
    pub async fn commit(&self, id: &str, amount: Option<i64>) -> Result<(i64, i64)> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE reservations SET state = 'committed', charged = COALESCE($2, amount), settled_at = $3 \
             WHERE id = $1 AND state = 'held' AND amount >= COALESCE($2, amount) RETURNING account_id, amount, charged",
        )
        .bind(id)
        .bind(amount)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            let settled = self.reservation(id).await?;
            return match settled.state.as_str() {
                "committed" => Ok((settled.charged.unwrap_or(settled.amount), settled.balance)),
                "held" => Err(LedgerError::AmountExceedsReservation {
                    amount: amount.unwrap_or(settled.amount),
                    reserved: settled.amount,
                }),
                state => Err(LedgerError::ReservationReleased { expired: state == "expired" }),
            };
        };
        let (account, reserved, charged): (String, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let returned = reserved - charged;
        let balance = unhold(&mut tx, &account, reserved, returned).await?;
        append(&mut tx, &account, "commit", returned, balance, Some(id), None).await?;
        tx.commit().await?;
        Ok((charged, balance))
    }

    /// Returns a held reservation to the balance. Returns `(released, balance)`; releasing again (or
    /// after expiry) returns the same amount and changes nothing.
    pub async fn release(&self, id: &str) -> Result<(i64, i64)> {
        match self.unhold(id, Unhold::Release).await? {
            Some(released) => Ok(released),
            None => {
                let settled = self.reservation(id).await?;
                match settled.state.as_str() {
                    "committed" => Err(LedgerError::ReservationCommitted),
                    // Held again cannot happen: a reservation leaves `held` once and for all.
                    _ => Ok((settled.amount, settled.balance)),
                }
            }
        }
    }

    /// Expires reservations held since before `cutoff`; returns how many.
    pub async fn expire_held_before(&self, cutoff: SystemTime) -> Result<usize> {
        const BATCH: i64 = 500;
        let cutoff = millis(cutoff);
        let mut expired = 0;
        loop {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM reservations WHERE state = 'held' AND created_at < $1 ORDER BY created_at LIMIT $2",
            )
            .bind(cutoff)
            .bind(BATCH)
            .fetch_all(&self.reader)
            .await?;
            for id in &ids {
                // None: committed or released since the SELECT; nothing to do.
                if self.unhold(id, Unhold::Expire).await?.is_some() {
                    expired += 1;
                }
            }
            if ids.len() < BATCH as usize {
                return Ok(expired);
            }
        }
    }

    /// Moves a held reservation to released/expired and its whole amount back to the balance.
    /// `None` when it is not held (any more).
    async fn unhold(&self, id: &str, how: Unhold) -> Result<Option<(i64, i64)>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE reservations SET state = $2, settled_at = $3 WHERE id = $1 AND state = 'held' \
             RETURNING account_id, amount",
        )
        .bind(id)
        .bind(how.state())
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (account, amount): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        let balance = unhold(&mut tx, &account, amount, amount).await?;
        append(&mut tx, &account, how.kind(), amount, balance, Some(id), None).await?;
        tx.commit().await?;
        Ok(Some((amount, balance)))
    }

    async fn reservation(&self, id: &str) -> Result<Settled> {
        let row = sqlx::query(
            "SELECT r.state, r.amount, r.charged, a.balance FROM reservations r \
             JOIN accounts a ON a.id = r.account_id WHERE r.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| LedgerError::ReservationNotFound(id.to_owned()))?;
        Ok(Settled {
            state: row.try_get(0)?,
            amount: row.try_get(1)?,
            charged: row.try_get(2)?,
            balance: row.try_get(3)?,
        })
    }
}

/// A reservation as found after the fact, with its account's balance now.
struct Settled {
    state: String,
    amount: i64,
    charged: Option<i64>,
    balance: i64,
}

/// Takes `held` off the account's holds and gives `returned` of it back to the balance.
async fn unhold(tx: &mut AnyConnection, account: &str, held: i64, returned: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "UPDATE accounts SET held = held - $2, balance = balance + $3 WHERE id = $1 RETURNING balance",
    )
    .bind(account)
    .bind(held)
    .bind(returned)
    .fetch_one(tx)
    .await?)
}

async fn earlier_top_up(tx: &mut AnyConnection, account: &str, reference: &str) -> Result<Option<TopUp>> {
    let row =
        sqlx::query("SELECT id, balance_after FROM ledger WHERE account_id = $1 AND kind = 'topup' AND reference = $2")
            .bind(account)
            .bind(reference)
            .fetch_optional(tx)
            .await?;
    row.map(|row| Ok(TopUp { transaction_id: row.try_get(0)?, balance: row.try_get(1)?, replayed: true })).transpose()
}

/// Appends one journal row; returns its id.
async fn append(
    tx: &mut AnyConnection,
    account: &str,
    kind: &str,
    amount: i64,
    balance_after: i64,
    reservation_id: Option<&str>,
    reference: Option<&str>,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ledger (account_id, kind, amount, balance_after, reservation_id, reference, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(account)
    .bind(kind)
    .bind(amount)
    .bind(balance_after)
    .bind(reservation_id)
    .bind(reference)
    .bind(now_ms())
    .fetch_one(tx)
    .await?)
}

fn entry(row: &AnyRow) -> Result<Entry> {
    Ok(Entry {
        id: row.try_get(0)?,
        kind: row.try_get(1)?,
        amount: row.try_get(2)?,
        balance_after: row.try_get(3)?,
        reservation_id: row.try_get(4)?,
        reference: row.try_get(5)?,
        created_at_ms: row.try_get(6)?,
    })
}

/// The busy timeout waits out another process's write lock instead of failing (first, so that switching
/// to WAL waits too); WAL lets readers run beside the writer; synchronous=FULL keeps every committed
/// charge across a power cut.
fn sqlite_pragmas(
    conn: &mut AnyConnection,
    _: PoolConnectionMetadata,
) -> Pin<Box<dyn Future<Output = std::result::Result<(), sqlx::Error>> + Send + '_>> {
    Box::pin(async move {
        // One statement each: `raw_sql`'s future is not provably `Send`, which the pool requires here.
        for pragma in [
            "PRAGMA busy_timeout = 5000",
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = FULL",
            "PRAGMA foreign_keys = ON",
        ] {
            sqlx::query(pragma).execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// `sqlite://PATH` and `sqlite:PATH` become a URL that creates the file; PostgreSQL URLs pass as given.
fn normalize_url(url: &str) -> Result<(Backend, String)> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, url.to_owned()));
    }
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"));
    match path {
        Some(path) if !path.is_empty() && !path.contains('?') && path != ":memory:" => {
            Ok((Backend::Sqlite, format!("sqlite://{path}?mode=rwc")))
        }
        _ => Err(LedgerError::UnsupportedUrl(url.split(':').next().unwrap_or_default().to_owned())),
    }
}

fn now_ms() -> i64 {
    millis(SystemTime::now())
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        let ok = [
            ("sqlite://tollgate-credit.db", Backend::Sqlite, "sqlite://tollgate-credit.db?mode=rwc"),
            ("sqlite:data/credit.db", Backend::Sqlite, "sqlite://data/credit.db?mode=rwc"),
            ("sqlite:///var/lib/credit.db", Backend::Sqlite, "sqlite:///var/lib/credit.db?mode=rwc"),
            ("postgres://u@db:5432/credit", Backend::Postgres, "postgres://u@db:5432/credit"),
            ("postgresql://db/credit", Backend::Postgres, "postgresql://db/credit"),
        ];
        for (url, backend, normalized) in ok {
            assert_eq!(normalize_url(url).unwrap(), (backend, normalized.to_owned()), "{url}");
        }
        for url in ["", "sqlite:", "sqlite://", "sqlite::memory:", "mysql://db", "credit.db", "sqlite://x.db?mode=ro"] {
            assert!(normalize_url(url).is_err(), "{url}");
        }
    }
}
