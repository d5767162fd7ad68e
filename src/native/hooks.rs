//! The event hooks Envoy calls (`envoy_dynamic_module_on_*`), each behind a panic guard, and the
//! state they keep: a `Plugin` per filter config, a `Local` per thread and config, a `Filter` per
//! stream. Envoy requires every HTTP hook to exist; the ones tollgate has no use for say so.

use std::cell::{Cell, RefCell};
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use super::abi::{
    self, ConfigEnvoyPtr, ConfigSchedulerPtr, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, ModuleBuffer,
};
use super::host::{self, MainEnvoy, StreamEnvoy};
use super::store::store;
use crate::config::Config;
use crate::grpc;
use crate::host::HostError;
use crate::metrics::Metric;
use crate::problem::{self, Denial};
use crate::refresh::Refresher;
use crate::settle::Settler;
use crate::worker::Worker;
use crate::{Flow, Stream};

/// Scheduler events: a stream handed settlements over, or the timer ticked.
const EVENT_WAKE: u64 = 1;
const EVENT_TICK: u64 = 2;
/// How often the root-context work runs, as the wasm build's tick.
const TICK: Duration = Duration::from_secs(1);

/// One filter config, shared by the main thread and every worker.
pub struct Plugin {
    /// Tells this config's thread-local state apart from another's (a reload makes a new one).
    id: u64,
    json: Vec<u8>,
    /// Envoy's config object: used on the main thread only (its callouts and counters).
    envoy: usize,
    /// Envoy's id per `Metric::ALL`.
    metrics: Vec<Option<usize>>,
    /// Settlements handed over by the streams; the main thread sends them.
    settler: Mutex<Settler>,
    /// The config's scheduler; `None` once Envoy destroyed the config. A commit holds the lock so
    /// that the scheduler is never deleted under it.
    scheduler: Mutex<Option<usize>>,
}

impl Plugin {
    pub fn metric_id(&self, metric: Metric) -> Option<usize> {
        self.metrics.get(metric.index()).copied().flatten()
    }

    pub fn envoy_config(&self) -> ConfigEnvoyPtr {
        self.envoy as ConfigEnvoyPtr
    }

    /// Moves what `worker` queued to the main thread's settler.
    pub fn take_settlements(&self, worker: &Worker) {
        let Ok(mut local) = worker.settler.try_borrow_mut() else { return };
        local.hand_over(&mut self.settler.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Asks the main thread to send what is due.
    pub fn wake(&self) {
        self.commit(EVENT_WAKE);
    }

    fn commit(&self, event: u64) -> bool {
        let scheduler = self.scheduler.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(scheduler) = *scheduler else { return false };
        // SAFETY: the scheduler is live while the lock shows it; commit is thread-safe.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                scheduler as ConfigSchedulerPtr,
                event,
            )
        };
        true
    }
}

/// What one thread keeps for one config: its own parsed config and worker state, and on the main
/// thread the refresher that fetches remote documents.
struct Local {
    plugin_id: u64,
    plugin: Weak<Plugin>,
    config: Rc<Config>,
    worker: Rc<Worker>,
    refresh: RefCell<Refresher>,
    /// The store's `sets` when this thread last loaded the documents stored there.
    loaded: Cell<u64>,
}

thread_local! {
    static LOCALS: RefCell<Vec<Rc<Local>>> = const { RefCell::new(Vec::new()) };
}

/// This thread's state for `plugin`, made on first use; `None` if its config does not parse here
/// (it parsed on the main thread, so only a bug gets there).
fn local(plugin: &Arc<Plugin>) -> Option<Rc<Local>> {
    LOCALS.with(|cell| {
        let mut locals = cell.try_borrow_mut().ok()?;
        if let Some(found) = locals.iter().find(|l| l.plugin_id == plugin.id) {
            return Some(Rc::clone(found));
        }
        // Configs Envoy has destroyed since.
        locals.retain(|l| l.plugin.strong_count() > 0);
        let config = match Config::from_json(&plugin.json) {
            Ok(config) => Rc::new(config),
            Err(err) => {
                log::error!("tollgate: invalid plugin configuration: {err}");
                return None;
            }
        };
        let local = Rc::new(Local {
            plugin_id: plugin.id,
            plugin: Arc::downgrade(plugin),
            worker: Rc::new(Worker::new(&config, &mut MainEnvoy { plugin })),
            refresh: RefCell::new(Refresher::new(&config)),
            config,
            loaded: Cell::new(0),
        });
        locals.push(Rc::clone(&local));
        Some(local)
    })
}

