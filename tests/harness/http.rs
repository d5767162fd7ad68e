//! A raw HTTP/1.1 client that sends exactly the bytes a test builds (no normalization anywhere),
//! and the message framing it shares with the upstream.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::thread;

use serde_json::Value;

use super::IO_TIMEOUT;

#[derive(Debug, Clone)]
enum Body {
    None,
    Fixed(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

/// A request sent byte for byte as built: no path normalization, headers in order, duplicates kept.
/// `Host: localhost` and `Connection: close` are added unless the request sets them.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path: Vec<u8>,
    headers: Vec<(String, String)>,
    body: Body,
    source: Option<Ipv4Addr>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        let path = path.as_bytes().to_vec();
        Request { method: method.to_owned(), path, headers: Vec::new(), body: Body::None, source: None }
    }

    /// Sends from this loopback address (any of 127.0.0.0/8), as a distinct client would.
    #[allow(dead_code, reason = "not every test file sends from other addresses")]
    pub fn sent_from(mut self, source: Ipv4Addr) -> Request {
        self.source = Some(source);
        self
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    /// Adds a header; call again with the same name for a duplicate.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A body sent with `Content-Length` (unless the request sets Content-Length or Transfer-Encoding).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = Body::Fixed(body.into());
        self
    }

    /// A body sent as these chunks with `Transfer-Encoding: chunked`, no Content-Length.
    pub fn chunked(mut self, chunks: Vec<Vec<u8>>) -> Request {
        self.body = Body::Chunked(chunks);
        self
    }

    /// The request target as arbitrary bytes (control bytes, non-UTF-8, anything).
    pub fn raw_path(mut self, path: impl Into<Vec<u8>>) -> Request {
        self.path = path.into();
        self
    }

    fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    pub fn describe(&self) -> String {
        format!("{} {}", self.method, String::from_utf8_lossy(&self.path).escape_debug())
    }

    /// The request exactly as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = self.headers.clone();
        let mut add = |name: &str, value: String| head.push((name.to_owned(), value));
        if !self.has("host") {
            add("Host", "localhost".to_owned());
        }
        if !self.has("connection") {
            add("Connection", "close".to_owned());
        }
        let framed = self.has("content-length") || self.has("transfer-encoding");
        let body = match &self.body {
            Body::None => Vec::new(),
            Body::Fixed(bytes) => {
                if !framed {
                    add("Content-Length", bytes.len().to_string());
                }
                bytes.clone()
            }
            Body::Chunked(chunks) => {
                if !framed {
                    add("Transfer-Encoding", "chunked".to_owned());
                }
                let mut out = Vec::new();
                for chunk in chunks.iter().filter(|c| !c.is_empty()) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                out
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.path);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &head {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names lower-cased, in order, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).first().copied()
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request to any HTTP/1.1 server on 127.0.0.1 (Envoy, its admin, or another server a test runs).
pub fn send_to(port: u16, request: &Request) -> Result<Response, String> {
    exchange_from(port, request.source, request.to_bytes(), request.method == "HEAD")
}

/// A request written in parts, at moments the test chooses; the response is read after the last.
pub struct Conversation {
    stream: TcpStream,
}

impl Conversation {
    pub fn open(port: u16) -> Conversation {
        let stream = connect(port, None).unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Conversation { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn response(self) -> Result<Response, String> {
        let mut wire = Wire::new(self.stream, true);
        read_response(&mut wire, false).map_err(|e| format!("reading the response: {e}"))
    }
}

/// One chunk of a `Transfer-Encoding: chunked` body, framed.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    framed
}

pub(super) fn exchange(port: u16, bytes: Vec<u8>, head_request: bool) -> Result<Response, String> {
    exchange_from(port, None, bytes, head_request)
}

fn connect(port: u16, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let Some(source) = source else { return TcpStream::connect(target) };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// One request on a new connection. The request is written on its own thread while this one reads:
/// Envoy may answer early (413) and stop reading or reset the connection mid-body, and the write
/// error must not hide the response that is already there to read.
fn exchange_from(port: u16, source: Option<Ipv4Addr>, bytes: Vec<u8>, head_request: bool) -> Result<Response, String> {
    let stream = connect(port, source).map_err(|e| format!("connect to port {port}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    });
    let mut wire = Wire::new(stream.try_clone().unwrap(), true);
    let response = read_response(&mut wire, head_request).map_err(|e| format!("reading the response: {e}"));
    let _ = stream.shutdown(Shutdown::Both); // unblocks a writer stuck on a peer that stopped reading
    let _ = sender.join();
    response
}

fn read_response(wire: &mut Wire, head_request: bool) -> io::Result<Response> {
    loop {
        let (status, headers) = wire.response_head()?;
        if (100..200).contains(&status) {
            continue; // 100 Continue and other interim responses
        }
        let mut body = Vec::new();
        if !(head_request || status == 204 || status == 304) {
            match body_framing(&headers) {
                Framing::Chunked => wire.chunked(&mut |b| body.extend_from_slice(b))?,
                Framing::Length(n) => wire.take(n, &mut |b| body.extend_from_slice(b))?,
                Framing::UntilClose => {
                    while wire.fill()? > 0 {}
                    body = std::mem::take(&mut wire.buf);
                }
            }
        }
        return Ok(Response { status, headers, body });
    }
}

// HTTP/1.1 message framing, shared with the upstream.

pub(super) enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

pub(super) fn body_framing(headers: &[(String, String)]) -> Framing {
    let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.trim().to_ascii_lowercase());
    if value("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        Framing::Chunked
    } else if let Some(length) = value("content-length") {
        Framing::Length(length.parse().unwrap_or(0))
    } else {
        Framing::UntilClose
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message.into())
}

/// A socket read through a buffer, so messages can be parsed as their bytes arrive.
pub(super) struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    /// A reset connection reads as its end (the client: a response may precede the reset).
    lenient: bool,
}

impl Wire {
    pub(super) fn new(stream: TcpStream, lenient: bool) -> Wire {
        Wire { stream, buf: Vec::new(), lenient }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream.
    pub(super) fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if self.lenient && matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                Ok(0)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(io::Error::new(ErrorKind::TimedOut, format!("no data for {IO_TIMEOUT:?}")))
            }
            Err(e) => Err(e),
        }
    }

    fn fill_or_eof(&mut self) -> io::Result<()> {
        match self.fill()? {
            0 => Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed mid-message")),
            _ => Ok(()),
        }
    }

    /// One line, without its CRLF.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill_or_eof()?;
        }
    }

