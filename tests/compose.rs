//! envoy/docker-compose.yaml is the native demo in containers: docker-compose accepts it, Envoy runs
//! the very envoy/envoy.yaml and build/tollgate.wasm (mounted read-only where that config loads them
//! from), every service shares the host network so the config's 127.0.0.1 addresses hold, and the
//! Envoy image is the version the Makefile installs natively.
//!
//! `docker-compose` comes from `make test-tools`, a prerequisite of `make test`. Nothing here needs a
//! Docker engine: `docker-compose config` only reads and resolves the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compose file as docker-compose resolves it (relative paths made absolute, defaults filled).
fn resolved_compose() -> Value {
    let out = Command::new("docker-compose")
        .args(["-f", "envoy/docker-compose.yaml", "config"])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("docker-compose: {e}: run `make test-tools` (`make test` runs it first)"));
    assert!(
        out.status.success(),
        "docker-compose refuses envoy/docker-compose.yaml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

fn envoy_config() -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo().join("envoy/envoy.yaml")).unwrap()).unwrap()
}

/// `ENVOY_VERSION := x.y.z` in the Makefile.
fn makefile_envoy_version() -> String {
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    let line = makefile.lines().find(|l| l.starts_with("ENVOY_VERSION")).expect("ENVOY_VERSION in the Makefile");
    line.split(":=").nth(1).expect("ENVOY_VERSION := x.y.z").trim().to_owned()
}

/// Every `vm_config.code.local.filename` in a config.
fn module_filenames(value: &Value, found: &mut Vec<String>) {
    if let Some(name) = value.pointer("/vm_config/code/local/filename").and_then(Value::as_str) {
        found.push(name.to_owned());
    }
    match value {
        Value::Object(map) => map.values().for_each(|v| module_filenames(v, found)),
        Value::Array(items) => items.iter().for_each(|v| module_filenames(v, found)),
        _ => {}
    }
}

/// The bind mount of a service whose target is `target`: (source, read-only).
fn mount_at(service: &Value, target: &str) -> Option<(PathBuf, bool)> {
    service["volumes"].as_array()?.iter().find_map(|volume| match volume {
        // Long syntax, as docker-compose prints what the file writes that way.
        Value::Object(_) if volume["target"] == target => {
            assert_eq!(volume["type"], "bind", "{volume}");
            Some((PathBuf::from(volume["source"].as_str()?), volume["read_only"] == true))
        }
        // Short syntax: SOURCE:TARGET[:MODE].
        Value::String(short) => {
            let mut parts = short.split(':');
            let (source, to, mode) = (parts.next()?, parts.next()?, parts.next().unwrap_or("rw"));
            (to == target).then(|| (PathBuf::from(source), mode.split(',').any(|m| m == "ro")))
        }
        _ => None,
    })
}

#[track_caller]
fn assert_read_only_mount(service: &Value, target: &str, source: &Path) {
    let (found, read_only) =
        mount_at(service, target).unwrap_or_else(|| panic!("nothing is mounted at {target}: {}", service["volumes"]));
    assert_eq!(found, source, "the mount at {target}");
    assert!(read_only, "{target} is mounted read-write");
}

#[test]
fn envoy_runs_the_native_demos_config_and_module_in_the_makefiles_version() {
    let compose = resolved_compose();
    let envoy = &compose["services"]["envoy"];
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{}", makefile_envoy_version()), "one Envoy version");

    // The config Envoy is started with is envoy/envoy.yaml itself, not a copy.
    let args: Vec<&str> =
        envoy["command"].as_array().expect("envoy's command").iter().filter_map(Value::as_str).collect();
    let config_at = args.iter().position(|a| *a == "-c" || *a == "--config-path").map(|i| args[i + 1]);
    let config_at = config_at.unwrap_or_else(|| panic!("envoy's command names no config: {args:?}"));
    assert_read_only_mount(envoy, config_at, &repo().join("envoy/envoy.yaml"));

    // The module is build/tollgate.wasm, at the path envoy.yaml loads it from: relative paths are
    // relative to the directory Envoy starts in, the service's working_dir.
    let mut filenames = Vec::new();
    module_filenames(&envoy_config(), &mut filenames);
    assert!(!filenames.is_empty(), "envoy.yaml loads no local module");
    let workdir = envoy["working_dir"].as_str().unwrap_or("/");
    for filename in filenames {
        let in_container = Path::new(workdir).join(&filename);
        assert_read_only_mount(envoy, in_container.to_str().unwrap(), &repo().join("build/tollgate.wasm"));
    }
}

#[test]
fn every_service_shares_the_host_network_so_envoy_yamls_addresses_hold() {
    let compose = resolved_compose();
    let services = compose["services"].as_object().unwrap();
    for name in ["envoy", "upstream", "credit"] {
        let service = services.get(name).unwrap_or_else(|| panic!("no {name} service"));
        assert_eq!(service["network_mode"], "host", "{name}");
    }
    for (name, service) in services {
        assert_eq!(service["network_mode"], "host", "{name}");
    }

    // The upstream runs the demo's script on the port envoy.yaml's upstream cluster names.
    let config = envoy_config();
    let clusters = config["static_resources"]["clusters"].as_array().unwrap();
    let cluster = clusters.iter().find(|c| c["name"] == "upstream").unwrap();
    let port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ["port_value"]
        .as_u64()
        .unwrap();
    let upstream = &services["upstream"];
    assert_read_only_mount(upstream, "/demo/demo_upstream.py", &repo().join("envoy/demo_upstream.py"));
    let command: Vec<&str> = upstream["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(command.contains(&"/demo/demo_upstream.py"), "{command:?}");
    assert!(command.contains(&port.to_string().as_str()), "the upstream listens on {port}: {command:?}");

    // The credit service is built from this repository's Dockerfile and listens where the demo expects.
    let credit = &services["credit"];
    let context = PathBuf::from(credit["build"]["context"].as_str().expect("credit is built here"));
    let dockerfile = context.join(credit["build"]["dockerfile"].as_str().unwrap_or("Dockerfile"));
    assert!(dockerfile.is_file(), "{} is missing", dockerfile.display());
    let command: Vec<&str> = credit["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(command.windows(2).any(|w| w == ["--listen", "127.0.0.1:8081"]), "{command:?}");
}