/// Runs a hook's body; a panic is logged and becomes `fallback`.
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        log::error!("tollgate: panic in {hook}; the request is answered 500 and Envoy carries on");
        fallback
    })
}

// ---------------------------------------------------------------------------------------------
// Logging

/// `log` records into Envoy's log, under its `dynamic_modules` logger.
struct EnvoyLog;

fn envoy_level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => abi::LOG_ERROR,
        log::Level::Warn => abi::LOG_WARN,
        log::Level::Info => abi::LOG_INFO,
        log::Level::Debug | log::Level::Trace => abi::LOG_DEBUG,
    }
}

impl log::Log for EnvoyLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // SAFETY: a plain query of Envoy's log level.
        unsafe { abi::envoy_dynamic_module_callback_log_enabled(envoy_level(metadata.level())) }
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        // SAFETY: the buffer is ours and outlives the call, which copies it.
        unsafe {
            abi::envoy_dynamic_module_callback_log(envoy_level(record.level()), ModuleBuffer::of(message.as_bytes()))
        };
    }

    fn flush(&self) {}
}

// ---------------------------------------------------------------------------------------------
// Program and config hooks

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guarded("program init", std::ptr::null(), || {
        static LOGGER: EnvoyLog = EnvoyLog;
        // A second load of the module in one process finds the logger set: that is fine.
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
        abi::ABI_VERSION.as_ptr().cast()
    })
}

/// Parses and checks the config on the main thread: a bad one makes Envoy refuse the filter, with
/// the message in its log.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const std::ffi::c_void {
    guarded("config new", std::ptr::null(), || {
        log::info!("tollgate {} ({}, native) starting", env!("CARGO_PKG_VERSION"), env!("TOLLGATE_GIT_HASH"));
        // SAFETY: Envoy's buffer, valid for this hook; copied.
        let json = unsafe { config.bytes() }.to_vec();
        let plugin = match new_plugin(config_envoy, json) {
            Ok(plugin) => plugin,
            Err(err) => {
                log::error!("tollgate: invalid plugin configuration: {err}");
                return std::ptr::null();
            }
        };
        Box::into_raw(Box::new(plugin)).cast_const().cast()
    })
}

fn new_plugin(config_envoy: ConfigEnvoyPtr, json: Vec<u8>) -> Result<Arc<Plugin>, String> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let config = Config::from_json(&json).map_err(|err| err.to_string())?;
    let metrics = Metric::ALL.iter().map(|m| define_metric(config_envoy, *m)).collect();
    // SAFETY: on the main thread with Envoy's live config.
    let scheduler = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(config_envoy) };
    if scheduler.is_null() {
        return Err("Envoy gave no scheduler".to_owned());
    }
    let plugin = Arc::new(Plugin {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        json,
        envoy: config_envoy as usize,
        metrics,
        settler: Mutex::new(Settler::default()),
        scheduler: Mutex::new(Some(scheduler as usize)),
    });
    let mut main = MainEnvoy { plugin: &plugin };
    let needs_tick = Refresher::new(&config).is_needed() || config.credits.is_some();
    let local = local(&plugin).ok_or("the config did not parse twice")?;
    local.refresh.borrow_mut().on_tick(&local.config, &local.worker.auth, &mut main);
    if needs_tick {
        start_timer(Arc::downgrade(&plugin))?;
    }
    Ok(plugin)
}