    /// Exactly `n` bytes, handed to `sink` as they arrive.
    pub(super) fn take(&mut self, mut n: usize, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() {
                self.fill_or_eof()?;
            }
            let k = n.min(self.buf.len());
            sink(&self.buf[..k]);
            self.buf.drain(..k);
            n -= k;
        }
        Ok(())
    }

    /// A chunked body, decoded into `sink`; extensions and trailers are skipped.
    pub(super) fn chunked(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            let line = self.line()?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
            match size.ok_or_else(|| invalid(format!("bad chunk size {:?}", String::from_utf8_lossy(&line))))? {
                0 => while !self.line()?.is_empty() {},
                size => {
                    self.take(size, sink)?;
                    if !self.line()?.is_empty() {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    continue;
                }
            }
            return Ok(());
        }
    }

    /// A request line and headers; `None` if the connection ends cleanly between requests.
    #[allow(clippy::type_complexity, reason = "a private tuple")]
    pub(super) fn request_head(&mut self) -> io::Result<Option<(String, String, Vec<(String, String)>)>> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 256];
            let mut request = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = request.parse(&self.buf).map_err(|e| invalid(e.to_string()))? {
                let method = request.method.unwrap_or_default().to_owned();
                let path = request.path.unwrap_or_default().to_owned();
                let headers = owned_headers(request.headers);
                self.buf.drain(..n);
                return Ok(Some((method, path, headers)));
            }
            if self.fill()? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(invalid("connection closed mid-head")) };
            }
        }
    }

    /// A status line and headers.
    pub(super) fn response_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 256];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = response.parse(&self.buf).map_err(|e| invalid(e.to_string()))? {
                let status = response.code.unwrap_or_default();
                let headers = owned_headers(response.headers);
                self.buf.drain(..n);
                return Ok((status, headers));
            }
            if self.fill()? == 0 {
                let got = String::from_utf8_lossy(&self.buf).into_owned();
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("closed before a full response: {got:?}"),
                ));
            }
        }
    }
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers.iter().map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned())).collect()
}
