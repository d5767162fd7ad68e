//! `Host` over proxy-wasm hostcalls. The SDK's trait defaults `unwrap` every status; here a failed
//! hostcall is logged and the request carries on, because a panic would kill the worker's VM.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use std::cell::RefCell;

use proxy_wasm::types::{BufferType, GrpcStatusCode, MapType, MetricType, Status};

use crate::grpc;
use crate::host::{Callout, Host, HostError, StreamHost};
use crate::metrics::Metric;

/// The proxy, as the contexts of one VM see it.
pub struct WasmHost;

thread_local! {
    /// Envoy's id for each of `Metric::ALL`, defined once per VM.
    static METRIC_IDS: RefCell<Vec<Option<u32>>> = const { RefCell::new(Vec::new()) };
    /// The shared queue that wakes this worker's root context (`on_queue_ready`).
    static ROOT_QUEUE: RefCell<Option<u32>> = const { RefCell::new(None) };
}

/// Registers the queue streams wake the root context through. Queues are shared by every VM of
/// the plugin in the process, so each worker's has a name of its own.
pub fn register_root_queue(name: &str) -> bool {
    let id = logged("register shared queue", hostcalls::register_shared_queue(name).map(Some));
    ROOT_QUEUE.with(|cell| *cell.borrow_mut() = id);
    id.is_some()
}

/// Empties the root's queue: its entries only say "wake up".
pub fn drain_root_queue(queue_id: u32) {
    while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
}

/// Defines the filter's metrics in this VM; Envoy returns the existing id for a name another VM
/// defined, so all workers add to the same stat.
pub fn define_metrics() {
    let ids = Metric::ALL
        .iter()
        .map(|m| {
            let kind = if m.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
            logged("define metric", hostcalls::define_metric(kind, m.name()).map(Some))
        })
        .collect();
    METRIC_IDS.with(|cell| *cell.borrow_mut() = ids);
}

/// A hostcall the request depends on: its failure is the pipeline's to act on, and logged here.
fn checked<T>(what: &'static str, result: Result<T, Status>) -> Result<T, HostError> {
    result.map_err(|status| {
        log::warn!("tollgate: hostcall {what} failed: {status:?}");
        HostError(what)
    })
}

fn logged<T: Default>(what: &str, result: Result<T, Status>) -> T {
    result.unwrap_or_else(|status| {
        log::warn!("tollgate: hostcall {what} failed: {status:?}");
        T::default()
    })
}

/// An HTTP callout's answer: status and body; `None` when there was none (timeout, reset, no
/// connection).
pub fn call_answer(body_size: usize) -> Option<(u16, Vec<u8>)> {
    let status = logged("get call status", hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status"));
    let status = text(status?).parse().ok()?;
    let body = logged("get call body", hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size));
    Some((status, body.unwrap_or_default()))
}

/// A header value as text. HTTP lets values carry obs-text bytes (0x80-0xFF), which Envoy passes
/// on; the SDK's `String` getters unwrap them as UTF-8 and would panic, killing the VM, so values
/// are read as bytes and anything invalid is replaced, never trusted.
fn text(value: Vec<u8>) -> String {
    String::from_utf8(value).unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
}

fn dispatch(call: &Callout) -> Option<u32> {
    let mut headers = vec![(":method", call.method), (":path", &call.path), (":authority", &call.authority)];
    headers.extend(call.headers.iter().map(|(n, v)| (*n, v.as_str())));
    headers.push(("accept", "application/json"));
    let body = (!call.body.is_empty()).then_some(call.body.as_slice());
    match hostcalls::dispatch_http_call(&call.cluster, headers, body, vec![], Duration::from_millis(call.timeout_ms)) {
        Ok(token) => Some(token),
        Err(status) => {
            log::warn!("tollgate: callout to cluster {:?} failed: {status:?}", call.cluster);
            None
        }
    }
}

impl Host for WasmHost {
    fn now_nanos(&self) -> u64 {
        let time = logged("get time", hostcalls::get_current_time().map(Some)).unwrap_or(UNIX_EPOCH);
        time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Some((value, cas)),
            Ok(_) => None,
            Err(status) => {
                log::warn!("tollgate: hostcall get shared data failed: {status:?}");
                None
            }
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        logged("set shared data", hostcalls::set_shared_data(key, Some(value), None));
    }

