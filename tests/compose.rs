//! envoy/docker-compose.yaml is the native demo in containers, portable across Linux, Docker Desktop
//! and podman: a bridge network with services reached by name, only the gateway and Envoy's admin
//! published (on the native demo's ports, host loopback only), readiness through healthchecks and
//! `depends_on` conditions, an init process in every service, images pinned by digest, read-only
//! mounts labelled for SELinux. Envoy runs envoy/envoy.compose.yaml, generated from envoy/envoy.yaml
//! (tests/config_files.rs runs `tollgate check` and `envoy --mode validate` on it, as on every
//! envoy/*.yaml), and `make compose-demo` prints the native demo's walkthrough or says what is missing.
//!
//! `docker-compose` comes from `make test-tools`, a prerequisite of `make test`. Nothing here needs a
//! container engine: `docker-compose config` only reads and resolves the file. The real run is
//! `make compose-demo` (README "The demo in containers").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The variables that replace the pinned images; unset, the file's own pins apply.
const IMAGE_VARIABLES: [&str; 4] =
    ["TOLLGATE_ENVOY_IMAGE", "TOLLGATE_PYTHON_IMAGE", "TOLLGATE_CURL_IMAGE", "TOLLGATE_CREDIT_IMAGE"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compose file as docker-compose resolves it (relative paths made absolute, defaults filled),
/// with the environment's `vars` and none of the image variables otherwise.
fn resolved_compose_with(vars: &[(&str, &str)]) -> Value {
    let mut command = Command::new("docker-compose");
    command.args(["-f", "envoy/docker-compose.yaml", "config"]).current_dir(repo());
    for name in IMAGE_VARIABLES {
        command.env_remove(name);
    }
    command.envs(vars.iter().copied());
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("docker-compose: {e}: run `make test-tools` (`make test` runs it first)"));
    assert!(
        out.status.success(),
        "docker-compose refuses envoy/docker-compose.yaml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

fn resolved_compose() -> Value {
    resolved_compose_with(&[])
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("services")
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo().join(path)).unwrap()).unwrap()
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().unwrap_or_else(|| panic!("not a list: {value}")).iter().filter_map(Value::as_str).collect()
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

/// A short-syntax bind mount, `SOURCE:TARGET:MODE`, as docker-compose prints it.
struct Mount {
    source: PathBuf,
    target: String,
    modes: Vec<String>,
}

/// The bind mounts of a service (named volumes left out).
fn bind_mounts(service: &Value) -> Vec<Mount> {
    let Some(volumes) = service["volumes"].as_array() else { return Vec::new() };
    volumes
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("the compose file uses short mount syntax: {v}")))
        .filter(|v| v.starts_with('/'))
        .map(|v| {
            let mut parts = v.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
            let modes = parts.next().unwrap_or("rw").split(',').map(str::to_owned).collect();
            Mount { source: PathBuf::from(source), target: target.to_owned(), modes }
        })
        .collect()
}

#[track_caller]
fn assert_mounted(service: &Value, target: &str, source: &Path) {
    let mounts = bind_mounts(service);
    let mount = mounts
        .iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("nothing is mounted at {target}: {}", service["volumes"]));
    assert_eq!(mount.source, source, "the mount at {target}");
}

#[test]
fn envoy_runs_the_generated_config_and_the_module_in_the_makefiles_version() {
    let compose = resolved_compose();
    let envoy = &services(&compose)["envoy"];
    assert_eq!(
        envoy["image"],
        format!("docker.io/envoyproxy/envoy:v{}", makefile_envoy_version()),
        "one Envoy version"
    );

    // Envoy is started with envoy/envoy.compose.yaml, mounted where the command names it.
    let args = strings(&envoy["command"]);
    let config_at = args.iter().position(|a| *a == "-c" || *a == "--config-path").map(|i| args[i + 1]);
    let config_at = config_at.unwrap_or_else(|| panic!("envoy's command names no config: {args:?}"));
    assert_mounted(envoy, config_at, &repo().join("envoy/envoy.compose.yaml"));

    // The module is build/tollgate.wasm, at the path the config loads it from: relative paths are
    // relative to the directory Envoy starts in, the service's working_dir.
    let mut filenames = Vec::new();
    module_filenames(&yaml("envoy/envoy.compose.yaml"), &mut filenames);
    assert!(!filenames.is_empty(), "envoy.compose.yaml loads no local module");
    let workdir = envoy["working_dir"].as_str().unwrap_or("/");
    for filename in filenames {
        let in_container = Path::new(workdir).join(&filename);
        assert_mounted(envoy, in_container.to_str().unwrap(), &repo().join("build/tollgate.wasm"));
    }
}

