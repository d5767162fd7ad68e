//! The SQLite backend: one writer thread that owns the only write connection and runs each batch in
//! one `BEGIN IMMEDIATE` transaction, and a few read connections beside it (WAL lets them run while
//! the writer writes).
//!
//! rusqlite calls SQLite directly on the calling thread with cached prepared statements: a
//! statement costs a few microseconds, where an async driver's hop to a worker thread and back costs
//! more than the statement itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::mpsc;

use crate::error::LedgerError;
use crate::journal_kinds;
use crate::ledger::{
    apply, now_ms, Account, Changes, Dialect, Entry, Grant, GrantStatus, Keys, Reservation, Snapshot, State, Usage,
    UsageRow, MIGRATIONS,
};
use crate::store::{new_id, Batch, Job};

type Result<T> = std::result::Result<T, LedgerError>;

/// Read connections kept open; more may open under load, and close after.
const IDLE_READERS: usize = 4;

const DIALECT: Dialect = Dialect {
    id: "INTEGER PRIMARY KEY AUTOINCREMENT",
    drop_foreign_keys: "",
    // SQLite cannot change a CHECK in place: the journal is copied into a new table, ids kept
    // (AUTOINCREMENT carries on from the highest).
    grant_journal: concat!(
        "CREATE TABLE ledger_v3 (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    kind           TEXT NOT NULL CHECK (kind IN (",
        journal_kinds!(),
        ")),
    amount         BIGINT NOT NULL,
    balance_after  BIGINT NOT NULL,
    reservation_id TEXT REFERENCES reservations (id),
    reference      TEXT,
    created_at     BIGINT NOT NULL,
    grant_id       TEXT REFERENCES grants (id),
    charged        BIGINT
);
INSERT INTO ledger_v3 (id, account_id, kind, amount, balance_after, reservation_id, reference, created_at)
    SELECT id, account_id, kind, amount, balance_after, reservation_id, reference, created_at FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_v3 RENAME TO ledger;
CREATE UNIQUE INDEX ledger_topup_reference ON ledger (account_id, reference) WHERE kind = 'topup';
CREATE INDEX ledger_by_account ON ledger (account_id, id);"
    ),
    bytewise_keys: "",
    // SQLite's own procedure for changing a CHECK without copying the table: edit the definition
    // in the schema table (https://sqlite.org/lang_altertable.html#otheralter), then reload it;
    // `migrate` moves the schema version on so that other connections reload it too. Where a
    // definition does not hold the list word for word, it stays as it was: slower, still right.
    checks_as_comparisons: "\
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql,
    'state IN (''held'', ''committed'', ''released'', ''expired'')',
    'state = ''held'' OR state = ''committed'' OR state = ''released'' OR state = ''expired''')
WHERE type = 'table' AND name = 'reservations';
UPDATE sqlite_schema SET sql = replace(sql,
    'kind IN (''topup'', ''reserve'', ''commit'', ''release'', ''expire'', ''grant'', ''grant_use'', ''grant_close'', ''grant_expire'')',
    'kind = ''topup'' OR kind = ''reserve'' OR kind = ''commit'' OR kind = ''release'' OR kind = ''expire'' OR kind = ''grant'' OR kind = ''grant_use'' OR kind = ''grant_close'' OR kind = ''grant_expire''')
WHERE type = 'table' AND name = 'ledger';
UPDATE sqlite_schema SET sql = replace(sql,
    'status IN (''live'', ''closed'', ''expired'')',
    'status = ''live'' OR status = ''closed'' OR status = ''expired''')
WHERE type = 'table' AND name = 'grants';
PRAGMA writable_schema = RESET;",
};

/// The columns `grant_row` reads, in order.
const GRANT_COLUMNS: &str = "id, account_id, instance, granted_total, used_total, lifetime_ms, status, rate, \
                             created_at, last_report_at, expires_at";

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Grant, String)> {
    let status: String = r.get(6)?;
    let grant = Grant {
        id: r.get(0)?,
        account: r.get(1)?,
        instance: r.get(2)?,
        granted_total: r.get(3)?,
        used_total: r.get(4)?,
        lifetime_ms: r.get(5)?,
        status: GrantStatus::Live,
        rate: r.get(7)?,
        created_at: r.get(8)?,
        last_report_at: r.get(9)?,
        expires_at: r.get(10)?,
    };
    Ok((grant, status))
}

