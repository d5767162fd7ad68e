//! The ledger's front door: group commit in front of a SQLite or PostgreSQL backend, and the reads
//! that need no transaction.
//!
//! Every write is a `Job` (one operation, or a gateway's batch of many) on one queue per service
//! instance. One writer drains the queue: it takes every job waiting, runs all their operations in
//! one transaction (one fsync), and answers each job with its own results. While it waits for the
//! disk, the next batch fills up, so the busier the service, the more each fsync carries. A caller
//! that goes away after queueing its job changes nothing: the writer finishes the job regardless
//! and the answer is dropped, so a retry finds the work done.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use crate::error::LedgerError;
use crate::ledger::{millis, Account, Entry, Op, Outcome, UsageRow};
use crate::{postgres, sqlite};

type Result<T> = std::result::Result<T, LedgerError>;

/// Jobs waiting beyond this many make callers wait to queue: memory stays bounded under overload.
const QUEUE: usize = 4096;
/// A transaction takes jobs until it holds this many operations, so one batch never grows without
/// bound (and neither does the lock time other instances wait through).
const MAX_OPS_PER_TRANSACTION: usize = 4096;

/// Some operations and where to send their results, in the same order.
pub struct Job {
    ops: Vec<Op>,
    reply: oneshot::Sender<Vec<Result<Outcome>>>,
}

/// The jobs one transaction serves, their operations taken out in order.
pub struct Batch {
    pub ops: Vec<Op>,
    replies: Vec<(oneshot::Sender<Vec<Result<Outcome>>>, usize)>,
}

impl Batch {
    /// `first` and the jobs queued behind it, up to `MAX_OPS_PER_TRANSACTION` operations.
    pub fn gather(first: Job, queue: &mut mpsc::Receiver<Job>) -> Self {
        let mut batch = Self { ops: Vec::with_capacity(first.ops.len()), replies: Vec::new() };
        batch.add(first);
        while batch.ops.len() < MAX_OPS_PER_TRANSACTION {
            match queue.try_recv() {
                Ok(job) => batch.add(job),
                Err(_) => break,
            }
        }
        batch
    }

    fn add(&mut self, job: Job) {
        self.replies.push((job.reply, job.ops.len()));
        self.ops.extend(job.ops);
    }

    /// The operations, and what answers them once the transaction is over.
    pub fn split(self) -> (Vec<Op>, Replies) {
        (self.ops, Replies(self.replies))
    }
}

/// Where each job of a batch waits for its results.
pub struct Replies(Vec<(oneshot::Sender<Vec<Result<Outcome>>>, usize)>);

impl Replies {
    /// Gives each job its own results; when the transaction failed, every job gets its error.
    pub fn send(self, results: Result<Vec<Result<Outcome>>>) {
        match results {
            Ok(results) => {
                let mut results = results.into_iter();
                for (reply, n) in self.0 {
                    // A caller that stopped waiting is fine: its operations are done.
                    let _ = reply.send(results.by_ref().take(n).collect());
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for (reply, n) in self.0 {
                    let _ = reply.send((0..n).map(|_| Err(LedgerError::Batch(Arc::clone(&error)))).collect());
                }
            }
        }
    }
}

/// Where reads go.
enum Reader {
    Sqlite(sqlite::Reader),
    Postgres(postgres::Reader),
}

pub struct Ledger {
    queue: mpsc::Sender<Job>,
    reader: Reader,
}

impl Ledger {
    /// Opens (for SQLite: creates) the database, applies pending migrations and starts the writer.
    pub async fn open(url: &str) -> Result<Self> {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let reader = match normalize_url(url)? {
            Target::Sqlite(path) => Reader::Sqlite(sqlite::open(&path, jobs).await?),
            Target::Postgres(url) => Reader::Postgres(postgres::open(&url, jobs).await?),
        };
        Ok(Self { queue, reader })
    }

    /// Which database this is, by name: the URL may hold a password.
    pub fn backend(&self) -> &'static str {
        match self.reader {
            Reader::Sqlite(_) => "SQLite",
            Reader::Postgres(_) => "PostgreSQL",
        }
    }

    pub async fn close(&self) {
        if let Reader::Postgres(reader) = &self.reader {
            reader.close().await;
        }
    }