#[test]
fn the_compose_config_is_envoy_yaml_but_for_the_addresses_and_is_up_to_date() {
    let check = Command::new("python3").args(["envoy/compose_envoy.py", "--check"]).current_dir(repo()).output();
    let check = check.unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // Apply to envoy.yaml, as data, the changes the generator promises; nothing else may differ.
    let native = yaml("envoy/envoy.yaml");
    let generated = yaml("envoy/envoy.compose.yaml");
    let mut expected = native.clone();
    expected["admin"]["address"]["socket_address"]["address"] = "0.0.0.0".into();
    for listener in expected["static_resources"]["listeners"].as_array_mut().unwrap() {
        listener["address"]["socket_address"]["address"] = "0.0.0.0".into();
    }
    let service_of = |cluster: &str| match cluster {
        "credits" => "credit",
        "upstream" => "upstream",
        "grpc" => "grpc-upstream",
        other => panic!("cluster {other}: which compose service is it?"),
    };
    for cluster in expected["static_resources"]["clusters"].as_array_mut().unwrap() {
        let service = service_of(cluster["name"].as_str().unwrap());
        cluster["type"] = "STRICT_DNS".into();
        for endpoints in cluster["load_assignment"]["endpoints"].as_array_mut().unwrap() {
            for endpoint in endpoints["lb_endpoints"].as_array_mut().unwrap() {
                endpoint["endpoint"]["address"]["socket_address"]["address"] = service.into();
            }
        }
    }
    assert!(expected == generated, "envoy.compose.yaml differs from envoy.yaml beyond its addresses");

    // Each cluster's service exists and listens, on every interface, on the cluster's port.
    let compose = resolved_compose();
    let services = services(&compose);
    for cluster in generated["static_resources"]["clusters"].as_array().unwrap() {
        let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
        let (host, port) =
            (address["socket_address"]["address"].as_str().unwrap(), &address["socket_address"]["port_value"]);
        let service = services.get(host).unwrap_or_else(|| panic!("no service {host}"));
        let command = strings(&service["command"]).join(" ");
        assert!(
            command.contains(&format!("0.0.0.0:{port}")) || command.contains(&format!("\"0.0.0.0\", {port}")),
            "{host}: {command}"
        );
    }
}

#[test]
fn a_bridge_network_and_only_the_gateway_and_admin_published_on_the_native_ports() {
    let compose = resolved_compose();
    let networks = compose["networks"].as_object().map(|n| n.values().collect::<Vec<_>>()).unwrap_or_default();
    assert!(networks.iter().all(|n| n["driver"].as_str().unwrap_or("bridge") == "bridge"), "{networks:?}");
    for (name, service) in services(&compose) {
        assert!(service.get("network_mode").is_none(), "{name} leaves the bridge network");
        if name != "envoy" {
            assert!(service.get("ports").is_none(), "{name} is published: {}", service["ports"]);
        }
    }

    // The gateway and the admin, on the ports envoy.yaml gives them natively, host loopback only.
    let native = yaml("envoy/envoy.yaml");
    let generated = yaml("envoy/envoy.compose.yaml");
    let port = |config: &Value, pointer: &str| config.pointer(pointer).unwrap().as_u64().unwrap();
    let mut wanted = Vec::new();
    for pointer in
        ["/admin/address/socket_address/port_value", "/static_resources/listeners/0/address/socket_address/port_value"]
    {
        assert_eq!(port(&native, pointer), port(&generated, pointer));
        wanted.push(format!("127.0.0.1:{0}:{0}", port(&native, pointer)));
    }
    // docker-compose prints `127.0.0.1:10000:10000/tcp`.
    let mut published: Vec<String> =
        strings(&services(&compose)["envoy"]["ports"]).iter().map(|p| p.trim_end_matches("/tcp").to_owned()).collect();
    published.sort();
    wanted.sort();
    assert_eq!(published, wanted);
}

