//! The recording upstream: an in-process HTTP/1.1 server (keep-alive) that records every request,
//! as soon as its head arrives and then as its body does, and echoes it back as JSON.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

use super::http::{body_framing, Framing, Wire};

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Names lower-cased, in arrival order, duplicates kept.
    pub headers: Vec<(String, String)>,
    /// The body bytes that arrived (decoded if chunked).
    pub body: Vec<u8>,
    /// The body ended as framed; false while it is arriving or if the connection ended first.
    pub complete: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    /// Each request with whether its reading has ended (complete or cut off).
    requests: Mutex<Vec<(Recorded, bool)>>,
    changed: Condvar,
    /// Every accepted connection, to shut down on stop.
    connections: Mutex<Vec<TcpStream>>,
    stopping: AtomicBool,
    /// When set, every request gets this status and JSON body instead of the echo.
    reply: Mutex<Option<(u16, Vec<u8>)>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Vec<(Recorded, bool)>)) {
        f(&mut self.requests.lock().unwrap());
        self.changed.notify_all();
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and echoes it back as JSON.
/// `x-upstream-status: N` sets the status; each `x-upstream-header: name: value` adds a header.
pub struct Upstream {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let state = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name(format!("upstream-{port}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if state.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    state.connections.lock().unwrap().push(stream.try_clone().unwrap());
                    let state = Arc::clone(&state);
                    thread::spawn(move || serve(stream, &state));
                }
            })
            .unwrap();
        Upstream { port, shared, acceptor: Some(acceptor) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().iter().map(|(r, _)| r.clone()).collect()
    }

    /// Waits until at least `n` requests have arrived and none is still mid-body, or `timeout`
    /// passes; returns what was recorded either way (Envoy forwards asynchronously).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.wait_while(timeout, |requests| requests.len() < n || requests.iter().any(|(_, ended)| !ended))
    }

    /// Waits until `done` holds for the recorded requests, or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        self.wait_while(timeout, |requests| !done(&requests.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>()))
    }

    fn wait_while(&self, timeout: Duration, pending: impl Fn(&Vec<(Recorded, bool)>) -> bool) -> Vec<Recorded> {
        let guard = self.shared.requests.lock().unwrap();
        let (guard, _) = self.shared.changed.wait_timeout_while(guard, timeout, |r| pending(r)).unwrap();
        guard.iter().map(|(r, _)| r.clone()).collect()
    }

    /// Answers every later request with `status` and this JSON body (a JWKS, say) instead of the
    /// echo; `None` goes back to echoing.
    pub fn set_reply(&self, reply: Option<(u16, Value)>) {
        *self.shared.reply.lock().unwrap() = reply.map(|(status, body)| (status, serde_json::to_vec(&body).unwrap()));
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        self.shared.update(Vec::clear);
    }

    /// Stops accepting and closes every connection, as a server that went down.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the blocked accept
        let _ = acceptor.join();
        for connection in self.shared.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both); // ends the connection threads' reads
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one keep-alive connection until it closes.
fn serve(stream: TcpStream, state: &Shared) {
    let mut output = stream.try_clone().unwrap();
    let mut wire = Wire::new(stream, false);
    while let Ok(Some((method, path, headers))) = wire.request_head() {
        let index = {
            let mut requests = state.requests.lock().unwrap();
            let recorded = Recorded { method, path, headers, body: Vec::new(), complete: false };
            requests.push((recorded, false));
            requests.len() - 1
        };
        state.changed.notify_all();
        let record = |bytes: &[u8]| state.update(|r| r[index].0.body.extend_from_slice(bytes));
        let request = state.requests.lock().unwrap()[index].0.clone();
        let framing = body_framing(&request.headers);
        let read = match framing {
            Framing::Chunked => wire.chunked(&mut |b| record(b)),
            Framing::Length(n) => wire.take(n, &mut |b| record(b)),
            Framing::UntilClose => Ok(()), // a request without framing has no body
        };
        state.update(|r| r[index] = (Recorded { complete: read.is_ok(), ..r[index].0.clone() }, true));
        if read.is_err() {
            return;
        }
        let request = state.requests.lock().unwrap()[index].0.clone();
        let reply = state.reply.lock().unwrap().clone();
        let answer = match reply {
            Some((status, body)) => response(status, &[], body),
            None => echo(&request),
        };
        if output.write_all(&answer).is_err() || request.header("connection") == Some("close") {
            return;
        }
    }
}

/// The upstream's answer: the request echoed as JSON, shaped by the `x-upstream-*` headers.
fn echo(request: &Recorded) -> Vec<u8> {
    let mut status = 200;
    let mut extra = Vec::new();
    for (name, value) in &request.headers {
        match name.as_str() {
            "x-upstream-status" => status = value.trim().parse().expect("x-upstream-status: a number"),
            "x-upstream-header" => {
                let (n, v) = value.split_once(':').expect("x-upstream-header: name: value");
                extra.push((n.trim().to_owned(), v.trim().to_owned()));
            }
            _ => {}
        }
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in &request.headers {
        let joined = match headers.get(name).and_then(Value::as_str) {
            Some(earlier) => format!("{earlier}, {value}"),
            None => value.clone(),
        };
        headers.insert(name.clone(), joined.into());
    }
    let body =
        json!({"method": request.method, "path": request.path, "headers": headers, "body_len": request.body.len()});
    let mut body = serde_json::to_vec(&body).unwrap();
    if request.method == "HEAD" || status == 204 || status == 304 {
        body.clear();
    }
    response(status, &extra, body)
}

fn response(status: u16, extra: &[(String, String)], body: Vec<u8>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} Upstream\r\ncontent-type: application/json\r\nserver: recording-upstream\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}
