//! `tollgate-credit`: the prepaid-credit ledger tollgate's filter reserves, commits and releases
//! credits against. Command line, startup, the expiry sweeper and graceful shutdown.

mod app;
mod error;
mod ledger;
mod postgres;
mod sqlite;
mod store;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{app, AppState};
use crate::error::LedgerError;
use crate::store::Ledger;

/// tollgate's credit service: accounts, top-ups, per-request reservations and gateway grants over HTTP/JSON,
/// kept in a SQLite file or a PostgreSQL database.
///
/// Once it listens it prints one line to stdout, `listening on ADDR:PORT`; logs go to stderr
/// (RUST_LOG sets the level, default info). SIGINT or SIGTERM stops it gracefully.
#[derive(Parser, Debug)]
#[command(name = "tollgate-credit", version)]
struct Cli {
    /// Address to listen on. Port 0 picks a free port; the line on stdout tells which.
    #[arg(long, value_name = "ADDR", env = "TOLLGATE_CREDIT_LISTEN", default_value = "127.0.0.1:8081")]
    listen: String,

    /// Where the ledger lives: `sqlite://PATH` or `sqlite:PATH` (a file, created if missing) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` (the database must exist; tables are created).
    #[arg(long, value_name = "URL", env = "TOLLGATE_CREDIT_DATABASE", default_value = "sqlite://tollgate-credit.db")]
    database: String,

    /// Bearer token of the gateway: reservations, commit, release, reading a balance.
    #[arg(long, value_name = "TOKEN", env = "TOLLGATE_CREDIT_SERVICE_TOKEN", hide_env_values = true)]
    service_token: String,

    /// Bearer token of operators: creating accounts, top-ups, the transaction journal, reading a balance.
    #[arg(long, value_name = "TOKEN", env = "TOLLGATE_CREDIT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,

    /// Reservations neither committed nor released within this many seconds are released by the
    /// service (journal kind `expire`). Keep it above the gateway's longest upstream timeout.
    #[arg(long, value_name = "SECONDS", env = "TOLLGATE_CREDIT_RESERVATION_TTL_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400 * 365))]
    reservation_ttl_seconds: u64,

    /// How often the sweeper looks for expired reservations and grants.
    #[arg(long, value_name = "SECONDS", env = "TOLLGATE_CREDIT_SWEEP_INTERVAL_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    sweep_interval_seconds: u64,
}

/// The shortest token the service accepts: 32 bytes, as `openssl rand -hex 16` gives.
const MIN_TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("--{0} must be at least {MIN_TOKEN_BYTES} bytes: a short token can be guessed")]
    ShortToken(&'static str),
    #[error("--service-token and --admin-token must differ, or the gateway could top up accounts")]
    SameTokens,
    #[error("opening the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("listening on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[tokio::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,sqlx=warn")).init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), StartError> {
    if cli.service_token.trim().len() < MIN_TOKEN_BYTES {
        return Err(StartError::ShortToken("service-token"));
    }
    if cli.admin_token.trim().len() < MIN_TOKEN_BYTES {
        return Err(StartError::ShortToken("admin-token"));
    }
    if cli.service_token == cli.admin_token {
        return Err(StartError::SameTokens);
    }

    let ledger = Ledger::open(&cli.database).await?;
    // The URL may hold a password: name the backend, not the URL.
    let backend = ledger.backend();
    let state = Arc::new(AppState::new(ledger, &cli.service_token, &cli.admin_token));

    let listener =
        TcpListener::bind(&cli.listen).await.map_err(|source| StartError::Bind { addr: cli.listen.clone(), source })?;
    let addr = listener.local_addr()?;
    log::info!(
        "tollgate-credit {} on {addr}, ledger on {backend}, reservations expire after {}s",
        env!("CARGO_PKG_VERSION"),
        cli.reservation_ttl_seconds
    );
    // The one line on stdout: whoever started us (the gateway's tests) reads the port from it.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);

    let (stop, stopped) = watch::channel(false);
    let sweeper = tokio::spawn(sweep(
        Arc::clone(&state),
        Duration::from_secs(cli.reservation_ttl_seconds),
        Duration::from_secs(cli.sweep_interval_seconds),
        stopped,
    ));

    axum::serve(listener, app(Arc::clone(&state))).with_graceful_shutdown(shutdown_signal()).await?;
    log::info!("stopped accepting; in-flight requests are done");
    let _ = stop.send(true);
    if let Err(e) = sweeper.await {
        log::warn!("sweeper: {e}");
    }
    state.ledger.close().await;
    Ok(())
}

/// Releases reservations older than `ttl` and settles grants nobody reported on for twice their
/// lifetime, every `interval`, until told to stop.
async fn sweep(state: Arc<AppState>, ttl: Duration, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let cutoff = SystemTime::now().checked_sub(ttl).unwrap_or(SystemTime::UNIX_EPOCH);
        match state.ledger.expire_held_before(cutoff).await {
            Ok(0) => {}
            Ok(n) => log::info!("expired {n} reservation(s) held longer than {}s", ttl.as_secs()),
            // The database may be back by the next tick; nothing is lost by waiting.
            Err(e) => log::warn!("sweeper: {e}"),
        }
        match state.ledger.expire_grants(SystemTime::now()).await {
            Ok(0) => {}
            Ok(n) => log::info!("settled {n} grant(s) nobody reported on for twice their lifetime"),
            Err(e) => log::warn!("sweeper: {e}"),
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM ({e}); only SIGINT stops the service");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if let Err(e) = result {
                log::warn!("cannot listen for SIGINT: {e}");
                std::future::pending::<()>().await;
            }
        }
        () = terminate => {}
    }
    log::info!("shutting down: finishing in-flight requests");
}