fn define_metric(config_envoy: ConfigEnvoyPtr, metric: Metric) -> Option<usize> {
    let mut id = 0usize;
    let name = ModuleBuffer::of(metric.name().as_bytes());
    // SAFETY: on the main thread with Envoy's live config; `id` is written by Envoy.
    let result = unsafe {
        if metric.is_histogram() {
            abi::envoy_dynamic_module_callback_http_filter_config_define_histogram(
                config_envoy,
                name,
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        } else {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                config_envoy,
                name,
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        }
    };
    if result != abi::METRICS_SUCCESS {
        log::warn!("tollgate: cannot define metric {}: {result}", metric.name());
        return None;
    }
    Some(id)
}

/// The ABI has no timer: a thread of ours sleeps and commits a tick to the config's scheduler,
/// which runs it on the main thread. It does nothing else, so it never holds a worker up, and it
/// ends once the config is gone.
fn start_timer(plugin: Weak<Plugin>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("tollgate-tick".to_owned())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            match plugin.upgrade() {
                Some(plugin) if plugin.commit(EVENT_TICK) => {}
                _ => return,
            }
        })
        .map(drop)
        .map_err(|err| format!("cannot start the timer thread: {err}"))
}

/// # Safety
/// `ptr` must be what `envoy_dynamic_module_on_http_filter_config_new` returned, not destroyed.
unsafe fn plugin_of<'a>(ptr: *const std::ffi::c_void) -> Option<&'a Arc<Plugin>> {
    // SAFETY: forwarded to the caller: a live `Box<Arc<Plugin>>` of ours, or null.
    unsafe { ptr.cast::<Arc<Plugin>>().as_ref() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const std::ffi::c_void) {
    guarded("config destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: Envoy hands back the pointer config_new made, once, and never uses it again.
        let plugin = unsafe { Box::from_raw(config.cast::<Arc<Plugin>>().cast_mut()) };
        let mut scheduler = plugin.scheduler.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(scheduler) = scheduler.take() {
            // SAFETY: ours to delete, once; no commit can run while the lock is held.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler as ConfigSchedulerPtr)
            };
        }
    })
}

/// The root-context work, on the main thread: send due settlements and, on a tick, refresh.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: ConfigEnvoyPtr,
    config: *const std::ffi::c_void,
    event: u64,
) {
    guarded("config scheduled", (), || {
        // SAFETY: Envoy passes the live config this module made.
        let Some(plugin) = (unsafe { plugin_of(config) }) else { return };
        let Some(local) = local(plugin) else { return };
        let mut main = MainEnvoy { plugin };
        if event == EVENT_TICK {
            if let Ok(mut refresh) = local.refresh.try_borrow_mut() {
                refresh.on_tick(&local.config, &local.worker.auth, &mut main);
            }
        }
        if let Some(credits) = &local.config.credits {
            plugin.settler.lock().unwrap_or_else(PoisonError::into_inner).send_due(&mut main, credits);
        }
        local.worker.flush_grants(&mut main, &local.config);
    })
}

