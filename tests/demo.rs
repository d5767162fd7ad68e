//! The demo as a user meets it: `envoy/demo.sh` brings up Envoy, the credit service and the sample
//! upstream; every command its walkthrough prints does what its comment says; Ctrl-C stops it all.
//! It runs on the demo's own fixed ports (10000, 9901, 8000, 8001, 8081), so it fails, saying so, when a
//! `make demo` is running.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use harness::*;

const PORTS: [u16; 5] = [10000, 9901, 8000, 8001, 8081];

/// Stops the demo's whole process group, also when an assertion fails mid-walkthrough.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-s", "TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

/// One walkthrough entry: what it claims, the command, and what the response must show.
struct Entry {
    comment: String,
    command: String,
    status: String,
    shows: Vec<String>,
    hides: Vec<String>,
}

/// Reads entries: a `  # … (→ STATUS, text, !text)` line, then the command on the next line.
fn entries(walkthrough: &[String]) -> Vec<Entry> {
    let mut entries = Vec::new();
    for pair in walkthrough.windows(2) {
        let Some(comment) = pair[0].trim().strip_prefix("# ") else { continue };
        let Some((_, expected)) = comment.rsplit_once("(→ ") else { continue };
        let mut parts = expected.trim_end_matches(')').split(", ").map(str::to_owned);
        let status = parts.next().unwrap();
        let (hides, shows): (Vec<String>, Vec<String>) = parts.partition(|p| p.starts_with('!'));
        entries.push(Entry {
            comment: comment.to_owned(),
            command: pair[1].trim().to_owned(),
            status,
            shows,
            hides: hides.into_iter().map(|h| h[1..].to_owned()).collect(),
        });
    }
    entries
}

#[test]
fn every_walkthrough_command_does_what_it_says_and_ctrl_c_stops_everything() {
    for port in PORTS {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} is busy: is a `make demo` running?");
    }
    let mut demo = Command::new("bash")
        .args(["envoy/demo.sh", ".venv/bin/envoy", "10000"])
        .env("TOLLGATE_CLI", env!("CARGO_BIN_EXE_tollgate"))
        .env("TOLLGATE_CREDIT", credit_binary())
        .current_dir(repo())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let stdout = BufReader::new(demo.stdout.take().unwrap());
    let mut demo = Running(demo);
    let (lines, printed) = mpsc::channel();
    thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(|line| drop(lines.send(line))));
    let mut walkthrough = Vec::new();
    while let Ok(line) = printed.recv_timeout(Duration::from_secs(60)) {
        let done = line.contains("Ctrl-C stops the demo");
        walkthrough.push(line);
        if done {
            break;
        }
    }
    assert!(walkthrough.last().is_some_and(|l| l.contains("Ctrl-C")), "the demo did not start:\n{walkthrough:?}");

    let entries = entries(&walkthrough);
    assert!(entries.len() >= 16, "{} entries in:\n{}", entries.len(), walkthrough.join("\n"));
    for entry in &entries {
        let output = Command::new("bash").args(["-c", &entry.command]).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_lowercase();
        // A gRPC client's command prints `grpc-status: CODE NAME` where curl prints `HTTP/1.1 CODE`.
        let status = text.lines().rev().find(|l| l.starts_with("http/") || l.starts_with("grpc-status:"));
        let status = status.unwrap_or_default().to_owned();
        let context = format!("{}\n$ {}\n{text}", entry.comment, entry.command);
        assert!(
            status.split(' ').nth(1) == Some(entry.status.as_str()),
            "status {status:?}, want {}:\n{context}",
            entry.status
        );
        for shown in &entry.shows {
            assert!(text.contains(&shown.to_lowercase()), "{shown:?} missing:\n{context}");
        }
        for hidden in &entry.hides {
            assert!(!text.contains(&hidden.to_lowercase()), "{hidden:?} shown:\n{context}");
        }
    }

    // Ctrl-C reaches the whole foreground process group, as a terminal sends it.
    Command::new("kill").args(["-s", "INT", "--", &format!("-{}", demo.0.id())]).status().unwrap();
    demo.0.wait().unwrap();
    thread::sleep(Duration::from_millis(500));
    for port in PORTS {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still served after Ctrl-C");
    }
}
