//! tollgate: an API gateway filter for Envoy. This file is the request pipeline, step by step in
//! the order of DESIGN.md; each step's logic lives in its own module, and `wasm/` is the only
//! code that talks to proxy-wasm.

pub mod checks;
pub mod config;
pub mod headers;
pub mod host;
pub mod problem;
pub mod routes;

#[cfg(target_arch = "wasm32")]
mod wasm;

use std::rc::Rc;

use checks::BodyCounter;
use config::{Config, Method};
use host::Host;
use problem::Denial;
use routes::{Access, Policy};

/// Where an operator attaches a policy to an Envoy route: `metadata.filter_metadata.tollgate.policy`.
const ROUTE_POLICY_PROPERTY: [&str; 5] = ["xds", "route_metadata", "filter_metadata", "tollgate", "policy"];

/// What the proxy should do with the request or response after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop here: the filter has answered the request itself.
    Pause,
}

/// One request's way through the filter.
pub struct Stream {
    config: Rc<Config>,
    /// The selected policy's `Cache-Control`, resolved at request time for the response.
    cache_control: Option<String>,
    body: BodyCounter,
    https: bool,
    request_id: String,
    /// The filter answered this request itself; its response already carries every header.
    answered: bool,
}

/// The request headers the pipeline reads, taken from one hostcall.
struct RequestView<'a> {
    all: &'a [(String, String)],
}

impl<'a> RequestView<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.all.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Stream {
    pub fn new(config: Rc<Config>) -> Stream {
        let cache_control = config.security_headers.cache_control.clone();
        Stream {
            body: BodyCounter::new(u64::MAX),
            config,
            cache_control,
            https: false,
            request_id: String::new(),
            answered: false,
        }
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host) -> Flow {
        let all = host.request_headers();
        let request = RequestView { all: &all };
        self.request_id = request.get("x-request-id").unwrap_or_default().to_owned();
        // Envoy sets X-Forwarded-Proto by its own trust rules (use_remote_address,
        // xff_num_trusted_hops), so a client cannot claim https through it.
        self.https = request.get("x-forwarded-proto").or(request.get(":scheme")) == Some("https");
        match self.request_headers(host, &request) {
            Ok(()) => Flow::Continue,
            Err(denial) => self.deny(host, &denial),
        }
    }

    fn request_headers(&mut self, host: &mut dyn Host, request: &RequestView) -> Result<(), Denial> {
        let method = request.get(":method").and_then(Method::from_header);
        let raw_path = request.get(":path").ok_or(checks::CheckError::MissingPath)?;

        // 1. Route policy.
        let policy = self.route_policy(host, method, raw_path)?;
        self.cache_control = policy.cache_control.clone();

        // 2. Request checks.
        checks::path(raw_path)?;
        checks::content_length(request.get("content-length"), policy.max_body_bytes)?;
        self.body = BodyCounter::new(policy.max_body_bytes);
        checks::content_type(method, request.get("content-type"), &policy.content_types)?;

        // 3. Identity headers: nothing downstream may trust what the client sent under them.
        headers::strip_identity(host, request.all, &self.config.identity_headers);

        // 4. Authentication and access. No credential is accepted yet (#3), so a route that
        // needs a caller has none.
        match policy.access {
            Access::Public => Ok(()),
            Access::Authenticated => Err(Denial::Unauthenticated),
            Access::Deny => Err(Denial::NotFound),
        }
    }

    /// Envoy route metadata, when the route carries it, wins over the prefix table: it is the
    /// operator's statement about that very route.
    fn route_policy(&self, host: &dyn Host, method: Option<Method>, raw_path: &str) -> Result<Rc<Policy>, Denial> {
        if let Some(name) = host.property(&ROUTE_POLICY_PROPERTY) {
            let name = String::from_utf8_lossy(&name);
            return self
                .config
                .routes
                .policy(&name)
                .cloned()
                .ok_or(Denial::UnknownRoutePolicy { name: name.into_owned() });
        }
        let path = raw_path.split(['?', '#']).next().unwrap_or_default();
        Ok(self.config.routes.select(method, path).clone())
    }

    /// Counts a streamed body chunk; `chunk_len` is what arrived since the last call, because
    /// this filter never asks Envoy to buffer.
    pub fn on_request_body(&mut self, host: &mut dyn Host, chunk_len: usize) -> Flow {
        if self.answered {
            return Flow::Pause;
        }
        match self.body.add(chunk_len) {
            Ok(()) => Flow::Continue,
            Err(err) => self.deny(host, &Denial::from(err)),
        }
    }

    pub fn on_response_headers(&mut self, host: &mut dyn Host) -> Flow {
        if !self.answered {
            let cache_control = self.cache_control.as_deref();
            headers::secure_response(host, &self.config.security_headers, cache_control, self.https);
        }
        Flow::Continue
    }

    fn deny(&mut self, host: &mut dyn Host, denial: &Denial) -> Flow {
        self.answered = true;
        respond(host, denial, &self.request_id, Some(&self.config), self.https);
        Flow::Pause
    }
}

