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

/// Pub/sub and a job queue through the same failover: a producer (`LPUSH`
/// a job and `PUBLISH` a message every 10 ms), 2 `BLPOP` workers and 2
/// subscribers, each reconnecting as an application would when the proxy
/// closes its connection.
pub struct Side {
    stop: Arc<AtomicBool>,
    produced: Arc<std::sync::atomic::AtomicU64>,
    producer: JoinHandle<(Vec<u64>, Vec<u64>, u64)>,
    workers: Vec<JoinHandle<(Vec<u64>, u64)>>,
    subscribers: Vec<JoinHandle<(Vec<u64>, u64)>>,
}

#[derive(Debug, Default)]
pub struct SideOutcome {
    pub jobs_acked: u64,
    /// Acknowledged jobs no worker got and not left in the list.
    pub jobs_lost: u64,
    /// Jobs a worker got twice.
    pub jobs_twice: u64,
    /// Errors and closed connections the producer and workers saw.
    pub queue_errors: u64,
    /// Messages published (with at least one receiver) after the event, and
    /// the fewest any subscriber received of them.
    pub messages_after: u64,
    pub least_received_after: u64,
    /// Closed connections the subscribers saw.
    pub subscriber_reconnects: u64,
}

fn connect(port: u16) -> Client {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(HUNG_AFTER)).unwrap();
    Client { s, buf: Vec::new() }
}

pub fn start_side(port: u16) -> Side {
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let st = stop.clone();
    let pr = produced.clone();
    let producer = std::thread::spawn(move || {
        let mut c = connect(port);
        let (mut acked, mut published, mut errors, mut n) = (Vec::new(), Vec::new(), 0, 0u64);
        let deadline = Instant::now() + Duration::from_secs(300);
        while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
            n += 1;
            pr.store(n, Ordering::SeqCst);
            let id = n.to_string();
            match c.call(&["LPUSH", "fo:jobs", &id]) {
                Some(r) if r.starts_with(':') => acked.push(n),
                Some(_) => errors += 1,
                None => {
                    errors += 1;
                    c = connect(port);
                }
            }
            match c.call(&["PUBLISH", "fo:chan", &id]) {
                Some(r) if r.starts_with(':') => published.push(n),
                Some(_) => errors += 1,
                None => {
                    errors += 1;
                    c = connect(port);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (acked, published, errors)
    });
    let workers = (0..2)
        .map(|_| {
            let st = stop.clone();
            std::thread::spawn(move || {
                let mut c = connect(port);
                let (mut got, mut errors) = (Vec::new(), 0);
                let deadline = Instant::now() + Duration::from_secs(300);
                while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match c.call(&["BLPOP", "fo:jobs", "1"]) {
                        Some(r) if r.starts_with('*') => {
                            if let Some(id) = r.lines().last().and_then(|l| l.parse().ok()) {
                                got.push(id);
                            }
                        }
                        Some(r) if r.starts_with("*-1") || r.starts_with('_') => {}
                        Some(_) => errors += 1,
                        None => {
                            errors += 1;
                            std::thread::sleep(Duration::from_millis(100));
                            c = connect(port);
                        }
                    }
                }
                (got, errors)
            })
        })
        .collect();
    let subscribers = (0..2)
        .map(|_| {
            let st = stop.clone();
            std::thread::spawn(move || {
                let (mut got, mut reconnects) = (Vec::new(), 0);
                let deadline = Instant::now() + Duration::from_secs(300);
                'outer: while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let mut c = connect(port);
                    c.s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let _ = c.s.write_all(&redis_entra_proxy::resp::command(&[
                        b"SUBSCRIBE",
                        b"fo:chan",
                    ]));
                    loop {
                        if st.load(Ordering::SeqCst) || Instant::now() > deadline {
                            break 'outer;
                        }
                        let mut scanner = ReplyScanner::new();
                        if let Ok(Some(r)) = scanner.scan(&c.buf) {
                            let frame: Vec<u8> = c.buf.drain(..r.len).collect();
                            let text = String::from_utf8_lossy(&frame);
                            if text.contains("message") {
                                if let Some(id) = text.lines().last().and_then(|l| l.parse().ok()) {
                                    got.push(id);
                                }
                            }
                            continue;
                        }
                        let mut chunk = [0u8; 16384];
                        match c.s.read(&mut chunk) {
                            Ok(0) => {
                                reconnects += 1;
                                std::thread::sleep(Duration::from_millis(100));
                                continue 'outer;
                            }
                            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => {
                                reconnects += 1;
                                continue 'outer;
                            }
                        }
                    }
                }
                (got, reconnects)
            })
        })
        .collect();
    Side {
        stop,
        produced,
        producer,
        workers,
        subscribers,
    }
}

impl Side {
    /// The last job/message id produced so far (call when the event begins).
    pub fn mark(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }

    /// Stop everything, then count; `event` from [`Side::mark`]; `left`:
    /// the job ids still in the list once the workers stopped.
    pub fn finish(self, event: u64, left: impl FnOnce() -> Vec<u64>) -> SideOutcome {
        self.stop.store(true, Ordering::SeqCst);
        let (acked, published, mut queue_errors) = self.producer.join().unwrap();
        let mut got = std::collections::HashMap::<u64, u32>::new();
        for w in self.workers {
            let (g, e) = w.join().unwrap();
            queue_errors += e;
            for id in g {
                *got.entry(id).or_default() += 1;
            }
        }
        let left = left();
        let mut o = SideOutcome {
            jobs_acked: acked.len() as u64,
            queue_errors,
            ..Default::default()
        };
        for id in &acked {
            match got.get(id) {
                None if !left.contains(id) => o.jobs_lost += 1,
                Some(n) if *n > 1 => o.jobs_twice += 1,
                _ => {}
            }
        }
        let after: std::collections::HashSet<u64> =
            published.iter().copied().filter(|id| *id > event).collect();
        o.messages_after = after.len() as u64;
        o.least_received_after = u64::MAX;
        for s in self.subscribers {
            let (g, reconnects) = s.join().unwrap();
            o.subscriber_reconnects += reconnects;
            let seen: std::collections::HashSet<u64> =
                g.into_iter().filter(|id| after.contains(id)).collect();
            o.least_received_after = o.least_received_after.min(seen.len() as u64);
        }
        o
    }
}

/// The job ids in `fo:jobs` now, read through the proxy.
pub fn jobs_left(port: u16) -> Vec<u64> {
    let mut c = connect(port);
    let r = c
        .call(&["LRANGE", "fo:jobs", "0", "-1"])
        .expect("LRANGE reply");
    r.lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .filter_map(|l| l.parse().ok())
        .collect()
}
