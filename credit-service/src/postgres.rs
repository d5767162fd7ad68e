//! The PostgreSQL backend: one writer task per instance runs each batch in one transaction with
//! set-based statements (arrays through `UNNEST`), so a batch of any size is a handful of round
//! trips, on a connection of its own; reads share a pool.
//!
//! Several instances may share the database. Each batch locks the account rows it touches
//! (`FOR UPDATE`, in id order, so two batches never deadlock) before it reads anything else, and
//! every write to a reservation or the journal happens under its account's lock: a batch decides
//! against rows no other instance can change until it commits.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::mpsc;

use crate::error::LedgerError;
use crate::journal_kinds;
use crate::ledger::{
    apply, now_ms, Account, Changes, Dialect, Entry, Grant, GrantStatus, Keys, Op, Outcome, Reservation, Snapshot,
    State, Usage, UsageRow, MIGRATIONS,
};
use crate::store::{new_id, Batch, Job};

type Result<T> = std::result::Result<T, LedgerError>;

/// An arbitrary constant: the advisory lock that keeps two instances starting at once from migrating
/// the same database together.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

const DIALECT: Dialect = Dialect {
    id: "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    drop_foreign_keys: "ALTER TABLE ledger DROP CONSTRAINT ledger_account_id_fkey, \
                        DROP CONSTRAINT ledger_reservation_id_fkey; \
                        ALTER TABLE reservations DROP CONSTRAINT reservations_account_id_fkey;",
    grant_journal: concat!(
        "ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check, ADD CONSTRAINT ledger_kind_check CHECK (kind IN (",
        journal_kinds!(),
        ")), ADD COLUMN grant_id TEXT, ADD COLUMN charged BIGINT;"
    ),
    bytewise_keys: "ALTER TABLE accounts ALTER COLUMN id TYPE TEXT COLLATE \"C\"; \
                    ALTER TABLE reservations ALTER COLUMN id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN account_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN request_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN route TYPE TEXT COLLATE \"C\"; \
                    ALTER TABLE ledger ALTER COLUMN account_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN reservation_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN reference TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN grant_id TYPE TEXT COLLATE \"C\"; \
                    ALTER TABLE grants ALTER COLUMN id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN account_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN instance TYPE TEXT COLLATE \"C\"; \
                    ALTER TABLE grant_usage ALTER COLUMN grant_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN policy TYPE TEXT COLLATE \"C\"; \
                    ALTER TABLE usage ALTER COLUMN account_id TYPE TEXT COLLATE \"C\", \
                        ALTER COLUMN policy TYPE TEXT COLLATE \"C\";",
    checks_as_comparisons: "",
};

/// Connects, migrates and starts the writer task on `jobs`.
pub async fn open(url: &str, jobs: mpsc::Receiver<Job>) -> Result<Reader> {
    let options = PgConnectOptions::from_str(url)?;
    // The writer only ever finds rows by key: at most `MAX_OPS_PER_TRANSACTION` of them, in tables
    // that grow without end. PostgreSQL prices an index probe as a read from disk, so past a few
    // hundred keys it scans the whole table into a hash instead, and keeps doing so until the table
    // is several times larger: a profile of the batch run found a third of its time in three scans
    // of `reservations` per reserve and commit batch. On the writer's own connection such plans are
    // ruled out. That leaves one sensible plan per statement whatever the arrays hold, so each is
    // planned once (a generic plan), not per execution: planning was a fifth of PostgreSQL's time
    // in the pairs run, where batches are small.
    let writer = PgPoolOptions::new().acquire_timeout(Duration::from_secs(5)).max_connections(1).connect_with(
        options.clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
        ]),
    );
    // The readers keep the planner's choice, made afresh per execution with the arguments in view.
    let readers = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .max_connections(7)
        .connect_with(options.options([("plan_cache_mode", "force_custom_plan")]));
    let (writer, readers) = (writer.await?, readers.await?);
    migrate(&writer).await?;
    tokio::spawn(write(writer.clone(), jobs));
    Ok(Reader { readers, writer })
}

