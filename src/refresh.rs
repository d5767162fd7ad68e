//! Keeps what JWT providers fetch through Envoy clusters fresh, from the root context: remote
//! JWKS and revocation lists, fetched at start, again every `refresh_seconds`, and retried with
//! backoff after a failure. A failed fetch keeps the last good copy: an unreachable identity
//! provider must not lock every caller out.
//!
//! Each Envoy worker runs its own VM with its own copies. Every document a worker fetches is also
//! put in Envoy's shared data, and every worker loads a newer one on its next tick, so a rotation
//! that one worker learned (say, by a refetch for an unknown `kid`) reaches them all.

use crate::auth::{AuthState, Provider, ProviderState, RemoteJwks};
use crate::common::{backoff_seconds, ConfigError};
use crate::config::Config;
use crate::host::{Callout, Host};
use crate::metrics::Metric;

/// What a remote source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jwks,
    RevokedJti,
}

#[derive(Debug)]
struct Source {
    provider: usize,
    kind: Kind,
    next_fetch_at: u64,
    in_flight: Option<u32>,
    failures: u32,
    /// The shared-data version of the document this worker loaded last.
    shared_version: Option<u32>,
}

pub struct Refresher {
    sources: Vec<Source>,
}

impl Refresher {
    pub fn new(config: &Config) -> Refresher {
        let mut sources = Vec::new();
        for (provider, p) in config.auth.providers().iter().enumerate() {
            let kinds = [(Kind::Jwks, p.remote_jwks().is_some()), (Kind::RevokedJti, p.revocation_source().is_some())];
            for (kind, present) in kinds {
                if present {
                    sources.push(Source {
                        provider,
                        kind,
                        next_fetch_at: 0,
                        in_flight: None,
                        failures: 0,
                        shared_version: None,
                    });
                }
            }
        }
        Refresher { sources }
    }

    pub fn is_needed(&self) -> bool {
        !self.sources.is_empty()
    }

    /// `auth` is this worker's state, where what is fetched is installed.
    pub fn on_tick(&mut self, config: &Config, auth: &AuthState, host: &mut dyn Host) {
        self.load_shared(config, auth, host);
        let now = host.now();
        for source in &mut self.sources {
            let Some(provider) = config.auth.providers().get(source.provider) else { continue };
            let Some(remote) = source.kind.remote(provider) else { continue };
            if source.in_flight.is_some() || now < source.next_fetch_at {
                continue;
            }
            host.count(Metric::RemoteFetches, 1);
            match host.http_call(&Callout::get(&remote.cluster, &remote.authority, &remote.path, remote.timeout_ms)) {
                Some(token) => source.in_flight = Some(token),
                None => {
                    host.count(Metric::RemoteFetchFailures, 1);
                    source.failures = source.failures.saturating_add(1);
                    source.next_fetch_at = now.saturating_add(backoff_seconds(source.failures));
                }
            }
        }
    }

    /// Loads every document another worker (or, natively, the main thread) stored in shared data
    /// since this worker last looked; fetches nothing. The native build's worker threads have no
    /// tick of their own and call this alone.
    pub fn load_shared(&mut self, config: &Config, auth: &AuthState, host: &dyn Host) {
        for source in &mut self.sources {
            let Some(provider) = config.auth.providers().get(source.provider) else { continue };
            let Some(state) = auth.provider(source.provider) else { continue };
            let Some(remote) = source.kind.remote(provider) else { continue };
            if let Some((body, version)) = host.shared_get(&shared_key(remote)) {
                if source.shared_version != Some(version) && source.kind.load(state, &body).is_ok() {
                    source.shared_version = Some(version);
                }
            }
        }
    }