/// Opens the file (creating it), migrates it and starts the writer thread on `jobs`.
pub async fn open(path: &str, jobs: mpsc::Receiver<Job>) -> Result<Reader> {
    let path = path.to_owned();
    let writer_path = path.clone();
    let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
        let mut conn = connect(&writer_path)?;
        // WAL lets readers run beside the writer; it is a property of the file, set once.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
        migrate(&mut conn)?;
        Ok(conn)
    })
    .await
    .map_err(|e| LedgerError::Internal(format!("opening SQLite: {e}")))??;
    std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || write(conn, jobs))
        .map_err(|e| LedgerError::Internal(format!("starting the writer thread: {e}")))?;
    Ok(Reader(Arc::new(Readers { path, idle: Mutex::new(Vec::new()) })))
}

/// The busy timeout waits out another process's write lock instead of failing; synchronous=FULL
/// keeps every committed charge across a power cut. A 64 MiB page cache keeps the indexes' pages
/// in memory: with the default 2 MiB, the writer spent an eighth of its time in pread as the
/// tables grew. (Reading through mmap as well made no difference that the bench could see.)
fn connect(path: &str) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )?;
    let applied: Vec<i64> = tx
        .prepare("SELECT version FROM schema_migrations")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let pending: Vec<_> = MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)).collect();
    for m in &pending {
        let failed = |source: rusqlite::Error| LedgerError::Migration {
            version: m.version,
            name: m.name,
            source: Box::new(source.into()),
        };
        tx.execute_batch(&m.sql(&DIALECT)).map_err(failed)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, now_ms()],
        )
        .map_err(failed)?;
        log::info!("applied migration {} ({})", m.version, m.name);
    }
    if !pending.is_empty() {
        // Other connections reload the schema when its version moves. DDL moves it; an edit of the
        // schema table (migration 5) does not.
        let version: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
        tx.pragma_update(None, "schema_version", version + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// The writer thread: one transaction per batch of queued jobs, until the queue closes.
fn write(mut conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        let (ops, replies) = Batch::gather(first, &mut jobs).split();
        replies.send(run(&mut conn, ops));
    }
}

fn run(conn: &mut Connection, ops: Vec<crate::ledger::Op>) -> Result<Vec<Result<crate::ledger::Outcome>>> {
    // IMMEDIATE takes the write lock up front; the busy timeout waits for another process's.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let snapshot = load(&tx, Keys::of(&ops), now)?;
    let decided = apply(ops, snapshot, now, &mut new_id);
    let ids = store(&tx, &decided.changes, now)?;
    tx.commit()?;
    decided.resolve(&ids)
}

/// Creates the accounts to create, then reads every row the batch touches. The transaction holds
/// the database's write lock, so nothing changes under it.
fn load(conn: &Connection, keys: Keys, now: i64) -> Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    let mut insert = conn.prepare_cached(
        "INSERT INTO accounts (id, balance, held, created_at) VALUES (?1, 0, 0, ?2) ON CONFLICT (id) DO NOTHING",
    )?;
    for id in keys.create {
        if insert.execute(params![id, now])? == 1 {
            snapshot.created.insert(id);
        }
    }
    let mut accounts = keys.accounts;
    let mut by_id = conn.prepare_cached("SELECT account_id, amount, state, charged FROM reservations WHERE id = ?1")?;
    for id in keys.reservations {
        let found = by_id.query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?)));
        if let Some((account, amount, state, charged)) = found.optional()? {
            accounts.insert(String::clone(&account));
            snapshot.reservations.insert(id, Reservation { account, amount, state: State::parse(&state)?, charged });
        }
    }
    let mut by_request = conn.prepare_cached(
        "SELECT id, amount, state, charged FROM reservations WHERE account_id = ?1 AND request_id = ?2",
    )?;
    for (account, request_id) in keys.requests {
        let found = by_request
            .query_row([&account, &request_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?)));
        if let Some((id, amount, state, charged)) = found.optional()? {
            let reservation = Reservation { account: account.clone(), amount, state: State::parse(&state)?, charged };
            snapshot.reservations.insert(String::clone(&id), reservation);
            snapshot.requests.insert((account, request_id), id);
        }
    }
    let mut top_up = conn.prepare_cached(
        "SELECT id, balance_after FROM ledger WHERE account_id = ?1 AND kind = 'topup' AND reference = ?2",
    )?;
    for (account, reference) in keys.references {
        if let Some(found) = top_up.query_row([&account, &reference], |r| Ok((r.get(0)?, r.get(1)?))).optional()? {
            snapshot.references.insert((account, reference), found);
        }
    }
    let mut account = conn.prepare_cached("SELECT balance, held FROM accounts WHERE id = ?1")?;
    let mut found = HashMap::with_capacity(accounts.len());
    for id in accounts {
        if let Some(a) = account.query_row([&id], |r| Ok(Account { balance: r.get(0)?, held: r.get(1)? })).optional()? {
            found.insert(id, a);
        }
    }
    snapshot.accounts = found;
    load_grants(conn, &keys.grants, &keys.grant_accounts, &mut snapshot)?;
    Ok(snapshot)
}

