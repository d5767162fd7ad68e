//! Commits and releases. A stream queues its settlement and wakes the worker's root context, which
//! sends it: a callout's answer goes to the context that made it, and the root outlives every
//! stream, so the response being sent or the client leaving never drops one. A failed one is
//! retried with backoff until the credit service gives a definite answer or
//! `credits.retry_seconds` runs out.
//!
//! The queue is bounded and ordered by when each job is due, so a slow credit service costs a
//! wake-up only the jobs that are due, and a dead one cannot grow a worker's memory. Commits and
//! releases due together go in one call to the service's batch endpoint, each with its own result.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::common::backoff_seconds;
use crate::credits::{self, Credits, Settlement};
use crate::host::{Host, NANOS_PER_MS, NANOS_PER_SECOND};
use crate::metrics::Metric;

/// Settlements one worker keeps, waiting and in flight. Past this a new one is dropped and
/// logged: its hold then ends at the credit service's expiry, and a commit dropped is an
/// under-charge, never an over-charge. At ~200 bytes a job, 4 MB at most.
pub const MAX_JOBS: usize = 20_000;

/// The most operations the credit service takes in one batch.
const MAX_BATCH: usize = 1000;

#[derive(Debug)]
struct Job {
    settlement: Settlement,
    /// When it was first queued (Unix nanoseconds): retries stop `retry_seconds` after that.
    first_sent: u64,
    /// When the current attempt was sent, for the latency histogram.
    sent: u64,
    attempts: u32,
}

/// A job waiting, ordered by when it is due, then by when it was queued.
#[derive(Debug)]
struct Waiting {
    due: u64,
    order: u64,
    job: Job,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

/// One worker's commits and releases: waiting to be sent (now, or for a retry), or in flight.
#[derive(Debug, Default)]
pub struct Settler {
    /// By callout token: one job, or the jobs of one batch in the order sent.
    in_flight: HashMap<u32, Vec<Job>>,
    /// Jobs in `in_flight`, all batches counted.
    flying: usize,
    waiting: BinaryHeap<Reverse<Waiting>>,
    queued: u64,
}

/// What became of an answer the root context received.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not a settlement's: someone else's callout.
    NotOurs,
    Done,
    /// Failed; sent again later.
    Retrying,
    /// Failed for good: logged, and the reservation is left to the credit service's expiry.
    GaveUp,
}

impl Settler {
    /// Queues a commit or release; the root context sends it on `send_due`.
    pub fn queue(&mut self, host: &mut dyn Host, settlement: Settlement) {
        let now = host.now_nanos();
        if self.waiting.len() + self.flying >= MAX_JOBS {
            host.count(Metric::CreditSettlementsDropped, 1);
            log::error!("tollgate: {settlement} dropped: {MAX_JOBS} settlements already queued");
            return;
        }
        self.wait(Job { settlement, first_sent: now, sent: now, attempts: 0 }, now);
    }

    fn wait(&mut self, job: Job, due: u64) {
        self.queued += 1;
        self.waiting.push(Reverse(Waiting { due, order: self.queued, job }));
    }

    /// Sends `jobs` in one callout: alone, or as a batch of commits and releases.
    fn dispatch(&mut self, host: &mut dyn Host, credits: &Credits, mut jobs: Vec<Job>) {
        let now = host.now_nanos();
        for job in &mut jobs {
            job.attempts += 1;
            job.sent = now;
        }
        let call = match jobs.as_slice() {
            [job] => credits.settle(&job.settlement),
            _ => credits.settle_batch(jobs.iter().map(|job| &job.settlement)),
        };
        host.count(Metric::CreditCallouts, 1);
        match host.http_call(&call) {
            Some(token) => {
                self.flying += jobs.len();
                self.in_flight.insert(token, jobs);
            }
            None => {
                host.count(Metric::CreditCalloutFailures, 1);
                for job in jobs {
                    self.retry_later(host, credits, job);
                }
            }
        }
    }

    /// Hands every job waiting here to `root`, which sends it from then on. The native build's
    /// streams queue on their worker thread, and the main thread, which outlives them, sends.
    pub fn hand_over(&mut self, root: &mut Settler) {
        for Reverse(Waiting { due, job, .. }) in std::mem::take(&mut self.waiting).into_vec() {
            if root.waiting.len() + root.flying >= MAX_JOBS {
                log::error!("tollgate: {} dropped: {MAX_JOBS} settlements already queued", job.settlement);
                continue;
            }
            root.wait(job, due);
        }
    }