async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(&mut *tx).await?;
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let failed = |source: sqlx::Error| LedgerError::Migration {
            version: m.version,
            name: m.name,
            source: Box::new(source.into()),
        };
        sqlx::raw_sql(&m.sql(&DIALECT)).execute(&mut *tx).await.map_err(failed)?;
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

/// The writer task: one transaction per batch of queued jobs, until the queue closes.
async fn write(pool: PgPool, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let (ops, replies) = Batch::gather(first, &mut jobs).split();
        replies.send(run(&pool, ops).await);
    }
}

async fn run(pool: &PgPool, ops: Vec<Op>) -> Result<Vec<Result<Outcome>>> {
    let mut tx = pool.begin().await?;
    let now = now_ms();
    let snapshot = load(&mut tx, Keys::of(&ops), now).await?;
    let decided = apply(ops, snapshot, now, &mut new_id);
    let ids = store(&mut tx, &decided.changes, now).await?;
    tx.commit().await?;
    decided.resolve(&ids)
}

/// Creates the accounts to create, locks every account the batch touches, then reads the rest: two
/// or three round trips, whatever the batch holds.
async fn load(tx: &mut Transaction<'static, Postgres>, keys: Keys, now: i64) -> Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    if !keys.create.is_empty() {
        let create: Vec<&str> = keys.create.iter().map(String::as_str).collect();
        let created: Vec<String> = sqlx::query_scalar(
            "INSERT INTO accounts (id, balance, held, created_at) SELECT id, 0, 0, $2 FROM UNNEST($1::text[]) AS u(id) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(&create)
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        snapshot.created.extend(created);
    }
    let accounts: Vec<&str> = keys.accounts.iter().map(String::as_str).collect();
    let reservations: Vec<&str> = keys.reservations.iter().map(String::as_str).collect();
    // A reservation's account never changes, so it may be looked up in the same statement that
    // takes the locks. One array of ids, not `id = ANY($1) OR id IN (…)`: the generic plan of that
    // tests every account against both, the array one id at a time.
    let rows = sqlx::query(
        "SELECT id, balance, held FROM accounts \
         WHERE id = ANY($1::text[] || ARRAY(SELECT account_id FROM reservations WHERE id = ANY($2))) \
         ORDER BY id FOR UPDATE",
    )
    .bind(&accounts)
    .bind(&reservations)
    .fetch_all(&mut **tx)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        found.insert(row.try_get(0)?, Account { balance: row.try_get(1)?, held: row.try_get(2)? });
    }
    snapshot.accounts = found;
    if !reservations.is_empty() || !keys.requests.is_empty() {
        let (owners, requests): (Vec<&str>, Vec<&str>) =
            keys.requests.iter().map(|(a, q)| (a.as_str(), q.as_str())).unzip();
        let rows = sqlx::query(
            "SELECT id, account_id, amount, state, charged, NULL::text FROM reservations WHERE id = ANY($1) \
             UNION ALL \
             SELECT r.id, r.account_id, r.amount, r.state, r.charged, r.request_id FROM reservations r \
             JOIN UNNEST($2::text[], $3::text[]) AS k(account_id, request_id) USING (account_id, request_id)",
        )
        .bind(&reservations)
        .bind(&owners)
        .bind(&requests)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let id: String = row.try_get(0)?;
            let state: String = row.try_get(3)?;
            let found = Reservation {
                account: row.try_get(1)?,
                amount: row.try_get(2)?,
                state: State::parse(&state)?,
                charged: row.try_get(4)?,
            };
            // Made by another instance after the lock statement began, so its account is not
            // locked: as good as not there yet.
            if !snapshot.accounts.contains_key(&found.account) {
                continue;
            }
            if let Some(request_id) = row.try_get::<Option<String>, _>(5)? {
                snapshot.requests.insert((found.account.clone(), request_id), id.clone());
            }
            snapshot.reservations.insert(id, found);
        }
    }
    if !keys.references.is_empty() {
        let (accounts, references): (Vec<&str>, Vec<&str>) =
            keys.references.iter().map(|(a, r)| (a.as_str(), r.as_str())).unzip();
        let rows = sqlx::query(
            "SELECT l.account_id, l.reference, l.id, l.balance_after FROM ledger l \
             JOIN UNNEST($1::text[], $2::text[]) AS k(account_id, reference) USING (account_id, reference) \
             WHERE l.kind = 'topup'",
        )
        .bind(&accounts)
        .bind(&references)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            snapshot.references.insert((row.try_get(0)?, row.try_get(1)?), (row.try_get(2)?, row.try_get(3)?));
        }
    }
    if !keys.grants.is_empty() || !keys.grant_accounts.is_empty() {
        load_grants(tx, &keys, &mut snapshot).await?;
    }
    Ok(snapshot)
}