    /// Runs `ops` in the next group commit; their results in order.
    pub async fn submit(&self, ops: Vec<Op>) -> Vec<Result<Outcome>> {
        let n = ops.len();
        if n == 0 {
            // A batch whose every operation failed validation: no transaction to run.
            return Vec::new();
        }
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Job { ops, reply }).await.is_err() {
            return (0..n).map(|_| Err(LedgerError::WriterGone)).collect();
        }
        answer.await.unwrap_or_else(|_| (0..n).map(|_| Err(LedgerError::WriterGone)).collect())
    }

    /// Runs one operation in the next group commit.
    pub async fn one(&self, op: Op) -> Result<Outcome> {
        self.submit(vec![op]).await.pop().unwrap_or(Err(LedgerError::WriterGone))
    }

    pub async fn account(&self, id: &str) -> Result<Account> {
        let found = match &self.reader {
            Reader::Sqlite(r) => r.account(id).await?,
            Reader::Postgres(r) => r.account(id).await?,
        };
        found.ok_or_else(|| LedgerError::AccountNotFound(id.to_owned()))
    }

    /// Journal rows of one account, oldest first, with ids above `after`.
    pub async fn transactions(&self, id: &str, after: i64, limit: i64) -> Result<Vec<Entry>> {
        self.account(id).await?;
        match &self.reader {
            Reader::Sqlite(r) => r.transactions(id, after, limit).await,
            Reader::Postgres(r) => r.transactions(id, after, limit).await,
        }
    }

    /// Expires reservations held since before `cutoff`; returns how many.
    pub async fn expire_held_before(&self, cutoff: SystemTime) -> Result<usize> {
        const BATCH: i64 = 500;
        let cutoff = millis(cutoff);
        let mut expired = 0;
        loop {
            let ids = match &self.reader {
                Reader::Sqlite(r) => r.held_before(cutoff, BATCH).await?,
                Reader::Postgres(r) => r.held_before(cutoff, BATCH).await?,
            };
            let full = ids.len() >= BATCH as usize;
            let ops = ids.into_iter().map(|reservation| Op::Expire { reservation }).collect();
            for result in self.submit(ops).await {
                // Expired(false): committed or released since the look-up; nothing to do.
                if matches!(result?, Outcome::Expired(true)) {
                    expired += 1;
                }
            }
            if !full {
                return Ok(expired);
            }
        }
    }

    /// Settles grants nobody reported on for twice their lifetime, as of `now`; returns how many.
    pub async fn expire_grants(&self, now: SystemTime) -> Result<usize> {
        const BATCH: i64 = 500;
        let now = millis(now);
        let mut expired = 0;
        loop {
            let overdue = match &self.reader {
                Reader::Sqlite(r) => r.overdue_grants(now, BATCH).await?,
                Reader::Postgres(r) => r.overdue_grants(now, BATCH).await?,
            };
            let full = overdue.len() >= BATCH as usize;
            let ops = overdue.into_iter().map(|(account, grant)| Op::ExpireGrant { account, grant }).collect();
            for result in self.submit(ops).await {
                // GrantExpired(false): reported on or closed since the look-up.
                if matches!(result?, Outcome::GrantExpired(true)) {
                    expired += 1;
                }
            }
            if !full {
                return Ok(expired);
            }
        }
    }

    /// Credits and requests of one account per policy and bucket of `bucket_ms`, for buckets from
    /// `from` to before `to` (ms, both multiples of `bucket_ms`): what grants reported, and the
    /// committed per-request reservations under their route.
    pub async fn usage(&self, id: &str, from: i64, to: i64, bucket_ms: i64) -> Result<Vec<UsageRow>> {
        self.account(id).await?;
        match &self.reader {
            Reader::Sqlite(r) => r.usage(id, from, to, bucket_ms).await,
            Reader::Postgres(r) => r.usage(id, from, to, bucket_ms).await,
        }
    }
}

/// A new reservation's (`res`) or grant's (`gr`) id: unguessable (74 random bits), so one gateway
/// cannot settle another's, and ordered by time. Random ids put each new reservation on a random
/// page of the primary-key index, so a batch of N dirtied about N pages, each written to the WAL at
/// commit; the profile showed the writer spending a fifth of its time in those writes.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[derive(Debug, PartialEq, Eq)]
enum Target {
    Sqlite(String),
    Postgres(String),
}

/// `sqlite://PATH` and `sqlite:PATH` name a file (created if missing); PostgreSQL URLs pass as given.
fn normalize_url(url: &str) -> Result<Target> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres(url.to_owned()));
    }
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"));
    match path {
        Some(path) if !path.is_empty() && !path.contains('?') && path != ":memory:" => {
            Ok(Target::Sqlite(path.to_owned()))
        }
        _ => Err(LedgerError::UnsupportedUrl(url.split(':').next().unwrap_or_default().to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        let ok = [
            ("sqlite://tollgate-credit.db", Target::Sqlite("tollgate-credit.db".into())),
            ("sqlite:data/credit.db", Target::Sqlite("data/credit.db".into())),
            ("sqlite:///var/lib/credit.db", Target::Sqlite("/var/lib/credit.db".into())),
            ("postgres://u@db:5432/credit", Target::Postgres("postgres://u@db:5432/credit".into())),
            ("postgresql://db/credit", Target::Postgres("postgresql://db/credit".into())),
        ];
        for (url, target) in ok {
            assert_eq!(normalize_url(url).unwrap(), target, "{url}");
        }
        for url in ["", "sqlite:", "sqlite://", "sqlite::memory:", "mysql://db", "credit.db", "sqlite://x.db?mode=ro"] {
            assert!(normalize_url(url).is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn each_job_gets_its_own_results() {
        let (queue, mut jobs) = mpsc::channel(8);
        let mut answers = Vec::new();
        for n in [2, 1, 3] {
            let (reply, answer) = oneshot::channel();
            let ops = (0..n).map(|i| Op::Release { reservation: format!("{n}-{i}") }).collect();
            queue.send(Job { ops, reply }).await.unwrap();
            answers.push(answer);
        }
        let first = jobs.recv().await.unwrap();
        let (ops, replies) = Batch::gather(first, &mut jobs).split();
        assert_eq!(ops.len(), 6);
        let results = ops
            .iter()
            .map(|op| match op {
                Op::Release { reservation } => Err(LedgerError::ReservationNotFound(reservation.clone())),
                _ => Err(LedgerError::WriterGone),
            })
            .collect();
        replies.send(Ok(results));
        let mut seen = Vec::new();
        for answer in answers {
            seen.push(answer.await.unwrap().into_iter().map(|r| r.unwrap_err().to_string()).collect::<Vec<_>>());
        }
        assert_eq!(seen[0], ["reservation \"2-0\" does not exist", "reservation \"2-1\" does not exist"]);
        assert_eq!(seen[1], ["reservation \"1-0\" does not exist"]);
        assert_eq!(seen[2].len(), 3);
    }
}