    /// Whether callout `token` is one of this settler's.
    pub fn is_waiting_for(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    /// The credit service's answer (`None`: no answer, e.g. a timeout) to callout `token`.
    pub fn on_answer(
        &mut self,
        host: &mut dyn Host,
        credits: &Credits,
        token: u32,
        answer: Option<(u16, Vec<u8>)>,
    ) -> Answer {
        let Some(jobs) = self.in_flight.remove(&token) else { return Answer::NotOurs };
        self.flying -= jobs.len();
        let elapsed = host.now_nanos().saturating_sub(jobs.first().map_or(0, |job| job.sent)) / NANOS_PER_MS;
        host.count(Metric::CreditCalloutMilliseconds, elapsed);
        if jobs.len() == 1 {
            let mut jobs = jobs;
            return match jobs.pop() {
                Some(job) => self.settled(host, credits, job, answer),
                None => Answer::Done,
            };
        }
        // A batch: each operation's own status. No answer, or one that is not the batch's,
        // retries every job of it.
        let statuses = match &answer {
            Some((200, body)) => credits::batch_statuses(body).filter(|s| s.len() == jobs.len()),
            _ => None,
        };
        let mut outcome = Answer::Done;
        for (i, job) in jobs.into_iter().enumerate() {
            let answer = statuses.as_ref().map(|statuses| (statuses[i], Vec::new()));
            match self.settled(host, credits, job, answer) {
                Answer::Done => {}
                other => outcome = other,
            }
        }
        outcome
    }

    /// What one job's answer means for it.
    fn settled(&mut self, host: &mut dyn Host, credits: &Credits, job: Job, answer: Option<(u16, Vec<u8>)>) -> Answer {
        let status = answer.as_ref().map(|(status, _)| *status);
        match (&job.settlement, answer) {
            (Settlement::Reclaim { .. }, Some((200 | 201, body))) => match credits::granted_id(&body) {
                Some((reservation_id, _)) => {
                    self.wait(Job { settlement: Settlement::Release { reservation_id }, attempts: 0, ..job }, 0);
                    self.send_due(host, credits);
                    Answer::Done
                }
                None => self.retry_later(host, credits, job),
            },
            // Refused (402, no such account): nothing is held under that key.
            (Settlement::Reclaim { .. }, Some((400..=499, _))) => Answer::Done,
            (_, Some((200, _))) => Answer::Done,
            // The service looked and refused (committed elsewhere, released, expired, unknown):
            // sending it again cannot change that.
            (_, Some((404 | 409 | 422, _))) => {
                host.count(Metric::CreditCalloutFailures, 1);
                log::error!(
                    "tollgate: credit service refused the {}: status {}",
                    job.settlement,
                    status.unwrap_or_default()
                );
                Answer::GaveUp
            }
            _ => {
                host.count(Metric::CreditCalloutFailures, 1);
                self.retry_later(host, credits, job)
            }
        }
    }

    fn retry_later(&mut self, host: &mut dyn Host, credits: &Credits, job: Job) -> Answer {
        let now = host.now_nanos();
        let due = now.saturating_add(backoff_seconds(job.attempts.saturating_add(1)) * NANOS_PER_SECOND);
        if due.saturating_sub(job.first_sent) > credits.retry_seconds * NANOS_PER_SECOND {
            log::error!(
                "tollgate: gave up on the {} after {} attempts; the credit service's expiry releases it",
                job.settlement,
                job.attempts
            );
            return Answer::GaveUp;
        }
        self.wait(job, due);
        Answer::Retrying
    }

    /// Sends what is due: new settlements, and retries whose backoff has passed. The root context
    /// calls this when a stream wakes it, and on every tick.
    pub fn send_due(&mut self, host: &mut dyn Host, credits: &Credits) {
        let now = host.now_nanos();
        let mut batch = Vec::new();
        while self.waiting.peek().is_some_and(|Reverse(w)| w.due <= now) {
            let Some(Reverse(Waiting { job, .. })) = self.waiting.pop() else { break };
            if job.attempts > 0 {
                host.count(Metric::CreditRetries, 1);
            }
            // A reclaim reads the reservation the service answers: it goes alone.
            if matches!(job.settlement, Settlement::Reclaim { .. }) {
                self.dispatch(host, credits, vec![job]);
                continue;
            }
            batch.push(job);
            if batch.len() == MAX_BATCH {
                self.dispatch(host, credits, std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            self.dispatch(host, credits, batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credits::RawCredits;
    use crate::host::fake::FakeHost;

    fn credits() -> Credits {
        let raw: RawCredits =
            serde_json::from_str(r#"{"cluster": "credits", "service_token": "t", "retry_seconds": 20}"#).unwrap();
        Credits::build(&raw).unwrap()
    }

    fn commit(id: &str) -> Settlement {
        Settlement::Commit { reservation_id: id.to_owned(), amount: 5 }
    }

    fn status(status: u16) -> Option<(u16, Vec<u8>)> {
        Some((status, b"{}".to_vec()))
    }

    #[test]
    fn a_queued_commit_goes_out_from_the_root_and_a_200_settles_it() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(&mut host, commit("res_1"));
        assert!(host.sent_calls.is_empty(), "only the root context sends");
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 1);
        assert_eq!(host.sent_calls[0].path, "/v1/reservations/res_1/commit");
        assert_eq!(host.sent_calls[0].body, br#"{"amount":5}"#);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, status(200)), Answer::Done);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, status(200)), Answer::NotOurs);
    }

    #[test]
    fn a_handed_over_commit_goes_out_from_the_root_it_was_handed_to() {
        let (mut host, credits) = (FakeHost::default(), credits());
        let (mut worker, mut root) = (Settler::default(), Settler::default());
        worker.queue(&mut host, commit("r1"));
        worker.hand_over(&mut root);
        worker.send_due(&mut host, &credits);
        assert!(host.calls.is_empty(), "the worker kept a job it handed over");
        root.send_due(&mut host, &credits);
        assert_eq!(host.calls.len(), 1);
        assert!(root.is_waiting_for(1));
    }

    #[test]
    fn a_failed_commit_is_retried_with_backoff_until_the_service_answers() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(&mut host, commit("res_1"));
        settler.send_due(&mut host, &credits);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, None), Answer::Retrying);
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 1, "not before its backoff");
        host.now += 2;
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 2);
        assert_eq!(host.sent_calls[1], host.sent_calls[0], "the same commit, so the service's idempotency holds");
        assert_eq!(settler.on_answer(&mut host, &credits, 2, status(503)), Answer::Retrying);
        host.now += 4;
        settler.send_due(&mut host, &credits);
        assert_eq!(settler.on_answer(&mut host, &credits, 3, status(200)), Answer::Done);
        assert_eq!(host.metric(Metric::CreditRetries), 2);
    }

    #[test]
    fn settlements_due_together_go_in_one_batch_and_each_gets_its_own_answer() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(&mut host, commit("res_1"));
        settler.queue(&mut host, Settlement::Release { reservation_id: "res_2".to_owned() });
        settler.queue(&mut host, commit("res_3"));
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 1, "one call for three");
        assert_eq!(host.sent_calls[0].path, "/v1/batch");
        let body: serde_json::Value = serde_json::from_slice(&host.sent_calls[0].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"operations": [
                {"op": "commit", "reservation_id": "res_1", "amount": 5},
                {"op": "release", "reservation_id": "res_2"},
                {"op": "commit", "reservation_id": "res_3", "amount": 5}]})
        );
        let results = br#"{"results": [{"status": 200, "body": {}}, {"status": 409, "body": {}},
            {"status": 503, "body": {}}]}"#;
        assert_eq!(settler.on_answer(&mut host, &credits, 1, Some((200, results.to_vec()))), Answer::Retrying);
        host.now += 2;
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 2);
        assert_eq!(host.sent_calls[1].path, "/v1/reservations/res_3/commit", "only the one that failed, alone");

        settler.queue(&mut host, commit("res_4"));
        settler.queue(&mut host, commit("res_5"));
        settler.send_due(&mut host, &credits);
        assert_eq!(settler.on_answer(&mut host, &credits, 3, None), Answer::Retrying);
        host.now += 2;
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.last().unwrap().path, "/v1/batch", "a batch with no answer is retried whole");
    }

    #[test]
    fn retries_stop_after_retry_seconds_and_on_a_definite_refusal() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(&mut host, commit("res_1"));
        settler.send_due(&mut host, &credits);
        let mut token = 1;
        let mut answer = settler.on_answer(&mut host, &credits, token, None);
        while answer == Answer::Retrying {
            host.now += 30;
            settler.send_due(&mut host, &credits);
            token += 1;
            answer = settler.on_answer(&mut host, &credits, token, None);
        }
        assert_eq!(answer, Answer::GaveUp);
        assert!(host.sent_calls.len() <= 4, "{} attempts in 20 s", host.sent_calls.len());

        settler.queue(&mut host, commit("res_2"));
        settler.send_due(&mut host, &credits);
        let last = u32::try_from(host.calls.len()).unwrap();
        assert_eq!(settler.on_answer(&mut host, &credits, last, status(409)), Answer::GaveUp);
    }
}
