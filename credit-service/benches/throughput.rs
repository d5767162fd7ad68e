//! `cargo bench -p tollgate-credit --bench throughput`: the release binary on a fresh SQLite file and on a
//! fresh PostgreSQL database, each driven by concurrent clients doing what the gateway does per billed
//! request (reserve, then commit), then by a few clients sending `POST /v1/batch` with 1,000 operations
//! each, then by a few gateways reporting on their grants for 1,000 accounts per `POST /v1/grants`.
//! Prints the results and writes `build/bench-credit.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "benchmark driver")]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Db, Service, SERVICE_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 64;
const BATCH_CLIENTS: usize = 4;
const BATCH: usize = 1000;
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(10);
const BATCH_RUN: Duration = Duration::from_secs(5);
/// Gateway instances reporting at once, and the accounts each reports on per call (all of them
/// share the same accounts, as gateways in front of one API do).
const GATEWAYS: usize = 4;
const GRANT_ACCOUNTS: usize = 1000;
const INITIAL: i64 = 1_000_000_000;
/// Linux reports process CPU time in clock ticks of 1/100 s.
const TICK: Duration = Duration::from_millis(10);

struct Figures {
    backend: &'static str,
    /// Reserve + commit pairs, each over HTTP calls of its own.
    pairs: Run,
    /// Operations sent `BATCH` at a time through `POST /v1/batch`.
    batched: Run,
    /// Grant reports sent `GRANT_ACCOUNTS` at a time through `POST /v1/grants`.
    grants: Run,
}

struct Run {
    done: usize,
    errors: usize,
    seconds: f64,
    /// Latency of one pair (or one batch call), sorted.
    latencies: Vec<Duration>,
    /// CPU time the service spent during the run, all threads.
    service_cpu: Duration,
    /// CPU time every PostgreSQL process on the machine spent during the run.
    database_cpu: Duration,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.done as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len().max(1)) - 1;
        self.latencies.get(i).copied().unwrap_or_default()
    }

    fn cpu_per(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.done.max(1) as f64
    }

    /// What the run did per second, its latency, the CPU per `unit` and its errors, as text.
    fn cells(&self, unit: &str) -> [String; 6] {
        [
            format!("{:.0} {unit}s/s", self.per_second()),
            format!("{:.2} ms", ms(self.percentile(0.50))),
            format!("{:.2} ms", ms(self.percentile(0.99))),
            format!("{:.1} µs/{unit}", self.cpu_per(self.service_cpu)),
            format!("{:.1} µs/{unit}", self.cpu_per(self.database_cpu)),
            self.errors.to_string(),
        ]
    }

    /// The cells again, named, on one line for the terminal.
    fn line(&self, unit: &str) -> String {
        let names = ["", "p50 ", "p99 ", "service CPU ", "database CPU ", "errors "];
        names.iter().zip(self.cells(unit)).map(|(name, cell)| format!("{name}{cell}")).collect::<Vec<_>>().join("  ")
    }
}

#[tokio::main]
async fn main() {
    let mut results = Vec::new();
    for backend in ["SQLite", "PostgreSQL"] {
        let db = if backend == "SQLite" { Db::sqlite().await } else { Db::postgres().await };
        let svc = Service::start(&db);
        svc.funded_account("bench", INITIAL).await;
        let warmup = measure(&svc, || pairs(&svc, WARMUP)).await;
        let pairs = measure(&svc, || pairs(&svc, RUN)).await;
        println!("{backend:<10} pairs    {}", pairs.line("pair"));
        let batched = measure(&svc, || batches(&svc, BATCH_RUN)).await;
        println!("{backend:<10} batched  {}", batched.line("op"));
        for i in 0..GRANT_ACCOUNTS {
            svc.funded_account(&format!("g{i}"), INITIAL).await;
        }
        let grants = measure(&svc, || grants(&svc, BATCH_RUN)).await;
        println!("{backend:<10} grants   {}", grants.line("report"));
        // Each pair charged 2 of the 3 it held; nothing may be left held or lost under load.
        if warmup.errors + pairs.errors + batched.errors == 0 {
            let spent = 2 * i64::try_from(warmup.done + pairs.done + batched.done / 2).unwrap();
            assert_eq!(svc.balance("bench").await, (INITIAL - spent, 0));
        }
        results.push(Figures { backend, pairs, batched, grants });
    }
    let report = report(&results);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/bench-credit.md");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, report).unwrap();
    println!("wrote {}", out.canonicalize().unwrap().display());
}

