//! `tollgate`: the operator's command line. `check` runs the plugin's own parser and validation on
//! a config before Envoy loads it; `schema` prints the config's JSON Schema.

use std::process::ExitCode;

use serde_json::Value;
use tollgate::config::{Config, RawConfig};

const USAGE: &str = "usage:
  tollgate check FILE...   validate plugin configs: a JSON plugin config, or an Envoy config
                           (YAML or JSON) whose tollgate Wasm filters (root_id \"tollgate\") and
                           route metadata (filter_metadata.tollgate.policy) are checked together
  tollgate schema          print the JSON Schema of the plugin config";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") if args.len() > 1 => {
            let mut ok = true;
            for file in &args[1..] {
                match check_file(file) {
                    Ok(summary) => println!("{file}: ok ({summary})"),
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

fn schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

fn check_file(file: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let document: Value = serde_yaml::from_str(&text).map_err(|e| format!("not JSON or YAML: {e}"))?;
    if document.get("policies").is_some() {
        // A plugin config on its own: parse the text itself so errors match what Envoy logs.
        let config = Config::from_json(text.as_bytes()).map_err(|e| format!("invalid tollgate config: {e}"))?;
        return Ok(format!("{} policies", config.routes.policy_names().count()));
    }
    check_envoy_config(&document)
}

/// Checks every tollgate filter in an Envoy config, and that each route's metadata names a
/// policy every one of them defines.
fn check_envoy_config(document: &Value) -> Result<String, String> {
    let mut configs = Vec::new();
    let mut references = Vec::new();
    walk(document, "$", &mut |path, value| {
        if value.get("root_id").and_then(Value::as_str) == Some("tollgate") {
            let json = value.pointer("/configuration/value").and_then(Value::as_str);
            configs.push((path.to_owned(), json.map(str::to_owned)));
        }
        if let Some(name) = value.pointer("/filter_metadata/tollgate/policy") {
            references.push((format!("{path}.filter_metadata.tollgate.policy"), name.clone()));
        }
    });
    if configs.is_empty() {
        return Err("no tollgate Wasm filter (root_id \"tollgate\") and no \"policies\": nothing to check".to_owned());
    }
    let mut parsed = Vec::new();
    for (path, json) in configs {
        let json = json.ok_or_else(|| format!("{path}.configuration.value: missing; the plugin needs its config"))?;
        let config = Config::from_json(json.as_bytes()).map_err(|e| format!("{path}.configuration: {e}"))?;
        parsed.push(config);
    }
    for (path, name) in &references {
        let name = name.as_str().ok_or_else(|| format!("{path}: must be a string naming a policy"))?;
        if parsed.iter().any(|c| c.routes.policy(name).is_none()) {
            return Err(format!("{path}: no policy named {name:?} in the tollgate config"));
        }
    }
    Ok(format!("{} tollgate filter(s), {} route policy reference(s)", parsed.len(), references.len()))
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