    /// A fetch came back: `body` is `Some` only for a 200 answer.
    pub fn on_response(
        &mut self,
        config: &Config,
        auth: &AuthState,
        token: u32,
        body: Option<Vec<u8>>,
        host: &mut dyn Host,
    ) {
        let now = host.now();
        let Some(source) = self.sources.iter_mut().find(|s| s.in_flight == Some(token)) else { return };
        source.in_flight = None;
        let Some(provider) = config.auth.providers().get(source.provider) else { return };
        let Some(state) = auth.provider(source.provider) else { return };
        let Some(remote) = source.kind.remote(provider) else { return };
        let what = format!("provider {} {:?} from {}{}", source.provider, source.kind, remote.cluster, remote.path);
        let loaded = match &body {
            // Unchanged: this worker loads the shared copy on its tick if it has not yet.
            Some(body) if is_shared(host, remote, body) => true,
            Some(body) => match source.kind.load(state, body) {
                Ok(()) => {
                    host.shared_set(&shared_key(remote), body);
                    true
                }
                Err(err) => {
                    log::warn!("tollgate: {what} rejected, keeping the last good copy: {err}");
                    false
                }
            },
            None => {
                log::warn!("tollgate: {what}: fetch failed, keeping the last good copy");
                false
            }
        };
        if loaded {
            source.failures = 0;
            source.next_fetch_at = now.saturating_add(remote.refresh_seconds);
        } else {
            host.count(Metric::RemoteFetchFailures, 1);
            source.failures = source.failures.saturating_add(1);
            source.next_fetch_at = now.saturating_add(backoff_seconds(source.failures).min(remote.refresh_seconds));
        }
    }
}

impl Kind {
    fn remote(self, provider: &Provider) -> Option<&RemoteJwks> {
        match self {
            Kind::Jwks => provider.remote_jwks(),
            Kind::RevokedJti => provider.revocation_source(),
        }
    }

    fn load(self, state: &ProviderState, body: &[u8]) -> Result<(), ConfigError> {
        match self {
            Kind::Jwks => state.load_remote_jwks(body).map(|report| {
                for skipped in &report.skipped {
                    log::warn!("tollgate: JWKS key left out: {skipped}");
                }
            }),
            Kind::RevokedJti => state.load_revoked_jti(body).map(|_| ()),
        }
    }
}

/// A JWKS whose `kid` is unknown is fetched again at most this often per provider and Envoy
/// process, so tokens with made-up key ids cannot make the gateway hammer the identity provider.
const REFETCH_INTERVAL_SECONDS: u64 = 10;

/// Whether a stream may refetch `source` for an unknown `kid` now: once per interval for the whole
/// process, claimed by compare-and-swap in shared data, whichever worker sees the token.
pub fn may_refetch(source: &RemoteJwks, host: &mut dyn Host, now: u64) -> bool {
    let key = format!("{}.refetched", shared_key(source));
    let (last, version) = match host.shared_get(&key) {
        Some((value, version)) => (<[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_le_bytes), Some(version)),
        None => (0, None),
    };
    now >= last.saturating_add(REFETCH_INTERVAL_SECONDS) && host.shared_swap(&key, &now.to_le_bytes(), version)
}

/// Loads a JWKS a stream fetched for an unknown `kid` into this worker's `state` of `provider`,
/// and shares it with the other workers — unless it is the document they all have already: a new
/// shared version makes every worker reload it and drop its verified tokens.
pub fn load_refetched(provider: &Provider, state: &ProviderState, body: &[u8], host: &mut dyn Host) {
    let Some(source) = provider.remote_jwks() else { return };
    if is_shared(host, source, body) {
        return;
    }
    match state.load_remote_jwks(body) {
        Ok(_) => host.shared_set(&shared_key(source), body),
        Err(err) => log::warn!("tollgate: JWKS refetch ignored: {err}"),
    }
}

/// Whether shared data holds exactly `body` for `source` already.
fn is_shared(host: &dyn Host, source: &RemoteJwks, body: &[u8]) -> bool {
    host.shared_get(&shared_key(source)).is_some_and(|(current, _)| current == body)
}