/// Answers a request that reached a VM whose configuration never loaded. Envoy does not create
/// streams for such a plugin; this is the fail-closed answer should one appear anyway.
pub fn refuse_unconfigured(host: &mut dyn Host) -> Flow {
    respond(host, &Denial::Unconfigured, "", None, false);
    Flow::Pause
}

fn respond(host: &mut dyn Host, denial: &Denial, request_id: &str, config: Option<&Config>, https: bool) {
    let kind = denial.problem_type();
    log::info!(
        "denied status={} type={} request_id={} detail={:?}",
        kind.status,
        kind.slug,
        request_id,
        log_detail(denial)
    );
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/problem+json")];
    if let Some(config) = config {
        // An error is never cacheable, whatever the route allows for its successes.
        headers.extend(headers::security(&config.security_headers, Some("no-store"), https));
    }
    if *denial == Denial::Unauthenticated {
        headers.push(("www-authenticate", "Bearer realm=\"tollgate\""));
    }
    host.send_response(kind.status, &headers, &problem::body(denial, request_id));
}

/// The log may say more than the client is told, never a credential.
fn log_detail(denial: &Denial) -> String {
    match denial {
        Denial::UnknownRoutePolicy { name } => format!("route metadata names unknown policy {name:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A local reply: status, headers, parsed body.
    type Sent = (u16, Vec<(String, String)>, serde_json::Value);

    /// A proxy that records what the pipeline did.
    #[derive(Default)]
    struct FakeHost {
        request: Vec<(String, String)>,
        properties: HashMap<String, Vec<u8>>,
        removed: Vec<String>,
        response: Vec<(String, String)>,
        sent: Option<Sent>,
    }

    impl Host for FakeHost {
        fn request_headers(&self) -> Vec<(String, String)> {
            self.request.clone()
        }
        fn remove_request_header(&mut self, name: &str) {
            self.removed.push(name.to_owned());
        }
        fn set_response_header(&mut self, name: &str, value: &str) {
            self.response.retain(|(n, _)| n != name);
            self.response.push((name.to_owned(), value.to_owned()));
        }
        fn remove_response_header(&mut self, name: &str) {
            self.response.retain(|(n, _)| n != name);
        }
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.properties.get(&path.join(".")).cloned()
        }
        fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
            let headers = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            self.sent = Some((status, headers, serde_json::from_slice(body).unwrap()));
        }
    }

    impl FakeHost {
        fn request(method: &str, path: &str, extra: &[(&str, &str)]) -> FakeHost {
            let mut request = vec![
                (":method".to_owned(), method.to_owned()),
                (":path".to_owned(), path.to_owned()),
                ("x-request-id".to_owned(), "rid-1".to_owned()),
            ];
            request.extend(extra.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
            FakeHost { request, ..FakeHost::default() }
        }
        fn sent_header(&self, name: &str) -> Option<&str> {
            let (_, headers, _) = self.sent.as_ref()?;
            headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }
    }

    const CONFIG: &str = r#"{
        "policies": {
            "public": {"access": "public", "max_body_bytes": 8},
            "api": {"access": "authenticated"},
            "cached": {"access": "public", "cache_control": "public, max-age=60"},
            "closed": {"access": "deny"}
        },
        "routes": [
            {"prefix": "/health", "policy": "public"},
            {"prefix": "/api", "policy": "api"},
            {"prefix": "/static", "policy": "cached"}
        ]
    }"#;

    fn run(host: &mut FakeHost) -> (Stream, Flow) {
        let mut stream = Stream::new(Rc::new(Config::from_json(CONFIG.as_bytes()).unwrap()));
        let flow = stream.on_request_headers(host);
        (stream, flow)
    }

    #[test]
    #[allow(clippy::type_complexity, reason = "a table of requests reads best inline")]
    fn denials_by_request() {
        let cases: &[(&str, &str, &[(&str, &str)], u16, &str)] = &[
            ("GET", "/health/../api", &[], 400, "invalid-path"),
            ("POST", "/health", &[("content-length", "9")], 413, "payload-too-large"),
            ("POST", "/health", &[("content-type", "text/xml")], 415, "unsupported-media-type"),
            ("GET", "/api/items", &[], 401, "unauthenticated"),
            ("GET", "/nowhere", &[], 404, "not-found"),
        ];
        for (method, path, extra, status, slug) in cases {
            let mut host = FakeHost::request(method, path, extra);
            let (_, flow) = run(&mut host);
            assert_eq!(flow, Flow::Pause, "{method} {path}");
            let (got, _, body) = host.sent.as_ref().unwrap();
            assert_eq!(
                (*got, body["type"].as_str().unwrap()),
                (*status, format!("urn:tollgate:problem:{slug}").as_str())
            );
            assert_eq!(body["request_id"], "rid-1");
            assert_eq!(host.sent_header("content-type"), Some("application/problem+json"));
            assert_eq!(host.sent_header("x-frame-options"), Some("DENY"));
            assert_eq!(host.sent_header("cache-control"), Some("no-store"));
        }
    }

    #[test]
    fn unauthenticated_carries_www_authenticate() {
        let mut host = FakeHost::request("GET", "/api/items", &[]);
        run(&mut host);
        assert_eq!(host.sent_header("www-authenticate"), Some("Bearer realm=\"tollgate\""));
    }

    #[test]
    fn a_public_request_passes_with_identity_headers_removed() {
        let mut host = FakeHost::request("GET", "/health", &[("x-tollgate-account", "acme"), ("x-other", "1")]);
        let (_, flow) = run(&mut host);
        assert_eq!(flow, Flow::Continue);
        assert!(host.sent.is_none());
        assert_eq!(host.removed, ["x-tollgate-account"]);
    }

    #[test]
    fn a_streamed_body_is_stopped_at_the_limit() {
        let mut host = FakeHost::request("POST", "/health", &[("transfer-encoding", "chunked")]);
        let (mut stream, flow) = run(&mut host);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 5), Flow::Continue);
        assert_eq!(stream.on_request_body(&mut host, 4), Flow::Pause);
        assert_eq!(host.sent.as_ref().unwrap().0, 413);
    }

    #[test]
    fn route_metadata_wins_over_the_prefix_table() {
        let mut host = FakeHost::request("GET", "/health", &[]);
        host.properties.insert(ROUTE_POLICY_PROPERTY.join("."), b"closed".to_vec());
        run(&mut host);
        assert_eq!(host.sent.as_ref().unwrap().0, 404);

        let mut host = FakeHost::request("GET", "/health", &[]);
        host.properties.insert(ROUTE_POLICY_PROPERTY.join("."), b"missing".to_vec());
        run(&mut host);
        assert_eq!(host.sent.as_ref().unwrap().0, 500);
    }

    #[test]
    fn responses_get_security_headers_and_lose_server() {
        let mut host = FakeHost::request("GET", "/static/app.js", &[("x-forwarded-proto", "https")]);
        let (mut stream, _) = run(&mut host);
        host.response =
            vec![("server".to_owned(), "gunicorn".to_owned()), ("x-frame-options".to_owned(), "ALLOW".to_owned())];
        stream.on_response_headers(&mut host);
        let get = |name: &str| host.response.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("server"), None);
        assert_eq!(get("x-frame-options"), Some("DENY"));
        assert_eq!(get("x-content-type-options"), Some("nosniff"));
        assert_eq!(get("cache-control"), Some("public, max-age=60"));
        assert_eq!(get("strict-transport-security"), Some("max-age=31536000; includeSubDomains"));
    }

    #[test]
    fn no_hsts_over_plain_http() {
        let mut host = FakeHost::request("GET", "/health", &[]);
        let (mut stream, _) = run(&mut host);
        stream.on_response_headers(&mut host);
        assert!(host.response.iter().all(|(n, _)| n != "strict-transport-security"));
        assert!(host.response.iter().any(|(n, v)| n == "cache-control" && v == "no-store"));
    }
}
