//! End-to-end harness: a real Envoy running the tollgate filter in front of an in-process recording
//! upstream, and a raw HTTP/1.1 client that sends exactly the bytes a test asks for.
//!
//! Every `Gateway` is private to its test: Envoy and the upstream listen on ports the kernel picks,
//! the config and log live in a fresh temp dir, so tests run in parallel (threads or processes).
//! Used as `mod harness; use harness::*;` from each test file.
#![allow(dead_code, reason = "each test file uses a different part of the harness")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code: a failed step fails the test")]

mod credit;
mod gate;
mod http;
mod upstream;

use std::fmt;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[allow(unused_imports, reason = "not every test file bills")]
pub use credit::{binary as credit_binary, CreditService, SERVICE_TOKEN};
#[allow(unused_imports, reason = "not every test file slows a server down")]
pub use gate::Gate;
use http::exchange;
#[allow(unused_imports, reason = "not every test file talks to other servers")]
pub use http::send_to;
#[allow(unused_imports, reason = "not every test file names every type")]
pub use http::{chunk, Conversation, Request, Response};
#[allow(unused_imports, reason = "not every test file names every type")]
pub use upstream::{Recorded, Upstream};

/// How long Envoy may take to become ready (V8 compiles the module once per worker).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Every client read and write: a hung exchange fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The listener `gw.port()` names; the first listener if none has this name.
const GATEWAY_LISTENER: &str = "gateway";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// Envoy config

