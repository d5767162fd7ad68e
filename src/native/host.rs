//! `Host` over Envoy's dynamic-module callbacks: `StreamHost` for a stream on a worker thread, and
//! `Host` for the main thread, which does the root-context work (settlements, JWKS refresh). A
//! callback that fails is logged and the request carries on, as in the wasm build.

use std::time::{SystemTime, UNIX_EPOCH};

use super::abi::{self, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, ModuleBuffer, ModuleHttpHeader};
use super::store::store;
use super::Plugin;
use crate::grpc;
use crate::host::{Callout, Host, HostError, StreamHost};
use crate::metrics::Metric;
use crate::worker::Worker;

/// Unix time from the process clock: the one Envoy's own `TimeSource` reads, without a call.
fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Bytes as text. Header values may carry obs-text bytes, which are replaced, never trusted.
fn text(bytes: &[u8]) -> String {
    // Valid UTF-8, the common case, is checked far faster than it is converted lossily.
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// A callout's headers as the ABI takes them: the pseudo-headers, the call's own, and `accept`.
fn callout_headers(call: &Callout) -> Vec<ModuleHttpHeader> {
    let mut headers = vec![
        ModuleHttpHeader::of(":method", call.method.as_bytes()),
        ModuleHttpHeader::of(":path", call.path.as_bytes()),
        ModuleHttpHeader::of(":authority", call.authority.as_bytes()),
    ];
    headers.extend(call.headers.iter().map(|(n, v)| ModuleHttpHeader::of(n, v.as_bytes())));
    headers.push(ModuleHttpHeader::of("accept", b"application/json"));
    headers
}

/// A callout's answer as the pipeline takes it: status and body; `None` when none came.
///
/// # Safety
/// `headers` and `chunks` must be null or point to `headers_size` and `chunks_size` elements that
/// Envoy keeps valid for the hook.
pub unsafe fn call_answer(
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) -> Option<(u16, Vec<u8>)> {
    if result != abi::CALLOUT_SUCCESS || headers.is_null() {
        return None;
    }
    // SAFETY: Envoy passes `headers_size` headers, valid until the hook returns.
    let headers = unsafe { std::slice::from_raw_parts(headers, headers_size) };
    let status = headers.iter().find_map(|h| {
        // SAFETY: each header's buffers are Envoy's, valid until the hook returns.
        let (name, value) = unsafe { (header_part(h.key_ptr, h.key_length), header_part(h.value_ptr, h.value_length)) };
        (name == b":status").then(|| text(value))
    })?;
    let status = status.parse().ok()?;
    let mut body = Vec::new();
    if !chunks.is_null() {
        // SAFETY: Envoy passes `chunks_size` buffers, valid until the hook returns.
        for chunk in unsafe { std::slice::from_raw_parts(chunks, chunks_size) } {
            // SAFETY: as above, for each chunk's bytes.
            body.extend_from_slice(unsafe { chunk.bytes() });
        }
    }
    Some((status, body))
}

/// # Safety
/// `ptr` must be null or point to `len` bytes valid for the returned lifetime.
unsafe fn header_part<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { EnvoyBuffer { ptr, length: len }.bytes() }
}

fn logged(what: &str, ok: bool) -> bool {
    if !ok {
        log::warn!("tollgate: {what} failed");
    }
    ok
}

/// One stream's view of Envoy, for the length of one hook.
pub struct StreamEnvoy<'a> {
    pub filter: FilterEnvoyPtr,
    pub plugin: &'a Plugin,
    pub worker: &'a Worker,
    /// A resume the pipeline asked for: the hook that runs it decides how Envoy hears of it (see
    /// `Filter::run`), since Envoy must not be told to continue a stream the filter still holds.
    pub resumed: bool,
    /// The request body Envoy holds for the filter spans its buffer and the chunk just received
    /// (the filter buffered the earlier chunks): the pipeline sees them as one body, as proxy-wasm
    /// reports them.
    pub buffering: bool,
}

