//! `tollgate`: the operator's command line. `check` runs the plugin's own parser and validation on
//! a config before Envoy loads it; `schema` prints the config's JSON Schema; `keygen` makes API
//! keys and `token` signs HS256 test tokens.

use std::process::ExitCode;

use serde_json::Value;
use tollgate::config::{Config, RawConfig};

const USAGE: &str = "usage:
  tollgate check [--reservation-ttl-seconds N] FILE...
                           validate plugin configs: a JSON plugin config, or an Envoy config
                           (YAML or JSON) whose tollgate Wasm filters (root_id \"tollgate\") and
                           route metadata (filter_metadata.tollgate.policy) are checked together;
                           with billing, warns when a request may outlive the credit service's
                           reservation TTL (N, the service's default 300 unless given)
  tollgate schema          print the JSON Schema of the plugin config
  tollgate keygen --id ID --account ACCOUNT [--tier TIER] [--scopes a,b] [--expires-at RFC3339]
                           make a new random API key: prints the key (give it to the caller, it is
                           shown once) and the entry for auth.api_keys.keys (only its SHA-256)
  tollgate token --secret BASE64 --issuer ISS --sub SUBJECT [--kid KID] [--audience AUD]
                 [--account ACCOUNT] [--tier TIER] [--scope \"a b\"] [--ttl SECONDS]
                           sign an HS256 JWT with a provider's `secrets` entry, for trying a
                           gateway out (claims account, tier and scope; ttl 3600 by default)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") if args.len() > 1 => {
            let (ttl, files) = match args.get(1).map(String::as_str) {
                Some("--reservation-ttl-seconds") => match args.get(2).map(|n| n.parse::<u64>()) {
                    Some(Ok(ttl)) if ttl > 0 => (ttl, &args[3..]),
                    _ => {
                        eprintln!("tollgate check: --reservation-ttl-seconds needs whole seconds > 0\n\n{USAGE}");
                        return ExitCode::from(2);
                    }
                },
                _ => (DEFAULT_RESERVATION_TTL_SECONDS, &args[1..]),
            };
            let mut ok = true;
            for file in files {
                match check_file(file, ttl) {
                    Ok((summary, warnings)) => {
                        for warning in warnings {
                            eprintln!("{file}: warning: {warning}");
                        }
                        println!("{file}: ok ({summary})");
                    }
                    Err(message) => {
                        eprintln!("{file}: {message}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("keygen") => match keygen(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("tollgate keygen: {message}\n\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some("token") => match token(&args[1..]) {
            Ok(jwt) => {
                println!("{jwt}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("tollgate token: {message}\n\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some("schema") if args.len() == 1 => {
            println!("{}", schema());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// A new key from the OS's randomness, and its config entry; the key itself is never stored.
fn keygen(args: &[String]) -> Result<(), String> {
    let mut entry = serde_json::Map::new();
    let mut pairs = args.chunks(2);
    for pair in &mut pairs {
        let [flag, value] = pair else { return Err(format!("{} needs a value", pair[0])) };
        let (field, value) = match flag.as_str() {
            "--id" => ("id", Value::from(value.as_str())),
            "--account" => ("account", Value::from(value.as_str())),
            "--tier" => ("tier", Value::from(value.as_str())),
            "--scopes" => ("scopes", value.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>().into()),
            "--expires-at" => ("expires_at", Value::from(value.as_str())),
            other => return Err(format!("unknown flag {other}")),
        };
        entry.insert(field.to_owned(), value);
    }
    for required in ["id", "account"] {
        if !entry.contains_key(required) {
            return Err(format!("--{required} is required"));
        }
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let key = format!("tg_{}", hex(&random));
    entry.insert("sha256".to_owned(), hex(&hmac_sha256::Hash::hash(key.as_bytes())).into());
    // The same validation the plugin runs, so a bad --expires-at or scope fails here.
    let config = serde_json::json!({"policies": {}, "auth": {"api_keys": {"keys": [entry]}}});
    Config::from_json(config.to_string().as_bytes()).map_err(|e| e.to_string())?;
    println!("key (give it to the caller; it is not stored anywhere): {key}");
    println!("entry for auth.api_keys.keys:");
    println!("{}", serde_json::to_string_pretty(&entry).unwrap_or_default());
    Ok(())
}

/// An HS256 token with the standard claims and the ones tollgate maps by default.
fn token(args: &[String]) -> Result<String, String> {
    use jwt_simple::prelude::*;
    let mut flags = std::collections::HashMap::new();
    for pair in args.chunks(2) {
        let [flag, value] = pair else { return Err(format!("{} needs a value", pair[0])) };
        let known = ["--secret", "--issuer", "--sub", "--kid", "--audience", "--account", "--tier", "--scope", "--ttl"];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag}"));
        }
        flags.insert(flag.trim_start_matches("--").to_owned(), value.clone());
    }
    let get = |name: &str| flags.get(name).cloned().ok_or(format!("--{name} is required"));
    let secret = Base64::decode_to_vec(get("secret")?, None).map_err(|_| "--secret must be base64".to_owned())?;
    let ttl: u64 = flags.get("ttl").map_or(Ok(3600), |t| t.parse()).map_err(|_| "--ttl must be whole seconds")?;
    let mut custom = serde_json::Map::new();
    for claim in ["account", "tier", "scope"] {
        if let Some(value) = flags.get(claim) {
            custom.insert(claim.to_owned(), value.as_str().into());
        }
    }
    let mut claims = Claims::with_custom_claims(custom, Duration::from_secs(ttl))
        .with_issuer(get("issuer")?)
        .with_subject(get("sub")?);
    if let Some(audience) = flags.get("audience") {
        claims = claims.with_audience(audience);
    }
    let mut key = HS256Key::from_bytes(&secret);
    if let Some(kid) = flags.get("kid") {
        key = key.with_key_id(kid);
    }
    key.authenticate(claims).map_err(|e| e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

/// A summary of what was checked, and warnings about configs that relied on a default that has
/// since changed.
fn check_file(file: &str, reservation_ttl: u64) -> Result<(String, Vec<String>), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let document: Value = serde_yaml::from_str(&text).map_err(|e| format!("not JSON or YAML: {e}"))?;
    if document.get("policies").is_some() {
        // A plugin config on its own: parse the text itself so errors match what Envoy logs.
        let config = Config::from_json(text.as_bytes()).map_err(|e| format!("invalid tollgate config: {e}"))?;
        return Ok((format!("{} policies", config.routes.policy_names().count()), changed_defaults("$", &document)));
    }
    check_envoy_config(&document, reservation_ttl)
}

/// Settings a config leaves to a default that changed, so the behaviour it relied on changed too.
fn changed_defaults(path: &str, config: &Value) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(signatures) = config.pointer("/auth/signatures") {
        if signatures.get("scheme").is_none() {
            warnings.push(format!(
                "{path}.auth.signatures.scheme is not set: requests are now signed over their RFC 9530 \
                 Content-Digest and checked before anything goes upstream (\"content-digest\"); clients \
                 that sign the body itself (the seeds' scheme) must change, or set \"scheme\": \"body\""
            ));
        }
    }
    let authenticates = config.pointer("/auth/jwt").is_some() || config.pointer("/auth/api_keys").is_some();
    if authenticates && config.pointer("/auth/failures").is_none() {
        warnings.push(format!(
            "{path}.auth.failures is not set: failed authentications are now limited to 30 a minute per \
             client address (then 429, before any credential is checked); set it to your budget, or null"
        ));
    }
    if config.get("rate_limits").is_some() && config.pointer("/rate_limits/ipv6_network").is_none() {
        warnings.push(format!(
            "{path}.rate_limits.ipv6_network is not set: IPv6 clients are now also limited per /48, at 16 \
             times each address limit; set it to your networks' size, or null"
        ));
    }
    let providers = config.pointer("/auth/jwt/providers").and_then(Value::as_array);
    let sources = providers.map_or(0, Vec::len) + usize::from(config.pointer("/auth/api_keys").is_some());
    for (i, provider) in providers.into_iter().flatten().enumerate() {
        if sources > 1 && provider.get("account_prefix").is_none() {
            warnings.push(format!(
                "{path}.auth.jwt.providers[{i}].account_prefix is not set: with more than one source of \
                 accounts, this provider's accounts are now prefixed (its issuer and ':'), so they no longer \
                 share budgets and balances with the same names from elsewhere; set \"\" to keep sharing"
            ));
        }
        if provider.get("required_claims").is_none() {
            warnings.push(format!(
                "{path}.auth.jwt.providers[{i}].required_claims is not set: it now defaults to [\"exp\"], so \
                 tokens without an expiry are refused; set [] to accept them"
            ));
        }
    }
    warnings
}

/// Checks every tollgate filter in an Envoy config, and that each route's metadata names a
/// policy every one of them defines.
fn check_envoy_config(document: &Value, reservation_ttl: u64) -> Result<(String, Vec<String>), String> {
    let mut configs = Vec::new();
    let mut references = Vec::new();
    walk(document, "$", &mut |path, value| {
        if value.get("root_id").and_then(Value::as_str) == Some("tollgate") {
            let json = value.pointer("/configuration/value").and_then(Value::as_str);
            configs.push((format!("{path}.configuration"), json.map(str::to_owned)));
        }
        // The native build (envoy/envoy-native.yaml): the same JSON in the dynamic module's config.
        if value.get("filter_name").and_then(Value::as_str) == Some("tollgate") {
            let json = value.pointer("/filter_config/value").and_then(Value::as_str);
            configs.push((format!("{path}.filter_config"), json.map(str::to_owned)));
        }
        if let Some(name) = value.pointer("/filter_metadata/tollgate/policy") {
            references.push((format!("{path}.filter_metadata.tollgate.policy"), name.clone()));
        }
    });
    if configs.is_empty() {
        return Err(
            "no tollgate filter (Wasm root_id or dynamic module filter_name \"tollgate\") and no \"policies\": \
             nothing to check"
                .to_owned(),
        );
    }
    let mut parsed = Vec::new();
    let mut warnings = Vec::new();
    for (path, json) in configs {
        let json = json.ok_or_else(|| format!("{path}.value: missing; the plugin needs its config"))?;
        let config = Config::from_json(json.as_bytes()).map_err(|e| format!("{path}: {e}"))?;
        if config.credits.is_some() && warnings.iter().all(|w: &String| !w.contains("reservation TTL")) {
            warnings.extend(outliving_holds(document, reservation_ttl));
        }
        if let Ok(value) = serde_json::from_str::<Value>(&json) {
            warnings.extend(changed_defaults(&path, &value));
        }
        parsed.push(config);
    }
    for (path, name) in &references {
        let name = name.as_str().ok_or_else(|| format!("{path}: must be a string naming a policy"))?;
        if parsed.iter().any(|c| c.routes.policy(name).is_none()) {
            return Err(format!("{path}: no policy named {name:?} in the tollgate config"));
        }
    }
    let summary = format!("{} tollgate filter(s), {} route policy reference(s)", parsed.len(), references.len());
    Ok((summary, warnings))
}

/// The credit service's `--reservation-ttl-seconds` unless told otherwise.
const DEFAULT_RESERVATION_TTL_SECONDS: u64 = 300;
/// Envoy's route `timeout` when a route sets none.
const ENVOY_ROUTE_TIMEOUT_SECONDS: f64 = 15.0;

/// Each connection manager on which a billed request may live longer than its reservation: the
/// whole request must arrive within `request_timeout`, then the upstream answer within the
/// route's `timeout` (15 s unless set), all within `common_http_protocol_options.max_stream_duration`
/// when set. Unset or 0, a bound is infinite. A commit after expiry still charges, but only what
/// the balance holds by then: the hold no longer reserved it.
fn outliving_holds(document: &Value, ttl: u64) -> Vec<String> {
    let mut warnings = Vec::new();
    walk(document, "$", &mut |path, value| {
        if value.get("http_filters").is_none() {
            return;
        }
        let request = seconds(value.get("request_timeout"));
        let mut longest_route: Option<f64> = Some(0.0);
        walk(value, path, &mut |_, node| {
            if let Some(route) =
                node.get("route").filter(|r| r.get("cluster").is_some() || r.get("weighted_clusters").is_some())
            {
                let timeout = route.get("timeout").map_or(Some(ENVOY_ROUTE_TIMEOUT_SECONDS), |t| seconds(Some(t)));
                longest_route = longest_route.zip(timeout).map(|(a, b)| a.max(b));
            }
        });
        let total = request.zip(longest_route).map(|(a, b)| a + b);
        let cap = seconds(value.pointer("/common_http_protocol_options/max_stream_duration"));
        let life = match (total, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ttl_f = ttl as f64;
        let how_long = match life {
            Some(life) if life <= ttl_f => return,
            Some(life) => format!("up to {life} s (request_timeout, then the longest route timeout)"),
            None => {
                "without bound (no request_timeout, or a route timeout of 0, and no max_stream_duration)".to_owned()
            }
        };
        warnings.push(format!(
            "{path}: a billed request may live {how_long}, longer than the credit service's reservation TTL \
             ({ttl} s): its hold may expire first, and its commit then charges only what the balance holds by \
             then; lower request_timeout and the route timeouts, or raise --reservation-ttl-seconds (and pass \
             it to tollgate check)"
        ));
    });
    warnings
}

/// An Envoy duration (`"60s"`, `"0.25s"`, or `{seconds, nanos}`) in seconds; `None` when unset or
/// 0, which Envoy reads as no limit.
fn seconds(value: Option<&Value>) -> Option<f64> {
    let value = value?;
    let secs = match value {
        Value::String(text) => text.strip_suffix('s')?.parse::<f64>().ok()?,
        Value::Object(map) => {
            let whole = map.get("seconds").and_then(|s| s.as_f64().or_else(|| s.as_str()?.parse().ok()));
            whole.unwrap_or(0.0) + map.get("nanos").and_then(Value::as_f64).unwrap_or(0.0) / 1e9
        }
        _ => return None,
    };
    (secs > 0.0).then_some(secs)
}

fn walk(value: &Value, path: &str, visit: &mut dyn FnMut(&str, &Value)) {
    match value {
        Value::Object(map) => {
            visit(path, value);
            for (key, child) in map {
                walk(child, &format!("{path}.{key}"), visit);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), visit);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn envoy_durations_read_as_envoy_reads_them() {
        for (value, want) in [
            (json!("60s"), Some(60.0)),
            (json!("0.25s"), Some(0.25)),
            (json!({"seconds": 5, "nanos": 500_000_000}), Some(5.5)),
            (json!({"seconds": "7"}), Some(7.0)),
            (json!("0s"), None),
            (json!("60"), None),
        ] {
            assert_eq!(seconds(Some(&value)), want, "{value}");
        }
        assert_eq!(seconds(None), None);
    }

    #[test]
    fn a_request_may_live_its_whole_request_timeout_then_its_longest_route_timeout() {
        let hcm = |request_timeout: Value, max: Value| {
            json!({"http_filters": [], "request_timeout": request_timeout,
                   "common_http_protocol_options": {"max_stream_duration": max},
                   "route_config": {"virtual_hosts": [{"routes": [
                       {"match": {"prefix": "/a"}, "route": {"cluster": "up", "timeout": "100s"}},
                       {"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]}})
        };
        let warned = |document: Value, ttl| outliving_holds(&document, ttl);
        assert!(warned(hcm(json!("60s"), Value::Null), 160).is_empty(), "60 + 100 fits 160");
        assert!(warned(hcm(json!("60s"), Value::Null), 159)[0].contains("up to 160 s"));
        assert!(warned(hcm(Value::Null, Value::Null), 300)[0].contains("without bound"), "no request_timeout");
        assert!(warned(hcm(Value::Null, json!("120s")), 300).is_empty(), "max_stream_duration bounds it");
    }
}