/// The shipped example config, `envoy/envoy.yaml`, as JSON.
pub fn shipped_envoy_config() -> Value {
    let path = repo().join("envoy/envoy.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The plugin configuration JSON string of the shipped config.
pub fn shipped_plugin_config() -> String {
    plugin_config(&mut shipped_envoy_config()).as_str().expect("configuration.value is a string").to_owned()
}

/// The `typed_config` of the gateway listener's http_connection_manager.
pub fn hcm(config: &mut Value) -> &mut Value {
    let listener = listeners(config).iter_mut().find(|l| l["name"] == GATEWAY_LISTENER).expect("no gateway listener");
    let filters = listener["filter_chains"][0]["filters"].as_array_mut().expect("no network filters");
    let hcm = filters.iter_mut().find(|f| f["name"] == "envoy.filters.network.http_connection_manager");
    &mut hcm.expect("no http_connection_manager")["typed_config"]
}

/// The `tollgate` entry of the http filter list (`{name, typed_config}`).
pub fn tollgate_filter(config: &mut Value) -> &mut Value {
    let filters = hcm(config)["http_filters"].as_array_mut().expect("no http_filters");
    filters.iter_mut().find(|f| f["name"] == "tollgate").expect("no tollgate http filter")
}

/// The plugin configuration `value` (a JSON string) of the tollgate filter.
pub fn plugin_config(config: &mut Value) -> &mut Value {
    &mut tollgate_filter(config)["typed_config"]["config"]["configuration"]["value"]
}

/// Takes the tollgate filter out, so Envoy only routes: the harness works without the module.
pub fn remove_tollgate_filter(config: &mut Value) {
    hcm(config)["http_filters"].as_array_mut().expect("no http_filters").retain(|f| f["name"] != "tollgate");
}

fn listeners(config: &mut Value) -> &mut Vec<Value> {
    config["static_resources"]["listeners"].as_array_mut().expect("no listeners")
}

/// The shipped config pointed at this test's upstream, with the options applied.
fn envoy_config(opts: GatewayOptions, upstream_port: u16) -> Value {
    let mut config = shipped_envoy_config();
    // Port 0 wherever Envoy listens: the kernel picks a free port at bind time and Envoy reports it
    // (`--admin-address-path`, admin `/listeners`), so there is no pick-then-bind race to retry.
    config["admin"]["address"]["socket_address"]["port_value"] = 0.into();
    for listener in listeners(&mut config) {
        listener["address"]["socket_address"]["port_value"] = 0.into();
    }
    let clusters = config["static_resources"]["clusters"].as_array_mut().expect("no clusters");
    let upstream = clusters.iter_mut().find(|c| c["name"] == "upstream").expect("no upstream cluster");
    for group in upstream["load_assignment"]["endpoints"].as_array_mut().expect("no endpoints") {
        for endpoint in group["lb_endpoints"].as_array_mut().expect("no lb_endpoints") {
            endpoint["endpoint"]["address"]["socket_address"] =
                json!({"address": "127.0.0.1", "port_value": upstream_port});
        }
    }
    absolutize_modules(&mut config);
    if let Some(port) = opts.credit_port {
        let clusters = config["static_resources"]["clusters"].as_array_mut().expect("no clusters");
        clusters.retain(|c| c["name"] != "credits");
        clusters.push(json!({
            "name": "credits", "connect_timeout": "0.25s", "type": "STATIC",
            "load_assignment": {"cluster_name": "credits", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
        }));
    }
    if let Some(wasm) = opts.wasm {
        let filename = wasm.to_str().expect("UTF-8 module path");
        tollgate_filter(&mut config)["typed_config"]["config"]["vm_config"]["code"] =
            json!({"local": {"filename": filename}});
    }
    if let Some(value) = opts.plugin_config {
        *plugin_config(&mut config) = value.into();
    }
    if let Some(mutate) = opts.mutate {
        mutate(&mut config);
    }
    if opts.native {
        to_native(&mut config);
    }
    config
}

/// Whether the gateway loads the dynamic module (`TOLLGATE_BUILD=native`, build/libtollgate.so from
/// `make native`) instead of the wasm module: the one switch that runs the e2e suites against the
/// native build.
pub fn native_build() -> bool {
    std::env::var("TOLLGATE_BUILD").is_ok_and(|build| build == "native")
}

/// Swaps the wasm filter for the dynamic module with the same plugin JSON, as
/// `envoy/envoy-native.yaml` does; after every test's own edits, which name the wasm fields.
fn to_native(config: &mut Value) {
    let filters = hcm(config)["http_filters"].as_array_mut().expect("no http_filters");
    // Some tests take the filter out and run Envoy alone.
    let Some(filter) = filters.iter_mut().find(|f| f["name"] == "tollgate") else { return };
    let value = filter["typed_config"]["config"]["configuration"]["value"].take();
    filter["typed_config"] = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": "tollgate", "do_not_close": true},
        "filter_name": "tollgate",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
    });
}

/// Makes every relative `vm_config.code.local.filename` absolute against the repository root.
fn absolutize_modules(value: &mut Value) {
    if let Some(name) = value.pointer_mut("/vm_config/code/local/filename") {
        let path = repo().join(name.as_str().expect("filename is a string"));
        *name = path.to_str().expect("UTF-8 repo path").into();
    }
    match value {
        Value::Object(map) => map.values_mut().for_each(absolutize_modules),
        Value::Array(items) => items.iter_mut().for_each(absolutize_modules),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway: one Envoy process

/// An edit of the whole Envoy config.
pub type Mutation = Box<dyn FnOnce(&mut Value)>;

pub struct GatewayOptions {
    /// Replaces the plugin configuration JSON string.
    pub plugin_config: Option<String>,
    /// Edits the whole Envoy config (the YAML as JSON) after the harness's own rewrites.
    pub mutate: Option<Mutation>,
    /// Envoy worker threads (`--concurrency`).
    pub concurrency: u32,
    /// The module the tollgate filter loads instead of `build/tollgate.wasm` (e.g. one pulled from a
    /// registry).
    pub wasm: Option<PathBuf>,
    /// The port of the credit service that the `credits` cluster points at.
    pub credit_port: Option<u16>,
    /// Loads the dynamic module (build/libtollgate.so) instead of the wasm module; by default
    /// whatever `TOLLGATE_BUILD` says (`native_build`).
    pub native: bool,
    /// A command Envoy's own binary runs under (e.g. `valgrind --tool=callgrind`); it may take
    /// minutes to start, so the ready timeout grows with it.
    pub wrapper: Vec<String>,
    /// Environment variables of the Envoy process (a secret a config names by `{"env": …}`).
    pub env: Vec<(String, String)>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            plugin_config: None,
            mutate: None,
            concurrency: 2,
            wasm: None,
            credit_port: None,
            native: native_build(),
            wrapper: vec![],
            env: vec![],
        }
    }
}

/// Envoy exited, or was not ready in time. `log` is everything it wrote.
pub struct StartFailure {
    pub reason: String,
    pub log: String,
}

impl fmt::Debug for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n--- Envoy log ---\n{}", self.reason, self.log)
    }
}

pub struct Gateway {
    envoy: Child,
    upstream: Upstream,
    dir: PathBuf,
    admin_port: u16,
    listeners: Vec<(String, u16)>,
}

impl Gateway {
    /// Starts Envoy and waits until it serves; panics with Envoy's log if it does not.
    pub fn start(opts: GatewayOptions) -> Gateway {
        Gateway::try_start(opts).unwrap_or_else(|failure| panic!("Envoy did not start: {failure:?}"))
    }