#[test]
fn envoy_takes_traffic_only_once_everything_it_needs_is_ready() {
    let compose = resolved_compose();
    let services = services(&compose);
    for (name, service) in services {
        assert_eq!(service["init"], true, "{name} runs without an init process: SIGTERM would not stop it");
    }
    for name in ["envoy", "upstream", "grpc-upstream", "credit"] {
        let test = strings(&services[name]["healthcheck"]["test"]);
        assert!(matches!(test.first(), Some(&"CMD" | &"CMD-SHELL")) && test.len() > 1, "{name}: {test:?}");
    }
    let condition =
        |service: &str, on: &str| services[service]["depends_on"][on]["condition"].as_str().map(str::to_owned);
    assert_eq!(condition("envoy", "upstream").as_deref(), Some("service_healthy"));
    assert_eq!(condition("envoy", "grpc-upstream").as_deref(), Some("service_healthy"));
    assert_eq!(condition("envoy", "credit").as_deref(), Some("service_healthy"));
    assert_eq!(condition("envoy", "credit-setup").as_deref(), Some("service_completed_successfully"));
    assert_eq!(condition("credit-setup", "credit").as_deref(), Some("service_healthy"));

    // credit-setup runs the native demo's script against the credit service by name.
    let setup = &services["credit-setup"];
    assert_mounted(setup, "/demo/demo-account.sh", &repo().join("envoy/demo-account.sh"));
    assert_eq!(setup["environment"]["CREDIT_URL"], "http://credit:8081");
    let credit = &services["credit"];
    let context = PathBuf::from(credit["build"]["context"].as_str().expect("credit is built here"));
    assert!(context.join(credit["build"]["dockerfile"].as_str().unwrap()).is_file());
}

#[test]
fn mounts_are_read_only_world_readable_and_labelled_for_selinux() {
    let compose = resolved_compose();
    let mut count = 0;
    for (name, service) in services(&compose) {
        for mount in bind_mounts(service) {
            count += 1;
            let at = format!("{name}: {}", mount.target);
            assert!(mount.modes.iter().any(|m| m == "ro"), "{at} is mounted read-write");
            assert!(mount.modes.iter().any(|m| m == "z"), "{at} has no shared SELinux label (z)");
            // Envoy runs as uid 101 and curl as uid 100: the files must be readable by others.
            // build/tollgate.wasm exists once `make wasm` ran (`make test` runs it first).
            if let Ok(meta) = std::fs::metadata(&mount.source) {
                assert!(meta.is_file(), "{at}: {} is not a file", mount.source.display());
                assert!(
                    meta.permissions().mode() & 0o004 != 0,
                    "{at}: {} is not world-readable",
                    mount.source.display()
                );
            }
        }
    }
    assert!(count >= 4, "{count} bind mounts");
}

