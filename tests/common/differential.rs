//! The differential test's parts: a seeded generator of command sequences,
//! a runner that sends one sequence to two servers (the proxy and a plain
//! redis-server with the same config) and keeps every byte each answered,
//! and a comparison that normalises only what is really nondeterministic
//! (a HELLO reply's connection id) and names the first reply that differs.
//!
//! A sequence is a list of steps; a step is one write of one or more
//! commands (a pipeline), sometimes cut into pieces written apart (split
//! writes). Each client has keys and channels of its own, so that several
//! clients run at once with replies that do not depend on timing.

use redis_entra_proxy::resp::scan::ReplyScanner;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// SplitMix64: small, seeded, the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One write: its bytes, where it is cut (split writes), and what it holds.
pub struct Step {
    pub bytes: Vec<u8>,
    pub cuts: Vec<usize>,
    pub label: String,
}

/// Which families of commands a sequence may hold.
#[derive(Clone, Copy)]
pub struct Mix {
    pub malformed: bool,
    pub modes: bool,
    pub pubsub: bool,
}

impl Mix {
    pub fn all() -> Mix {
        Mix {
            malformed: true,
            modes: true,
            pubsub: true,
        }
    }
}

fn enc(words: &[String]) -> Vec<u8> {
    let refs: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
    redis_entra_proxy::resp::command(&refs).to_vec()
}

/// A sequence of `steps` writes for client `client` (its keys are
/// `c<client>:...`), ending with QUIT (or a malformed frame, which closes
/// the connection as well).
pub fn sequence(seed: u64, client: usize, steps: usize, mix: Mix) -> Vec<Step> {
    let mut r = Rng::new(seed ^ ((client as u64) << 48));
    let p = format!("c{client}:");
    let mut out = Vec::new();
    // Whether a MULTI is (probably) open: then nothing the README says the
    // proxy refuses inside MULTI is generated, so that such a documented
    // difference does not hide the rest of the sequence.
    let mut in_multi = false;
    for _ in 0..steps {
        let n = if r.chance(30) { 1 + r.below(8) } else { 1 };
        let mut bytes = Vec::new();
        let mut label = Vec::new();
        for _ in 0..n {
            let mut words = command(&mut r, &p, mix);
            let name = words[0].to_ascii_uppercase();
            let refused = matches!(
                &name[..],
                "SUBSCRIBE" | "PSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "HELLO"
            ) || (name == "CLIENT" && words[1] == "REPLY");
            if in_multi && refused {
                words = vec!["GET".into(), format!("{p}a")];
            }
            match (&name[..], words.len()) {
                ("MULTI", 1) => in_multi = true,
                ("EXEC", 1) | ("DISCARD", 1) | ("RESET", 1) => in_multi = false,
                _ => {}
            }
            label.push(words.join(" "));
            bytes.extend_from_slice(&enc(&words));
        }
        let cuts = if r.chance(15) && bytes.len() > 2 {
            let mut c: Vec<usize> = (0..1 + r.below(3))
                .map(|_| 1 + r.below(bytes.len() - 1))
                .collect();
            c.sort_unstable();
            c.dedup();
            c
        } else {
            Vec::new()
        };
        out.push(Step {
            bytes,
            cuts,
            label: label.join("; "),
        });
    }
    let last: (&[u8], &str) = if mix.malformed && r.chance(30) {
        *r.pick(&[
            (&b"*x\r\n"[..], "malformed: *x"),
            (b"*1\r\n$-5\r\n", "malformed: bulk length -5"),
            (b"*1\r\n+PING\r\n", "malformed: simple string in an array"),
        ])
    } else {
        (b"*1\r\n$4\r\nQUIT\r\n", "QUIT")
    };
    out.push(Step {
        bytes: last.0.to_vec(),
        cuts: Vec::new(),
        label: last.1.to_string(),
    });
    out
}

