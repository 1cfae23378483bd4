//! Load through the proxy during a failover: clients in SET/GET loops, every
//! acknowledged write recorded and read back afterwards, every error
//! classified the way a user would care about it.

use redis_entra_proxy::resp::scan::ReplyScanner;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A client's call that has had no reply for this long counts as hung.
pub const HUNG_AFTER: Duration = Duration::from_secs(45);

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub reads: u64,
    pub writes: u64,
    /// Error replies to GET.
    pub read_errors: u64,
    /// Error replies to SET that say it was never sent.
    pub write_errors_unsent: u64,
    /// Error replies to SET that say it may or may not have run.
    pub write_errors_inflight: u64,
    /// A GET that did not return the value last acknowledged for its key.
    pub stale_reads: u64,
    /// Clients with a call unanswered for [`HUNG_AFTER`] or closed on.
    pub hung: u64,
    pub max_stall: Duration,
    /// Error texts seen (first few), for the failure message.
    pub samples: Vec<String>,
    /// Acknowledged writes: key -> value.
    pub acked: HashMap<String, String>,
}

impl Outcome {
    fn add(&mut self, o: Outcome) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.read_errors += o.read_errors;
        self.write_errors_unsent += o.write_errors_unsent;
        self.write_errors_inflight += o.write_errors_inflight;
        self.stale_reads += o.stale_reads;
        self.hung += o.hung;
        self.max_stall = self.max_stall.max(o.max_stall);
        for s in o.samples {
            if self.samples.len() < 8 {
                self.samples.push(s);
            }
        }
        self.acked.extend(o.acked);
    }

    pub fn errors(&self) -> u64 {
        self.read_errors + self.write_errors_unsent + self.write_errors_inflight
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Outcome>>,
}

/// `clients` connections to the proxy on `port`, each in a loop: SET a new
/// key, GET it back.
pub fn start(port: u16, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..clients)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || client(port, c, &stop))
        })
        .collect();
    Load { stop, threads }
}

impl Load {
    pub fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Outcome::default();
        for t in self.threads {
            all.add(t.join().expect("load client thread"));
        }
        all
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// `None`: no reply within [`HUNG_AFTER`], or the connection closed.
    fn call(&mut self, args: &[&str]) -> Option<String> {
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.s
            .write_all(&redis_entra_proxy::resp::command(&refs))
            .ok()?;
        loop {
            let mut scanner = ReplyScanner::new();
            if let Ok(Some(r)) = scanner.scan(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..r.len).collect();
                return Some(String::from_utf8_lossy(&reply).into_owned());
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn client(port: u16, c: usize, stop: &AtomicBool) -> Outcome {
    let mut o = Outcome::default();
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(HUNG_AFTER)).unwrap();
    let mut cl = Client { s, buf: Vec::new() };
    let mut last: Option<(String, String)> = None;
    let mut i = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        i += 1;
        let key = format!("fo:{c}:{i}");
        let val = format!("v{c}-{i}");
        let t = Instant::now();
        let Some(r) = cl.call(&["SET", &key, &val]) else {
            o.hung += 1;
            break;
        };
        o.max_stall = o.max_stall.max(t.elapsed());
        o.writes += 1;
        if r == "+OK\r\n" {
            o.acked.insert(key.clone(), val.clone());
            last = Some((key, val));
        } else {
            if r.contains("may or may not have been executed") {
                o.write_errors_inflight += 1;
            } else {
                o.write_errors_unsent += 1;
            }
            if o.samples.len() < 4 {
                o.samples.push(format!("SET: {}", r.trim_end()));
            }
        }
        if let Some((k, v)) = &last {
            let t = Instant::now();
            let Some(r) = cl.call(&["GET", k]) else {
                o.hung += 1;
                break;
            };
            o.max_stall = o.max_stall.max(t.elapsed());
            o.reads += 1;
            if r.starts_with('-') {
                o.read_errors += 1;
                if o.samples.len() < 4 {
                    o.samples.push(format!("GET: {}", r.trim_end()));
                }
            } else if r != format!("${}\r\n{v}\r\n", v.len()) {
                o.stale_reads += 1;
            }
        }
    }
    o
}

/// Acknowledged writes missing (or changed) on the server behind `port`,
/// read back through the proxy in batches.
pub fn lost_writes(port: u16, acked: &HashMap<String, String>) -> u64 {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut cl = Client { s, buf: Vec::new() };
    let entries: Vec<_> = acked.iter().collect();
    let mut lost = 0;
    for chunk in entries.chunks(200) {
        let mut args = vec!["MGET"];
        args.extend(chunk.iter().map(|(k, _)| k.as_str()));
        let r = cl.call(&args).expect("MGET reply");
        for (_, v) in chunk {
            if !r.contains(&format!("${}\r\n{v}\r\n", v.len())) {
                lost += 1;
            }
        }
    }
    lost
}