    fn shared_swap(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        match hostcalls::set_shared_data(key, Some(value), version) {
            Ok(()) => true,
            Err(Status::CasMismatch) => false,
            Err(status) => {
                log::warn!("tollgate: hostcall set shared data failed: {status:?}");
                false
            }
        }
    }

    fn count(&mut self, metric: Metric, value: u64) {
        let Some(id) = METRIC_IDS.with(|cell| cell.borrow().get(metric.index()).copied().flatten()) else { return };
        if metric.is_histogram() {
            logged("record metric", hostcalls::record_metric(id, value));
        } else if value > 0 {
            logged("increment metric", hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX)));
        }
    }

    fn http_call(&mut self, call: &Callout) -> Option<u32> {
        dispatch(call)
    }

    fn wake_root(&mut self) {
        if let Some(queue) = ROOT_QUEUE.with(|cell| *cell.borrow()) {
            logged("wake the root context", hostcalls::enqueue_shared_queue(queue, Some(b"")));
        }
    }
}

impl StreamHost for WasmHost {
    fn request_headers(&self) -> Vec<(String, String)> {
        let headers = logged("get request headers", hostcalls::get_map_bytes(MapType::HttpRequestHeaders));
        headers.into_iter().map(|(name, value)| (name, text(value))).collect()
    }

    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        checked("set a request header", hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)))
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        checked("remove a request header", hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None))
    }

    fn request_trailers(&self) -> Vec<(String, String)> {
        let trailers = logged("get request trailers", hostcalls::get_map_bytes(MapType::HttpRequestTrailers));
        trailers.into_iter().map(|(name, value)| (name, text(value))).collect()
    }

    fn remove_request_trailer(&mut self, name: &str) -> Result<(), HostError> {
        checked("remove a request trailer", hostcalls::set_map_value(MapType::HttpRequestTrailers, name, None))
    }

    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        let body = checked("read the request body", hostcalls::get_buffer(BufferType::HttpRequestBody, start, len))?;
        let body = body.unwrap_or_default();
        match body.len() == len {
            true => Ok(body),
            false => Err(HostError("read the whole request body")),
        }
    }

    fn resume_request(&mut self) {
        logged("resume request", hostcalls::resume_http_request());
    }

    fn response_header(&self, name: &str) -> Option<String> {
        logged("get response header", hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)).map(text)
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        logged("set response header", hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)));
    }

    fn remove_response_header(&mut self, name: &str) {
        logged("remove response header", hostcalls::set_map_value(MapType::HttpResponseHeaders, name, None));
    }

    fn response_trailer(&self, name: &str) -> Option<String> {
        logged("get response trailer", hostcalls::get_map_value_bytes(MapType::HttpResponseTrailers, name)).map(text)
    }

    fn set_response_trailer(&mut self, name: &str, value: &str) {
        logged("set response trailer", hostcalls::set_map_value(MapType::HttpResponseTrailers, name, Some(value)));
    }

    fn remove_response_trailer(&mut self, name: &str) {
        logged("remove response trailer", hostcalls::set_map_value(MapType::HttpResponseTrailers, name, None));
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        logged("get property", hostcalls::get_property(path.to_vec()))
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        logged("send response", hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)));
    }

    /// `grpc-status` and `grpc-message` are in `headers`, which Envoy keeps as they are; the
    /// status argument says the same to Envoy, which then answers trailers-only.
    fn send_grpc_response(&mut self, status: grpc::Code, headers: &[(&str, &str)]) {
        let metadata = headers.iter().map(|(name, value)| (*name, value.as_bytes())).collect();
        logged("send gRPC response", hostcalls::send_grpc_response(grpc_status(status), None, metadata));
    }
}

fn grpc_status(code: grpc::Code) -> GrpcStatusCode {
    match code {
        grpc::Code::InvalidArgument => GrpcStatusCode::InvalidArgument,
        grpc::Code::PermissionDenied => GrpcStatusCode::PermissionDenied,
        grpc::Code::ResourceExhausted => GrpcStatusCode::ResourceExhausted,
        grpc::Code::FailedPrecondition => GrpcStatusCode::FailedPrecondition,
        grpc::Code::Unimplemented => GrpcStatusCode::Unimplemented,
        grpc::Code::Internal => GrpcStatusCode::Internal,
        grpc::Code::Unavailable => GrpcStatusCode::Unavailable,
        grpc::Code::Unauthenticated => GrpcStatusCode::Unauthenticated,
    }
}