impl StreamEnvoy<'_> {
    fn chunks(&self, body_type: u32) -> Vec<EnvoyBuffer> {
        // SAFETY: `filter` is the live filter of the current hook.
        let count = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.filter, body_type) };
        if count == 0 {
            return Vec::new();
        }
        let mut chunks = vec![EnvoyBuffer::EMPTY; count];
        // SAFETY: `chunks` has room for the `count` buffers Envoy reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(self.filter, body_type, chunks.as_mut_ptr())
        };
        if ok {
            chunks
        } else {
            Vec::new()
        }
    }

    /// What Envoy holds for the filter now, in order.
    fn held_chunks(&self) -> Vec<EnvoyBuffer> {
        let received = self.chunks(abi::RECEIVED_REQUEST_BODY);
        if !self.buffering {
            return received;
        }
        let mut held = self.chunks(abi::BUFFERED_REQUEST_BODY);
        held.extend(received);
        held
    }

    /// The size of the body Envoy holds for the filter, as the body hook reports it.
    pub fn held_body_size(&self) -> usize {
        self.held_chunks().iter().map(|c| c.length).sum()
    }

    fn header(&self, header_type: u32, name: &str) -> Option<String> {
        header(self.filter, header_type, name)
    }

    /// Every header of a map (request headers or trailers), pseudo-headers included.
    fn all_headers(&self, header_type: u32) -> Vec<(String, String)> {
        // SAFETY: `filter` is live.
        let count = unsafe { abi::envoy_dynamic_module_callback_http_get_headers_size(self.filter, header_type) };
        if count == 0 {
            return Vec::new();
        }
        let mut headers = vec![EnvoyHttpHeader::EMPTY; count];
        // SAFETY: `headers` has room for the `count` headers Envoy reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers(self.filter, header_type, headers.as_mut_ptr())
        };
        if !logged("read the headers", ok) {
            return Vec::new();
        }
        headers
            .iter()
            .map(|h| {
                // SAFETY: Envoy's buffers, valid until the hook returns or a header is set.
                let (name, value) =
                    unsafe { (header_part(h.key_ptr, h.key_length), header_part(h.value_ptr, h.value_length)) };
                (text(name), text(value))
            })
            .collect()
    }

    fn set_header(&self, header_type: u32, name: &str, value: ModuleBuffer) -> bool {
        // SAFETY: `filter` is live; the buffers are ours and outlive the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.filter,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }
}

/// What differs between a stream's view and the main thread's: whose counters and callouts the
/// ABI call names, and how the root is woken. The rest of `Host` is the same process-wide clock
/// and store for both.
pub trait Side {
    /// Adds to a counter (`histogram`: records in a histogram) defined on the plugin's config.
    fn record(&self, id: usize, histogram: bool, value: u64) -> u32;
    /// Starts a callout; Envoy writes its id into `id`.
    fn callout(
        &self,
        id: &mut u64,
        cluster: ModuleBuffer,
        headers: &mut [ModuleHttpHeader],
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    fn plugin(&self) -> &Plugin;
    fn wake(&mut self);
}

impl<S: Side> Host for S {
    fn now_nanos(&self) -> u64 {
        now_nanos()
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        store().get(key)
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        store().set(key, value);
    }

    fn shared_swap(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        store().swap(key, value, version)
    }

    fn count(&mut self, metric: Metric, value: u64) {
        let Some(id) = self.plugin().metric_id(metric) else { return };
        if metric.is_histogram() || value > 0 {
            logged("record a metric", self.record(id, metric.is_histogram(), value) == abi::METRICS_SUCCESS);
        }
    }

    fn http_call(&mut self, call: &Callout) -> Option<u32> {
        let mut headers = callout_headers(call);
        let mut id = 0u64;
        let cluster = ModuleBuffer::of(call.cluster.as_bytes());
        let result = self.callout(&mut id, cluster, &mut headers, ModuleBuffer::of(&call.body), call.timeout_ms);
        if result != abi::CALLOUT_INIT_SUCCESS {
            log::warn!("tollgate: callout to cluster {:?} failed: {result}", call.cluster);
            return None;
        }
        u32::try_from(id).ok()
    }

