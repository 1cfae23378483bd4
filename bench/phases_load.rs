//! The client load of `scripts/cluster-phases.sh` (a Cargo example,
//! `phases_load`): about 200 plain RESP clients of the proxy in front of a
//! clustered cache, each working on the keys of one hash slot (a hash tag), so
//! that an error or a stall can be put down to the shard that owns the slot:
//!
//! - writers: `SET {tag}:w:<n> v<n>` (a new key each time, never overwritten),
//!   `INCR {tag}:n:<phase>`, `GET` of the key just written;
//! - transactions: `MULTI; SET {tag}:t:<n> v<n>; INCR {tag}:tn:<phase>; EXEC`
//!   in one write;
//! - queues: a pusher `RPUSH {tag}:q <n>` and a consumer `BLPOP {tag}:q 1`;
//! - pub/sub: a publisher `PUBLISH ch:<k> <n>` and a subscriber of `ch:<k>`.
//!
//! Each client paces itself (`--interval-ms` per round). The phase is named on
//! standard input (`phase NAME` lines; `stop` or end of input ends the run,
//! as does `--max-seconds`); prints `ready` once every client is connected.
//! Writes to `--out DIR`:
//! - `clients.csv`: id, kind, slot (-1: pub/sub channel, no slot);
//! - `events.csv`: ms, phase, client, event, detail: `error` (an error reply,
//!   its text), `closed` (the connection failed, then reconnected), `slow` (a
//!   reply later than `--slow-ms`: the wait in ms), `hung` (no reply in
//!   `--hung-s`: the client gave up and reconnected), `wrong` (an unexpected
//!   reply), `gap` (a subscriber heard nothing for longer than `--slow-ms`);
//! - `acked.csv`: key, value, phase, ms: every acknowledged write to read back
//!   (`counter` rows: the INCR key, acknowledged count and unsure count;
//!   `queue` rows: the items pushed and acknowledged, and those consumed);
//! - `pubsub.csv`: phase, published, published to nobody, received.
//!
//! Loopback only; every loop bounded by `--max-seconds` and a round count.

#[allow(dead_code)] // the TLS connector: bench/load.rs only
mod client;