/// The grants named by id and the live grants of the given accounts, with their usage per policy.
fn load_grants(
    conn: &Connection,
    ids: &std::collections::BTreeSet<String>,
    accounts: &std::collections::BTreeSet<String>,
    snapshot: &mut Snapshot,
) -> Result<()> {
    let mut found = Vec::new();
    let mut by_id = conn.prepare_cached(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?1"))?;
    for id in ids {
        found.extend(by_id.query_row([id], grant_row).optional()?);
    }
    let mut live =
        conn.prepare_cached(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = ?1 AND status = 'live'"))?;
    for account in accounts {
        for row in live.query_map([account], grant_row)? {
            found.push(row?);
        }
    }
    let mut usage = conn.prepare_cached("SELECT policy, credits, requests FROM grant_usage WHERE grant_id = ?1")?;
    for (mut grant, status) in found {
        if snapshot.grants.contains_key(&grant.id) {
            continue;
        }
        grant.status = GrantStatus::parse(&status)?;
        for row in usage.query_map([&grant.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
            let (policy, credits, requests): (String, i64, i64) = row?;
            snapshot.grant_usage.insert((grant.id.clone(), policy), Usage { credits, requests });
        }
        snapshot.grants.insert(grant.id.clone(), grant);
    }
    Ok(())
}

/// Writes a batch's changes; returns the journal ids, one per row, in order.
fn store(conn: &Connection, changes: &Changes, now: i64) -> Result<Vec<i64>> {
    let mut account = conn.prepare_cached("UPDATE accounts SET balance = ?2, held = ?3 WHERE id = ?1")?;
    for (id, a) in &changes.accounts {
        account.execute(params![id, a.balance, a.held])?;
    }
    let mut reserve = conn.prepare_cached(
        "INSERT INTO reservations (id, account_id, request_id, route, amount, state, charged, created_at, settled_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for r in &changes.reservations {
        let settled_at = (r.state != State::Held).then_some(now);
        reserve.execute(params![
            r.id,
            r.account,
            r.request_id,
            r.route,
            r.amount,
            r.state.as_str(),
            r.charged,
            now,
            settled_at
        ])?;
    }
    let mut settle =
        conn.prepare_cached("UPDATE reservations SET state = ?2, charged = ?3, settled_at = ?4 WHERE id = ?1")?;
    for s in &changes.settlements {
        settle.execute(params![s.id, s.state.as_str(), s.charged, now])?;
    }
    store_grants(conn, changes, now)?;
    let mut append = conn.prepare_cached(
        "INSERT INTO ledger (account_id, kind, amount, balance_after, reservation_id, reference, created_at, \
         grant_id, charged) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut ids = Vec::with_capacity(changes.journal.len());
    for row in &changes.journal {
        append.execute(params![
            row.account,
            row.kind,
            row.amount,
            row.balance_after,
            row.reservation,
            row.reference,
            now,
            row.grant,
            row.charged
        ])?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(ids)
}

/// Grants, their usage per policy, and the usage analytics. Changed grants are written before new
/// ones: a batch may end a grant and open the next of the same (account, instance), and the live
/// grant's unique index must see the first one ended.
fn store_grants(conn: &Connection, changes: &Changes, now: i64) -> Result<()> {
    let mut update = conn.prepare_cached(
        "UPDATE grants SET granted_total = ?2, used_total = ?3, lifetime_ms = ?4, status = ?5, rate = ?6, \
         last_report_at = ?7, expires_at = ?8, settled_at = ?9 WHERE id = ?1",
    )?;
    for (g, _) in changes.grants.iter().filter(|(_, made)| !made) {
        let settled_at = (g.status != GrantStatus::Live).then_some(now);
        update.execute(params![
            g.id,
            g.granted_total,
            g.used_total,
            g.lifetime_ms,
            g.status.as_str(),
            g.rate,
            g.last_report_at,
            g.expires_at,
            settled_at
        ])?;
    }
    let mut insert = conn.prepare_cached(&format!(
        "INSERT INTO grants ({GRANT_COLUMNS}, settled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?;
    for (g, _) in changes.grants.iter().filter(|(_, made)| *made) {
        let settled_at = (g.status != GrantStatus::Live).then_some(now);
        insert.execute(params![
            g.id,
            g.account,
            g.instance,
            g.granted_total,
            g.used_total,
            g.lifetime_ms,
            g.status.as_str(),
            g.rate,
            g.created_at,
            g.last_report_at,
            g.expires_at,
            settled_at
        ])?;
    }
    let mut grant_usage = conn.prepare_cached(
        "INSERT INTO grant_usage (grant_id, policy, credits, requests) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (grant_id, policy) DO UPDATE SET credits = excluded.credits, requests = excluded.requests",
    )?;
    for (grant, policy, u) in &changes.grant_usage {
        grant_usage.execute(params![grant, policy, u.credits, u.requests])?;
    }
    let mut usage = conn.prepare_cached(
        "INSERT INTO usage (account_id, policy, hour, credits, requests) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (account_id, policy, hour) \
         DO UPDATE SET credits = usage.credits + excluded.credits, requests = usage.requests + excluded.requests",
    )?;
    for (account, policy, hour, u) in &changes.usage {
        usage.execute(params![account, policy, hour, u.credits, u.requests])?;
    }
    Ok(())
}

struct Readers {
    path: String,
    idle: Mutex<Vec<Connection>>,
}

/// Reads on connections of their own, on tokio's blocking threads.
#[derive(Clone)]
pub struct Reader(Arc<Readers>);

impl Reader {
    /// Runs `read` on an idle connection (or a new one) off the async threads.
    async fn with<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || -> Result<T> {
            let idle = readers.idle.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match idle {
                Some(conn) => conn,
                None => {
                    let conn = connect(&readers.path)?;
                    conn.pragma_update(None, "query_only", "ON")?;
                    conn
                }
            };
            let result = read(&conn)?;
            if let Ok(mut idle) = readers.idle.lock() {
                if idle.len() < IDLE_READERS {
                    idle.push(conn);
                }
            }
            Ok(result)
        })
        .await
        .map_err(|e| LedgerError::Internal(format!("a read's task: {e}")))?
    }

    pub async fn account(&self, id: &str) -> Result<Option<Account>> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.prepare_cached("SELECT balance, held FROM accounts WHERE id = ?1")?
                .query_row([id], |r| Ok(Account { balance: r.get(0)?, held: r.get(1)? }))
                .optional()
        })
        .await
    }

    pub async fn transactions(&self, id: &str, after: i64, limit: i64) -> Result<Vec<Entry>> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(
                "SELECT id, kind, amount, balance_after, reservation_id, reference, created_at, grant_id, charged \
                 FROM ledger \
                 WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?
            .query_map(params![id, after, limit], |r| {
                Ok(Entry {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    amount: r.get(2)?,
                    balance_after: r.get(3)?,
                    reservation_id: r.get(4)?,
                    reference: r.get(5)?,
                    created_at_ms: r.get(6)?,
                    grant_id: r.get(7)?,
                    charged: r.get(8)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Ids of reservations held since before `cutoff` (ms), oldest first.
    pub async fn held_before(&self, cutoff: i64, limit: i64) -> Result<Vec<String>> {
        self.with(move |conn| {
            conn.prepare_cached(
                "SELECT id FROM reservations WHERE state = 'held' AND created_at < ?1 ORDER BY created_at LIMIT ?2",
            )?
            .query_map(params![cutoff, limit], |r| r.get(0))?
            .collect()
        })
        .await
    }

    /// `(account, id)` of live grants with no report for twice their lifetime as of `now` (ms).
    pub async fn overdue_grants(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>> {
        self.with(move |conn| {
            conn.prepare_cached(
                "SELECT account_id, id FROM grants WHERE status = 'live' AND expires_at <= ?1 \
                 AND last_report_at + 2 * lifetime_ms <= ?1 ORDER BY expires_at LIMIT ?2",
            )?
            .query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
        .await
    }

    pub async fn usage(&self, id: &str, from: i64, to: i64, bucket_ms: i64) -> Result<Vec<UsageRow>> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(
                "SELECT policy, start, SUM(credits), SUM(requests) FROM ( \
                     SELECT policy, hour / ?4 * ?4 AS start, credits, requests FROM usage \
                     WHERE account_id = ?1 AND hour >= ?2 AND hour < ?3 \
                     UNION ALL \
                     SELECT route, settled_at / ?4 * ?4, charged, 1 FROM reservations \
                     WHERE account_id = ?1 AND state = 'committed' AND settled_at >= ?2 AND settled_at < ?3) \
                 GROUP BY policy, start ORDER BY start, policy",
            )?
            .query_map(params![id, from, to, bucket_ms], |r| {
                Ok(UsageRow { policy: r.get(0)?, start: r.get(1)?, credits: r.get(2)?, requests: r.get(3)? })
            })?
            .collect()
        })
        .await
    }
}