    fn wake_root(&mut self) {
        self.wake();
    }
}

impl Side for StreamEnvoy<'_> {
    fn record(&self, id: usize, histogram: bool, value: u64) -> u32 {
        let (labels, no_labels) = (std::ptr::null_mut(), 0);
        // SAFETY: `filter` is live and `id` was defined on the config that made it.
        unsafe {
            match histogram {
                true => abi::envoy_dynamic_module_callback_http_filter_record_histogram_value(
                    self.filter,
                    id,
                    labels,
                    no_labels,
                    value,
                ),
                false => abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                    self.filter,
                    id,
                    labels,
                    no_labels,
                    value,
                ),
            }
        }
    }

    fn callout(
        &self,
        id: &mut u64,
        cluster: ModuleBuffer,
        headers: &mut [ModuleHttpHeader],
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32 {
        // SAFETY: `filter` is live; every buffer is ours and outlives the call, which copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_http_callout(
                self.filter,
                id,
                cluster,
                headers.as_mut_ptr(),
                headers.len(),
                body,
                timeout_ms,
            )
        }
    }

    fn plugin(&self) -> &Plugin {
        self.plugin
    }

    /// Hands the worker's queued settlements to the main thread and wakes it.
    fn wake(&mut self) {
        self.plugin.take_settlements(self.worker);
        self.plugin.wake();
    }
}

impl StreamHost for StreamEnvoy<'_> {
    fn request_headers(&self) -> Vec<(String, String)> {
        self.all_headers(abi::REQUEST_HEADER)
    }

    fn request_trailers(&self) -> Vec<(String, String)> {
        self.all_headers(abi::REQUEST_TRAILER)
    }

    fn remove_request_trailer(&mut self, name: &str) -> Result<(), HostError> {
        match self.set_header(abi::REQUEST_TRAILER, name, ModuleBuffer::NULL) {
            true => Ok(()),
            false => Err(HostError("remove a request trailer")),
        }
    }

    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        match self.set_header(abi::REQUEST_HEADER, name, ModuleBuffer::of(value.as_bytes())) {
            true => Ok(()),
            false => Err(HostError("set a request header")),
        }
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        match self.set_header(abi::REQUEST_HEADER, name, ModuleBuffer::NULL) {
            true => Ok(()),
            false => Err(HostError("remove a request header")),
        }
    }

    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        let mut body = Vec::with_capacity(len);
        let mut skip = start;
        for chunk in self.held_chunks() {
            // SAFETY: Envoy's chunk, valid until the hook returns.
            let bytes = unsafe { chunk.bytes() };
            let from = skip.min(bytes.len());
            skip -= from;
            let take = (len - body.len()).min(bytes.len() - from);
            body.extend_from_slice(&bytes[from..from + take]);
            if body.len() == len {
                return Ok(body);
            }
        }
        Err(HostError("read the whole request body"))
    }

    fn resume_request(&mut self) {
        self.resumed = true;
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.header(abi::RESPONSE_HEADER, name)
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        logged(
            "set a response header",
            self.set_header(abi::RESPONSE_HEADER, name, ModuleBuffer::of(value.as_bytes())),
        );
    }

    fn remove_response_header(&mut self, name: &str) {
        logged("remove a response header", self.set_header(abi::RESPONSE_HEADER, name, ModuleBuffer::NULL));
    }

    fn response_trailer(&self, name: &str) -> Option<String> {
        self.header(abi::RESPONSE_TRAILER, name)
    }

    fn set_response_trailer(&mut self, name: &str, value: &str) {
        logged(
            "set a response trailer",
            self.set_header(abi::RESPONSE_TRAILER, name, ModuleBuffer::of(value.as_bytes())),
        );
    }

    fn remove_response_trailer(&mut self, name: &str) {
        logged("remove a response trailer", self.set_header(abi::RESPONSE_TRAILER, name, ModuleBuffer::NULL));
    }

    /// The two properties the pipeline reads: route metadata and the client address.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: `filter` is live; `value` is written by Envoy and copied within this hook.
        let found = unsafe {
            match path {
                ["xds", "route_metadata", "filter_metadata", namespace, key] => {
                    abi::envoy_dynamic_module_callback_http_get_metadata_string(
                        self.filter,
                        abi::METADATA_ROUTE,
                        ModuleBuffer::of(namespace.as_bytes()),
                        ModuleBuffer::of(key.as_bytes()),
                        &mut value,
                    )
                }
                ["source", "address"] => abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                    self.filter,
                    abi::ATTRIBUTE_SOURCE_ADDRESS,
                    &mut value,
                ),
                _ => false,
            }
        };
        // SAFETY: Envoy's buffer, valid until the hook returns.
        (found && !value.ptr.is_null()).then(|| unsafe { value.bytes() }.to_vec())
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        send_response(self.filter, status, headers, body);
    }

    /// The ABI's local reply takes no gRPC status: `headers` carry it. Envoy answers a gRPC request
    /// trailers-only and keeps a `grpc-status` it finds there; any other request (gRPC-Web) gets
    /// these headers on a 200 with no body, which is a trailers-only answer to it too.
    fn send_grpc_response(&mut self, _status: grpc::Code, headers: &[(&str, &str)]) {
        send_response(self.filter, 200, headers, &[]);
    }
}