/// The grants named by id and the live grants of the reports' accounts, with their usage per
/// policy: one round trip for each.
async fn load_grants(tx: &mut Transaction<'static, Postgres>, keys: &Keys, snapshot: &mut Snapshot) -> Result<()> {
    let ids: Vec<&str> = keys.grants.iter().map(String::as_str).collect();
    let accounts: Vec<&str> = keys.grant_accounts.iter().map(String::as_str).collect();
    let rows = sqlx::query(
        "SELECT id, account_id, instance, granted_total, used_total, lifetime_ms, status, rate, created_at, \
                last_report_at, expires_at \
         FROM grants WHERE id = ANY($1) OR (account_id = ANY($2) AND status = 'live')",
    )
    .bind(&ids)
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let status: String = row.try_get(6)?;
        let grant = Grant {
            id: row.try_get(0)?,
            account: row.try_get(1)?,
            instance: row.try_get(2)?,
            granted_total: row.try_get(3)?,
            used_total: row.try_get(4)?,
            lifetime_ms: row.try_get(5)?,
            status: GrantStatus::parse(&status)?,
            rate: row.try_get(7)?,
            created_at: row.try_get(8)?,
            last_report_at: row.try_get(9)?,
            expires_at: row.try_get(10)?,
        };
        // Only grants of accounts this transaction holds locked: no other instance changes them
        // until it commits.
        if snapshot.accounts.contains_key(&grant.account) {
            snapshot.grants.insert(grant.id.clone(), grant);
        }
    }
    if snapshot.grants.is_empty() {
        return Ok(());
    }
    let loaded: Vec<&str> = snapshot.grants.keys().map(String::as_str).collect();
    let rows = sqlx::query("SELECT grant_id, policy, credits, requests FROM grant_usage WHERE grant_id = ANY($1)")
        .bind(&loaded)
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let usage = Usage { credits: row.try_get(2)?, requests: row.try_get(3)? };
        snapshot.grant_usage.insert((row.try_get(0)?, row.try_get(1)?), usage);
    }
    Ok(())
}