fn command(r: &mut Rng, p: &str, mix: Mix) -> Vec<String> {
    let key = |r: &mut Rng| format!("{p}{}", r.pick(&["a", "b", "n", "l", "h", "s", "z"]));
    let val = |r: &mut Rng| {
        r.pick(&["1", "2", "x", "hello", "", "-3", "9.5"])
            .to_string()
    };
    let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let roll = r.below(100);
    let k = key(r);
    let v = val(r);
    let mut words = match roll {
        0..=9 => w(&["SET", &k, &v]),
        10..=17 => w(&["GET", &k]),
        18..=21 => w(&["INCR", &k]),
        22..=23 => w(&["APPEND", &k, &v]),
        24..=25 => w(&["MGET", &k, &key(r)]),
        26..=27 => w(&["DEL", &k]),
        28..=31 => w(&["RPUSH", &k, &v, &val(r)]),
        32..=33 => w(&["LPOP", &k]),
        34..=35 => w(&["LRANGE", &k, "0", "-1"]),
        36..=37 => w(&["HSET", &k, "f", &v]),
        38..=39 => w(&["HGETALL", &k]),
        40..=41 => w(&["SADD", &k, &v]),
        42 => w(&["SCARD", &k]),
        43..=44 => w(&["ZADD", &k, "1", &v]),
        45 => w(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]),
        46..=47 => w(&["EXISTS", &k]),
        48..=49 => w(&["TYPE", &k]),
        50..=55 => w(&["MULTI"]),
        56..=59 => w(&["EXEC"]),
        60 => w(&["DISCARD"]),
        61 => w(&["WATCH", &k]),
        62 => w(&["UNWATCH"]),
        63..=64 => w(&["EVAL", "return redis.call('get', KEYS[1])", "1", &k]),
        65 => w(&["EVAL", "return redis.call('nosuch')", "0"]),
        66..=67 => w(&["BLPOP", &k, "0.01"]),
        68 => w(&["BZPOPMIN", &k, "0.01"]),
        69..=71 => w(&["PING"]),
        72 => w(&["ECHO", &v]),
        // Wrong arity, unknown commands and subcommands.
        73 => w(&[
            *r.pick(&["MULTI", "EXEC", "DISCARD", "RESET", "UNWATCH"]),
            "x",
        ]),
        74 => w(&["GET"]),
        75 => w(&["NOSUCH", &v]),
        76 => w(&["CLIENT", *r.pick(&["NOSUCH", "ID", "GETNAME"]), "x"]),
        77 => w(&["SELECT"]),
        78 => w(&["AUTH", "a", "b", "c"]),
        79 => w(&["HELLO", *r.pick(&["x", "4", "03"])]),
        80..=81 => w(&["CLIENT", "GETNAME"]),
        82 => w(&["CLIENT", "SETNAME", *r.pick(&["app", "x y", ""])]),
        _ if !mix.modes && !mix.pubsub => w(&["GET", &k]),
        83..=89 if mix.modes => match r.below(7) {
            0 => w(&["HELLO", *r.pick(&["2", "3"])]),
            1 => w(&["CLIENT", "REPLY", *r.pick(&["ON", "OFF", "SKIP"])]),
            2 => w(&["CLIENT", "REPLY", "ON"]),
            3 => w(&["SELECT", *r.pick(&["0", "1", "0"])]),
            4 => w(&["RESET"]),
            5 => w(&["PING", "a", "b", "c"]),
            _ => w(&["SELECT", "x"]),
        },
        _ if mix.pubsub => {
            let ch = format!("{p}ch{}", r.below(3));
            match r.below(6) {
                0 | 1 => w(&["SUBSCRIBE", &ch]),
                2 => w(&["PSUBSCRIBE", &format!("{p}ch*")]),
                3 => w(&["UNSUBSCRIBE"]),
                4 => w(&["PUNSUBSCRIBE"]),
                // Nobody subscribes to these: no message depends on timing.
                _ => w(&["PUBLISH", &format!("{p}nobody"), &v]),
            }
        }
        _ => w(&["GET", &k]),
    };
    if words.is_empty() {
        words.push("PING".into());
    }
    words
}

