//! The one door from the pipeline to the proxy. The wasm adapter implements it with proxy-wasm
//! hostcalls; unit tests implement it with a recording fake.

/// What the pipeline asks of the proxy. Methods do not fail: the adapter logs a hostcall error
/// and carries on, because a request is better served than a worker's VM killed by a panic.
pub trait Host {
    /// All request headers in one call (pseudo-headers included, names lower-case).
    fn request_headers(&self) -> Vec<(String, String)>;
    fn set_request_header(&mut self, name: &str, value: &str);
    fn remove_request_header(&mut self, name: &str);
    /// `len` bytes of the request body Envoy holds for the filter, from `start`.
    fn request_body(&self, start: usize, len: usize) -> Vec<u8>;
    /// Lets a paused request go on.
    fn resume_request(&mut self);
    fn set_response_header(&mut self, name: &str, value: &str);
    fn remove_response_header(&mut self, name: &str);
    /// An Envoy attribute, e.g. `["xds", "route_metadata", …]`; `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Answers the request without the upstream.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Unix time in seconds, from the proxy's clock.
    fn now(&self) -> u64;
    /// A value in Envoy's shared data (one store for all workers of the VM) and its version.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Stores a value in Envoy's shared data, whatever its current version.
    fn shared_set(&mut self, key: &str, value: &[u8]);
    /// Stores a value only if the entry is still at `version` (`None`: whatever it is); `false`
    /// when another worker changed it first.
    fn shared_swap(&mut self, key: &str, value: &[u8], version: Option<u32>) -> bool;
    /// A GET to an Envoy cluster; the token its answer will come back with, or `None` when the
    /// call could not be made (unknown cluster, say).
    fn http_get(&mut self, cluster: &str, authority: &str, path: &str, timeout_ms: u64) -> Option<u32>;
}
