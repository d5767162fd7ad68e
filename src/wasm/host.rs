//! `Host` over proxy-wasm hostcalls. The SDK's trait defaults `unwrap` every status; here a failed
//! hostcall is logged and the request carries on, because a panic would kill the worker's VM.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

use crate::host::Host;

pub struct WasmHost;

fn logged<T: Default>(what: &str, result: Result<T, proxy_wasm::types::Status>) -> T {
    result.unwrap_or_else(|status| {
        log::warn!("tollgate: hostcall {what} failed: {status:?}");
        T::default()
    })
}

impl Host for WasmHost {
    fn request_headers(&self) -> Vec<(String, String)> {
        logged("get request headers", hostcalls::get_map(MapType::HttpRequestHeaders))
    }

    fn remove_request_header(&mut self, name: &str) {
        logged("remove request header", hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None));
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        logged("set response header", hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)));
    }

    fn remove_response_header(&mut self, name: &str) {
        logged("remove response header", hostcalls::set_map_value(MapType::HttpResponseHeaders, name, None));
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        logged("get property", hostcalls::get_property(path.to_vec()))
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        logged("send response", hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)));
    }
}
