//! A TCP proxy that holds what clients send until the test opens it: a credit service or a JWKS
//! server made slow on purpose, for exactly as long as a test needs, whatever the machine's speed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct State {
    open: bool,
    /// Bytes clients have sent to the gate.
    received: usize,
}

pub struct Gate {
    port: u16,
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Gate {
    /// A closed gate in front of the server on `target` (127.0.0.1).
    pub fn start(target: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let state = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let state = Arc::clone(&state);
                thread::spawn(move || relay(client, server, &state));
            }
        });
        Gate { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits until a client has sent something through the gate; panics after `timeout`.
    pub fn wait_for_request(&self, timeout: Duration) {
        let (lock, changed) = &*self.shared;
        let guard = lock.lock().unwrap();
        let (guard, _) = changed.wait_timeout_while(guard, timeout, |s| s.received == 0).unwrap();
        assert!(guard.received > 0, "nothing reached the gate in {timeout:?}");
    }

    /// Holds what clients send from now on, and forgets what went through before.
    pub fn close(&self) {
        let (lock, _) = &*self.shared;
        *lock.lock().unwrap() = State::default();
    }

    /// Lets everything through, until closed again.
    pub fn open(&self) {
        let (lock, changed) = &*self.shared;
        lock.lock().unwrap().open = true;
        changed.notify_all();
    }
}

/// Client to server through the gate; server to client as it comes.
fn relay(mut client: TcpStream, mut server: TcpStream, shared: &(Mutex<State>, Condvar)) {
    let (mut back_from, mut back_to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(Shutdown::Write);
    });
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (lock, changed) = shared;
        let mut state = lock.lock().unwrap();
        state.received += n;
        changed.notify_all();
        let state = changed.wait_while(state, |s| !s.open).unwrap();
        drop(state);
        if server.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}
