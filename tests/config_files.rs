//! The shipped configs: the committed JSON Schema matches the config types, every example plugin
//! config validates against it and against the plugin's own parser, `tollgate check` reports
//! mistakes by field path, and Envoy itself accepts every shipped Envoy config.
#![allow(clippy::unwrap_used, reason = "test code: a failed step fails the test")]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn envoy_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml") && p.file_name().is_some_and(|n| n != "docker-compose.yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// Every tollgate plugin config (the `configuration.value` string) inside an Envoy config.
fn plugin_configs(file: &Path) -> Vec<String> {
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut found = Vec::new();
    collect(&doc, &mut found);
    found
}

fn collect(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("root_id").and_then(Value::as_str) == Some("tollgate") {
                found.push(value.pointer("/configuration/value").unwrap().as_str().unwrap().to_owned());
            }
            if map.get("filter_name").and_then(Value::as_str) == Some("tollgate") {
                found.push(value.pointer("/filter_config/value").unwrap().as_str().unwrap().to_owned());
            }
            map.values().for_each(|v| collect(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| collect(v, found)),
        _ => {}
    }
}

#[test]
fn committed_schema_matches_the_config_types() {
    let generated = serde_json::to_value(schemars::schema_for!(tollgate::config::RawConfig)).unwrap();
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("envoy/tollgate.schema.json")).unwrap()).unwrap();
    assert!(
        generated == committed,
        "envoy/tollgate.schema.json is stale: regenerate it with `cargo run --bin tollgate schema > envoy/tollgate.schema.json`"
    );
}

#[test]
fn example_configs_validate_against_the_schema_and_the_parser() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("envoy/tollgate.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for file in envoy_configs() {
        let configs = plugin_configs(&file);
        assert!(!configs.is_empty(), "{} has no tollgate filter", file.display());
        for json in configs {
            let instance: Value = serde_json::from_str(&json).unwrap();
            let errors: Vec<String> =
                validator.iter_errors(&instance).map(|e| format!("{}: {e}", e.instance_path())).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", file.display());
            tollgate::config::Config::from_json(json.as_bytes()).unwrap();
        }
    }
}

#[test]
fn schema_rejects_what_the_parser_rejects() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("envoy/tollgate.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for bad in [
        r#"{"policies": {}, "unknown": 1}"#,
        r#"{"policies": {"p": {"access": "public", "max_body_bytes": -1}}}"#,
        r#"{"policies": {"p": {"access": "sometimes"}}}"#,
        r#"{"policies": {"p": {"access": "public", "extra": true}}}"#,
    ] {
        let instance: Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&instance), "schema accepted {bad}");
        assert!(tollgate::config::Config::from_json(bad.as_bytes()).is_err(), "parser accepted {bad}");
    }
}

fn tollgate_check(file: &Path) -> (bool, String) {
    tollgate_check_with(&[], file)
}

