//! The proxy-wasm glue, and the only code that imports `proxy_wasm`: the root context loads the
//! config once, keeps remote JWKS fresh and settles credit reservations; each HTTP context hands
//! its callbacks to `Stream`.

mod host;

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

use crate::config::Config;
use crate::refresh::Refresher;
use crate::worker::Worker;
use crate::{Flow, Stream};
use host::WasmHost;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

struct Root {
    state: Option<Configured>,
}

/// What a root context holds once its configuration is valid.
struct Configured {
    config: Rc<Config>,
    worker: Rc<Worker>,
    refresh: Refresher,
}

impl Configured {
    /// Settlements due, and the process's grant report when its turn is due.
    fn send_settlements(&self) {
        if let (Some(credits), Ok(mut settler)) = (&self.config.credits, self.worker.settler.try_borrow_mut()) {
            settler.send_due(&mut WasmHost, credits);
        }
        self.worker.flush_grants(&mut WasmHost, &self.config);
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let mut host = WasmHost;
        let Some(state) = &mut self.state else { return };
        let answer = host::call_answer(body_size);
        if state.worker.is_grant_report(token_id) {
            state.worker.grant_answer(&mut host, token_id, answer);
            return;
        }
        if let (Some(credits), Ok(mut settler)) = (&state.config.credits, state.worker.settler.try_borrow_mut()) {
            if settler.is_waiting_for(token_id) {
                settler.on_answer(&mut host, credits, token_id, answer);
                return;
            }
        }
        let body = answer.filter(|(status, _)| *status == 200).map(|(_, body)| body);
        state.refresh.on_response(&state.config, &state.worker.auth, token_id, body, &mut host);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("tollgate {} ({}) starting", env!("CARGO_PKG_VERSION"), env!("TOLLGATE_GIT_HASH"));
        host::define_metrics();
        true
    }

    /// Returning `false` makes Envoy refuse the plugin: it never runs half-configured.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let mut host = WasmHost;
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!("tollgate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        let config = match Config::from_json(&bytes) {
            Ok(config) => Rc::new(config),
            Err(err) => {
                log::error!("tollgate: invalid plugin configuration: {err}");
                return false;
            }
        };
        let refresh = Refresher::new(&config);
        // The tick refreshes remote key sets and retries failed commits and releases.
        if refresh.is_needed() || config.credits.is_some() {
            if let Err(status) = hostcalls::set_tick_period(Duration::from_secs(1)) {
                log::error!("tollgate: cannot start the timer: {status:?}");
                return false;
            }
        }
        let worker = Rc::new(Worker::new(&config, &mut host));
        if config.credits.is_some() && !host::register_root_queue(&format!("tollgate.settle.{}", worker.id())) {
            return false;
        }
        let mut state = Configured { config, worker, refresh };
        state.refresh.on_tick(&state.config, &state.worker.auth, &mut host);
        self.state = Some(state);
        true
    }

    fn on_tick(&mut self) {
        let Some(state) = &mut self.state else { return };
        state.refresh.on_tick(&state.config, &state.worker.auth, &mut WasmHost);
        state.send_settlements();
    }

    /// A stream queued a settlement.
    fn on_queue_ready(&mut self, queue_id: u32) {
        host::drain_root_queue(queue_id);
        if let Some(state) = &mut self.state {
            state.send_settlements();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let stream = self.state.as_ref().map(|s| Stream::new(Rc::clone(&s.config), Rc::clone(&s.worker)));
        Some(Box::new(Http { stream }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    /// `None` only if Envoy created a stream for a plugin whose config failed.
    stream: Option<Stream>,
}

impl Context for Http {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(stream) = &mut self.stream {
            stream.on_http_call_response(&mut WasmHost, token_id, host::call_answer(body_size));
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_request_headers(&mut WasmHost, end_of_stream),
            None => crate::refuse_unconfigured(&mut WasmHost),
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_request_body(&mut WasmHost, body_size, end_of_stream),
            None => Flow::Pause,
        })
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_request_trailers(&mut WasmHost),
            None => Flow::Pause,
        })
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_response_headers(&mut WasmHost),
            None => Flow::Continue,
        })
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_response_trailers(&mut WasmHost),
            None => Flow::Continue,
        })
    }

    /// The stream is over, whether answered, reset or abandoned by the client.
    fn on_log(&mut self) {
        if let Some(stream) = &mut self.stream {
            stream.on_done(&mut WasmHost);
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}
