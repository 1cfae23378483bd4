//! A small TCP front on loopback standing in for Azure's load-balanced cache
//! endpoint: it passes bytes (TLS included, untouched) through to the server
//! it routes to now, and can do what Azure does to clients at a failover:
//! close every connection through it, refuse new ones for a while, and route
//! to another server. Standard library only (threads), so that
//! `examples/failover_front.rs` serves `scripts/failover-lab.sh` with the
//! same code.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct State {
    /// The server port new connections go to.
    target: Mutex<u16>,
    /// Refuse new connections (the listening socket is closed meanwhile).
    refusing: AtomicBool,
    stop: AtomicBool,
    /// Both sockets of every connection through the front, by id.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
}

pub struct Front {
    pub port: u16,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl Front {
    /// Listen on `port` (0: any free one) and route to `target`.
    pub fn start(port: u16, target: u16) -> Front {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("front: bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            target: Mutex::new(target),
            refusing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let s = state.clone();
        let acceptor = std::thread::spawn(move || accept_loop(listener, port, s));
        Front {
            port,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// Close every connection through the front (both sides, at once).
    pub fn close_all(&self) -> usize {
        let conns: Vec<_> = self
            .state
            .conns
            .lock()
            .unwrap()
            .drain()
            .map(|(_, c)| c)
            .collect();
        for (a, b) in &conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// Refuse new connections (connect gets ECONNREFUSED) until [`Front::accept`].
    pub fn refuse(&self) {
        self.state.refusing.store(true, Ordering::SeqCst);
        // The acceptor closes its listening socket within one poll.
        std::thread::sleep(Duration::from_millis(30));
    }

    pub fn accept(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// New connections go to `target` from now on.
    pub fn route(&self, target: u16) {
        *self.state.target.lock().unwrap() = target;
    }

    pub fn target(&self) -> u16 {
        *self.state.target.lock().unwrap()
    }

    /// Connections through the front now.
    pub fn open(&self) -> usize {
        self.state.conns.lock().unwrap().len()
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.close_all();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(listener: TcpListener, port: u16, state: Arc<State>) {
    let mut listener = Some(listener);
    while !state.stop.load(Ordering::SeqCst) {
        if state.refusing.load(Ordering::SeqCst) {
            listener = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        l.set_nonblocking(true).unwrap();
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                state.accepted.fetch_add(1, Ordering::SeqCst);
                let target = *state.target.lock().unwrap();
                // A server that is down: the client's connection is closed
                // at once, as a load balancer with no healthy backend does.
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let id = state.next_id.fetch_add(1, Ordering::SeqCst);
                state.conns.lock().unwrap().insert(
                    id,
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                );
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let st = state.clone();
                std::thread::spawn(move || pump(client, server, id, st));
                let st = state.clone();
                std::thread::spawn(move || pump(s2, c2, id, st));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copy `from` to `to` until either side ends; then close both.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, state: Arc<State>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    state.conns.lock().unwrap().remove(&id);
}