fn tollgate_check_with(flags: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate")).arg("check").args(flags).arg(file).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn tollgate_check_warns_when_a_billed_request_may_outlive_its_reservation() {
    let shipped = repo().join("envoy/envoy.yaml");
    let warned = |output: &str| output.contains("longer than the credit service's reservation TTL");
    // The shipped limits: 60 s to send the request, then 15 s (Envoy's default route timeout).
    let (ok, output) = tollgate_check(&shipped);
    assert!(ok && !warned(&output), "within the service's default 300 s: {output}");
    let (ok, output) = tollgate_check_with(&["--reservation-ttl-seconds", "60"], &shipped);
    assert!(ok && warned(&output) && output.contains("up to 75 s"), "{output}");

    let dir = std::env::temp_dir().join(format!("tollgate-ttl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unbounded = dir.join("envoy.yaml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("request_timeout: 60s"));
    std::fs::write(&unbounded, text.replace("request_timeout: 60s", "request_timeout: 0s")).unwrap();
    let (ok, output) = tollgate_check(&unbounded);
    assert!(ok && warned(&output) && output.contains("without bound"), "a client may trickle forever: {output}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tollgate_check_accepts_the_shipped_configs() {
    for file in envoy_configs() {
        let (ok, output) = tollgate_check(&file);
        assert!(ok, "{output}");
    }
}

#[test]
fn tollgate_check_warns_about_a_config_that_relied_on_a_changed_default() {
    let dir = std::env::temp_dir().join(format!("tollgate-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |scheme: &str| {
        format!(
            r#"{{"policies": {{}}, "auth": {{"signatures": {{{scheme}"secrets": [{{"account": "a",
                "secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}}]}}}}}}"#
        )
    };
    for (scheme, warned) in [("", true), (r#""scheme": "content-digest", "#, false), (r#""scheme": "body", "#, false)] {
        let file = dir.join("signed.json");
        std::fs::write(&file, config(scheme)).unwrap();
        let (ok, output) = tollgate_check(&file);
        assert!(ok, "a warning is not an error: {output}");
        assert_eq!(output.contains("warning: $.auth.signatures.scheme is not set"), warned, "{scheme}: {output}");
    }
    let file = dir.join("jwt.json");
    std::fs::write(
        &file,
        r#"{"policies": {}, "auth": {"jwt": {"providers": [{"audiences": "any",
            "secrets": [{"secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}]}]}}}"#,
    )
    .unwrap();
    let (ok, output) = tollgate_check(&file);
    assert!(ok && output.contains("warning: $.auth.jwt.providers[0].required_claims is not set"), "{output}");
    assert!(output.contains("warning: $.auth.failures is not set"), "{output}");
    assert!(!output.contains("account_prefix"), "one source of accounts: {output}");

    let file = dir.join("sources.json");
    let sources = |prefix: &str| {
        format!(
            r#"{{"policies": {{}}, "auth": {{"failures": null, "api_keys": {{"keys": []}}, "jwt": {{"providers": [{{
                "audiences": "any", "required_claims": [], {prefix}
                "secrets": [{{"secret": "c2lnbmluZy1zZWNyZXQtb2YtYXQtbGVhc3QtMzItYnl0ZXM="}}]}}]}}}}}}"#
        )
    };
    for (prefix, warned) in [("", true), (r#""account_prefix": "","#, false)] {
        std::fs::write(&file, sources(prefix)).unwrap();
        let (ok, output) = tollgate_check(&file);
        assert!(ok, "{output}");
        let warning = "warning: $.auth.jwt.providers[0].account_prefix is not set";
        assert_eq!(output.contains(warning), warned, "{prefix}: {output}");
    }

    let file = dir.join("limits.json");
    let limited = |extra: &str| {
        format!(
            r#"{{"policies": {{"open": {{"access": "public", "rate_limit": {{}}}}}},
                "rate_limits": {{"anonymous": {{"per_minute": 5}}{extra}}},
                "auth": {{"failures": null, "api_keys": {{"keys": []}}}}}}"#
        )
    };
    for (extra, warned) in [("", true), (r#", "ipv6_network": null"#, false)] {
        std::fs::write(&file, limited(extra)).unwrap();
        let (ok, output) = tollgate_check(&file);
        assert!(ok, "{output}");
        assert_eq!(output.contains("warning: $.rate_limits.ipv6_network is not set"), warned, "{extra}: {output}");
        assert!(!output.contains("auth.failures"), "set explicitly: {output}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tollgate_check_names_the_field_at_fault() {
    let dir = std::env::temp_dir().join(format!("tollgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("unknown.json", r#"{"policies": {}, "route": []}"#.to_owned(), "route: unknown field `route`"),
        (
            "negative.json",
            r#"{"policies": {"p": {"access": "public", "max_body_bytes": -1}}}"#.to_owned(),
            "policies.p.max_body_bytes: invalid value: integer `-1`",
        ),
        (
            // An Envoy config whose route metadata names a policy the plugin lacks.
            "envoy.yaml",
            std::fs::read_to_string(repo().join("envoy/envoy.yaml"))
                .unwrap()
                .replace("policy: closed", "policy: clossed"),
            "filter_metadata.tollgate.policy: no policy named \"clossed\"",
        ),
    ];
    for (name, text, expected) in cases {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let (ok, output) = tollgate_check(&file);
        assert!(!ok, "{name} was accepted");
        assert!(output.contains(expected), "{name}: {output}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// envoy-native.yaml is envoy.yaml with the dynamic module for the Wasm filter: the plugin JSON must
/// stay the same, so a change to one that misses the other fails here.
#[test]
fn the_native_example_carries_the_same_plugin_config() {
    let wasm = plugin_configs(&repo().join("envoy/envoy.yaml"));
    let native = plugin_configs(&repo().join("envoy/envoy-native.yaml"));
    assert_eq!(wasm.len(), 1);
    assert_eq!(native, wasm, "envoy/envoy-native.yaml's plugin config differs from envoy/envoy.yaml's");
}

#[test]
fn envoy_accepts_the_shipped_configs() {
    let envoy = repo().join(".venv/bin/envoy");
    for file in envoy_configs() {
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(&file)
            .current_dir(repo())
            // envoy-native.yaml loads build/libtollgate.so (`make native`) to validate it.
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", repo().join("build"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn tollgate_keygen_makes_a_key_whose_entry_the_plugin_accepts() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keygen", "--id", "acme-1", "--account", "acme", "--tier", "pro", "--scopes", "read,write"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(key.starts_with("tg_") && key.len() == 67, "{key}");
    let entry: Value = serde_json::from_str(text.split_once("keys:\n").unwrap().1).unwrap();
    let digest: String = hmac_sha256::Hash::hash(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(entry["sha256"], digest.as_str());
    assert_eq!(entry["scopes"], serde_json::json!(["read", "write"]));
    assert!(!entry.to_string().contains(&key), "the entry holds the key itself");

    let bad = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keygen", "--id", "x", "--account", "a", "--expires-at", "tomorrow"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("auth.api_keys.keys[0].expires_at"));
}