/// A main-thread callout came back: a settlement's, or a refresh's.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: ConfigEnvoyPtr,
    config: *const std::ffi::c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    guarded("config callout done", (), || {
        // SAFETY: Envoy passes the live config this module made.
        let Some(plugin) = (unsafe { plugin_of(config) }) else { return };
        let Some(local) = local(plugin) else { return };
        let Ok(token) = u32::try_from(callout_id) else { return };
        // SAFETY: Envoy's arrays, valid for this hook.
        let answer = unsafe { host::call_answer(result, headers, headers_size, chunks, chunks_size) };
        let mut main = MainEnvoy { plugin };
        if local.worker.is_grant_report(token) {
            local.worker.grant_answer(&mut main, token, answer);
            return;
        }
        if let Some(credits) = &local.config.credits {
            let mut settler = plugin.settler.lock().unwrap_or_else(PoisonError::into_inner);
            if settler.is_waiting_for(token) {
                settler.on_answer(&mut main, credits, token, answer);
                return;
            }
        }
        let body = answer.filter(|(status, _)| *status == 200).map(|(_, body)| body);
        if let Ok(mut refresh) = local.refresh.try_borrow_mut() {
            refresh.on_response(&local.config, &local.worker.auth, token, body, &mut main);
        };
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const std::ffi::c_void {
    // Per-route policy comes from route metadata, as in the wasm build; a per-route config is
    // refused rather than ignored.
    log::error!("tollgate: per-route filter config is not supported; name a policy in route metadata");
    std::ptr::null()
}

/// Required by Envoy; never called, since no per-route config is ever made.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: *const std::ffi::c_void) {}

// ---------------------------------------------------------------------------------------------
// Stream hooks

/// Which hook a pipeline step runs in.
#[derive(Clone, Copy)]
enum Hook {
    /// Request headers, body or trailers: Envoy waits for the hook's answer to go on.
    Request(&'static str),
    /// Response headers, or the end of the stream.
    Response(&'static str),
    /// A callout's answer: nothing waits on it, the stream goes on by `continue_decoding`.
    Callout,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Request(name) | Hook::Response(name) => name,
            Hook::Callout => "callout done",
        }
    }
}

/// A callout's token and its answer (status and body; `None` when none came).
type Answer = (u32, Option<(u16, Vec<u8>)>);

/// One stream's state behind Envoy's filter.
struct Filter {
    plugin: Arc<Plugin>,
    local: Option<Rc<Local>>,
    stream: RefCell<Option<Stream>>,
    /// Callout answers that arrived while a hook held the stream (Envoy may answer a failed
    /// callout inside the call that made it): the hook hands them over before it returns.
    early_answers: RefCell<Vec<Answer>>,
    buffering: Cell<bool>,
    /// A hook panicked: the request was answered and nothing more is done.
    failed: Cell<bool>,
    response_started: Cell<bool>,
}

/// # Safety
/// `ptr` must be what `envoy_dynamic_module_on_http_filter_new` returned, not destroyed.
unsafe fn filter_of<'a>(ptr: *const std::ffi::c_void) -> Option<&'a Filter> {
    // SAFETY: forwarded to the caller: a live `Box<Filter>` of ours, or null.
    unsafe { ptr.cast::<Filter>().as_ref() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const std::ffi::c_void,
    _filter_envoy: FilterEnvoyPtr,
) -> *const std::ffi::c_void {
    guarded("filter new", std::ptr::null(), || {
        // SAFETY: Envoy passes the live config this module made.
        let Some(plugin) = (unsafe { plugin_of(config) }) else { return std::ptr::null() };
        let local = local(plugin);
        let stream = local.as_ref().map(|l| {
            load_documents(plugin, l);
            Stream::new(Rc::clone(&l.config), Rc::clone(&l.worker))
        });
        let filter = Filter {
            plugin: Arc::clone(plugin),
            local,
            stream: RefCell::new(stream),
            early_answers: RefCell::new(Vec::new()),
            buffering: Cell::new(false),
            failed: Cell::new(false),
            response_started: Cell::new(false),
        };
        Box::into_raw(Box::new(filter)).cast_const().cast()
    })
}

/// A worker has no tick: a new stream loads what another thread stored (a JWKS the main thread
/// fetched, one a stream refetched) as soon as there is something new, for one atomic load.
fn load_documents(plugin: &Plugin, local: &Local) {
    let sets = store().sets();
    if sets == local.loaded.get() {
        return;
    }
    local.loaded.set(sets);
    if let Ok(mut refresh) = local.refresh.try_borrow_mut() {
        refresh.load_shared(&local.config, &local.worker.auth, &MainEnvoy { plugin });
    }
}

impl Filter {
    /// Runs one pipeline step with the stream and a host for this hook; answers a panic with a 500.
    fn run(&self, envoy: FilterEnvoyPtr, hook: Hook, step: impl FnOnce(&mut Stream, &mut StreamEnvoy) -> Flow) -> Flow {
        if self.failed.get() {
            return Flow::Pause;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let Some(local) = &self.local else { return Err(()) };
            let Ok(mut stream) = self.stream.try_borrow_mut() else {
                // Held by the hook that is running: Envoy calls back into the filter while it
                // sends our own local reply, which needs nothing more from the pipeline. A request
                // hook is never let on from here (nothing of ours continues a stream it holds).
                return Ok(match hook {
                    Hook::Request(_) => (Flow::Pause, false),
                    Hook::Response(_) | Hook::Callout => (Flow::Continue, false),
                });
            };
            let Some(stream) = stream.as_mut() else { return Err(()) };
            let mut host = StreamEnvoy {
                filter: envoy,
                plugin: &self.plugin,
                worker: &local.worker,
                resumed: false,
                buffering: self.buffering.get(),
            };
            let flow = step(stream, &mut host);
            loop {
                let Some((token, answer)) = self.early_answers.borrow_mut().pop() else { break };
                stream.on_http_call_response(&mut host, token, answer);
            }
            Ok((flow, host.resumed))
        }));
        match outcome {
            // A resume asked for in a hook Envoy is waiting on is that hook's answer; one asked for
            // in a callout's answer is sent once the stream is let go, since Envoy runs the body
            // hook inside `continue_decoding`.
            Ok(Ok((flow, resumed))) => match (hook, resumed) {
                (Hook::Callout, true) => {
                    // SAFETY: `envoy` is the live filter whose callout came back.
                    unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(envoy) };
                    flow
                }
                (_, true) => Flow::Continue,
                (_, false) => flow,
            },
            Ok(Err(())) => {
                // No stream: the config never parsed on this thread. Fail closed.
                answer_failure(envoy, &Denial::Unconfigured);
                self.failed.set(true);
                Flow::Pause
            }
            Err(_) => {
                log::error!("tollgate: panic in {}; the request is answered 500 and Envoy carries on", hook.name());
                self.failed.set(true);
                if !self.response_started.get() {
                    answer_failure(envoy, &Denial::Host(HostError("handle the request")));
                }
                Flow::Pause
            }
        }
    }
}