use bytes::BytesMut;
use client::{Client, Res};
use redis_entra_proxy::resp::command;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Opts {
    addr: SocketAddr,
    out: std::path::PathBuf,
    clients: usize,
    interval: Duration,
    slow: Duration,
    hung: Duration,
    max_seconds: u64,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        addr: "127.0.0.1:6379".parse().expect("literal"),
        out: ".".into(),
        clients: 200,
        interval: Duration::from_millis(50),
        slow: Duration::from_millis(2000),
        hung: Duration::from_secs(45),
        max_seconds: 900,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut v = || it.next().ok_or(format!("{flag} wants a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--addr" => o.addr = v()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--out" => o.out = v()?.into(),
            "--clients" => o.clients = num(v()?)? as usize,
            "--interval-ms" => o.interval = Duration::from_millis(num(v()?)?),
            "--slow-ms" => o.slow = Duration::from_millis(num(v()?)?),
            "--hung-s" => o.hung = Duration::from_secs(num(v()?)?),
            "--max-seconds" => o.max_seconds = num(v()?)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !o.addr.ip().is_loopback() {
        return Err("loopback addresses only".into());
    }
    if o.clients < 20 {
        return Err("--clients: at least 20 (one of each kind per 20)".into());
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Writer,
    Tx,
    Consumer,
    Pusher,
    Subscriber,
    Publisher,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Writer => "writer",
            Kind::Tx => "tx",
            Kind::Consumer => "blpop",
            Kind::Pusher => "rpush",
            Kind::Subscriber => "subscriber",
            Kind::Publisher => "publisher",
        }
    }
}

/// Everything the clients share: the phase, the stop flag, the event log.
struct Shared {
    o: Opts,
    phases: Mutex<Vec<String>>,
    phase: AtomicUsize,
    stop: AtomicBool,
    ready: AtomicUsize,
    events: Mutex<std::io::BufWriter<std::fs::File>>,
    /// phase -> [published, published to nobody, received]
    pubsub: Mutex<BTreeMap<String, [u64; 3]>>,
}

impl Shared {
    fn phase(&self) -> String {
        self.phases.lock().expect("not poisoned")[self.phase.load(Ordering::Relaxed)].clone()
    }

    fn event(&self, phase: &str, client: usize, what: &str, detail: &str) {
        let ms = now_ms();
        let detail = detail.replace(['"', '\n', '\r'], " ");
        let mut f = self.events.lock().expect("not poisoned");
        let _ = writeln!(f, "{ms},{phase},{client},{what},\"{detail}\"");
    }

    fn pubsub(&self, phase: &str, i: usize, n: u64) {
        self.pubsub
            .lock()
            .expect("not poisoned")
            .entry(phase.to_string())
            .or_default()[i] += n;
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// What a client acknowledged, for the read-back.
#[derive(Default)]
struct Acked {
    /// key, value, phase, when acknowledged (ms since the epoch)
    writes: Vec<(String, String, String, u128)>,
    /// INCR key -> (acknowledged, unsure: an error or a lost connection)
    counters: BTreeMap<String, (u64, u64)>,
    /// queue rows: "pushed" or "consumed", queue, item, phase
    queue: Vec<(&'static str, String, u64, String)>,
}

/// The first line of an error reply, without the `-`.
fn err_text(r: &[u8]) -> Option<String> {
    if r.first() != Some(&b'-') {
        return None;
    }
    let end = r.windows(2).position(|w| w == b"\r\n").unwrap_or(r.len());
    Some(String::from_utf8_lossy(&r[1..end]).into_owned())
}

fn int(r: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(r.strip_prefix(b":")?).ok()?;
    s.trim_end().parse().ok()
}

/// The elements of a flat array of bulk strings (or a lone bulk string).
fn bulks(r: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = r;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = &rest[..i];
        rest = &rest[i + 2..];
        if line.first() == Some(&b'$') {
            let n: usize = match std::str::from_utf8(&line[1..])
                .ok()
                .and_then(|s| s.parse().ok())
            {
                Some(n) => n,
                None => continue,
            };
            if rest.len() < n + 2 {
                break;
            }
            out.push(rest[..n].to_vec());
            rest = &rest[n + 2..];
        }
    }
    out
}

/// The result of one exchange: the replies, or why there are none.
enum Outcome {
    Replies(Vec<BytesMut>),
    /// The connection failed (text).
    Closed(String),
    /// No reply within `--hung-s`.
    Hung,
}

/// Send `bytes`, read `n` replies; log a `slow` event past `slow` (+ `grace`,
/// the time the command may block by design).
async fn exchange(
    s: &Shared,
    c: &mut Client,
    id: usize,
    phase: &str,
    bytes: &[u8],
    n: usize,
    grace: Duration,
) -> Outcome {
    let start = Instant::now();
    let r = tokio::time::timeout(s.o.hung + grace, async {
        c.send(bytes).await?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(c.replies(1).await?);
        }
        Res::Ok(v)
    })
    .await;
    let waited = start.elapsed();
    if waited > s.o.slow + grace {
        s.event(
            phase,
            id,
            "slow",
            &format!("{}", (waited - grace).as_millis()),
        );
    }
    match r {
        Ok(Ok(v)) => Outcome::Replies(v),
        Ok(Err(e)) => Outcome::Closed(e),
        Err(_) => Outcome::Hung,
    }
}

/// Connect, bounded: retries every 200 ms until the run stops.
async fn connect(s: &Shared, id: usize) -> Option<Client> {
    for _ in 0..10_000 {
        if s.stopped() {
            return None;
        }
        match Client::open(s.o.addr, None, None).await {
            Ok(c) => return Some(c),
            Err(e) => {
                s.event(&s.phase(), id, "closed", &format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    None
}

/// Log what went wrong with an exchange; true when the connection must be
/// opened again.
fn failed(s: &Shared, id: usize, phase: &str, o: &Outcome) -> bool {
    match o {
        Outcome::Replies(_) => false,
        Outcome::Closed(e) => {
            s.event(phase, id, "closed", e);
            true
        }
        Outcome::Hung => {
            s.event(
                phase,
                id,
                "hung",
                &format!("no reply in {}s", s.o.hung.as_secs()),
            );
            true
        }
    }
}

/// One command of a round, in the phase of now: an error reply is logged
/// as `error` (`NAME: text`), a failed exchange as `closed` or `hung` (and
/// `reconnect` set). The phase and the reply (`None`: an error reply or none).
async fn step(
    s: &Shared,
    c: &mut Client,
    id: usize,
    reconnect: &mut bool,
    name: &str,
    bytes: &[u8],
    grace: Duration,
) -> (String, Option<BytesMut>) {
    let phase = s.phase();
    let o = exchange(s, c, id, &phase, bytes, 1, grace).await;
    *reconnect |= failed(s, id, &phase, &o);
    let Outcome::Replies(mut r) = o else {
        return (phase, None);
    };
    let reply = r.pop().filter(|r| match err_text(r) {
        Some(e) => {
            s.event(&phase, id, "error", &format!("{name}: {e}"));
            false
        }
        None => true,
    });
    (phase, reply)
}

/// The integer `NAME` answered; any other reply is logged as an `error`.
fn integer(s: &Shared, phase: &str, id: usize, name: &str, reply: Option<BytesMut>) -> Option<i64> {
    let r = reply?;
    let n = int(&r);
    if n.is_none() {
        s.event(phase, id, "error", &format!("{name}: not an integer"));
    }
    n
}

async fn run_client(s: Arc<Shared>, id: usize, kind: Kind, tag: String) -> Acked {
    let mut acked = Acked::default();
    let Some(mut c) = connect(&s, id).await else {
        return acked;
    };
    let sub = command(&[b"SUBSCRIBE", format!("ch:{tag}").as_bytes()]);
    if kind == Kind::Subscriber {
        if let Outcome::Replies(_) =
            exchange(&s, &mut c, id, &s.phase(), &sub, 1, Duration::ZERO).await
        {
        } else {
            s.event(&s.phase(), id, "error", "SUBSCRIBE failed at start");
        }
    }
    s.ready.fetch_add(1, Ordering::Relaxed);
    let zero = Duration::ZERO;
    let mut last_message = Instant::now();
    let mut gap_phase = s.phase();
    for seq in 1..=10_000_000u64 {
        if s.stopped() {
            break;
        }
        let round = Instant::now();
        // The phase of the round names its counters; events and writes go
        // to the phase in which their command was sent.
        let phase = s.phase();
        let mut reconnect = false;
        match kind {
            Kind::Writer => {
                let key = format!("{{{tag}}}:w:{seq}");
                let value = format!("v{seq}");
                let counter = format!("{{{tag}}}:n:{phase}");
                let set = command(&[b"SET", key.as_bytes(), value.as_bytes()]);
                let (phase, r) = step(&s, &mut c, id, &mut reconnect, "SET", &set, zero).await;
                let written = match r {
                    Some(r) if &r[..] == b"+OK\r\n" => {
                        acked
                            .writes
                            .push((key.clone(), value.clone(), phase, now_ms()));
                        true
                    }
                    Some(_) => {
                        s.event(&phase, id, "wrong", "SET");
                        false
                    }
                    None => false,
                };
                if !reconnect {
                    let incr = command(&[b"INCR", counter.as_bytes()]);
                    let (phase, r) =
                        step(&s, &mut c, id, &mut reconnect, "INCR", &incr, zero).await;
                    let e = acked.counters.entry(counter).or_default();
                    match integer(&s, &phase, id, "INCR", r) {
                        Some(_) => e.0 += 1,
                        None => e.1 += 1,
                    }
                }
                if !reconnect && written {
                    let get = command(&[b"GET", key.as_bytes()]);
                    let (phase, r) = step(&s, &mut c, id, &mut reconnect, "GET", &get, zero).await;
                    if r.is_some_and(|r| bulks(&r) != vec![value.into_bytes()]) {
                        s.event(&phase, id, "wrong", "GET of the key just written");
                    }
                }
            }
            Kind::Tx => {
                let key = format!("{{{tag}}}:t:{seq}");
                let value = format!("v{seq}");
                let counter = format!("{{{tag}}}:tn:{phase}");
                let mut tx = command(&[b"MULTI"]).to_vec();
                tx.extend_from_slice(&command(&[b"SET", key.as_bytes(), value.as_bytes()]));
                tx.extend_from_slice(&command(&[b"INCR", counter.as_bytes()]));
                tx.extend_from_slice(&command(&[b"EXEC"]));
                let phase = s.phase();
                let o = exchange(&s, &mut c, id, &phase, &tx, 4, zero).await;
                let e = acked.counters.entry(counter).or_default();
                match &o {
                    Outcome::Replies(r) => {
                        let errors: Vec<String> = r.iter().filter_map(|r| err_text(r)).collect();
                        let exec = &r[3];
                        if errors.is_empty() && exec.starts_with(b"*2\r\n+OK\r\n:") {
                            acked.writes.push((key, value, phase.clone(), now_ms()));
                            e.0 += 1;
                        } else if !errors.is_empty() {
                            s.event(
                                &phase,
                                id,
                                "error",
                                &format!("MULTI/EXEC: {}", errors.join(" / ")),
                            );
                        } else {
                            let t =
                                String::from_utf8_lossy(&exec[..exec.len().min(60)]).into_owned();
                            s.event(&phase, id, "wrong", &format!("EXEC answered {t}"));
                        }
                    }
                    _ => e.1 += 1,
                }
                reconnect |= failed(&s, id, &phase, &o);
            }
            Kind::Pusher => {
                let q = format!("{{{tag}}}:q");
                let rpush = command(&[b"RPUSH", q.as_bytes(), seq.to_string().as_bytes()]);
                let (phase, r) = step(&s, &mut c, id, &mut reconnect, "RPUSH", &rpush, zero).await;
                if integer(&s, &phase, id, "RPUSH", r).is_some() {
                    acked.queue.push(("pushed", q, seq, phase));
                }
            }
            Kind::Consumer => {
                let q = format!("{{{tag}}}:q");
                let blpop = command(&[b"BLPOP", q.as_bytes(), b"1"]);
                let block = Duration::from_secs(1);
                let (phase, r) = step(&s, &mut c, id, &mut reconnect, "BLPOP", &blpop, block).await;
                if let Some(r) = r.filter(|r| !r.starts_with(b"*-1") && !r.starts_with(b"_")) {
                    let b = bulks(&r);
                    match b
                        .get(1)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    {
                        Some(item) => acked.queue.push(("consumed", q, item, phase)),
                        None => s.event(&phase, id, "wrong", "BLPOP"),
                    }
                }
            }
            Kind::Publisher => {
                let ch = format!("ch:{tag}");
                let publish = command(&[b"PUBLISH", ch.as_bytes(), seq.to_string().as_bytes()]);
                let (phase, r) =
                    step(&s, &mut c, id, &mut reconnect, "PUBLISH", &publish, zero).await;
                if let Some(n) = integer(&s, &phase, id, "PUBLISH", r) {
                    s.pubsub(&phase, 0, 1);
                    if n == 0 {
                        s.pubsub(&phase, 1, 1);
                    }
                }
            }
            Kind::Subscriber => {
                // Read what arrives for up to one second.
                match tokio::time::timeout(Duration::from_secs(1), c.replies(1)).await {
                    Ok(Ok(m)) => {
                        if let Some(e) = err_text(&m) {
                            s.event(&phase, id, "error", &format!("subscriber: {e}"));
                        } else if bulks(&m).first().map(|k| k.as_slice()) == Some(b"message") {
                            let silent = last_message.elapsed();
                            if silent > s.o.slow {
                                s.event(&gap_phase, id, "gap", &format!("{}", silent.as_millis()));
                            }
                            last_message = Instant::now();
                            gap_phase = phase.clone();
                            s.pubsub(&phase, 2, 1);
                        }
                    }
                    Ok(Err(e)) => {
                        s.event(&phase, id, "closed", &e);
                        reconnect = true;
                    }
                    Err(_) => {}
                }
            }
        }
        if reconnect {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match connect(&s, id).await {
                Some(n) => c = n,
                None => break,
            }
            if kind == Kind::Subscriber {
                let phase = s.phase();
                let o = exchange(&s, &mut c, id, &phase, &sub, 1, zero).await;
                failed(&s, id, &phase, &o);
            }
            continue;
        }
        if kind != Kind::Subscriber {
            if let Some(rest) = s.o.interval.checked_sub(round.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
    }
    if kind == Kind::Subscriber && last_message.elapsed() > s.o.slow {
        s.event(
            &gap_phase,
            id,
            "gap",
            &format!("{} (until the end)", last_message.elapsed().as_millis()),
        );
    }
    acked
}

/// A hash tag whose slot is `slot`.
fn tag_for(id: usize, slot: u16) -> String {
    for j in 0..10_000_000u64 {
        let t = format!("c{id}.{j}");
        if redis_entra_proxy::command::keys::slot(t.as_bytes()) == slot {
            return t;
        }
    }
    format!("c{id}")
}

#[tokio::main]
async fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("phases_load: {e}");
            std::process::exit(64);
        }
    };
    if let Err(e) = run(o).await {
        eprintln!("phases_load: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Opts) -> Res<()> {
    std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
    let out = o.out.clone();
    let file = |name: &str| {
        std::fs::File::create(out.join(name))
            .map(std::io::BufWriter::new)
            .map_err(|e| format!("{name}: {e}"))
    };
    let mut events = file("events.csv")?;
    let _ = writeln!(events, "ms,phase,client,event,detail");
    let mut clients = file("clients.csv")?;
    let _ = writeln!(clients, "client,kind,slot");
    let n = o.clients;
    let max = Duration::from_secs(o.max_seconds);
    let s = Arc::new(Shared {
        o,
        phases: Mutex::new(vec!["start".into()]),
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
        events: Mutex::new(events),
        pubsub: Mutex::default(),
    });
    // Kinds by id % 20: 15 writers, 3 transactions, a queue client, a pub/sub
    // client; queue and pub/sub clients go in pairs (the second of a pair uses
    // the first's tag). Slots spread evenly over 0..16383.
    let mut tasks = Vec::new();
    let (mut queue_tag, mut channel) = (String::new(), 0usize);
    let (mut queues, mut pubsubs) = (0usize, 0usize);
    for id in 0..n {
        let slot = ((id * 16384 / n + 41) % 16384) as u16;
        let (kind, tag, slot) = match id % 20 {
            0..=14 => (Kind::Writer, tag_for(id, slot), slot as i32),
            15..=17 => (Kind::Tx, tag_for(id, slot), slot as i32),
            18 => {
                queues += 1;
                if queues % 2 == 1 {
                    queue_tag = tag_for(id, slot);
                    (Kind::Consumer, queue_tag.clone(), slot as i32)
                } else {
                    let slot = redis_entra_proxy::command::keys::slot(queue_tag.as_bytes()) as i32;
                    (Kind::Pusher, queue_tag.clone(), slot)
                }
            }
            _ => {
                pubsubs += 1;
                if pubsubs % 2 == 1 {
                    channel += 1;
                    (Kind::Subscriber, channel.to_string(), -1)
                } else {
                    (Kind::Publisher, channel.to_string(), -1)
                }
            }
        };
        let _ = writeln!(clients, "{id},{},{slot}", kind.name());
        tasks.push(tokio::spawn(run_client(s.clone(), id, kind, tag)));
    }
    clients.flush().map_err(|e| e.to_string())?;
    drop(clients);
    let started = Instant::now();
    while s.ready.load(Ordering::Relaxed) < n && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("ready {}", s.ready.load(Ordering::Relaxed));
    let _ = std::io::stdout().flush();
    // Phases from standard input, on a thread of its own (blocking reads).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().take(10_000) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let left = max.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(line)) => {
                if let Some(name) = line.strip_prefix("phase ") {
                    let mut p = s.phases.lock().expect("not poisoned");
                    p.push(name.trim().to_string());
                    s.phase.store(p.len() - 1, Ordering::Relaxed);
                    drop(p);
                    println!("phase {}", name.trim());
                    let _ = std::io::stdout().flush();
                } else if line.trim() == "stop" {
                    break;
                }
            }
            _ => break,
        }
    }
    s.stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        // A client waits at most --hung-s (+1 s) for a reply, then stops.
        if let Ok(Ok(a)) = tokio::time::timeout(s.o.hung + Duration::from_secs(5), t).await {
            acked.push(a);
        }
    }
    let mut w = file("acked.csv")?;
    // The last column: for writes, when acknowledged (ms); for counters,
    // the increments that may or may not have run.
    let _ = writeln!(w, "type,key,value,phase,unsure");
    for a in &acked {
        for (k, v, p, ms) in &a.writes {
            let _ = writeln!(w, "write,{k},{v},{p},{ms}");
        }
        for (k, (n, u)) in &a.counters {
            let _ = writeln!(w, "counter,{k},{n},,{u}");
        }
        for (what, q, item, p) in &a.queue {
            let _ = writeln!(w, "{what},{q},{item},{p},0");
        }
    }
    w.flush().map_err(|e| e.to_string())?;
    let mut p = file("pubsub.csv")?;
    let _ = writeln!(p, "phase,published,published_to_nobody,received");
    for (phase, [a, b, c]) in s.pubsub.lock().expect("not poisoned").iter() {
        let _ = writeln!(p, "{phase},{a},{b},{c}");
    }
    p.flush().map_err(|e| e.to_string())?;
    s.events
        .lock()
        .expect("not poisoned")
        .flush()
        .map_err(|e| e.to_string())?;
    println!("done clients={} stopped={}", n, acked.len());
    Ok(())
}