/// What `drive` does, with the CPU the service and the database spent doing it.
async fn measure<F: std::future::Future<Output = (usize, usize, Vec<Duration>)>>(
    svc: &Service,
    drive: impl FnOnce() -> F,
) -> Run {
    let (service, database) = (cpu(&[svc.pid()]), cpu(&postgres_pids()));
    let started = Instant::now();
    let (done, errors, mut latencies) = drive().await;
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    Run {
        done,
        errors,
        seconds,
        latencies,
        service_cpu: cpu(&[svc.pid()]).saturating_sub(service),
        database_cpu: cpu(&postgres_pids()).saturating_sub(database),
    }
}

/// `CLIENTS` loops of reserve + commit for `length`; returns pairs done, errors and each pair's latency.
async fn pairs(svc: &Service, length: Duration) -> (usize, usize, Vec<Duration>) {
    clients(svc, CLIENTS, length, |mut conn, client, run, deadline| async move {
        let (mut latencies, mut errors) = (Vec::new(), 0);
        let mut n = 0u64;
        while Instant::now() < deadline {
            n += 1;
            let started = Instant::now();
            let body =
                format!(r#"{{"account":"bench","amount":3,"request_id":"run{run}-{client}-{n}","route":"/api"}}"#);
            let (status, reserved) = conn.post("/v1/reservations", &body).await;
            if status != 201 {
                eprintln!("reserve: {status} {reserved}");
                errors += 1;
                continue;
            }
            let id = field(&reserved, "reservation_id");
            let (status, committed) = conn.post(&format!("/v1/reservations/{id}/commit"), r#"{"amount":2}"#).await;
            if status == 200 {
                latencies.push(started.elapsed());
            } else {
                eprintln!("commit: {status} {committed}");
                errors += 1;
            }
        }
        (latencies.len(), errors, latencies)
    })
    .await
}

/// `BATCH_CLIENTS` loops of one batch of `BATCH` reservations, then one batch committing them, for
/// `length`; returns operations done, failed operations and each batch call's latency.
async fn batches(svc: &Service, length: Duration) -> (usize, usize, Vec<Duration>) {
    clients(svc, BATCH_CLIENTS, length, |mut conn, client, run, deadline| async move {
        let (mut latencies, mut errors, mut done) = (Vec::new(), 0, 0);
        let mut n = 0u64;
        while Instant::now() < deadline {
            let reserves: Vec<String> = (0..BATCH)
                .map(|_| {
                    n += 1;
                    format!(
                        r#"{{"op":"reserve","account":"bench","amount":3,"request_id":"batch{run}-{client}-{n}","route":"/api"}}"#
                    )
                })
                .collect();
            let started = Instant::now();
            let (status, answer) = conn.post("/v1/batch", &operations(&reserves)).await;
            latencies.push(started.elapsed());
            assert_eq!(status, 200, "{answer}");
            let answer: Answer<'_> = serde_json::from_str(&answer).unwrap();
            let mut commits = Vec::with_capacity(BATCH);
            for result in answer.results {
                match (result.status, result.body.reservation_id) {
                    (201, Some(id)) => {
                        commits.push(format!(r#"{{"op":"commit","reservation_id":"{id}","amount":2}}"#));
                    }
                    _ => errors += 1,
                }
            }
            let started = Instant::now();
            let (status, answer) = conn.post("/v1/batch", &operations(&commits)).await;
            latencies.push(started.elapsed());
            assert_eq!(status, 200, "{answer}");
            let answer: Answer<'_> = serde_json::from_str(&answer).unwrap();
            let committed = answer.results.iter().filter(|r| r.status == 200).count();
            errors += commits.len() - committed;
            done += commits.len() + committed;
        }
        (done, errors, latencies)
    })
    .await
}

/// What the benchmark reads of a `POST /v1/batch` answer. The client shares the cores with the
/// service: a typed, borrowing parse of 1,000 results costs it a fraction of building a
/// `serde_json::Value` of them.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    results: Vec<BatchResult<'a>>,
}

#[derive(serde::Deserialize)]
struct BatchResult<'a> {
    status: u16,
    #[serde(borrow)]
    body: BatchBody<'a>,
}

#[derive(serde::Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow, default)]
    reservation_id: Option<&'a str>,
}

/// `GATEWAYS` instances, each reporting on its grant for every one of `GRANT_ACCOUNTS` accounts
/// per call, in a loop for `length`: each report spends 5 more credits of its grant and wants 100
/// beyond what it spent, as a gateway's flush does; returns reports answered 200, others, and each
/// call's latency.
async fn grants(svc: &Service, length: Duration) -> (usize, usize, Vec<Duration>) {
    clients(svc, GATEWAYS, length, |mut conn, client, run, deadline| async move {
        let (mut latencies, mut errors, mut done) = (Vec::new(), 0, 0);
        let mut held: Vec<(Option<String>, i64, i64)> = vec![(None, 0, 0); GRANT_ACCOUNTS];
        while Instant::now() < deadline {
            let reports: Vec<String> = held
                .iter_mut()
                .enumerate()
                .map(|(i, (grant, granted, used))| {
                    *used = (*used + 5).min(*granted);
                    let grant = grant.as_ref().map_or("null".to_owned(), |id| format!(r#""{id}""#));
                    format!(
                        r#"{{"account":"g{i}","grant_id":{grant},"used_total":{used},"usage":{{"api":{{"credits":{used},"requests":{used}}}}},"want_total":{},"min_grant":10,"max_grant":1000}}"#,
                        *used + 100
                    )
                })
                .collect();
            let body = format!(r#"{{"instance":"bench-{run}-{client}","reports":[{}]}}"#, reports.join(","));
            let started = Instant::now();
            let (status, answer) = conn.post("/v1/grants", &body).await;
            latencies.push(started.elapsed());
            assert_eq!(status, 200, "{answer}");
            let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
            for (result, (grant, granted, _)) in answer["results"].as_array().unwrap().iter().zip(&mut held) {
                if result["status"] == 200 {
                    *grant = Some(result["body"]["grant_id"].as_str().unwrap().to_owned());
                    *granted = result["body"]["granted_total"].as_i64().unwrap();
                    done += 1;
                } else {
                    errors += 1;
                }
            }
        }
        (done, errors, latencies)
    })
    .await
}

/// Runs `n` clients, each `client(connection, its number, the run's number, deadline)` on a
/// connection of its own; adds up what they did, failed and waited.
async fn clients<F, C>(svc: &Service, n: usize, length: Duration, client: C) -> (usize, usize, Vec<Duration>)
where
    C: Fn(Conn, usize, usize, Instant) -> F,
    F: std::future::Future<Output = (usize, usize, Vec<Duration>)> + Send + 'static,
{
    // Request ids must not repeat across runs, or the service would answer replays.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + length;
    let address = svc.base.strip_prefix("http://").unwrap();
    let mut running = Vec::with_capacity(n);
    for i in 0..n {
        running.push(tokio::spawn(client(Conn::open(address).await, i, run, deadline)));
    }
    let (mut done, mut errors, mut all) = (0, 0, Vec::new());
    for one in running {
        let (did, failed, latencies) = one.await.unwrap();
        done += did;
        errors += failed;
        all.extend(latencies);
    }
    (done, errors, all)
}

fn operations(ops: &[String]) -> String {
    format!(r#"{{"operations":[{}]}}"#, ops.join(","))
}

/// A keep-alive HTTP/1.1 connection that does just what the benchmark needs. A general client
/// costs tens of microseconds a call, which on a shared 2-core machine the service would pay for.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(address: &str) -> Self {
        let stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: Vec::with_capacity(64 * 1024) }
    }

    /// Posts `body` with the service token; the status and the body of the answer.
    async fn post(&mut self, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: credit\r\nauthorization: Bearer {SERVICE_TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await.unwrap();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                let status = head[9..12].parse().unwrap();
                let length = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, value)| value.trim().parse().unwrap());
                if self.buf.len() >= end + 4 + length {
                    let body = String::from_utf8(self.buf[end + 4..end + 4 + length].to_vec()).unwrap();
                    self.buf.drain(..end + 4 + length);
                    return (status, body);
                }
            }
            assert!(self.stream.read_buf(&mut self.buf).await.unwrap() > 0, "the service closed the connection");
        }
    }
}

