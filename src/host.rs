//! The one door from the pipeline to the proxy. The wasm adapter implements it with proxy-wasm
//! hostcalls; unit tests implement it with a recording fake.

use crate::grpc;
use crate::metrics::Metric;

/// The proxy's clock counts nanoseconds.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;
pub const NANOS_PER_MS: u64 = 1_000_000;

/// What any context of the VM may ask of the proxy: the clock, shared data, metrics and callouts.
/// These do not fail: the adapter logs a hostcall error and carries on, because a request is
/// better served than a worker's VM killed by a panic, and none of them edits what goes upstream.
pub trait Host {
    /// Unix time in seconds, from the proxy's clock.
    fn now(&self) -> u64 {
        self.now_nanos() / NANOS_PER_SECOND
    }
    /// Unix time in nanoseconds, from the proxy's clock.
    fn now_nanos(&self) -> u64;
    /// A value in Envoy's shared data (one store for all workers of the VM) and its version.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Stores a value in Envoy's shared data, whatever its current version.
    fn shared_set(&mut self, key: &str, value: &[u8]);
    /// Stores a value only if the entry is still at `version` (`None`: whatever it is); `false`
    /// when another worker changed it first.
    fn shared_swap(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool;
    /// Adds `value` to a counter, or records it in a histogram.
    fn count(&mut self, metric: Metric, value: u64);
    /// An HTTP call to an Envoy cluster; the token its answer will come back to this context with,
    /// or `None` when the call could not be made (unknown cluster, say).
    fn http_call(&mut self, call: &Callout) -> Option<u32>;
    /// Asks the worker's root context to run soon (it sends queued settlements).
    fn wake_root(&mut self);
}

/// What one stream may ask of the proxy, on top of `Host`. An edit of the request that fails is
/// an error the pipeline must act on: a forged identity header that could not be removed, or a
/// credential left in place, must not reach the upstream.
pub trait StreamHost: Host {
    /// All request headers in one call (pseudo-headers included, names lower-case).
    fn request_headers(&self) -> Vec<(String, String)>;
    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// The request trailers (names lower-case), when the request has them.
    fn request_trailers(&self) -> Vec<(String, String)>;
    fn remove_request_trailer(&mut self, name: &str) -> Result<(), HostError>;
    /// `len` bytes of the request body Envoy holds for the filter, from `start`.
    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError>;
    /// Lets a paused request go on.
    fn resume_request(&mut self);
    /// A response header (`:status` included); `None` when absent.
    fn response_header(&self, name: &str) -> Option<String>;
    fn set_response_header(&mut self, name: &str, value: &str);
    fn remove_response_header(&mut self, name: &str);
    /// A response trailer (a gRPC call's `grpc-status`, say); `None` when absent. Only from the
    /// response trailers hook.
    fn response_trailer(&self, name: &str) -> Option<String>;
    fn set_response_trailer(&mut self, name: &str, value: &str);
    fn remove_response_trailer(&mut self, name: &str);
    /// An Envoy attribute of this stream, e.g. `["xds", "route_metadata", …]`; `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Answers the request without the upstream.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Answers a gRPC call without the upstream: trailers-only, HTTP 200, `headers` (which carry
    /// `grpc-status` and `grpc-message`) and no body.
    fn send_grpc_response(&mut self, status: grpc::Code, headers: &[(&str, &str)]);
}

/// The proxy refused an operation on the stream (a hostcall returned an error status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the proxy could not {0}")]
pub struct HostError(pub &'static str);

/// An HTTP request to an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub cluster: String,
    pub method: &'static str,
    pub path: String,
    pub authority: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl Callout {
    pub fn get(cluster: &str, authority: &str, path: &str, timeout_ms: u64) -> Callout {
        Callout {
            cluster: cluster.to_owned(),
            method: "GET",
            path: path.to_owned(),
            authority: authority.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms,
        }
    }
}

/// A recording proxy for unit tests: request and response headers, a held body, properties, a
/// clock, shared data with versions, and the callouts made.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashMap;

    use super::{Callout, Host, HostError, StreamHost};
    use crate::grpc;
    use crate::metrics::Metric;

    pub const NOW: u64 = 1_800_000_000;

    /// A local reply: status, headers, parsed body (`null` for a gRPC one).
    pub type Sent = (u16, Vec<(String, String)>, serde_json::Value);

    pub struct FakeHost {
        pub request: Vec<(String, String)>,
        /// The request body Envoy holds for the filter.
        pub body: Vec<u8>,
        pub properties: HashMap<String, Vec<u8>>,
        pub removed: Vec<String>,
        pub response: Vec<(String, String)>,
        pub sent: Option<Sent>,
        /// The gRPC status of a gRPC local reply.
        pub grpc_sent: Option<grpc::Code>,
        pub resumed: bool,
        pub now: u64,
        /// Nanoseconds past `now`.
        pub nanos: u64,
        pub shared: HashMap<String, (Vec<u8>, u32)>,
        /// This many compare-and-swaps fail, as if another worker won the race.
        pub lose_swaps: u32,
        /// Callouts as `cluster` + `path`, and in full.
        pub calls: Vec<String>,
        pub sent_calls: Vec<Callout>,
        pub root_woken: u32,
        pub metrics: HashMap<&'static str, u64>,
        /// Request headers the proxy refuses to edit, as a hostcall failure would.
        pub locked: Vec<String>,
        pub trailers: Vec<(String, String)>,
        pub response_trailers: Vec<(String, String)>,
    }

    impl Default for FakeHost {
        fn default() -> Self {
            FakeHost {
                request: Vec::new(),
                body: Vec::new(),
                properties: HashMap::new(),
                removed: Vec::new(),
                response: Vec::new(),
                sent: None,
                grpc_sent: None,
                resumed: false,
                now: NOW,
                nanos: 0,
                shared: HashMap::new(),
                lose_swaps: 0,
                calls: Vec::new(),
                sent_calls: Vec::new(),
                root_woken: 0,
                metrics: HashMap::new(),
                locked: Vec::new(),
                trailers: Vec::new(),
                response_trailers: Vec::new(),
            }
        }
    }

    impl FakeHost {
        pub fn request(method: &str, path: &str, extra: &[(&str, &str)]) -> FakeHost {
            let mut request = vec![
                (":method".to_owned(), method.to_owned()),
                (":path".to_owned(), path.to_owned()),
                ("x-request-id".to_owned(), "rid-1".to_owned()),
            ];
            request.extend(extra.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
            FakeHost { request, ..FakeHost::default() }
        }

        pub fn upstream_header(&self, name: &str) -> Option<&str> {
            self.request.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }

        pub fn metric(&self, metric: Metric) -> u64 {
            self.metrics.get(metric.name()).copied().unwrap_or(0)
        }

        fn refuse_edit(&self, name: &str) -> Result<(), HostError> {
            match self.locked.iter().any(|n| n == name) {
                true => Err(HostError("edit a request header")),
                false => Ok(()),
            }
        }

        pub fn sent_header(&self, name: &str) -> Option<&str> {
            let (_, headers, _) = self.sent.as_ref()?;
            headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }
    }

    impl Host for FakeHost {
        fn now_nanos(&self) -> u64 {
            self.now * 1_000_000_000 + self.nanos
        }
        fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.shared.get(key).cloned()
        }
        fn shared_set(&mut self, key: &str, value: &[u8]) {
            let version = self.shared.get(key).map_or(1, |(_, v)| v + 1);
            self.shared.insert(key.to_owned(), (value.to_vec(), version));
        }
        fn shared_swap(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool {
            if self.lose_swaps > 0 {
                self.lose_swaps -= 1;
                return false;
            }
            if version.is_some() && self.shared.get(key).map(|(_, v)| *v) != version {
                return false;
            }
            self.shared_set(key, value);
            true
        }
        fn count(&mut self, metric: Metric, value: u64) {
            *self.metrics.entry(metric.name()).or_default() += value;
        }
        fn http_call(&mut self, call: &Callout) -> Option<u32> {
            self.calls.push(format!("{}{}", call.cluster, call.path));
            self.sent_calls.push(call.clone());
            u32::try_from(self.calls.len()).ok()
        }
        fn wake_root(&mut self) {
            self.root_woken += 1;
        }
    }

    impl StreamHost for FakeHost {
        fn request_headers(&self) -> Vec<(String, String)> {
            self.request.clone()
        }
        fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.refuse_edit(name)?;
            self.request.retain(|(n, _)| n != name);
            self.request.push((name.to_owned(), value.to_owned()));
            Ok(())
        }
        fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
            self.refuse_edit(name)?;
            self.request.retain(|(n, _)| n != name);
            self.removed.push(name.to_owned());
            Ok(())
        }
        fn request_trailers(&self) -> Vec<(String, String)> {
            self.trailers.clone()
        }
        fn remove_request_trailer(&mut self, name: &str) -> Result<(), HostError> {
            self.refuse_edit(name)?;
            self.trailers.retain(|(n, _)| n != name);
            Ok(())
        }
        fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
            self.body.get(start..start + len).map(<[u8]>::to_vec).ok_or(HostError("read the request body"))
        }
        fn resume_request(&mut self) {
            self.resumed = true;
        }
        fn response_header(&self, name: &str) -> Option<String> {
            self.response.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        }
        fn set_response_header(&mut self, name: &str, value: &str) {
            self.response.retain(|(n, _)| n != name);
            self.response.push((name.to_owned(), value.to_owned()));
        }
        fn remove_response_header(&mut self, name: &str) {
            self.response.retain(|(n, _)| n != name);
        }
        fn response_trailer(&self, name: &str) -> Option<String> {
            self.response_trailers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        }
        fn set_response_trailer(&mut self, name: &str, value: &str) {
            self.response_trailers.retain(|(n, _)| n != name);
            self.response_trailers.push((name.to_owned(), value.to_owned()));
        }
        fn remove_response_trailer(&mut self, name: &str) {
            self.response_trailers.retain(|(n, _)| n != name);
        }
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.properties.get(&path.join(".")).cloned()
        }
        fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
            let headers = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            self.sent = Some((status, headers, serde_json::from_slice(body).unwrap()));
        }
        fn send_grpc_response(&mut self, status: grpc::Code, headers: &[(&str, &str)]) {
            let headers = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            self.sent = Some((200, headers, serde_json::Value::Null));
            self.grpc_sent = Some(status);
        }
    }
}
