//! Clustered caches as a busy application uses them: many short clients,
//! a limit reached, a slot migrating, keyless commands. The proxy in front
//! of the real six-node TLS cluster (one per test binary, shared). Tests that
//! change the topology hold [`EXCLUSIVE`] for writing. Nodes dying and
//! resharding under a SCAN: `tests/cluster_failures.rs`.

mod common;

use common::cluster::{self, proxy_with, Announce};
use common::cluster_ops::{owner_of, per_node, replica_of, spread, wait_primary, Migration};
use common::proxy::Raw;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

static EXCLUSIVE: RwLock<()> = RwLock::new(());

/// Finding 1: a dedicated connection goes back to its node (or is closed)
/// when its client's transaction or blocking wait ends, or the client
/// leaves: the per-node count returns to its idle value.
#[test]
fn dedicated_connections_return_to_their_node_after_one_shot_clients() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    // Warm every node's pools: one transaction on each slot range.
    {
        let mut r = Raw::connect(proxy.port);
        for i in 0..30 {
            let k = format!("life:warm:{i}");
            assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
            assert_eq!(r.call(&["SET", &k, "1"]), "+QUEUED\r\n");
            assert_eq!(r.call(&["EXEC"]), "*1\r\n+OK\r\n");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = per_node(c);
    let peak = std::sync::Mutex::new(before.clone());
    let sample = || {
        let now = per_node(c);
        let mut p = peak.lock().unwrap();
        for (k, v) in now {
            let e = p.entry(k).or_default();
            *e = (*e).max(v);
        }
    };
    // 300 one-shot transactions, 100 one-shot BLPOPs with a timeout, 30
    // clients that leave in the middle of a transaction.
    spread(300, 10, |i| {
        let mut r = Raw::connect(proxy.port);
        let k = format!("life:tx:{i}");
        assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(r.call(&["SET", &k, "1"]), "+QUEUED\r\n");
        assert_eq!(r.call(&["EXEC"]), "*1\r\n+OK\r\n", "{k}");
    });
    sample();
    spread(100, 10, |i| {
        let mut r = Raw::connect(proxy.port);
        let k = format!("life:list:{i}");
        assert_eq!(r.call(&["BLPOP", &k, "0.05"]), "*-1\r\n");
    });
    sample();
    spread(30, 5, |i| {
        let mut r = Raw::connect(proxy.port);
        let k = format!("life:left:{i}");
        assert_eq!(r.call(&["WATCH", &k]), "+OK\r\n");
        assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(r.call(&["SET", &k, "1"]), "+QUEUED\r\n");
    });
    sample();
    // Released connections are reset and kept warm (at most twice
    // upstream.warm_pinned per node beyond the idle set) or closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = per_node(c);
        let settled = c.ports.iter().all(|p| now[p] <= before[p] + 4);
        if settled || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let peak = peak.into_inner().unwrap();
    eprintln!("proxy connections per node: before {before:?} peak {peak:?} after {after:?}");
    for p in &c.ports {
        assert!(
            after[p] <= before[p] + 4,
            "node {p}: {} connections before, {} at peak, {} after",
            before[p],
            peak[p],
            after[p]
        );
    }
    // Nothing was left undone: every acknowledged transaction wrote.
    let mut r = Raw::connect(proxy.port);
    for i in (0..300).step_by(7) {
        assert_eq!(r.call(&["GET", &format!("life:tx:{i}")]), "$1\r\n1\r\n");
    }
    for i in 0..30 {
        assert_eq!(r.call(&["EXISTS", &format!("life:left:{i}")]), ":0\r\n");
    }
}

/// Finding 1: when no dedicated connection can be had (upstream.max_pinned
/// reached on the node), the command that needed one gets a clear error and
/// EXEC answers EXECABORT; nothing reported done is lost.
#[test]
fn a_transaction_without_a_connection_aborts_and_reports_nothing_done() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[("REDIS_ENTRA_PROXY_UPSTREAM__MAX_PINNED", "3")]);
    let mut check = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..8).map(|i| format!("{{lim}}k{i}")).collect();
    for k in &keys {
        check.call(&["DEL", k]);
    }
    // Eight clients open a transaction on the same node at once.
    let mut clients: Vec<Raw> = (0..8).map(|_| Raw::connect(proxy.port)).collect();
    let mut refused = 0;
    for (r, k) in clients.iter_mut().zip(&keys) {
        assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
        let set = r.call(&["SET", k, "1"]);
        if set != "+QUEUED\r\n" {
            assert!(set.contains("max_pinned"), "{set}");
            refused += 1;
        }
        // A keyless command after the refusal changes nothing.
        r.call(&["PING"]);
    }
    assert_eq!(refused, 5, "three connections, eight clients");
    let mut done = 0;
    let mut aborted = 0;
    for (r, k) in clients.iter_mut().zip(&keys) {
        let exec = r.call(&["EXEC"]);
        let exists = check.call(&["EXISTS", k]);
        if exec.starts_with("-EXECABORT") {
            aborted += 1;
            assert_eq!(exists, ":0\r\n", "{k} aborted but written");
        } else {
            assert_eq!(exec, "*2\r\n+OK\r\n+PONG\r\n", "{k}");
            assert_eq!(exists, ":1\r\n", "{k} reported done but not written");
            done += 1;
        }
    }
    eprintln!("max_pinned 3: {done} transactions done, {aborted} aborted");
    assert_eq!((done, aborted), (3, 5));
    // The same for a WATCH that could not be given a connection (once the
    // connections of the transactions above are back).
    std::thread::sleep(Duration::from_millis(500));
    let mut holders: Vec<Raw> = (0..3).map(|_| Raw::connect(proxy.port)).collect();
    for (i, h) in holders.iter_mut().enumerate() {
        assert_eq!(h.call(&["WATCH", &keys[i]]), "+OK\r\n");
    }
    let mut w = Raw::connect(proxy.port);
    assert!(w.call(&["WATCH", &keys[7]]).contains("max_pinned"));
    drop(holders);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.call(&["MULTI"]), "+OK\r\n");
    w.call(&["SET", &keys[7], "2"]);
    assert!(w.call(&["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(check.call(&["EXISTS", &keys[7]]), ":0\r\n");
}

/// Finding 4: with a slot migrating, commands on dedicated connections
/// (blocking, transactions, WATCH, client modes) follow `ASK` (with
/// `ASKING`) and `MOVED`; no redirection reaches the client.
#[test]
fn redirections_are_followed_on_dedicated_connections() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let tag = format!("mig{}", std::process::id());
    let k = |n: &str| format!("{{{tag}}}{n}");
    let mut w = Raw::connect(proxy.port);
    // Warm the proxy's slot map before the migration starts.
    assert_eq!(w.call(&["SET", &k("warm"), "1"]), "+OK\r\n");
    assert_eq!(w.call(&["DEL", &k("warm")]), ":1\r\n");
    let m = Migration::start(c, &k("x"));
    let mut seen = Vec::new();
    let mut note = |what: &str, reply: String, want: &str| {
        if reply != want {
            seen.push(format!("{what}: {reply:?} (wanted {want:?})"));
        }
    };
    // A blocking wait on a key that is not on the migrating node.
    let mut b = Raw::connect(proxy.port);
    note(
        "BLPOP timeout",
        b.call(&["BLPOP", &k("q1"), "0.2"]),
        "*-1\r\n",
    );
    b.send(&["BLPOP", &k("q2"), "10"]);
    std::thread::sleep(Duration::from_millis(300));
    note("RPUSH", w.call(&["RPUSH", &k("q2"), "v"]), ":1\r\n");
    let got = String::from_utf8(b.read()).unwrap();
    note(
        "BLPOP woken",
        got,
        &format!("*2\r\n${}\r\n{}\r\n$1\r\nv\r\n", k("q2").len(), k("q2")),
    );
    // Transactions on new keys.
    let mut t = Raw::connect(proxy.port);
    for i in 0..5 {
        let key = k(&format!("t{i}"));
        note("MULTI", t.call(&["MULTI"]), "+OK\r\n");
        note("SET in MULTI", t.call(&["SET", &key, "1"]), "+QUEUED\r\n");
        note("INCR in MULTI", t.call(&["INCR", &key]), "+QUEUED\r\n");
        note("EXEC", t.call(&["EXEC"]), "*2\r\n+OK\r\n:2\r\n");
        note("read back", w.call(&["GET", &key]), "$1\r\n2\r\n");
    }
    // A command refused inside it (another slot) dooms the transaction,
    // even when a later one is made again on the importing node.
    note("MULTI", t.call(&["MULTI"]), "+OK\r\n");
    let other = t.call(&["MSET", "{a}x", "1", "{b}y", "2"]);
    if !other.starts_with("-CROSSSLOT") {
        note("keys of two slots in MULTI", other, "-CROSSSLOT ...");
    }
    note(
        "SET in MULTI",
        t.call(&["SET", &k("d1"), "1"]),
        "+QUEUED\r\n",
    );
    note(
        "SET in MULTI",
        t.call(&["SET", &k("d2"), "1"]),
        "+QUEUED\r\n",
    );
    let exec = t.call(&["EXEC"]);
    if !exec.starts_with("-EXECABORT") {
        note("EXEC after a refusal", exec, "-EXECABORT ...");
    }
    note("nothing written", w.call(&["EXISTS", &k("d1")]), ":0\r\n");
    note("nothing written", w.call(&["EXISTS", &k("d2")]), ":0\r\n");
    // WATCH, then a transaction on the watched key.
    note("WATCH", t.call(&["WATCH", &k("w")]), "+OK\r\n");
    note("MULTI", t.call(&["MULTI"]), "+OK\r\n");
    note(
        "SET in MULTI",
        t.call(&["SET", &k("w"), "5"]),
        "+QUEUED\r\n",
    );
    let exec = t.call(&["EXEC"]);
    let wv = w.call(&["GET", &k("w")]);
    match exec.as_str() {
        "*1\r\n+OK\r\n" => note("watched value", wv, "$1\r\n5\r\n"),
        // Aborted as if the key had changed: nothing written.
        "*-1\r\n" => note("watched value", wv, "$-1\r\n"),
        _ => note("EXEC after WATCH", exec, "*1\r\n+OK\r\n"),
    }
    // A client mode: every command on its own connections.
    let mut r = Raw::connect(proxy.port);
    note(
        "CLIENT NO-EVICT",
        r.call(&["CLIENT", "NO-EVICT", "on"]),
        "+OK\r\n",
    );
    note("GET in a mode", r.call(&["GET", &k("t0")]), "$1\r\n2\r\n");
    note("SET in a mode", r.call(&["SET", &k("m"), "1"]), "+OK\r\n");
    // The migration ends: MOVED from the old node now.
    m.finish(c);
    note(
        "BLPOP after",
        b.call(&["BLPOP", &k("q3"), "0.2"]),
        "*-1\r\n",
    );
    note(
        "GET in a mode after",
        r.call(&["GET", &k("m")]),
        "$1\r\n1\r\n",
    );
    note("MULTI", t.call(&["MULTI"]), "+OK\r\n");
    note("INCR in MULTI", t.call(&["INCR", &k("t1")]), "+QUEUED\r\n");
    note("EXEC after", t.call(&["EXEC"]), "*1\r\n:3\r\n");
    eprintln!("{} redirections or errors reached clients", seen.len());
    assert!(seen.is_empty(), "{seen:#?}");
}

/// Finding 4: a blocking wait whose primary fails over (`-UNBLOCKED` from
/// the demoted node) is made again on the new primary, nothing consumed.
#[test]
fn a_blocking_wait_survives_a_failover_of_its_node() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let key = format!("fo:{}", std::process::id());
    let mut w = Raw::connect(proxy.port);
    assert_eq!(w.call(&["DEL", &key]), ":0\r\n");
    c.wait_replicas_synced();
    let owner = owner_of(c, &key);
    let replica = replica_of(c, owner);
    let mut b = Raw::connect(proxy.port);
    b.send(&["BLPOP", &key, "20"]);
    std::thread::sleep(Duration::from_millis(300));
    let out = c.cli(replica, &["CLUSTER", "FAILOVER"]);
    assert_eq!(out.trim(), "OK", "{out}");
    wait_primary(c, replica);
    c.wait_converged();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.call(&["RPUSH", &key, "after"]), ":1\r\n");
    let got = String::from_utf8(b.read()).unwrap();
    assert_eq!(
        got,
        format!("*2\r\n${}\r\n{key}\r\n$5\r\nafter\r\n", key.len()),
        "BLPOP across the failover"
    );
}

