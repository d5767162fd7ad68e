//! The filter's own metrics. Envoy exports them with its stats: `/stats/prometheus` shows each under
//! its name (`tollgate_requests_allowed`), `/stats` as `wasmcustom.<name>`. Every worker adds to
//! the same stat.

/// A counter, or a histogram where the name says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests the filter let through to the upstream.
    Allowed,
    /// Requests the filter answered itself, by status.
    Denied400,
    Denied401,
    Denied402,
    Denied403,
    Denied404,
    Denied413,
    Denied415,
    Denied429,
    Denied500,
    Denied503,
    /// Compare-and-swaps a rate-limit update lost to another worker and retried.
    RateLimitCasRetries,
    /// Rate-limit updates that kept losing races and were refused.
    RateLimitContended,
    /// JWKS and revocation-list fetches made, and those that failed.
    RemoteFetches,
    RemoteFetchFailures,
    /// Credit service callouts made (reserve, commit, release), and those that failed.
    CreditCallouts,
    CreditCalloutFailures,
    /// Histogram: milliseconds from a credit callout to its answer.
    CreditCalloutMilliseconds,
    /// Commits and releases retried from the root context after a failure.
    CreditRetries,
    /// Commits and releases dropped because a worker's queue was full (the credit service down
    /// for long under load).
    CreditSettlementsDropped,
    /// Tokens refused from a worker's memory of refused tokens, without a signature check.
    AuthRefusalsRemembered,
}

impl Metric {
    pub const ALL: [Metric; 21] = [
        Metric::Allowed,
        Metric::Denied400,
        Metric::Denied401,
        Metric::Denied402,
        Metric::Denied403,
        Metric::Denied404,
        Metric::Denied413,
        Metric::Denied415,
        Metric::Denied429,
        Metric::Denied500,
        Metric::Denied503,
        Metric::RateLimitCasRetries,
        Metric::RateLimitContended,
        Metric::RemoteFetches,
        Metric::RemoteFetchFailures,
        Metric::CreditCallouts,
        Metric::CreditCalloutFailures,
        Metric::CreditCalloutMilliseconds,
        Metric::CreditRetries,
        Metric::CreditSettlementsDropped,
        Metric::AuthRefusalsRemembered,
    ];

    /// The stat name, as Prometheus shows it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "tollgate_requests_allowed",
            Metric::Denied400 => "tollgate_requests_denied_400",
            Metric::Denied401 => "tollgate_requests_denied_401",
            Metric::Denied402 => "tollgate_requests_denied_402",
            Metric::Denied403 => "tollgate_requests_denied_403",
            Metric::Denied404 => "tollgate_requests_denied_404",
            Metric::Denied413 => "tollgate_requests_denied_413",
            Metric::Denied415 => "tollgate_requests_denied_415",
            Metric::Denied429 => "tollgate_requests_denied_429",
            Metric::Denied500 => "tollgate_requests_denied_500",
            Metric::Denied503 => "tollgate_requests_denied_503",
            Metric::RateLimitCasRetries => "tollgate_ratelimit_cas_retries",
            Metric::RateLimitContended => "tollgate_ratelimit_contended",
            Metric::RemoteFetches => "tollgate_remote_fetches",
            Metric::RemoteFetchFailures => "tollgate_remote_fetch_failures",
            Metric::CreditCallouts => "tollgate_credit_callouts",
            Metric::CreditCalloutFailures => "tollgate_credit_callout_failures",
            Metric::CreditCalloutMilliseconds => "tollgate_credit_callout_ms",
            Metric::CreditRetries => "tollgate_credit_retries",
            Metric::CreditSettlementsDropped => "tollgate_credit_settlements_dropped",
            Metric::AuthRefusalsRemembered => "tollgate_auth_refusals_remembered",
        }
    }

    pub fn is_histogram(self) -> bool {
        self == Metric::CreditCalloutMilliseconds
    }

    /// The counter for a response the filter made itself.
    pub fn denied(status: u16) -> Metric {
        match status {
            400 => Metric::Denied400,
            401 => Metric::Denied401,
            402 => Metric::Denied402,
            403 => Metric::Denied403,
            404 => Metric::Denied404,
            413 => Metric::Denied413,
            415 => Metric::Denied415,
            429 => Metric::Denied429,
            500 => Metric::Denied500,
            _ => Metric::Denied503,
        }
    }

    /// Its place in `ALL` (declaration order), which is also where the adapter keeps its id.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_the_filter_answers_has_its_own_counter() {
        for status in [400, 401, 402, 403, 404, 413, 415, 429, 500, 503] {
            assert!(Metric::denied(status).name().ends_with(&status.to_string()), "{status}");
        }
        let names: std::collections::HashSet<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), Metric::ALL.len());
        assert!(Metric::ALL.iter().enumerate().all(|(i, m)| m.index() == i));
    }
}
