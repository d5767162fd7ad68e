//! Keeps each JWT provider's remote JWKS fresh from the root context: fetched at start, again
//! every `refresh_seconds`, and retried with backoff after a failure. A failed fetch keeps the
//! last good key set: an unreachable identity provider must not lock every caller out.
//!
//! Each Envoy worker runs its own VM with its own key sets. Every set a worker fetches is also put
//! in Envoy's shared data, and every worker loads a newer one on its next tick, so a rotation
//! that one worker learned (say, by a refetch for an unknown `kid`) reaches them all.

use crate::auth::{Provider, RemoteJwks};
use crate::config::Config;
use crate::host::Host;

/// Retry delays after a failure grow to this; a set that never loaded is retried at least this
/// often, since until then the provider's requests get 503.
const MAX_RETRY_SECONDS: u64 = 30;

#[derive(Debug, Default, Clone, Copy)]
struct Remote {
    next_fetch_at: u64,
    in_flight: Option<u32>,
    failures: u32,
    /// The shared-data version of the set this worker loaded last.
    shared_version: Option<u32>,
}

pub struct JwksFetcher {
    /// Per provider, in config order; `None` for providers with inline keys only.
    remotes: Vec<Option<Remote>>,
}

impl JwksFetcher {
    pub fn new(config: &Config) -> JwksFetcher {
        let remotes = config.auth.providers().iter().map(|p| p.remote_jwks().map(|_| Remote::default())).collect();
        JwksFetcher { remotes }
    }

    pub fn is_needed(&self) -> bool {
        self.remotes.iter().any(Option::is_some)
    }

    pub fn on_tick(&mut self, config: &Config, host: &mut dyn Host) {
        let now = host.now();
        for (index, slot) in self.remotes.iter_mut().enumerate() {
            let (Some(remote), Some(provider)) = (slot.as_mut(), config.auth.providers().get(index)) else { continue };
            let Some(source) = provider.remote_jwks() else { continue };
            if let Some((body, version)) = host.shared_get(&shared_key(source)) {
                if remote.shared_version != Some(version) && provider.load_remote_jwks(&body).is_ok() {
                    remote.shared_version = Some(version);
                }
            }
            if remote.in_flight.is_some() || now < remote.next_fetch_at {
                continue;
            }
            match host.http_get(&source.cluster, &source.authority, &source.path, source.timeout_ms) {
                Some(token) => remote.in_flight = Some(token),
                None => {
                    log::warn!("tollgate: cannot fetch the JWKS of provider {index} from cluster {:?}", source.cluster);
                    remote.failures = remote.failures.saturating_add(1);
                    remote.next_fetch_at = now.saturating_add(backoff(remote.failures));
                }
            }
        }
    }

    /// A fetch came back: `body` is `Some` only for a 200 answer.
    pub fn on_response(&mut self, config: &Config, token: u32, body: Option<Vec<u8>>, host: &mut dyn Host) {
        let now = host.now();
        let found = self.remotes.iter_mut().enumerate().find(|(_, r)| r.is_some_and(|r| r.in_flight == Some(token)));
        let Some((index, Some(remote))) = found else { return };
        remote.in_flight = None;
        let (Some(provider), Some(source)) =
            (config.auth.providers().get(index), config.auth.providers().get(index).and_then(|p| p.remote_jwks()))
        else {
            return;
        };
        let loaded = match body.as_ref().map(|b| provider.load_remote_jwks(b)) {
            Some(Ok(report)) => {
                for skipped in &report.skipped {
                    log::warn!("tollgate: provider {index} JWKS: key left out: {skipped}");
                }
                if let Some(body) = &body {
                    host.shared_set(&shared_key(source), body);
                }
                true
            }
            Some(Err(err)) => {
                log::warn!("tollgate: provider {index} JWKS rejected, keeping the last good set: {err}");
                false
            }
            None => {
                log::warn!("tollgate: provider {index} JWKS fetch failed, keeping the last good set");
                false
            }
        };
        if loaded {
            remote.failures = 0;
            remote.next_fetch_at = now.saturating_add(source.refresh_seconds);
        } else {
            remote.failures = remote.failures.saturating_add(1);
            let retry = backoff(remote.failures);
            let retry = if provider.has_remote_keys() { retry.min(source.refresh_seconds) } else { retry };
            remote.next_fetch_at = now.saturating_add(retry);
        }
    }
}

/// Loads a JWKS a stream fetched for an unknown `kid`, and shares it with the other workers.
pub fn load_refetched(provider: &Provider, body: &[u8], host: &mut dyn Host) {
    let Some(source) = provider.remote_jwks() else { return };
    match provider.load_remote_jwks(body) {
        Ok(_) => host.shared_set(&shared_key(source), body),
        Err(err) => log::warn!("tollgate: JWKS refetch ignored: {err}"),
    }
}

/// One shared-data entry per JWKS source (a handful, whatever the traffic), named after where it
/// comes from so two filters with the same source share it.
fn shared_key(source: &RemoteJwks) -> String {
    format!("tollgate.jwks.{}.{}{}", source.cluster, source.authority, source.path)
}

/// 1, 2, 4, … seconds, up to `MAX_RETRY_SECONDS`.
fn backoff(failures: u32) -> u64 {
    1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX).min(MAX_RETRY_SECONDS)
}
