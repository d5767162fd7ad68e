//! Test harness: the real `tollgate-credit` binary on a free port, on a fresh database of either
//! backend, and a client that speaks its API. Shared by the tests and the benchmark.
#![allow(dead_code, reason = "the tests and the benchmark use different parts of the harness")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code: a failed step fails the test")]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

pub const SERVICE_TOKEN: &str = "test-service-token-of-at-least-32-bytes";
pub const ADMIN_TOKEN: &str = "test-admin-token-of-at-least-32-bytes";

/// Where tests create their PostgreSQL databases; the machine's server by default.
fn postgres_admin_url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name no other test, run or process uses.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A database of its own for one test, removed when dropped (also when the test fails).
pub enum Db {
    Sqlite { dir: PathBuf },
    Postgres { name: String },
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = std::env::temp_dir().join(unique("tollgate_credit"));
        std::fs::create_dir_all(&dir).unwrap();
        Db::Sqlite { dir }
    }

    pub async fn postgres() -> Db {
        let name = unique("tollgate_credit");
        let url = format!("{}/postgres", postgres_admin_url());
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} (set TOLLGATE_TEST_POSTGRES): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        Db::Postgres { name }
    }

    pub fn url(&self) -> String {
        match self {
            Db::Sqlite { dir } => format!("sqlite://{}", dir.join("ledger.db").display()),
            Db::Postgres { name } => format!("{}/{name}", postgres_admin_url()),
        }
    }

    /// A connection of the test's own to the service's database, to get in the service's way.
    pub async fn connect(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        sqlx::AnyConnection::connect(&self.url()).await.unwrap()
    }

    /// PostgreSQL only: drops the database under the running service.
    pub async fn drop_under_service(&self) {
        let Db::Postgres { name } = self else { panic!("not a PostgreSQL database") };
        let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_admin_url())).await.unwrap();
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&mut conn).await.unwrap();
    }

    /// The directory (SQLite) or database name (PostgreSQL): what an error must not reveal.
    pub fn name(&self) -> String {
        match self {
            Db::Sqlite { dir } => dir.display().to_string(),
            Db::Postgres { name } => name.clone(),
        }
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, Db::Sqlite { .. })
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        match self {
            Db::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Db::Postgres { name } => {
                // Drop cannot await, and may run inside the test's runtime: a thread of its own with a
                // runtime of its own. FORCE ends any connection a killed service left behind.
                let db = name.clone();
                let dropped = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        let mut conn =
                            sqlx::PgConnection::connect(&format!("{}/postgres", postgres_admin_url())).await?;
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut conn).await?;
                        conn.close().await
                    })
                })
                .join();
                if !matches!(dropped, Ok(Ok(()))) {
                    eprintln!("could not drop test database {name}: {dropped:?}");
                }
            }
        }
    }
}

/// A running `tollgate-credit`; killed when dropped, with its log printed if the test failed.
pub struct Service {
    child: Child,
    pub base: String,
    pub http: reqwest::Client,
    log: Arc<Mutex<String>>,
}

impl Service {
    pub fn start(db: &Db) -> Service {
        Self::start_with(db, &[])
    }

    /// Starts the binary with `extra` flags and waits for its `listening on` line.
    pub fn start_with(db: &Db, extra: &[&str]) -> Service {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_tollgate-credit")), db, extra)
    }

    pub fn start_binary(binary: &Path, db: &Db, extra: &[&str]) -> Service {
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--database", &db.url()])
            .args(extra)
            .env("TOLLGATE_CREDIT_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("TOLLGATE_CREDIT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep reading so the service never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("no `listening on` line ({other:?}); log:\n{}", log.lock().unwrap());
            }
        };
        let addr = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{line}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Service { child, base: format!("http://{addr}"), http, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.signal("TERM");
        self.wait()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success());
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// The exit status, once the service exits by itself (within 5 s).
    pub fn wait(mut self) -> ExitStatus {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("no exit within 5 s; log:\n{}", self.log());
    }

    /// One call: the status and the JSON body (Null when there is none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
        };
        (status, json)
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(ADMIN_TOKEN), body.map(|b| b.to_string()).as_deref()).await
    }

    pub async fn gateway(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(SERVICE_TOKEN), body.map(|b| b.to_string()).as_deref()).await
    }

    /// Creates the account and tops it up with `credits` (if any); expects both to succeed.
    pub async fn funded_account(&self, id: &str, credits: i64) {
        let (status, body) = self.admin(Method::PUT, &format!("/v1/accounts/{id}"), None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        if credits > 0 {
            let (status, body) = self.top_up(id, credits, &format!("initial-{id}")).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }

    pub async fn top_up(&self, id: &str, amount: i64, reference: &str) -> (StatusCode, Value) {
        let body = json!({ "amount": amount, "reference": reference });
        self.admin(Method::POST, &format!("/v1/accounts/{id}/credits"), Some(body)).await
    }

    pub async fn reserve(&self, account: &str, amount: i64, request_id: &str) -> (StatusCode, Value) {
        let body = json!({ "account": account, "amount": amount, "request_id": request_id, "route": "/api/things" });
        self.gateway(Method::POST, "/v1/reservations", Some(body)).await
    }

    /// Reserves and expects a new reservation; returns its id.
    pub async fn hold(&self, account: &str, amount: i64, request_id: &str) -> String {
        let (status, body) = self.reserve(account, amount, request_id).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["reservation_id"].as_str().unwrap().to_owned()
    }

    pub async fn commit(&self, reservation: &str, amount: Option<i64>) -> (StatusCode, Value) {
        let body = amount.map(|amount| json!({ "amount": amount }));
        self.gateway(Method::POST, &format!("/v1/reservations/{reservation}/commit"), body).await
    }

    pub async fn release(&self, reservation: &str) -> (StatusCode, Value) {
        self.gateway(Method::POST, &format!("/v1/reservations/{reservation}/release"), None).await
    }

    /// `(balance, held)`.
    pub async fn balance(&self, id: &str) -> (i64, i64) {
        let (status, body) = self.gateway(Method::GET, &format!("/v1/accounts/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["balance"].as_i64().unwrap(), body["held"].as_i64().unwrap())
    }

    pub async fn transactions(&self, id: &str) -> Vec<Value> {
        let (status, body) = self.admin(Method::GET, &format!("/v1/accounts/{id}/transactions"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["transactions"].as_array().unwrap().clone()
    }

    /// The journal as `(kind, amount, balance_after)`, checked to add up: each row's balance is the
    /// previous one plus its amount, and the last one is the account's balance.
    pub async fn journal(&self, id: &str) -> Vec<(String, i64, i64)> {
        let rows: Vec<(String, i64, i64)> = self
            .transactions(id)
            .await
            .iter()
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().to_owned(),
                    r["amount"].as_i64().unwrap(),
                    r["balance_after"].as_i64().unwrap(),
                )
            })
            .collect();
        let mut running = 0;
        for (kind, amount, after) in &rows {
            running += amount;
            assert_eq!(running, *after, "journal does not add up at a {kind} row: {rows:?}");
        }
        assert_eq!(running, self.balance(id).await.0, "journal total is not the balance: {rows:?}");
        rows
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- tollgate-credit log ----\n{}", self.log());
        }
    }
}

/// Each named `async fn(Db)` becomes a module with one test per backend: `NAME::sqlite`, `NAME::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Db::sqlite().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Db::postgres().await).await
            }
        }
    )*};
}