/// Answers a request the pipeline could not handle as the pipeline answers its own refusals:
/// problem+json, or to a gRPC caller its gRPC status, trailers-only.
fn answer_failure(envoy: FilterEnvoyPtr, denial: &Denial) {
    let status = denial.problem_type().status;
    match grpc::Wire::of(host::request_header(envoy, "content-type").as_deref()) {
        Some(wire) => {
            let message = grpc::percent_encode(&denial.to_string());
            let code = grpc::Code::of(status).as_str();
            let headers = [("content-type", wire.content_type()), ("grpc-status", code), ("grpc-message", &message)];
            host::send_response(envoy, 200, &headers, &[]);
        }
        None => {
            let body = problem::body(denial, "");
            host::send_response(envoy, status, &[("content-type", "application/problem+json")], &body);
        }
    }
}

/// Test builds only (`make native-probe`, feature `native-panic-probe`): a request carrying
/// `x-tollgate-panic-probe` panics inside the pipeline's step, so tests/native_panic.rs can see the
/// guard answer 500 and Envoy carry on. Release builds compile the empty one.
#[cfg(feature = "native-panic-probe")]
#[allow(clippy::panic, reason = "a panic on demand is the probe's whole point")]
fn panic_probe(host: &StreamEnvoy) {
    use crate::host::StreamHost;
    if host.request_headers().iter().any(|(name, _)| name == "x-tollgate-panic-probe") {
        panic!("tollgate panic probe");
    }
}

#[cfg(not(feature = "native-panic-probe"))]
fn panic_probe(_host: &StreamEnvoy) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
    end_of_stream: bool,
) -> u32 {
    guarded("request headers", abi::HEADERS_STOP_ALL_AND_BUFFER, || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return abi::HEADERS_CONTINUE };
        let step = |s: &mut Stream, h: &mut StreamEnvoy| {
            panic_probe(h);
            s.on_request_headers(h, end_of_stream)
        };
        match filter.run(envoy, Hook::Request("request headers"), step) {
            Flow::Continue => abi::HEADERS_CONTINUE,
            // Envoy holds the headers and buffers the body: the filter sees it once it goes on.
            Flow::Pause => abi::HEADERS_STOP_ALL_AND_BUFFER,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
    end_of_stream: bool,
) -> u32 {
    guarded("request body", abi::BODY_STOP_AND_BUFFER, || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return abi::BODY_CONTINUE };
        let flow = filter.run(envoy, Hook::Request("request body"), |s, h| {
            let size = h.held_body_size();
            s.on_request_body(h, size, end_of_stream)
        });
        filter.buffering.set(flow == Flow::Pause);
        match flow {
            Flow::Continue => abi::BODY_CONTINUE,
            Flow::Pause => abi::BODY_STOP_AND_BUFFER,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
) -> u32 {
    guarded("request trailers", abi::TRAILERS_STOP, || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return abi::TRAILERS_CONTINUE };
        match filter.run(envoy, Hook::Request("request trailers"), |s, h| s.on_request_trailers(h)) {
            Flow::Continue => abi::TRAILERS_CONTINUE,
            Flow::Pause => abi::TRAILERS_STOP,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
    _end_of_stream: bool,
) -> u32 {
    guarded("response headers", abi::HEADERS_CONTINUE, || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return abi::HEADERS_CONTINUE };
        if !filter.failed.get() {
            filter.run(envoy, Hook::Response("response headers"), |s, h| s.on_response_headers(h));
        }
        filter.response_started.set(true);
        abi::HEADERS_CONTINUE
    })
}

/// Required by Envoy; tollgate does not read the response body.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _end_of_stream: bool,
) -> u32 {
    abi::BODY_CONTINUE
}

