//! `cargo bench -p tollgate-credit --bench throughput`: the release binary on a fresh SQLite file and on a
//! fresh PostgreSQL database, each driven by concurrent clients doing what the gateway does per billed
//! request (reserve, then commit). Prints the results and writes `build/bench-credit.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "benchmark driver")]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Db, Service, SERVICE_TOKEN};
use reqwest::StatusCode;
use serde_json::json;

const CLIENTS: usize = 16;
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(10);
const INITIAL: i64 = 1_000_000_000;

struct Figures {
    backend: &'static str,
    pairs: usize,
    errors: usize,
    seconds: f64,
    /// Latency of one reserve + commit pair, sorted.
    latencies: Vec<Duration>,
}

impl Figures {
    fn per_second(&self) -> f64 {
        self.pairs as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len().max(1)) - 1;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

#[tokio::main]
async fn main() {
    let mut results = Vec::new();
    for backend in ["SQLite", "PostgreSQL"] {
        let db = if backend == "SQLite" { Db::sqlite().await } else { Db::postgres().await };
        let svc = Service::start(&db);
        svc.funded_account("bench", INITIAL).await;
        let (warmup_pairs, warmup_errors, _) = drive(&svc, WARMUP).await;
        let (pairs, errors, latencies) = drive(&svc, RUN).await;
        let figures = Figures { backend, pairs, errors, seconds: RUN.as_secs_f64(), latencies };
        println!(
            "{backend:<10} {:>8.0} pairs/s   p50 {:>6.2} ms   p99 {:>6.2} ms   errors {}",
            figures.per_second(),
            ms(figures.percentile(0.50)),
            ms(figures.percentile(0.99)),
            figures.errors
        );
        // Each pair charged 2 of the 3 it held; nothing may be left held or lost under load.
        if warmup_errors + errors == 0 {
            let spent = 2 * i64::try_from(warmup_pairs + pairs).unwrap();
            assert_eq!(svc.balance("bench").await, (INITIAL - spent, 0));
        }
        results.push(figures);
    }
    let report = report(&results);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/bench-credit.md");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, report).unwrap();
    println!("wrote {}", out.canonicalize().unwrap().display());
}

/// `CLIENTS` loops of reserve + commit for `length`; returns pairs done, errors and each pair's latency.
async fn drive(svc: &Service, length: Duration) -> (usize, usize, Vec<Duration>) {
    // Request ids must not repeat across runs, or the service would answer replays.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + length;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let http = svc.http.clone();
            let base = svc.base.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let started = Instant::now();
                    let request_id = format!("run{}-{client}-{n}", run);
                    let body = json!({ "account": "bench", "amount": 3, "request_id": request_id, "route": "/api" });
                    let reserved = http
                        .post(format!("{base}/v1/reservations"))
                        .bearer_auth(SERVICE_TOKEN)
                        .json(&body)
                        .send()
                        .await;
                    let Ok(reserved) = reserved.map_err(|e| eprintln!("reserve: {e}")) else {
                        errors += 1;
                        continue;
                    };
                    if reserved.status() != StatusCode::CREATED {
                        eprintln!("reserve: {}", reserved.status());
                        errors += 1;
                        continue;
                    }
                    let id = reserved.json::<serde_json::Value>().await.unwrap()["reservation_id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let committed = http
                        .post(format!("{base}/v1/reservations/{id}/commit"))
                        .bearer_auth(SERVICE_TOKEN)
                        .json(&json!({ "amount": 2 }))
                        .send()
                        .await;
                    match committed {
                        Ok(r) if r.status() == StatusCode::OK => latencies.push(started.elapsed()),
                        other => {
                            eprintln!("commit: {other:?}");
                            errors += 1;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for client in clients {
        let (latencies, failed) = client.await.unwrap();
        all.extend(latencies);
        errors += failed;
    }
    all.sort();
    (all.len(), errors, all)
}

fn report(results: &[Figures]) -> String {
    let mut md = String::from("# Credit service throughput\n\n");
    let _ = writeln!(
        md,
        "`cargo bench -p tollgate-credit --bench throughput`: {CLIENTS} concurrent clients, each doing what the \
         gateway does per billed request — `POST /v1/reservations`, then `POST /v1/reservations/{{id}}/commit` — \
         in a loop for {} s after {} s of warm-up, over keep-alive HTTP/1.1 on loopback, against the release \
         binary. Clients, service and database share this machine ({} cores).\n",
        RUN.as_secs(),
        WARMUP.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    md.push_str("| backend | reserve+commit pairs/s | p50 pair latency | p99 pair latency | errors |\n");
    md.push_str("| --- | ---: | ---: | ---: | ---: |\n");
    for f in results {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            f.backend,
            f.per_second(),
            ms(f.percentile(0.50)),
            ms(f.percentile(0.99)),
            f.errors
        );
    }
    md.push_str(
        "\nSQLite runs in WAL mode with `synchronous = FULL` and one writer connection, so every commit waits \
         for its fsync; PostgreSQL is the machine's server with its own settings.\n",
    );
    md
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