/// A header of the stream `filter`, in the map `header_type`; `None` when absent.
fn header(filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<String> {
    let mut value = EnvoyBuffer::EMPTY;
    // SAFETY: `filter` is live; `value` is written by Envoy and read within this hook.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            filter,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            &mut value,
            0,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: Envoy's buffer, valid until the hook returns or a header is set.
    (found && !value.ptr.is_null()).then(|| text(unsafe { value.bytes() }))
}

/// A request header, for the panic guard's answer, which has no `StreamEnvoy`.
pub fn request_header(filter: FilterEnvoyPtr, name: &str) -> Option<String> {
    header(filter, abi::REQUEST_HEADER, name)
}

/// A local reply; also the panic guard's 500.
pub fn send_response(filter: FilterEnvoyPtr, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut headers: Vec<ModuleHttpHeader> =
        headers.iter().map(|(n, v)| ModuleHttpHeader::of(n, v.as_bytes())).collect();
    // SAFETY: `filter` is live; every buffer is ours and outlives the call, which copies them.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter,
            u32::from(status),
            headers.as_mut_ptr(),
            headers.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(b"tollgate"),
        );
    }
}

/// The main thread's view of Envoy, for the root-context work of one filter config.
pub struct MainEnvoy<'a> {
    pub plugin: &'a Plugin,
}

impl Side for MainEnvoy<'_> {
    fn record(&self, id: usize, histogram: bool, value: u64) -> u32 {
        let (config, labels, no_labels) = (self.plugin.envoy_config(), std::ptr::null_mut(), 0);
        // SAFETY: on the main thread, with the config that defined `id`.
        unsafe {
            match histogram {
                true => abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                    config, id, labels, no_labels, value,
                ),
                false => abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    config, id, labels, no_labels, value,
                ),
            }
        }
    }

    fn callout(
        &self,
        id: &mut u64,
        cluster: ModuleBuffer,
        headers: &mut [ModuleHttpHeader],
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32 {
        // SAFETY: on the main thread with a live config; every buffer outlives the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.plugin.envoy_config(),
                id,
                cluster,
                headers.as_mut_ptr(),
                headers.len(),
                body,
                timeout_ms,
            )
        }
    }

    fn plugin(&self) -> &Plugin {
        self.plugin
    }

    /// This is the root already: what it has to send, it sends.
    fn wake(&mut self) {}
}