/// Every byte `port` answered to `steps`, read on a thread of its own
/// (nothing waits on the other side's reading), until it closed. Steps are
/// written in order; a split step's pieces with a short pause between them.
pub fn run(port: u16, steps: &[Step]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let got = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut chunk = [0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
        out
    });
    for step in steps {
        let mut at = 0;
        for &cut in step.cuts.iter().chain(std::iter::once(&step.bytes.len())) {
            if s.write_all(&step.bytes[at..cut]).is_err() {
                break;
            }
            at = cut;
            if cut < step.bytes.len() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    got.join().unwrap()
}

/// The replies in `bytes`, each normalised (a HELLO reply's `id`; the
/// order of the channels in the confirmations of one UNSUBSCRIBE or
/// PUNSUBSCRIBE of every channel, which follows a hash table's order with a
/// seed of each server's own); a tail that is not a whole reply is kept as
/// the last item.
pub fn replies(bytes: &[u8]) -> Vec<String> {
    let mut frames: Vec<&[u8]> = Vec::new();
    let mut tail = None;
    let mut at = 0;
    while at < bytes.len() {
        let mut scanner = ReplyScanner::new();
        match scanner.scan(&bytes[at..]) {
            Ok(Some(r)) => {
                frames.push(&bytes[at..at + r.len]);
                at += r.len;
            }
            _ => {
                tail = Some(format!("(not a whole reply) {}", show(&bytes[at..])));
                break;
            }
        }
    }
    let mut out: Vec<String> = frames.iter().map(|f| normalise(f)).collect();
    sort_unsubscribe_runs(&frames, &mut out);
    out.extend(tail);
    out
}

/// The channel of an (P)UNSUBSCRIBE confirmation, and the rest of it.
fn unsubscribed(frame: &[u8]) -> Option<(String, String)> {
    let text = show(frame);
    let rest = [
        "*3\\r\\n$11\\r\\nunsubscribe\\r\\n",
        ">3\\r\\n$11\\r\\nunsubscribe\\r\\n",
        "*3\\r\\n$12\\r\\npunsubscribe\\r\\n",
        ">3\\r\\n$12\\r\\npunsubscribe\\r\\n",
    ]
    .iter()
    .find_map(|p| text.strip_prefix(p).map(|r| (p.to_string(), r.to_string())))?;
    let (head, body) = rest;
    // $<len>\r\n<name>\r\n:<count>\r\n
    let after_len = body.find("\\r\\n")? + 4;
    let name_end = after_len + body[after_len..].find("\\r\\n")?;
    let name = body[..name_end].to_string();
    Some((name, format!("{head}{}", &body[name_end..])))
}

fn sort_unsubscribe_runs(frames: &[&[u8]], out: &mut [String]) {
    let mut i = 0;
    while i < frames.len() {
        let mut j = i;
        let mut names = Vec::new();
        let mut rests = Vec::new();
        while let Some((name, rest)) = frames.get(j).and_then(|f| unsubscribed(f)) {
            names.push(name);
            rests.push(rest);
            j += 1;
        }
        if j - i > 1 {
            names.sort();
            for (k, (name, rest)) in names.iter().zip(&rests).enumerate() {
                out[i + k] = format!("{name} {rest}");
            }
        }
        i = j.max(i + 1);
    }
}

fn normalise(reply: &[u8]) -> String {
    let text = show(reply);
    match text.find("$2\\r\\nid\\r\\n:") {
        Some(i) => {
            let start = i + "$2\\r\\nid\\r\\n:".len();
            let end = text[start..].find('\\').map_or(text.len(), |e| start + e);
            format!("{}<id>{}", &text[..start], &text[end..])
        }
        None => text,
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace("\r\n", "\\r\\n")
}

/// The first difference between two reply streams: (index, want, got).
pub fn first_difference(want: &[String], got: &[String]) -> Option<(usize, String, String)> {
    let none = || "(nothing)".to_string();
    (0..want.len().max(got.len())).find_map(|i| {
        let (a, b) = (want.get(i), got.get(i));
        (a != b).then(|| {
            (
                i,
                a.cloned().unwrap_or_else(none),
                b.cloned().unwrap_or_else(none),
            )
        })
    })
}

/// Differences the README documents (its compatibility section), by a
/// piece of the proxy's reply: a sequence whose first difference is one of
/// these is counted apart.
pub const DOCUMENTED: &[&str] = &[
    // SUBSCRIBE, PSUBSCRIBE, HELLO, CLIENT REPLY inside MULTI: refused, and
    // EXEC discards the transaction.
    "inside MULTI is not supported by redis-entra-proxy",
    // HELLO that changes the protocol inside a transaction (the proxy's own
    // check, behind the one above).
    "the proxy cannot change the protocol of a client",
];

/// One seed: `clients` clients at once, each its own sequence, against
/// `want` (the reference) and `got`. Returns the differences found (one per
/// client at most: its first) not in [`DOCUMENTED`], the number of those
/// that are, and the number of commands sent.
pub fn run_seed(
    seed: u64,
    clients: usize,
    steps: usize,
    mix: Mix,
    want: u16,
    got: u16,
) -> (Vec<String>, usize, usize) {
    let seqs: Vec<Vec<Step>> = (0..clients)
        .map(|c| sequence(seed, c, steps, mix))
        .collect();
    let commands = seqs
        .iter()
        .flatten()
        .map(|s| s.label.split("; ").count())
        .sum();
    let (a, b) = std::thread::scope(|scope| {
        let run_all = |port: u16| {
            let handles: Vec<_> = seqs
                .iter()
                .map(|seq| scope.spawn(move || run(port, seq)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        };
        let a = scope.spawn(move || run_all(want));
        let b = scope.spawn(move || run_all(got));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut diffs = Vec::new();
    let mut documented = 0;
    for (c, (x, y)) in a.iter().zip(&b).enumerate() {
        let (x, y) = (replies(x), replies(y));
        if let Some((i, w, g)) = first_difference(&x, &y) {
            if DOCUMENTED.iter().any(|d| g.contains(d)) {
                documented += 1;
                continue;
            }
            let trail: Vec<&str> = seqs[c].iter().map(|s| s.label.as_str()).collect();
            diffs.push(format!(
                "seed {seed} client {c} reply {i}: want {w}\n  got {g}\n  sequence: {}",
                trail.join(" | ")
            ));
        }
    }
    (diffs, documented, commands)
}

/// Empty both servers (FLUSHALL on db 0 and 1) before a seed.
pub fn flush(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").unwrap();
    let mut b = [0u8; 64];
    let _ = s.read(&mut b);
}

/// A byte relay in front of `to`, on a free port, for the self-test; with
/// `swap`, the replies numbered `swap` and `swap + 1` on each connection
/// change places (a defect the comparison must catch).
pub fn relay(to: u16, swap: Option<usize>) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { return };
            let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let mut n_reply = 0usize;
                let mut held: Option<Vec<u8>> = None;
                loop {
                    let n = match s_in.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        let mut scanner = ReplyScanner::new();
                        let Ok(Some(r)) = scanner.scan(&buf) else {
                            break;
                        };
                        let one: Vec<u8> = buf.drain(..r.len).collect();
                        n_reply += 1;
                        match (swap, held.take()) {
                            (Some(at), None) if n_reply == at => held = Some(one),
                            (_, Some(first)) => {
                                let _ = c_out.write_all(&one);
                                let _ = c_out.write_all(&first);
                            }
                            _ => {
                                let _ = c_out.write_all(&one);
                            }
                        }
                    }
                }
                if let Some(first) = held {
                    let _ = c_out.write_all(&first);
                }
                let _ = c_out.write_all(&buf);
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}