/// A string field of a flat JSON object, without parsing all of it.
fn field<'a>(json: &'a str, name: &str) -> &'a str {
    let start = json.find(&format!(r#""{name}":""#)).unwrap() + name.len() + 4;
    let end = json[start..].find('"').unwrap();
    &json[start..start + end]
}

/// User plus system CPU time of the processes, all their threads.
fn cpu(pids: &[u32]) -> Duration {
    let ticks: u32 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            Some(fields.get(11)?.parse::<u32>().ok()? + fields.get(12)?.parse::<u32>().ok()?)
        })
        .sum();
    TICK * ticks
}

fn postgres_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres"))
        .collect()
}

fn report(results: &[Figures]) -> String {
    let mut md = String::from("# Credit service throughput\n\n");
    let _ = writeln!(
        md,
        "`cargo bench -p tollgate-credit --bench throughput`, against the release binary over keep-alive \
         HTTP/1.1 on loopback. Clients, service and database share this machine ({} cores).\n\n\
         - **pairs**: {CLIENTS} concurrent clients, each doing what the gateway does per billed request — \
         `POST /v1/reservations`, then `POST /v1/reservations/{{id}}/commit` — in a loop for {} s after {} s \
         of warm-up; latency is the pair's.\n\
         - **batched**: {BATCH_CLIENTS} clients, each sending `POST /v1/batch` with {BATCH} reservations, then \
         one with {BATCH} commits of them, for {} s; a row counts operations, latency is one batch call's.\n\
         - **grants**: {GATEWAYS} gateway instances, each sending `POST /v1/grants` with one report for each of \
         the same {GRANT_ACCOUNTS} accounts (cumulative use up 5, want 100 more, usage under one policy), for \
         {} s; a row counts reports, latency is one call's.\n\
         - CPU is user + system time over the run: the service's process, and every `postgres` process \
         on the machine (PostgreSQL only).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        RUN.as_secs(),
        WARMUP.as_secs(),
        BATCH_RUN.as_secs(),
        BATCH_RUN.as_secs(),
    );
    md.push_str("| backend | load | throughput | p50 latency | p99 latency | service CPU | database CPU | errors |\n");
    md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for f in results {
        for (load, run, unit) in
            [("pairs", &f.pairs, "pair"), ("batched", &f.batched, "op"), ("grants", &f.grants, "report")]
        {
            let _ = writeln!(md, "| {} | {load} | {} |", f.backend, run.cells(unit).join(" | "));
        }
    }
    md.push_str(
        "\nSQLite runs in WAL mode with `synchronous = FULL`: every group commit waits for its fsync. \
         PostgreSQL is the machine's server with its own settings.\n",
    );
    md
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