/// A gRPC call's outcome, `grpc-status`, is in the response trailers.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
) -> u32 {
    guarded("response trailers", abi::TRAILERS_CONTINUE, || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return abi::TRAILERS_CONTINUE };
        if !filter.failed.get() {
            filter.run(envoy, Hook::Response("response trailers"), |s, h| s.on_response_trailers(h));
        }
        abi::TRAILERS_CONTINUE
    })
}

/// The stream is over, whether answered, reset or abandoned: what it holds is given back.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
) {
    guarded("stream complete", (), || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return };
        filter.failed.set(false);
        filter.response_started.set(true);
        filter.run(envoy, Hook::Response("stream complete"), |s, h| {
            s.on_done(h);
            Flow::Continue
        });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const std::ffi::c_void) {
    guarded("filter destroy", (), || {
        if !filter.is_null() {
            // SAFETY: Envoy hands back the pointer filter_new made, once, and never uses it again.
            drop(unsafe { Box::from_raw(filter.cast::<Filter>().cast_mut()) });
        }
    })
}

/// A callout this stream made came back (or failed).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: FilterEnvoyPtr,
    filter: *const std::ffi::c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    guarded("callout done", (), || {
        // SAFETY: Envoy passes the live filter this module made.
        let Some(filter) = (unsafe { filter_of(filter) }) else { return };
        let Ok(token) = u32::try_from(callout_id) else { return };
        // SAFETY: Envoy's arrays, valid for this hook.
        let answer = unsafe { host::call_answer(result, headers, headers_size, chunks, chunks_size) };
        if filter.stream.try_borrow_mut().is_err() {
            // Inside the hook that made the call: that hook takes it.
            filter.early_answers.borrow_mut().push((token, answer));
            return;
        }
        filter.run(envoy, Hook::Callout, |s, h| {
            s.on_http_call_response(h, token, answer);
            Flow::Continue
        });
    })
}

/// Required by Envoy; tollgate makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _stream: u64,
    _headers: *const EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// Required by Envoy; tollgate makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// Required by Envoy; tollgate makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _stream: u64,
    _trailers: *const EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

/// Required by Envoy; tollgate makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _stream: u64,
) {
}

/// Required by Envoy; tollgate makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _stream: u64,
    _reason: u32,
) {
}

/// Required by Envoy; tollgate schedules nothing per stream.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _event: u64,
) {
}

/// Required by Envoy; tollgate is not a terminal filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
) {
}

/// Required by Envoy; tollgate is not a terminal filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
) {
}

/// Required by Envoy; a local reply (ours or another filter's) goes out as it is.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _envoy: FilterEnvoyPtr,
    _filter: *const std::ffi::c_void,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    abi::LOCAL_REPLY_CONTINUE
}

/// Required by Envoy; the config makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _config_envoy: ConfigEnvoyPtr,
    _config: *const std::ffi::c_void,
    _stream: u64,
    _headers: *const EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// Required by Envoy; the config makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _config_envoy: ConfigEnvoyPtr,
    _config: *const std::ffi::c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// Required by Envoy; the config makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _config_envoy: ConfigEnvoyPtr,
    _config: *const std::ffi::c_void,
    _stream: u64,
    _trailers: *const EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

/// Required by Envoy; the config makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _config_envoy: ConfigEnvoyPtr,
    _config: *const std::ffi::c_void,
    _stream: u64,
) {
}

/// Required by Envoy; the config makes no streaming callouts.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _config_envoy: ConfigEnvoyPtr,
    _config: *const std::ffi::c_void,
    _stream: u64,
    _reason: u32,
) {
}