/// Writes a batch's changes in one statement, one data-modifying part per table and kind of change
/// (`Changes` holds each row once, as none of the parts sees another's rows); returns the journal
/// ids, one per row, in order.
async fn store(tx: &mut Transaction<'static, Postgres>, changes: &Changes, now: i64) -> Result<Vec<i64>> {
    store_grants(tx, changes, now).await?;
    if changes.accounts.is_empty() && changes.journal.is_empty() {
        return Ok(Vec::new());
    }
    let (a, r, s, j) = (&changes.accounts, &changes.reservations, &changes.settlements, &changes.journal);
    // Rows go into the journal in batch order, so the identity hands out ascending ids in that
    // order: sorted, the returned ids line up with the rows.
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "WITH accounts_changed AS ( \
             UPDATE accounts AS a SET balance = u.balance, held = u.held \
             FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(id, balance, held) WHERE a.id = u.id), \
         reservations_made AS ( \
             INSERT INTO reservations (id, account_id, request_id, route, amount, state, charged, created_at, settled_at) \
             SELECT id, account_id, request_id, route, amount, state, charged, $18, \
                    CASE WHEN state = 'held' THEN NULL ELSE $18 END \
             FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::int8[]) \
             AS u(id, account_id, request_id, route, amount, state, charged)), \
         reservations_settled AS ( \
             UPDATE reservations AS r SET state = u.state, charged = u.charged, settled_at = $18 \
             FROM UNNEST($11::text[], $12::text[], $13::int8[]) AS u(id, state, charged) WHERE r.id = u.id) \
         INSERT INTO ledger (account_id, kind, amount, balance_after, reservation_id, reference, created_at, \
                             grant_id, charged) \
         SELECT account_id, kind, amount, balance_after, reservation_id, reference, $18, grant_id, charged \
         FROM UNNEST($14::text[], $15::text[], $16::int8[], $17::int8[], $19::text[], $20::text[], $21::text[], \
                     $22::int8[]) WITH ORDINALITY \
         AS u(account_id, kind, amount, balance_after, reservation_id, reference, grant_id, charged, n) \
         ORDER BY n RETURNING id",
    )
    .bind(a.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
    .bind(a.iter().map(|(_, a)| a.balance).collect::<Vec<_>>())
    .bind(a.iter().map(|(_, a)| a.held).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.account.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.route.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.amount).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|r| r.charged).collect::<Vec<_>>())
    .bind(s.iter().map(|s| s.id.as_str()).collect::<Vec<_>>())
    .bind(s.iter().map(|s| s.state.as_str()).collect::<Vec<_>>())
    .bind(s.iter().map(|s| s.charged).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.account.as_str()).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.amount).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.balance_after).collect::<Vec<_>>())
    .bind(now)
    .bind(j.iter().map(|r| r.reservation.as_deref()).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.reference.as_deref()).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.grant.as_deref()).collect::<Vec<_>>())
    .bind(j.iter().map(|r| r.charged).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// Grants, their usage per policy and the usage analytics, a statement each when the batch has any.
/// Changed grants are written before new ones, in a statement of their own: a batch may end a grant
/// and open the next of the same (account, instance), and the live grant's unique index must see
/// the first one ended.
async fn store_grants(tx: &mut Transaction<'static, Postgres>, changes: &Changes, now: i64) -> Result<()> {
    let (changed, made): (Vec<&Grant>, Vec<&Grant>) = {
        let (made, changed): (Vec<_>, Vec<_>) = changes.grants.iter().partition(|(_, made)| *made);
        (changed.into_iter().map(|(g, _)| g).collect(), made.into_iter().map(|(g, _)| g).collect())
    };
    let settled_at = |g: &Grant| (g.status != GrantStatus::Live).then_some(now);
    if !changed.is_empty() {
        sqlx::query(
            "UPDATE grants AS g SET granted_total = u.granted_total, used_total = u.used_total, \
                 lifetime_ms = u.lifetime_ms, status = u.status, rate = u.rate, last_report_at = u.last_report_at, \
                 expires_at = u.expires_at, settled_at = u.settled_at \
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::text[], $6::int8[], $7::int8[], \
                         $8::int8[], $9::int8[]) \
             AS u(id, granted_total, used_total, lifetime_ms, status, rate, last_report_at, expires_at, settled_at) \
             WHERE g.id = u.id",
        )
        .bind(changed.iter().map(|g| g.id.as_str()).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.granted_total).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.used_total).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.lifetime_ms).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.status.as_str()).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.rate).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.last_report_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| g.expires_at).collect::<Vec<_>>())
        .bind(changed.iter().map(|g| settled_at(g)).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !made.is_empty() {
        sqlx::query(
            "INSERT INTO grants (id, account_id, instance, granted_total, used_total, lifetime_ms, status, rate, \
                                 created_at, last_report_at, expires_at, settled_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], \
                                  $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[])",
        )
        .bind(made.iter().map(|g| g.id.as_str()).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.account.as_str()).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.instance.as_str()).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.granted_total).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.used_total).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.lifetime_ms).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.status.as_str()).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.rate).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.created_at).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.last_report_at).collect::<Vec<_>>())
        .bind(made.iter().map(|g| g.expires_at).collect::<Vec<_>>())
        .bind(made.iter().map(|g| settled_at(g)).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !changes.grant_usage.is_empty() || !changes.usage.is_empty() {
        let (gu, u) = (&changes.grant_usage, &changes.usage);
        sqlx::query(
            "WITH grant_usage_changed AS ( \
                 INSERT INTO grant_usage (grant_id, policy, credits, requests) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[]) \
                 ON CONFLICT (grant_id, policy) \
                 DO UPDATE SET credits = EXCLUDED.credits, requests = EXCLUDED.requests) \
             INSERT INTO usage AS s (account_id, policy, hour, credits, requests) \
             SELECT * FROM UNNEST($5::text[], $6::text[], $7::int8[], $8::int8[], $9::int8[]) \
             ON CONFLICT (account_id, policy, hour) \
             DO UPDATE SET credits = s.credits + EXCLUDED.credits, requests = s.requests + EXCLUDED.requests",
        )
        .bind(gu.iter().map(|(g, _, _)| g.as_str()).collect::<Vec<_>>())
        .bind(gu.iter().map(|(_, p, _)| p.as_str()).collect::<Vec<_>>())
        .bind(gu.iter().map(|(_, _, u)| u.credits).collect::<Vec<_>>())
        .bind(gu.iter().map(|(_, _, u)| u.requests).collect::<Vec<_>>())
        .bind(u.iter().map(|(a, _, _, _)| a.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|(_, p, _, _)| p.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|(_, _, h, _)| *h).collect::<Vec<_>>())
        .bind(u.iter().map(|(_, _, _, u)| u.credits).collect::<Vec<_>>())
        .bind(u.iter().map(|(_, _, _, u)| u.requests).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Reads that need no transaction, on a pool of their own; and the writer's connection, to close.
pub struct Reader {
    readers: PgPool,
    writer: PgPool,
}

impl Reader {
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }

    pub async fn account(&self, id: &str) -> Result<Option<Account>> {
        let row = sqlx::query("SELECT balance, held FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.readers)
            .await?;
        row.map(|row| Ok(Account { balance: row.try_get(0)?, held: row.try_get(1)? })).transpose()
    }

    pub async fn transactions(&self, id: &str, after: i64, limit: i64) -> Result<Vec<Entry>> {
        let rows = sqlx::query(
            "SELECT id, kind, amount, balance_after, reservation_id, reference, created_at, grant_id, charged \
                 FROM ledger \
             WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Entry {
                    id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    amount: r.try_get(2)?,
                    balance_after: r.try_get(3)?,
                    reservation_id: r.try_get(4)?,
                    reference: r.try_get(5)?,
                    created_at_ms: r.try_get(6)?,
                    grant_id: r.try_get(7)?,
                    charged: r.try_get(8)?,
                })
            })
            .collect()
    }

    /// Ids of reservations held since before `cutoff` (ms), oldest first.
    pub async fn held_before(&self, cutoff: i64, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM reservations WHERE state = 'held' AND created_at < $1 ORDER BY created_at LIMIT $2",
        )
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?)
    }

    /// `(account, id)` of live grants with no report for twice their lifetime as of `now` (ms).
    pub async fn overdue_grants(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT account_id, id FROM grants WHERE status = 'live' AND expires_at <= $1 \
             AND last_report_at + 2 * lifetime_ms <= $1 ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    pub async fn usage(&self, id: &str, from: i64, to: i64, bucket_ms: i64) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT policy, start, SUM(credits)::int8, SUM(requests)::int8 FROM ( \
                 SELECT policy, hour / $4 * $4 AS start, credits, requests FROM usage \
                 WHERE account_id = $1 AND hour >= $2 AND hour < $3 \
                 UNION ALL \
                 SELECT route, settled_at / $4 * $4, charged, 1 FROM reservations \
                 WHERE account_id = $1 AND state = 'committed' AND settled_at >= $2 AND settled_at < $3) AS u \
             GROUP BY policy, start ORDER BY start, policy",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(bucket_ms)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    policy: r.try_get(0)?,
                    start: r.try_get(1)?,
                    credits: r.try_get(2)?,
                    requests: r.try_get(3)?,
                })
            })
            .collect()
    }
}
