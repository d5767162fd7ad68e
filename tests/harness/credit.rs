//! The real credit service (`tollgate-credit`) on a SQLite file in a temporary directory, on a
//! port of its own, with helpers that read its ledger through the admin API.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::http::{send_to, Request, Response};

pub const SERVICE_TOKEN: &str = "test-service-token-of-at-least-32-bytes";
pub const ADMIN_TOKEN: &str = "test-admin-token-of-at-least-32-bytes";

pub struct CreditService {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    ttl_seconds: u64,
}

/// `target/<profile>/tollgate-credit`, next to the test binary's `deps/` directory.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let binary = dir.join("tollgate-credit");
    assert!(binary.exists(), "{} is missing: run `cargo build -p tollgate-credit` (make test does)", binary.display());
    binary
}

impl CreditService {
    pub fn start() -> CreditService {
        CreditService::with_ttl(300)
    }

    /// Reservations neither committed nor released are released after `ttl_seconds`.
    pub fn with_ttl(ttl_seconds: u64) -> CreditService {
        let dir = super::fresh_dir();
        let (child, port) = spawn(&dir, 0, ttl_seconds);
        CreditService { child: Some(child), port, dir, ttl_seconds }
    }

    /// The service's process id, for benchmarks that read its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL: no graceful shutdown, as a crash or a lost machine.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and the same ledger.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn(&self.dir, self.port, self.ttl_seconds);
        self.child = Some(child);
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        let mut request = Request::new(method, path).header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        send_to(self.port, &request).unwrap_or_else(|e| panic!("credit service {method} {path}: {e}"))
    }

    /// Creates `account` with `credits` to spend.
    pub fn create_account(&self, account: &str, credits: u64) {
        let created = self.call("PUT", &format!("/v1/accounts/{account}"), None);
        assert!(matches!(created.status, 200 | 201), "{}", created.text());
        let body = json!({"amount": credits, "reference": format!("test-{account}")});
        let topped = self.call("POST", &format!("/v1/accounts/{account}/credits"), Some(body));
        assert!(matches!(topped.status, 200 | 201), "{}", topped.text());
    }

    /// What the account can spend, and what is on hold.
    pub fn balance(&self, account: &str) -> (u64, u64) {
        let body = self.call("GET", &format!("/v1/accounts/{account}"), None).json();
        (body["balance"].as_u64().unwrap(), body["held"].as_u64().unwrap())
    }

    /// Waits until nothing is held on the account (commits and releases go after the response;
    /// an idle grant is reported and given back), and answers its balance.
    pub fn settled(&self, account: &str, within: std::time::Duration) -> u64 {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (balance, held) = self.balance(account);
            if held == 0 {
                return balance;
            }
            assert!(std::time::Instant::now() < deadline, "{held} still held on {account}: {:?}", self.kinds(account));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The kinds of the account's ledger rows, oldest first.
    pub fn kinds(&self, account: &str) -> Vec<String> {
        self.transactions(account).iter().map(|t| t["kind"].as_str().unwrap_or_default().to_owned()).collect()
    }

    /// What the account spent per policy and hour (`GET /v1/accounts/{id}/usage`).
    pub fn usage(&self, account: &str) -> Value {
        self.call("GET", &format!("/v1/accounts/{account}/usage"), None).json()
    }

    /// The account's ledger rows, oldest first.
    pub fn transactions(&self, account: &str) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let after = all.last().and_then(|t| t["id"].as_u64()).unwrap_or(0);
            let body = self.call("GET", &format!("/v1/accounts/{account}/transactions?after={after}"), None).json();
            let page = body["transactions"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }
}

impl Drop for CreditService {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn(dir: &std::path::Path, port: u16, ttl_seconds: u64) -> (Child, u16) {
    let database = format!("sqlite://{}", dir.join("ledger.db").display());
    let mut child = Command::new(binary())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--database", &database, "--sweep-interval-seconds", "1"])
        .args(["--reservation-ttl-seconds", &ttl_seconds.to_string()])
        .env("TOLLGATE_CREDIT_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("TOLLGATE_CREDIT_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(fs::OpenOptions::new().create(true).append(true).open(dir.join("credit.log")).unwrap())
        .spawn()
        .expect("start tollgate-credit");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let bound = line.trim().strip_prefix("listening on ").and_then(|a| a.rsplit(':').next()?.parse().ok());
    let Some(bound) = bound else {
        let _ = child.kill();
        panic!("tollgate-credit did not start ({line:?}); see {}", dir.display());
    };
    (child, bound)
}