/// Is `image` `NAME:TAG@sha256:<64 hex>`?
fn pinned(image: &str) -> bool {
    let Some((named, digest)) = image.split_once("@sha256:") else { return false };
    let tagged = named.rsplit_once(':').is_some_and(|(name, tag)| !name.is_empty() && !tag.contains('/'));
    tagged && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[test]
fn images_are_pinned_by_digest_with_their_tag_and_the_readme_lists_them() {
    let compose = resolved_compose();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut images: Vec<String> = Vec::new();
    for (name, service) in services(&compose) {
        let image = service["image"].as_str().unwrap().to_owned();
        if name == "credit" {
            assert!(service.get("build").is_some(), "the credit image is built here, not pulled");
            continue;
        }
        images.push(image);
    }
    // What the credit service's image builds from.
    let dockerfile = std::fs::read_to_string(repo().join("envoy/credit-service.Dockerfile")).unwrap();
    for arg in ["RUST_IMAGE", "DEBIAN_IMAGE"] {
        let line =
            dockerfile.lines().find(|l| l.starts_with(&format!("ARG {arg}="))).unwrap_or_else(|| panic!("ARG {arg}"));
        images.push(line.split_once('=').unwrap().1.to_owned());
    }
    assert!(!dockerfile.contains("# syntax="), "a syntax line makes BuildKit pull one more, unpinned, image");
    for image in &images {
        assert!(readme.contains(image.as_str()), "README does not list {image}");
        // No registry was reachable where the compose demo was written, and no published digest of
        // Envoy's v1.40.0 image could be found: README says so, and this is the one exception.
        if image.starts_with("docker.io/envoyproxy/envoy:") {
            continue;
        }
        assert!(pinned(image), "{image} is not NAME:TAG@sha256:DIGEST");
    }
    // The gRPC upstream runs on the upstream's image.
    images.sort();
    images.dedup();
    assert_eq!(images.len(), 5, "{images:?}");

    // Each pulled image can be replaced, e.g. by a local stand-in (envoy/standin/build.sh).
    let replaced = resolved_compose_with(&IMAGE_VARIABLES.map(|v| (v, "localhost/stand-in:1")));
    for (name, service) in services(&replaced) {
        assert_eq!(service["image"], "localhost/stand-in:1", "{name}");
    }
}

fn compose_demo(args: &[&str], path: &str, compose: Option<&str>) -> Output {
    let mut command = Command::new("/bin/bash");
    command.arg("envoy/compose-demo.sh").args(args).current_dir(repo()).env("PATH", path).env_remove("COMPOSE");
    for name in IMAGE_VARIABLES {
        command.env_remove(name);
    }
    if let Some(compose) = compose {
        command.env("COMPOSE", compose);
    }
    command.output().unwrap()
}

#[test]
fn compose_demo_prints_the_native_walkthrough_with_the_ledger_read_inside_the_network() {
    let cli = env!("CARGO_BIN_EXE_tollgate");
    let out = compose_demo(&["--walkthrough", cli], &std::env::var("PATH").unwrap(), Some("podman-compose"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();

    // As many entries, each with the same expectations, as envoy/demo.sh prints.
    let demo = std::fs::read_to_string(repo().join("envoy/demo.sh")).unwrap();
    let expectations = |text: &str| -> Vec<String> {
        text.lines().filter_map(|l| l.strip_prefix("  # ")?.rsplit_once("(→ ").map(|(_, e)| e.to_owned())).collect()
    };
    let (native, here) = (expectations(&demo), expectations(&text));
    assert!(native.len() >= 14, "{native:?}");
    assert_eq!(here, native);
    assert!(text.contains("eyJ"), "no signed token in:\n{text}");

    // Every command reaches only what is published, or runs inside the compose network.
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        if !pair[0].trim().starts_with("# ") {
            continue;
        }
        // A command may wait first (`sleep 1; curl …`, for the gateway's grant report to land).
        let command = pair[1].trim();
        let command =
            command.split_once("; ").filter(|(wait, _)| wait.starts_with("sleep ")).map_or(command, |(_, c)| c);
        assert!(!command.contains(":8081") || command.contains("run --rm"), "{command}");
        assert!(!command.contains(":8000"), "{command}");
        if command.starts_with("podman-compose ") {
            assert!(
                command.contains("-f envoy/docker-compose.yaml") && command.contains("http://credit:8081/"),
                "{command}"
            );
        } else {
            assert!(command.contains("127.0.0.1:10000") || command.contains("127.0.0.1:9901"), "{command}");
        }
    }
    assert!(text.contains("Ctrl-C"), "{text}");
}

#[test]
fn compose_demo_without_an_engine_says_what_is_missing() {
    // A PATH with what the script needs to start and no engine; then one with a docker-compose
    // whose daemon does not answer (as with Docker installed but stopped).
    let dir = std::env::temp_dir().join(format!("tollgate-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for tool in ["dirname", "sed", "head", "cat"] {
        let found = ["/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists()).unwrap();
        let _ = std::os::unix::fs::symlink(found, dir.join(tool));
    }
    let path = dir.to_str().unwrap();
    let cli = env!("CARGO_BIN_EXE_tollgate");

    let out = compose_demo(&[cli], path, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for named in ["docker compose", "docker-compose", "podman-compose", "make demo"] {
        assert!(stderr.contains(named), "{named:?} not named in:\n{stderr}");
    }

    let fake = dir.join("docker-compose");
    std::fs::write(
        &fake,
        "#!/bin/bash\n[ \"$1\" = version ] && exit 0\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = compose_demo(&[cli], path, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("found: docker-compose (installed, but its engine does not answer"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
