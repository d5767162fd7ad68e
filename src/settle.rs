//! Commits and releases. A stream queues its settlement and wakes the worker's root context, which
//! sends it: a callout's answer goes to the context that made it, and the root outlives every
//! stream, so the response being sent or the client leaving never drops one. A failed one is
//! retried with backoff until the credit service gives a definite answer or
//! `credits.retry_seconds` runs out.

use std::collections::HashMap;

use crate::credits::{Credits, Settlement};
use crate::host::{Host, NANOS_PER_MS, NANOS_PER_SECOND};
use crate::metrics::Metric;

const MAX_BACKOFF_SECONDS: u64 = 30;

#[derive(Debug)]
struct Job {
    settlement: Settlement,
    /// When it was first sent (Unix nanoseconds): retries stop `retry_seconds` after that.
    first_sent: u64,
    /// When the current attempt was sent, for the latency histogram.
    sent: u64,
    attempts: u32,
    /// For a job waiting to be retried: when (Unix nanoseconds).
    due: u64,
}

/// One worker's commits and releases: waiting to be sent (now, or for a retry), or in flight.
#[derive(Debug, Default)]
pub struct Settler {
    in_flight: HashMap<u32, Job>,
    waiting: Vec<Job>,
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
    pub fn queue(&mut self, settlement: Settlement, now: u64) {
        self.waiting.push(Job { settlement, first_sent: now, sent: now, attempts: 0, due: now });
    }

    fn dispatch(&mut self, host: &mut dyn Host, credits: &Credits, mut job: Job) {
        job.attempts += 1;
        job.sent = host.now_nanos();
        host.count(Metric::CreditCallouts, 1);
        match host.http_call(&credits.settle(&job.settlement)) {
            Some(token) => {
                self.in_flight.insert(token, job);
            }
            None => {
                host.count(Metric::CreditCalloutFailures, 1);
                self.retry_later(host, credits, job);
            }
        }
    }

    /// The credit service's answer (`None`: no answer, e.g. a timeout) to callout `token`.
    pub fn on_answer(&mut self, host: &mut dyn Host, credits: &Credits, token: u32, status: Option<u16>) -> Answer {
        let Some(job) = self.in_flight.remove(&token) else { return Answer::NotOurs };
        let elapsed = host.now_nanos().saturating_sub(job.sent) / NANOS_PER_MS;
        host.count(Metric::CreditCalloutMilliseconds, elapsed);
        match status {
            Some(200) => Answer::Done,
            // The service looked and refused (committed elsewhere, released, expired, unknown):
            // sending it again cannot change that.
            Some(404 | 409 | 422) => {
                host.count(Metric::CreditCalloutFailures, 1);
                log::error!(
                    "tollgate: credit service refused {} for reservation {}: status {}",
                    job.settlement.action(),
                    job.settlement.reservation_id,
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

    fn retry_later(&mut self, host: &mut dyn Host, credits: &Credits, mut job: Job) -> Answer {
        let now = host.now_nanos();
        let backoff = (1u64 << job.attempts.min(5)).min(MAX_BACKOFF_SECONDS);
        job.due = now.saturating_add(backoff * NANOS_PER_SECOND);
        if job.due.saturating_sub(job.first_sent) > credits.retry_seconds * NANOS_PER_SECOND {
            log::error!(
                "tollgate: gave up on {} for reservation {} after {} attempts; the credit service's expiry releases it",
                job.settlement.action(),
                job.settlement.reservation_id,
                job.attempts
            );
            return Answer::GaveUp;
        }
        self.waiting.push(job);
        Answer::Retrying
    }

    /// Sends what is due: new settlements, and retries whose backoff has passed. The root context
    /// calls this when a stream wakes it, and on every tick.
    pub fn send_due(&mut self, host: &mut dyn Host, credits: &Credits) {
        let now = host.now_nanos();
        let (due, later): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|j| j.due <= now);
        self.waiting = later;
        for job in due {
            if job.attempts > 0 {
                host.count(Metric::CreditRetries, 1);
            }
            self.dispatch(host, credits, job);
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
        Settlement { reservation_id: id.to_owned(), charge: Some(5) }
    }

    #[test]
    fn a_queued_commit_goes_out_from_the_root_and_a_200_settles_it() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(commit("res_1"), host.now_nanos());
        assert!(host.sent_calls.is_empty(), "only the root context sends");
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 1);
        assert_eq!(host.sent_calls[0].path, "/v1/reservations/res_1/commit");
        assert_eq!(host.sent_calls[0].body, br#"{"amount":5}"#);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, Some(200)), Answer::Done);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, Some(200)), Answer::NotOurs);
    }

    #[test]
    fn a_failed_commit_is_retried_with_backoff_until_the_service_answers() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(commit("res_1"), host.now_nanos());
        settler.send_due(&mut host, &credits);
        assert_eq!(settler.on_answer(&mut host, &credits, 1, None), Answer::Retrying);
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 1, "not before its backoff");
        host.now += 2;
        settler.send_due(&mut host, &credits);
        assert_eq!(host.sent_calls.len(), 2);
        assert_eq!(host.sent_calls[1], host.sent_calls[0], "the same commit, so the service's idempotency holds");
        assert_eq!(settler.on_answer(&mut host, &credits, 2, Some(503)), Answer::Retrying);
        host.now += 4;
        settler.send_due(&mut host, &credits);
        assert_eq!(settler.on_answer(&mut host, &credits, 3, Some(200)), Answer::Done);
        assert_eq!(host.metric(Metric::CreditRetries), 2);
    }

    #[test]
    fn retries_stop_after_retry_seconds_and_on_a_definite_refusal() {
        let (credits, mut host, mut settler) = (credits(), FakeHost::default(), Settler::default());
        settler.queue(commit("res_1"), host.now_nanos());
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

        settler.queue(commit("res_2"), host.now_nanos());
        settler.send_due(&mut host, &credits);
        let last = u32::try_from(host.calls.len()).unwrap();
        assert_eq!(settler.on_answer(&mut host, &credits, last, Some(409)), Answer::GaveUp);
    }
}
