//! The one door from the pipeline to the proxy. The wasm adapter implements it with proxy-wasm
//! hostcalls; unit tests implement it with a recording fake.

/// What the pipeline asks of the proxy. Methods do not fail: the adapter logs a hostcall error
/// and carries on, because a request is better served than a worker's VM killed by a panic.
pub trait Host {
    /// All request headers in one call (pseudo-headers included, names lower-case).
    fn request_headers(&self) -> Vec<(String, String)>;
    fn remove_request_header(&mut self, name: &str);
    fn set_response_header(&mut self, name: &str, value: &str);
    fn remove_response_header(&mut self, name: &str);
    /// An Envoy attribute, e.g. `["xds", "route_metadata", …]`; `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Answers the request without the upstream.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]);
}
