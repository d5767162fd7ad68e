//! Panic safety of the native build: a panic inside the pipeline never reaches Envoy. The probe
//! module (`make native-probe`, build/libtollgate-probe.so) panics on requests that carry
//! `x-tollgate-panic-probe`; the hook's guard must answer 500 problem+json (a gRPC caller: INTERNAL),
//! and Envoy must keep serving on the same worker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use harness::*;
use serde_json::json;

#[test]
fn a_panic_in_the_pipeline_is_a_500_and_envoy_carries_on() {
    let module = repo().join("build/libtollgate-probe.so");
    assert!(module.exists(), "{} is missing: run `make native-probe`", module.display());
    let gw = Gateway::start(GatewayOptions {
        native: false,
        concurrency: 1,
        mutate: Some(Box::new(|config| {
            let filter = tollgate_filter(config);
            let value = filter["typed_config"]["config"]["configuration"]["value"].take();
            filter["typed_config"] = json!({
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": "tollgate-probe"},
                "filter_name": "tollgate",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
            });
        })),
        ..GatewayOptions::default()
    });
    for _ in 0..3 {
        let resp = gw.send(Request::get("/health").header("x-tollgate-panic-probe", "1"));
        assert_eq!(resp.status, 500, "body: {}", resp.text());
        assert_eq!(resp.header("content-type"), Some("application/problem+json"));
        assert_eq!(resp.json()["type"], "urn:tollgate:problem:gateway-error", "body: {}", resp.text());
        // To a gRPC caller, the same answer is its gRPC status, trailers-only.
        let grpc =
            Request::get("/health").header("x-tollgate-panic-probe", "1").header("content-type", "application/grpc");
        let resp = gw.send(grpc);
        assert_eq!((resp.status, resp.header("grpc-status")), (200, Some("13")), "{:?}", resp.headers);
        assert_eq!(resp.header("grpc-message"), Some("the gateway could not process this request"));
        let resp = gw.send(Request::get("/health"));
        assert_eq!(resp.status, 200, "Envoy or the worker did not carry on: {}", resp.text());
        assert_eq!(resp.header("x-frame-options"), Some("DENY"), "the filter stopped running");
    }
    assert!(gw.envoy_log().contains("panic in request headers"), "{}", gw.envoy_log());
}
