//! The proxy-wasm glue, and the only code that imports `proxy_wasm`: the root context loads the
//! config once, each HTTP context hands its callbacks to the pipeline's `Stream`.

mod host;

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

use crate::config::Config;
use crate::{Flow, Stream};
use host::WasmHost;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("tollgate {} ({}) starting", env!("CARGO_PKG_VERSION"), env!("TOLLGATE_GIT_HASH"));
        true
    }

    /// Returning `false` makes Envoy refuse the plugin: it never runs half-configured.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!("tollgate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        match Config::from_json(&bytes) {
            Ok(config) => {
                self.config = Some(Rc::new(config));
                true
            }
            Err(err) => {
                log::error!("tollgate: invalid plugin configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { stream: self.config.clone().map(Stream::new) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    /// `None` only if Envoy created a stream for a plugin whose config failed.
    stream: Option<Stream>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_request_headers(&mut WasmHost),
            None => crate::refuse_unconfigured(&mut WasmHost),
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_request_body(&mut WasmHost, body_size),
            None => Flow::Pause,
        })
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(match &mut self.stream {
            Some(stream) => stream.on_response_headers(&mut WasmHost),
            None => Flow::Continue,
        })
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}
