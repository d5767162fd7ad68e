//! A plugin config the filter refuses: Envoy's log names the field at fault, and no request is
//! served by a half-configured filter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use harness::*;

fn refused(plugin_config: String, expected_in_log: &str) {
    match Gateway::try_start(GatewayOptions { plugin_config: Some(plugin_config), ..GatewayOptions::default() }) {
        // With a static listener Envoy refuses to start at all.
        Err(failure) => {
            assert!(failure.log.contains(expected_in_log), "Envoy's log lacks {expected_in_log:?}:\n{}", failure.log)
        }
        // Should Envoy start anyway, the plugin must refuse every request.
        Ok(gw) => {
            assert!(gw.envoy_log().contains(expected_in_log), "Envoy's log lacks {expected_in_log:?}");
            let resp = gw.send(Request::get("/health"));
            assert!(resp.status >= 500, "a half-configured filter served {}", resp.status);
            assert_eq!(gw.upstream().requests().len(), 0);
        }
    }
}

#[test]
fn an_unknown_field_is_named() {
    let config = shipped_plugin_config().replacen("\"routes\"", "\"routez\": [], \"routes\"", 1);
    refused(config, "invalid plugin configuration: routez: unknown field `routez`");
}

#[test]
fn a_wrong_type_is_named() {
    let config = shipped_plugin_config().replacen("\"max_body_bytes\": 1048576", "\"max_body_bytes\": \"1MB\"", 1);
    refused(config, "invalid plugin configuration: policies.api.max_body_bytes: invalid type: string \"1MB\"");
}

#[test]
fn a_negative_limit_is_named() {
    let config = shipped_plugin_config().replacen("\"max_body_bytes\": 65536 }", "\"max_body_bytes\": -1 }", 1);
    refused(config, "invalid plugin configuration: policies.public.max_body_bytes: invalid value: integer `-1`");
}

#[test]
fn a_dangling_policy_reference_is_named() {
    let config = shipped_plugin_config().replacen("\"policy\": \"account\"", "\"policy\": \"acount\"", 1);
    refused(config, "invalid plugin configuration: routes[3].policy: no policy named \"acount\"");
}

#[test]
fn a_zero_rate_limit_is_named() {
    let config = shipped_plugin_config().replacen("\"per_minute\": 60,", "\"per_minute\": 0,", 1);
    refused(config, "invalid plugin configuration: rate_limits.tiers.free.per_minute: must be > 0");
}
