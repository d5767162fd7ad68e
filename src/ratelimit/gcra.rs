//! One rate-limit window as GCRA (the generic cell rate algorithm, RFC 2697's cousin used by ATM
//! and redis-cell).
//!
//! Why GCRA: a window's whole state is one number, the theoretical arrival time (TAT), so every
//! window of a caller fits in one small shared-data value that one compare-and-swap updates. It
//! is exact (no sampling, no fixed-window edge where 2N requests pass around a boundary), and a
//! refused request writes nothing. `limit` per `period` is a bucket of `capacity` requests
//! (`limit` unless `burst` lowers it) that refills evenly, one request every `period / limit`.

use crate::host::NANOS_PER_SECOND;

/// How long a window's quota takes to refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Second, Period::Minute, Period::Hour, Period::Day];

    pub fn seconds(self) -> u64 {
        match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3_600,
            Period::Day => 86_400,
        }
    }

    /// The config field that sets this period's limit.
    pub fn field(self) -> &'static str {
        match self {
            Period::Second => "per_second",
            Period::Minute => "per_minute",
            Period::Hour => "per_hour",
            Period::Day => "per_day",
        }
    }
}

/// One limit on one caller: `limit` requests per `period`, at most `capacity` back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub period: Period,
    pub limit: u64,
    pub capacity: u64,
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// Where this window's TAT sits in a caller's shared-data value.
    pub position: usize,
}

/// What a window says about one more request at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; store `tat`. `remaining` more would pass right now; the bucket is full again
    /// `full_in` nanoseconds from now.
    Allow { tat: u64, remaining: u64, full_in: u64 },
    /// Refused; one request will pass `wait` nanoseconds from now.
    Deny { wait: u64, full_in: u64 },
}

impl Window {
    /// `limit` and `capacity` are at least 1 and `capacity <= limit` (validated by the config).
    pub fn new(period: Period, limit: u64, capacity: u64, position: usize) -> Window {
        let interval = (period.seconds() * NANOS_PER_SECOND / limit.max(1)).max(1);
        Window { period, limit, capacity: capacity.clamp(1, limit.max(1)), interval, position }
    }

    /// Decides one request at `now` (nanoseconds) against the stored `tat` (0 for a fresh caller).
    pub fn check(&self, tat: u64, now: u64) -> Verdict {
        let start = tat.max(now);
        let next = start.saturating_add(self.interval);
        let horizon = self.capacity.saturating_mul(self.interval);
        let ahead = next - now;
        if ahead > horizon {
            Verdict::Deny { wait: ahead - horizon, full_in: start - now }
        } else {
            Verdict::Allow { tat: next, remaining: (horizon - ahead) / self.interval, full_in: ahead }
        }
    }
}

/// Whole seconds, rounded up: a client told to wait this long is not refused for waiting too little.
pub fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000 * NANOS_PER_SECOND;

    fn run(window: &Window, tat: &mut u64, now: u64) -> Verdict {
        let verdict = window.check(*tat, now);
        if let Verdict::Allow { tat: next, .. } = verdict {
            *tat = next;
        }
        verdict
    }

    #[test]
    fn a_full_bucket_allows_the_limit_back_to_back_then_refuses() {
        let w = Window::new(Period::Minute, 5, 5, 0);
        let mut tat = 0;
        for expected in (0..5).rev() {
            match run(&w, &mut tat, T0) {
                Verdict::Allow { remaining, .. } => assert_eq!(remaining, expected),
                other => panic!("refused early: {other:?}"),
            }
        }
        match run(&w, &mut tat, T0) {
            Verdict::Deny { wait, full_in } => {
                assert_eq!(wait, 12 * NANOS_PER_SECOND, "one request refills every 60/5 s");
                assert_eq!(full_in, 60 * NANOS_PER_SECOND);
            }
            other => panic!("allowed over the limit: {other:?}"),
        }
    }

    #[test]
    fn waiting_exactly_the_told_time_passes_and_a_moment_less_does_not() {
        let w = Window::new(Period::Second, 3, 3, 0);
        let mut tat = 0;
        for _ in 0..3 {
            run(&w, &mut tat, T0);
        }
        let Verdict::Deny { wait, .. } = run(&w, &mut tat, T0) else { panic!("not refused") };
        assert!(matches!(run(&w, &mut tat, T0 + wait - 1), Verdict::Deny { .. }));
        assert!(matches!(run(&w, &mut tat, T0 + wait), Verdict::Allow { remaining: 0, .. }));
        assert_eq!(ceil_seconds(wait), 1);
    }

    #[test]
    fn burst_lowers_the_bucket_but_not_the_rate() {
        let w = Window::new(Period::Minute, 60, 2, 0);
        let mut tat = 0;
        assert!(matches!(run(&w, &mut tat, T0), Verdict::Allow { remaining: 1, .. }));
        assert!(matches!(run(&w, &mut tat, T0), Verdict::Allow { remaining: 0, .. }));
        assert!(matches!(run(&w, &mut tat, T0), Verdict::Deny { wait, .. } if wait == NANOS_PER_SECOND));
        // After the burst, one a second: the sustained rate is still 60 a minute.
        let allowed =
            (0..600).filter(|i| matches!(run(&w, &mut tat, T0 + i * NANOS_PER_SECOND / 10), Verdict::Allow { .. }));
        assert_eq!(allowed.count(), 59);
    }

    #[test]
    fn an_idle_caller_is_back_to_a_full_bucket() {
        let w = Window::new(Period::Hour, 10, 10, 0);
        let mut tat = 0;
        for _ in 0..10 {
            run(&w, &mut tat, T0);
        }
        assert!(matches!(w.check(tat, T0), Verdict::Deny { .. }));
        assert!(matches!(w.check(tat, T0 + 360 * NANOS_PER_SECOND), Verdict::Allow { remaining: 0, .. }));
        assert!(matches!(w.check(tat, T0 + 3_600 * NANOS_PER_SECOND), Verdict::Allow { remaining: 9, .. }));
    }

    #[test]
    fn huge_limits_keep_a_nonzero_interval() {
        let w = Window::new(Period::Second, u64::MAX, u64::MAX, 0);
        assert!(matches!(w.check(0, T0), Verdict::Allow { .. }));
    }
}