    /// Starts Envoy; `Err` if it exits (e.g. the plugin refused its config) or is not ready in 30 s.
    pub fn try_start(opts: GatewayOptions) -> Result<Gateway, StartFailure> {
        let upstream = Upstream::start();
        let concurrency = opts.concurrency;
        let mut command = match opts.wrapper.split_first() {
            None => Command::new(repo().join(".venv/bin/envoy")),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(envoy_binary());
                command
            }
        };
        let ready_timeout = if opts.wrapper.is_empty() { READY_TIMEOUT } else { 10 * READY_TIMEOUT };
        command.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let config = envoy_config(opts, upstream.port());
        let dir = fresh_dir();
        let config_path = dir.join("envoy.json");
        fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        // Envoy's stderr, not `--log-path`: the log-path file is flushed on a timer (seconds), so a
        // test reading the log mid-run would miss lines; stderr to a file is written per line.
        let log = File::create(dir.join("envoy.log")).unwrap();
        let mut envoy = command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &concurrency.to_string(), "--log-level", "info"])
            // Hot restart makes every Envoy on the machine share one shared-memory region and
            // domain socket (keyed by --base-id): a second Envoy would fail to start.
            .arg("--disable-hot-restart")
            // Envoy writes the admin address it bound (port 0) here.
            .arg("--admin-address-path")
            .arg(dir.join("admin-address"))
            // The shipped config's relative paths are relative to the repository root.
            .current_dir(repo())
            // Where Envoy finds `libtollgate.so` for the native build.
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", repo().join("build"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(".venv/bin/envoy: run `make envoy`");
        // `.venv/bin/envoy` is a Python script that execs the binary: same pid, so kill() reaches Envoy.
        match wait_ready(&mut envoy, &dir, ready_timeout) {
            Ok((admin_port, listeners)) => Ok(Gateway { envoy, upstream, dir, admin_port, listeners }),
            Err(mut reason) => {
                let _ = envoy.kill();
                let _ = envoy.wait();
                let log = fs::read_to_string(dir.join("envoy.log")).unwrap_or_default();
                let module = repo().join("build/tollgate.wasm");
                if !module.exists() && config.to_string().contains(module.to_str().unwrap()) {
                    reason.push_str(" (build/tollgate.wasm is missing: run `make wasm`)");
                }
                if config.to_string().contains("DynamicModuleFilter") && !repo().join("build/libtollgate.so").exists() {
                    reason.push_str(" (build/libtollgate.so is missing: run `make native`)");
                }
                let _ = fs::remove_dir_all(&dir);
                Err(StartFailure { reason, log })
            }
        }
    }

    /// SIGKILL to Envoy, as a crash or a lost machine: nothing it held in memory is reported.
    pub fn kill(&mut self) {
        let _ = self.envoy.kill();
        let _ = self.envoy.wait();
    }

    /// The gateway listener's port.
    pub fn port(&self) -> u16 {
        let named = self.listeners.iter().find(|(name, _)| name == GATEWAY_LISTENER);
        named.or(self.listeners.first()).expect("Envoy has no listener").1
    }

    /// The port of a listener by name (for configs that add listeners, with port 0).
    pub fn listener_port(&self, name: &str) -> u16 {
        self.listeners.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no listener {name:?}")).1
    }

    /// Envoy's process id (the wrapper execs the binary, so it is Envoy's own), for benchmarks
    /// that pin it to a core or read its CPU time.
    pub fn envoy_pid(&self) -> u32 {
        self.envoy.id()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// GET on Envoy's admin interface, e.g. `/stats?filter=wasm`.
    pub fn admin(&self, path: &str) -> Response {
        send_to(self.admin_port, &Request::get(path)).unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }

    /// A metric's value in Envoy's Prometheus output, summed over label sets; 0 when absent.
    #[allow(dead_code, reason = "not every test file reads metrics")]
    /// The native build's metrics have the names the wasm build's have, under the prefix Envoy
    /// gives a dynamic module's stats.
    pub fn metric(&self, name: &str) -> u64 {
        let name = match native_build() && name.starts_with("tollgate_") {
            true => format!("envoy_dynamicmodulescustom_{name}"),
            false => name.to_owned(),
        };
        let text = self.admin("/stats/prometheus").text();
        text.lines()
            .filter(|line| line.split(['{', ' ']).next() == Some(name.as_str()))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Everything Envoy has logged so far.
    pub fn envoy_log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Sends one request on a new connection and reads the response; panics on a transport error.
    pub fn send(&self, request: Request) -> Response {
        self.try_send(&request).unwrap_or_else(|e| panic!("{}: {e}", request.describe()))
    }

    /// As `send`, but a transport error (e.g. Envoy closed without a response) is an `Err`.
    pub fn try_send(&self, request: &Request) -> Result<Response, String> {
        send_to(self.port(), request)
    }

    /// Sends bytes as they are (a whole request, however malformed) and reads one response.
    pub fn send_raw(&self, bytes: &[u8]) -> Response {
        exchange(self.port(), bytes.to_vec(), false).unwrap_or_else(|e| panic!("raw request: {e}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGKILL: with hot restart off there is no shared state to release, and the log is already
        // on disk, so a graceful SIGTERM shutdown would only cost time.
        let _ = self.envoy.kill();
        let _ = self.envoy.wait();
        if thread::panicking() {
            eprintln!("--- Envoy log ({}) ---\n{}--- end of Envoy log ---", self.dir.display(), self.envoy_log());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        self.upstream.stop();
    }
}

/// Polls until admin `/ready` is 200 and the gateway listener accepts TCP, or Envoy exits. Every
/// 5 ms: `make bench` times Envoy's start with it.
fn wait_ready(envoy: &mut Child, dir: &Path, timeout: Duration) -> Result<(u16, Vec<(String, u16)>), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = envoy.try_wait().unwrap() {
            return Err(format!("Envoy exited before it was ready ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("Envoy was not ready after {timeout:?}"));
        }
        if let Some(ready) = probe(dir) {
            return Ok(ready);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn probe(dir: &Path) -> Option<(u16, Vec<(String, u16)>)> {
    // Written once the admin listener is bound, which is before the listeners are created.
    let address = fs::read_to_string(dir.join("admin-address")).ok()?;
    let admin: u16 = address.trim().rsplit(':').next()?.parse().ok()?;
    if send_to(admin, &Request::get("/ready")).ok()?.status != 200 {
        return None;
    }
    let statuses = send_to(admin, &Request::get("/listeners?format=json")).ok()?.json();
    let listeners: Vec<(String, u16)> = statuses["listener_statuses"]
        .as_array()?
        .iter()
        .filter_map(|l| {
            let port = l["local_address"]["socket_address"]["port_value"].as_u64()?;
            Some((l["name"].as_str()?.to_owned(), u16::try_from(port).ok()?))
        })
        .collect();
    let gateway = listeners.iter().find(|(n, _)| n == GATEWAY_LISTENER).or(listeners.first())?.1;
    let address = SocketAddr::from(([127, 0, 0, 1], gateway));
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    Some((admin, listeners))
}

/// The Envoy executable that `.venv/bin/envoy` (a Python script) execs, for a wrapper that must
/// run the binary itself.
pub fn envoy_binary() -> PathBuf {
    let lib = repo().join(".venv/lib");
    let found = fs::read_dir(&lib).ok().into_iter().flatten().flatten().find_map(|python| {
        let binary = python.path().join("site-packages/envoy/_bin/envoy");
        binary.exists().then_some(binary)
    });
    found.unwrap_or_else(|| panic!("no Envoy binary under {}: run `make envoy`", lib.display()))
}

/// A new empty directory, unique across test threads (counter) and test processes (pid).
pub(crate) fn fresh_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tollgate-e2e-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir); // left by an earlier process that had this pid
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the feature tests

/// An RFC 9457 problem response from the filter: the status, `urn:tollgate:problem:<slug>`,
/// `application/problem+json`, and every security header.
#[track_caller]
pub fn assert_problem(resp: &Response, status: u16, slug: &str) {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/problem+json"), "body: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["type"], format!("urn:tollgate:problem:{slug}"), "body: {body}");
    assert_eq!(body["status"], status, "body: {body}");
    assert_security_headers(resp);
}

/// The security headers every response carries under the default settings, each exactly once.
#[track_caller]
pub fn assert_security_headers(resp: &Response) {
    for (name, value) in [
        ("x-content-type-options", Some("nosniff")),
        ("x-frame-options", Some("DENY")),
        ("referrer-policy", Some("strict-origin-when-cross-origin")),
        ("permissions-policy", None),
    ] {
        let values = resp.header_all(name);
        assert_eq!(values.len(), 1, "{name}: {values:?} in {:?}", resp.headers);
        if let Some(value) = value {
            assert_eq!(values[0], value, "{name}");
        }
    }
}
