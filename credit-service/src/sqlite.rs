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
use crate::ledger::{apply, now_ms, Account, Changes, Dialect, Entry, Keys, Reservation, Snapshot, State, MIGRATIONS};
use crate::store::{reservation_id, Batch, Job};

type Result<T> = std::result::Result<T, LedgerError>;

/// Read connections kept open; more may open under load, and close after.
const IDLE_READERS: usize = 4;

const DIALECT: Dialect = Dialect { id: "INTEGER PRIMARY KEY AUTOINCREMENT", drop_foreign_keys: "" };

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
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
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
    let decided = apply(ops, snapshot, &mut reservation_id);
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
    Ok(snapshot)
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
    let mut append = conn.prepare_cached(
        "INSERT INTO ledger (account_id, kind, amount, balance_after, reservation_id, reference, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
            now
        ])?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(ids)
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
                "SELECT id, kind, amount, balance_after, reservation_id, reference, created_at FROM ledger \
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
}