/// Finding 7: keyless commands answer for the whole cache: RANDOMKEY from
/// every shard, INFO keyspace summed as DBSIZE is; an upstream error names
/// the node and the slot.
#[test]
fn keyless_commands_answer_for_the_whole_cache() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.flush();
    let proxy = proxy_with(c, &[("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "2s")]);
    let mut r = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..300).map(|i| format!("rk:{i}")).collect();
    for k in &keys {
        assert_eq!(r.call(&["SET", k, "v"]), "+OK\r\n");
    }
    let mut owners: HashMap<String, u16> = HashMap::new();
    for p in c.primaries() {
        for k in c.cli(p, &["KEYS", "rk:*"]).lines() {
            owners.insert(k.trim().to_string(), p);
        }
    }
    assert_eq!(owners.len(), 300);
    let mut from: HashMap<u16, usize> = HashMap::new();
    for _ in 0..150 {
        let k = r.call(&["RANDOMKEY"]);
        let k = k.split("\r\n").nth(1).unwrap().to_string();
        *from.entry(owners[&k]).or_default() += 1;
    }
    eprintln!("RANDOMKEY x150 by shard: {from:?}");
    assert_eq!(from.len(), 3, "RANDOMKEY from every shard: {from:?}");
    assert_eq!(r.call(&["DBSIZE"]), ":300\r\n");
    let info = r.call(&["INFO", "keyspace"]);
    assert!(info.contains("db0:keys=300,"), "{info}");
    let info = r.call(&["INFO"]);
    assert!(info.contains("db0:keys=300,"), "INFO (all sections)");
    // A frozen shard: the timeout names the node and the slot.
    let k = &keys[0];
    let owner = owners[k];
    let pid: i32 = c
        .cli(owner, &["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signals to a redis-server child of this test process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let reply = r.call(&["GET", k]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let slot = c
        .cli(c.ports[0], &["CLUSTER", "KEYSLOT", k])
        .trim()
        .to_string();
    eprintln!("GET on a frozen shard: {reply:?}");
    assert!(
        reply.starts_with("-")
            && reply.contains(&format!("127.0.0.1:{owner}"))
            && reply.contains(&format!("slot {slot}")),
        "{reply}"
    );
    c.wait_converged();
}

/// Finding 7: PUBLISH counts the receivers as one Redis would, the proxy's
/// own subscribers included, whichever node it went to (compared with a
/// plain redis-server holding the same subscribers).
#[test]
fn publish_counts_every_receiver_like_one_redis() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let plain = common::redis::PlainRedis::start();
    let subscribe = |port: u16| {
        let mut a = Raw::connect(port);
        a.call(&["SUBSCRIBE", "pc:news"]);
        let mut b = Raw::connect(port);
        b.call(&["PSUBSCRIBE", "pc:*"]);
        let mut d = Raw::connect(port);
        d.call(&["SUBSCRIBE", "pc:news"]);
        d.call(&["PSUBSCRIBE", "pc:n*"]);
        d.call(&["PSUBSCRIBE", "other:*"]);
        vec![a, b, d]
    };
    let _p = subscribe(proxy.port);
    let _r = subscribe(plain.port);
    let mut counts = Vec::new();
    for i in 0..6 {
        for ch in ["pc:news", "pc:sport", "nobody"] {
            // A new client each time: spread over the dispatchers and nodes.
            let mut p = Raw::connect(proxy.port);
            let mut r = Raw::connect(plain.port);
            let msg = format!("m{i}");
            let want = r.call(&["PUBLISH", ch, &msg]);
            let got = p.call(&["PUBLISH", ch, &msg]);
            counts.push((ch, got.clone(), want.clone()));
            assert_eq!(got, want, "PUBLISH {ch}");
        }
    }
    eprintln!("PUBLISH counts (proxy, plain): {:?}", &counts[..3]);
}

/// Found by `scripts/cluster-phases.sh` (kill -9 of a primary under load):
/// a transaction whose `MULTI` never reached the node (its dedicated
/// connection failed as `MULTI` went out) must not run its later commands
/// outside a transaction. The client pipelines `MULTI; SET; INCR; EXEC` (as
/// client libraries do) while the node is frozen (reply timeout 1 s), thawed
/// 1.5 s later: it is told the transaction failed, and nothing of it is
/// written.
#[test]
fn a_transaction_whose_multi_was_lost_runs_nothing_outside_it() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    let proxy = proxy_with(c, &[("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "1s")]);
    let (a, b) = ("{txlost}a", "{txlost}b");
    let mut check = Raw::connect(proxy.port);
    check.call(&["DEL", a, b]);
    let owner = owner_of(c, a);
    let pid = c.pid(owner);
    let mut r = Raw::connect(proxy.port);
    // A first transaction: the node's dedicated connections are open.
    assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.call(&["SET", a, "0"]), "+QUEUED\r\n");
    assert_eq!(r.call(&["EXEC"]), "*1\r\n+OK\r\n");
    c.signal(pid, libc::SIGSTOP);
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill(2) on a redis-server child of this test process.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    for cmd in [&["MULTI"][..], &["SET", a, "1"], &["INCR", b], &["EXEC"]] {
        r.send(cmd);
    }
    let replies: Vec<String> = (0..4)
        .map(|_| String::from_utf8(r.read()).unwrap())
        .collect();
    thaw.join().unwrap();
    eprintln!("MULTI lost: {replies:?}");
    let written = (check.call(&["GET", a]), check.call(&["GET", b]));
    c.wait_converged();
    assert!(replies[3].starts_with("-EXECABORT"), "EXEC: {}", replies[3]);
    assert_eq!(
        written,
        ("$1\r\n0\r\n".to_string(), "$-1\r\n".to_string()),
        "a transaction reported failed wrote (a, b)"
    );
}
