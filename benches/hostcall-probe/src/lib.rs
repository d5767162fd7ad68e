//! The hostcall probe: per request, `count` calls of one kind, from the plugin config `kind:count`
//! (`noop` makes none). The benchmark compares Envoy's instructions per request across kinds; the
//! difference to `noop`, divided by `count`, is what one call costs.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

/// Response headers the calls set, as tollgate sets them: static names, short values.
const NAMES: [&str; 4] = ["x-content-type-options", "x-frame-options", "referrer-policy", "x-ratelimit-limit"];
const SHARED_KEY: &str = "probe.shared";
/// The test harness's recording upstream, which answers every request with a 200.
const CALLOUT_CLUSTER: &str = "upstream";

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Probe::default()) });
}}

#[derive(Clone, Copy, Default)]
struct Probe {
    kind: Kind,
    count: usize,
    /// Callouts sent and not yet answered; the request resumes when none are left.
    pending: usize,
}

#[derive(Clone, Copy, Default, PartialEq)]
enum Kind {
    #[default]
    Noop,
    /// Reads the request headers (one call, data back).
    RequestHeaders,
    /// Reads one request header (data back).
    RequestHeader,
    /// Route metadata, absent on the route: no data back.
    RouteMetadata,
    Time,
    /// Reads a shared-data value (data back).
    SharedGet,
    /// Sets a response header.
    ResponseSet,
    /// Removes a response header that is not there.
    ResponseRemove,
    /// An HTTP callout the request waits for: dispatch, the answer's callback, resume.
    HttpCall,
}

impl Context for Probe {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        self.pending -= 1;
        if self.pending == 0 {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl RootContext for Probe {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten();
        let config = String::from_utf8(config.unwrap_or_default()).unwrap_or_default();
        let (kind, count) = config.split_once(':').unwrap_or((&config, "0"));
        self.count = count.parse().unwrap_or(0);
        self.kind = match kind {
            "request-headers" => Kind::RequestHeaders,
            "request-header" => Kind::RequestHeader,
            "route-metadata" => Kind::RouteMetadata,
            "time" => Kind::Time,
            "shared-get" => Kind::SharedGet,
            "response-set" => Kind::ResponseSet,
            "response-remove" => Kind::ResponseRemove,
            "http-call" => Kind::HttpCall,
            _ => Kind::Noop,
        };
        hostcalls::set_shared_data(SHARED_KEY, Some(&[0; 48]), None).is_ok()
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(*self))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if self.kind == Kind::HttpCall {
            let headers = vec![(":method", "GET"), (":path", "/probe"), (":authority", "probe")];
            // A deadline that valgrind's slowness cannot reach.
            let timeout = Duration::from_secs(60);
            for _ in 0..self.count {
                if hostcalls::dispatch_http_call(CALLOUT_CLUSTER, headers.clone(), None, vec![], timeout).is_ok() {
                    self.pending += 1;
                }
            }
            return if self.pending > 0 { Action::Pause } else { Action::Continue };
        }
        for _ in 0..self.count {
            // Results are dropped: the probe prices the call, not what is done with its answer.
            let _ = match self.kind {
                Kind::RequestHeaders => hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map(drop),
                Kind::RequestHeader => hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "host").map(drop),
                Kind::RouteMetadata => {
                    hostcalls::get_property(vec!["xds", "route_metadata", "filter_metadata", "probe", "policy"])
                        .map(drop)
                }
                Kind::Time => hostcalls::get_current_time().map(drop),
                Kind::SharedGet => hostcalls::get_shared_data(SHARED_KEY).map(drop),
                _ => Ok(()),
            };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        for i in 0..self.count {
            let name = NAMES[i % NAMES.len()];
            let _ = match self.kind {
                Kind::ResponseSet => hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some("value")),
                Kind::ResponseRemove => hostcalls::set_map_value(MapType::HttpResponseHeaders, "x-absent", None),
                _ => Ok(()),
            };
        }
        Action::Continue
    }
}
