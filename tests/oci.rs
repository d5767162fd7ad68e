//! The Wasm OCI image `make oci` builds (build/oci), end to end: pushed to a real registry (Debian's
//! `docker-registry`) by the command `make oci-push` runs, pulled back the way Istio and Envoy
//! Gateway pull a Wasm image (the registry API: the manifest, then its single layer, `plugin.wasm`
//! out of that tar), and served by a real Envoy that loads the pulled module.
//!
//! The tools come from `make test-tools` and the layout from `make oci`, both prerequisites of
//! `make test`; a missing one fails the test with the target that provides it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The layer type the fetchers' "compat" branch requires of the image's last layer.
const COMPAT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// What Istio's and Envoy Gateway's fetchers send (go-containerregistry's defaults include these).
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A command on PATH, or a failure naming the make target that installs it.
fn tool(name: &str, target: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: run `make {target}` (`make test` runs it first)"))
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256_digest(bytes: &[u8]) -> String {
    let hash = hmac_sha256::Hash::hash(bytes);
    format!("sha256:{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The tag `make oci` gives the image: the crate's version.
const TAG: &str = env!("CARGO_PKG_VERSION");

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// A local registry

/// Debian's `docker-registry` (CNCF distribution) on 127.0.0.1, with its own config and storage.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start() -> Registry {
        let binary = tool("docker-registry", "test-tools");
        let dir = temp_dir("registry");
        // distribution binds the address in its config, so pick a free port now; another process
        // could take it before the registry binds it, hence the retries.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let config = dir.join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: tollgate-test\n",
                    dir.join("storage").display()
                ),
            )
            .unwrap();
            let log = fs::File::create(dir.join("registry.log")).unwrap();
            let child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut registry = Registry { child, port, dir: dir.clone() };
            if registry.wait_ready() {
                return registry;
            }
            let _ = registry.child.kill();
            let _ = registry.child.wait();
            std::mem::forget(registry); // keep the directory for the next try
        }
        panic!("docker-registry did not start; its log:\n{}", fs::read_to_string(dir.join("registry.log")).unwrap());
    }

    /// `GET /v2/` answers 200, or the registry exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if send_to(self.port, &Request::get("/v2/")).is_ok_and(|r| r.status == 200) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn get(&self, path: &str) -> Response {
        let resp = send_to(self.port, &Request::get(path).header("Accept", ACCEPT))
            .unwrap_or_else(|e| panic!("registry GET {path}: {e}"));
        assert_eq!(resp.status, 200, "registry GET {path}: {}", resp.text());
        resp
    }

    /// A blob, checked against its digest as every client must.
    fn blob(&self, repository: &str, digest: &str) -> Vec<u8> {
        let body = self.get(&format!("/v2/{repository}/blobs/{digest}")).body;
        assert_eq!(sha256_digest(&body), digest, "blob content does not match its digest");
        body
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- registry log ---\n{}--- end of registry log ---", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The layout `make oci` wrote

/// The manifest digest the layout tags with the crate's version.
fn layout_digest(layout: &Path) -> String {
    let index_path = layout.join("index.json");
    let text = fs::read_to_string(&index_path)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make oci` (`make test` runs it first)", index_path.display()));
    let index: Value = serde_json::from_str(&text).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let tagged = manifests.iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == TAG);
    let manifest = tagged.unwrap_or_else(|| panic!("build/oci has no tag {TAG}: run `make oci`"));
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    manifest["digest"].as_str().unwrap().to_owned()
}

/// Extracts `plugin.wasm` from a compat layer (a gzip tar) with GNU tar, which also proves the
/// layer is a complete archive, and checks it is the layer's only entry.
fn plugin_from_layer(layer: &[u8], dir: &Path) -> PathBuf {
    let archive = dir.join("layer.tar.gz");
    fs::write(&archive, layer).unwrap();
    let listing = run(Command::new("tar").arg("--list").arg("--gzip").arg("--file").arg(&archive)).stdout;
    assert_eq!(String::from_utf8(listing).unwrap(), "plugin.wasm\n", "the layer holds plugin.wasm alone, at its root");
    let out = dir.join("rootfs");
    fs::create_dir_all(&out).unwrap();
    run(Command::new("tar").arg("--extract").arg("--gzip").arg("--file").arg(&archive).arg("--directory").arg(&out));
    out.join("plugin.wasm")
}

#[test]
fn the_image_pushes_pulls_back_as_the_same_module_and_envoy_serves_with_it() {
    tool("skopeo", "test-tools");
    tool("umoci", "test-tools");
    let layout = repo().join("build/oci");
    let module = fs::read(repo().join("build/tollgate.wasm")).expect("build/tollgate.wasm: run `make wasm`");
    let digest = layout_digest(&layout);
    let recorded = fs::read_to_string(repo().join("build/oci.digest")).expect("build/oci.digest: run `make oci`");
    assert_eq!(recorded.trim(), digest, "the digest `make oci` printed names the image in the layout");

    // Push with the command `make oci-push` runs.
    let registry = Registry::start();
    let tag = TAG;
    let repository = "tollgate/filter";
    let dest = format!("127.0.0.1:{}/{repository}:{tag}", registry.port);
    let pushed = run(Command::new("bash")
        .arg(repo().join("envoy/oci.sh"))
        .args(["push", "build/oci", tag, &dest, "--dest-tls-verify=false"])
        .current_dir(repo()));
    let stdout = String::from_utf8(pushed.stdout).unwrap();
    assert!(stdout.contains(&format!("pushed {dest}@{digest}")), "push output: {stdout}");

    // Pull as the Wasm fetchers do: the manifest by tag, then its layers by digest.
    let resp = registry.get(&format!("/v2/{repository}/manifests/{tag}"));
    assert_eq!(resp.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        resp.header("docker-content-digest"),
        Some(digest.as_str()),
        "the registry holds the digest `make oci` printed"
    );
    assert_eq!(sha256_digest(&resp.body), digest, "the manifest bytes are the ones the layout holds");
    let manifest = resp.json();
    // umoci leaves out the optional `mediaType` (the registry serves it as the Content-Type above);
    // either way it is not the Docker schema 2 type, so the fetchers take their OCI compat branch.
    assert!(manifest.get("mediaType").is_none_or(|t| t == OCI_MANIFEST), "{manifest}");
    assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "compat format: a single layer; manifest: {manifest}");
    assert_eq!(layers[0]["mediaType"], COMPAT_LAYER);

    // The metadata, on the manifest and in the image config.
    let config: Value =
        serde_json::from_slice(&registry.blob(repository, manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let head =
        String::from_utf8(run(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(repo())).stdout).unwrap();
    for metadata in [&manifest["annotations"], &config["config"]["Labels"]] {
        assert_eq!(metadata["org.opencontainers.image.title"], "tollgate", "{metadata}");
        assert_eq!(metadata["org.opencontainers.image.version"], tag, "{metadata}");
        assert_eq!(metadata["org.opencontainers.image.description"], env!("CARGO_PKG_DESCRIPTION"), "{metadata}");
        let revision = metadata["org.opencontainers.image.revision"].as_str().unwrap_or_default();
        assert!(revision.starts_with(head.trim()), "revision {revision:?} is not HEAD {head}: run `make oci`");
    }

    // The module in the layer is build/tollgate.wasm, byte for byte.
    let dir = temp_dir("oci-pull");
    let layer = registry.blob(repository, layers[0]["digest"].as_str().unwrap());
    let pulled = plugin_from_layer(&layer, &dir);
    assert!(
        fs::read(&pulled).unwrap() == module,
        "the pulled plugin.wasm differs from build/tollgate.wasm (an image older than the module? run `make oci`)"
    );

    // And a real Envoy runs the pulled module.
    let gw = Gateway::start(GatewayOptions { wasm: Some(pulled.clone()), ..GatewayOptions::default() });
    let config_dump = gw.admin("/config_dump").text();
    assert!(config_dump.contains(pulled.to_str().unwrap()), "Envoy does not load the pulled module");
    let resp = gw.send(Request::get("/health"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_security_headers(&resp);
    assert_eq!(resp.header("server"), None, "the filter removes the upstream's server header");
    let denied = gw.send(Request::get("/api/items"));
    assert_problem(&denied, 401, "unauthenticated");
    drop(gw);
    let _ = fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Plain Envoy without a registry client: the module over HTTP, pinned by its sha256

/// `python3 -m http.server` serving build/ on a port the kernel picks.
struct FileServer {
    child: Child,
    port: u16,
}

impl FileServer {
    fn start(dir: &Path) -> FileServer {
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let port =
            line.split(" port ").nth(1).and_then(|rest| rest.split_whitespace().next()).and_then(|p| p.parse().ok());
        FileServer { port: port.unwrap_or_else(|| panic!("http.server said {line:?}")), child }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The README's `vm_config.code.remote`: the module fetched from `url` through a cluster for the
/// file server, and checked against `sha256`.
fn load_remotely(server_port: u16, sha256: String) -> Mutation {
    Box::new(move |config| {
        let uri = format!("http://127.0.0.1:{server_port}/tollgate.wasm");
        tollgate_filter(config)["typed_config"]["config"]["vm_config"]["code"] = serde_json::json!({
            "remote": {
                "http_uri": {"uri": uri, "cluster": "wasm_downloads", "timeout": "10s"},
                "sha256": sha256,
            }
        });
        config["static_resources"]["clusters"].as_array_mut().unwrap().push(serde_json::json!({
            "name": "wasm_downloads",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "wasm_downloads", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": server_port}}
            }}]}]}
        }));
    })
}

#[test]
fn envoy_loads_the_module_over_http_pinned_by_its_sha256_and_refuses_another() {
    let module = fs::read(repo().join("build/tollgate.wasm")).expect("build/tollgate.wasm: run `make wasm`");
    let sha256 = sha256_digest(&module).trim_start_matches("sha256:").to_owned();
    let server = FileServer::start(&repo().join("build"));

    let gw = Gateway::start(GatewayOptions { mutate: Some(load_remotely(server.port, sha256)), ..Default::default() });
    let resp = gw.send(Request::get("/health"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_security_headers(&resp);
    drop(gw);

    // A module that is not the one pinned never runs, and nothing passes unfiltered: Envoy starts,
    // the plugin fails closed (fail_open: false), and every request gets 503.
    let gw = Gateway::start(GatewayOptions {
        mutate: Some(load_remotely(server.port, "0".repeat(64))),
        ..Default::default()
    });
    let resp = gw.send(Request::get("/health"));
    assert_eq!(resp.status, 503, "a module failing its sha256: {}", resp.text());
    assert!(gw.upstream().requests().is_empty(), "the upstream was reached");
    assert!(gw.envoy_log().contains("Plugin tollgate failed to load"), "Envoy's log does not say the plugin failed");
}