/// One shared-data entry per remote source (a handful, whatever the traffic), named after where
/// it comes from so two filters with the same source share it.
fn shared_key(source: &RemoteJwks) -> String {
    format!("tollgate.remote.{}.{}{}", source.cluster, source.authority, source.path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost as Fake;

    /// An Ed25519 key (x = 32 bytes of 1): remote key sets hold public keys only.
    const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}]}"#;

    fn config() -> Config {
        Config::from_json(
            br#"{"policies": {}, "auth": {"jwt": {"providers": [{"audiences": "any",
                "remote_jwks": {"cluster": "idp", "path": "/jwks", "refresh_seconds": 600},
                "revoked_jti_remote": {"cluster": "idp", "path": "/revoked", "refresh_seconds": 60}}]}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn fetches_at_start_then_on_schedule_and_backs_off_after_failures() {
        let config = config();
        let auth = AuthState::new(&config.auth);
        let mut refresher = Refresher::new(&config);
        let mut host = Fake { now: 1000, ..Fake::default() };
        refresher.on_tick(&config, &auth, &mut host);
        assert_eq!(host.calls, ["idp/jwks", "idp/revoked"]);
        refresher.on_tick(&config, &auth, &mut host);
        assert_eq!(host.calls.len(), 2, "no second fetch while one is in flight");

        refresher.on_response(&config, &auth, 1, Some(JWKS.as_bytes().to_vec()), &mut host);
        refresher.on_response(&config, &auth, 2, None, &mut host);
        assert!(auth.provider(0).unwrap().has_remote_keys());
        assert!(host.shared.contains_key("tollgate.remote.idp.idp/jwks"), "the JWKS was not shared");

        host.now = 1001;
        refresher.on_tick(&config, &auth, &mut host);
        assert_eq!(host.calls.last().map(String::as_str), Some("idp/revoked"), "a failure retries after 1 s");
        refresher.on_response(&config, &auth, 3, None, &mut host);
        host.now = 1002;
        refresher.on_tick(&config, &auth, &mut host);
        assert_eq!(host.calls.len(), 3, "the second failure waits 2 s");
        host.now = 1600;
        refresher.on_tick(&config, &auth, &mut host);
        assert!(host.calls.contains(&"idp/jwks".to_owned()) && host.calls.len() == 5, "{:?}", host.calls);
    }

    #[test]
    fn a_bad_document_keeps_the_last_good_copy() {
        let config = config();
        let auth = AuthState::new(&config.auth);
        let mut refresher = Refresher::new(&config);
        let mut host = Fake { now: 0, ..Fake::default() };
        refresher.on_tick(&config, &auth, &mut host);
        refresher.on_response(&config, &auth, 1, Some(JWKS.as_bytes().to_vec()), &mut host);
        host.now = 700;
        refresher.on_tick(&config, &auth, &mut host);
        refresher.on_response(&config, &auth, 3, Some(b"{not json".to_vec()), &mut host);
        assert!(auth.provider(0).unwrap().has_remote_keys());
    }

    #[test]
    fn another_workers_copy_is_loaded_from_shared_data() {
        let config = config();
        let auth = AuthState::new(&config.auth);
        let mut refresher = Refresher::new(&config);
        let mut host = Fake::default();
        host.shared_set("tollgate.remote.idp.idp/jwks", JWKS.as_bytes());
        refresher.on_tick(&config, &auth, &mut host);
        assert!(auth.provider(0).unwrap().has_remote_keys());
    }

    #[test]
    fn an_unknown_kid_refetches_once_per_interval_for_the_whole_process() {
        let config = config();
        let remote = config.auth.providers()[0].remote_jwks().unwrap();
        // One FakeHost is the process's shared data, whichever worker asks.
        let mut host = Fake::default();
        assert!(may_refetch(remote, &mut host, 1000));
        assert!(!may_refetch(remote, &mut host, 1000), "a second worker, the same second");
        assert!(!may_refetch(remote, &mut host, 1009));
        assert!(may_refetch(remote, &mut host, 1010));
    }

    #[test]
    fn a_refetch_of_the_same_document_changes_nothing_any_worker_sees() {
        let config = config();
        let auth = AuthState::new(&config.auth);
        let provider = &config.auth.providers()[0];
        let mut host = Fake::default();
        load_refetched(provider, auth.provider(0).unwrap(), JWKS.as_bytes(), &mut host);
        let version = host.shared["tollgate.remote.idp.idp/jwks"].1;
        load_refetched(provider, auth.provider(0).unwrap(), JWKS.as_bytes(), &mut host);
        assert_eq!(host.shared["tollgate.remote.idp.idp/jwks"].1, version, "no new version: no worker drops its cache");
    }
}
