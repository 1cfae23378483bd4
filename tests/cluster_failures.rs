//! Clustered caches when nodes die, freeze or slots move under a client:
//! kill -9 of the configured node and of another primary, SIGSTOP of a
//! primary under dozens of clients, a SCAN across resharding. The
//! proxy in front of the real six-node TLS cluster (one per test binary).
//! Every test here changes the topology and holds [`EXCLUSIVE`] for writing.

mod common;

use common::cluster::{self, proxy_with, Announce, Cluster};
use common::cluster_load::proxy_conns;
use common::cluster_ops::{
    kill_synced, owner_of, replica_of, reshard, revive, tag_off_seed, wait_primary, RestartOnPanic,
};
use common::proxy::Raw;
use std::sync::RwLock;
use std::time::{Duration, Instant};

static EXCLUSIVE: RwLock<()> = RwLock::new(());

/// Finding 5: a SCAN with a small COUNT across resharding returns every key
/// that existed for the whole scan (duplicates allowed).
#[test]
fn scan_across_a_reshard_returns_every_key() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let mut w = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..3000).map(|i| format!("scan:{i}")).collect();
    for chunk in keys.chunks(500) {
        for k in chunk {
            w.send(&["SET", k, "v"]);
        }
        for _ in chunk {
            assert_eq!(w.read(), b"+OK\r\n");
        }
    }
    let primaries = c.primaries();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (seen, calls) = std::thread::scope(|s| {
        s.spawn(|| {
            // Slots move each way, so keys land on nodes scanned before and after.
            reshard(c, primaries[2], primaries[0], 1000);
            reshard(c, primaries[0], primaries[1], 2000);
            reshard(c, primaries[1], primaries[2], 1000);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut r = Raw::connect(proxy.port);
        let mut seen = std::collections::HashSet::new();
        let mut calls = 0;
        // SCANs, one after another, until one of them ran wholly after the
        // resharding began and it ended (bounded).
        for round in 0..20 {
            let mut cursor = "0".to_string();
            loop {
                r.send(&["SCAN", &cursor, "MATCH", "scan:*", "COUNT", "5"]);
                let reply = String::from_utf8(r.read()).unwrap();
                assert!(reply.starts_with("*2\r\n"), "{reply}");
                let lines: Vec<&str> = reply.split("\r\n").collect();
                cursor = lines[2].to_string();
                if round == 0 {
                    seen.extend(lines[4..].iter().skip(1).step_by(2).map(|s| s.to_string()));
                }
                calls += 1;
                std::thread::sleep(Duration::from_millis(5));
                if cursor == "0" {
                    break;
                }
            }
            if done.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
        (seen, calls)
    });
    c.wait_converged();
    let missing: Vec<&String> = keys.iter().filter(|k| !seen.contains(*k)).collect();
    eprintln!(
        "SCAN across a reshard: {} of {} keys seen by the first scan ({calls} calls in all), {} missing",
        keys.len() - missing.len(),
        keys.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for chunk in keys.chunks(500) {
        for k in chunk {
            w.send(&["DEL", k]);
        }
        for _ in chunk {
            w.read();
        }
    }
}

/// Finding 3: plain pub/sub does not go deaf when the configured host's node
/// dies (kill -9): the subscriptions move to a live node (or the subscriber
/// is disconnected to resubscribe); never silent.
#[test]
fn subscribers_keep_hearing_when_the_configured_node_dies() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let mut sub = Raw::connect(proxy.port);
    assert!(sub.call(&["SUBSCRIBE", "life:news"]).ends_with(":1\r\n"));
    let mut p = Raw::connect(proxy.port);
    p.call(&["PUBLISH", "life:news", "before"]);
    let m = String::from_utf8(sub.read()).unwrap();
    assert!(m.contains("before"), "{m}");
    let seed = c.ports[0];
    c.wait_replicas_synced();
    let pid = c.pid(seed);
    c.signal(pid, libc::SIGKILL);
    let _back = RestartOnPanic(c, seed);
    // Publish until the subscriber hears one again (or is disconnected).
    let start = Instant::now();
    let mut heard = None;
    let mut published = 0;
    while start.elapsed() < Duration::from_secs(30) {
        published += 1;
        let r = p.call(&["PUBLISH", "life:news", &format!("after-{published}")]);
        if published % 20 == 1 {
            eprintln!("PUBLISH {published} at {:?}: {r:?}", start.elapsed());
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sub.try_read(Duration::from_millis(200))
        })) {
            Ok(Some(m)) => {
                heard = Some(String::from_utf8(m).unwrap());
                break;
            }
            Ok(None) => {}
            Err(_) => {
                heard = Some("disconnected".into());
                break;
            }
        }
    }
    let waited = start.elapsed();
    c.restart(seed);
    c.wait_converged();
    c.wait_replicas_synced();
    eprintln!(
        "after kill -9 of the configured node: {heard:?} after {waited:?}, {published} PUBLISH sent"
    );
    let heard = heard.expect("the subscriber heard nothing for 30 s and stayed connected");
    if heard != "disconnected" {
        assert!(heard.contains("after-"), "{heard}");
        // A new subscriber is accepted too.
        let mut s2 = Raw::connect(proxy.port);
        assert!(s2.call(&["SUBSCRIBE", "life:news2"]).ends_with(":1\r\n"));
    }
}

/// Finding 6: kill -9 of a primary: commands for its slots wait for the
/// promotion the cluster announces and go to the new owner (no error);
/// the node that left is forgotten (not redialled when it comes back as a
/// replica).
#[test]
fn commands_for_a_dead_primary_wait_for_its_replacement() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let mut w = Raw::connect(proxy.port);
    // A key on a primary that is not the configured host.
    let tag = tag_off_seed(c, "hold");
    let victim = owner_of(c, &format!("{{{tag}}}"));
    for i in 0..30 {
        assert_eq!(w.call(&["SET", &format!("warm:{i}"), "1"]), "+OK\r\n");
    }
    c.wait_replicas_synced();
    c.signal(c.pid(victim), libc::SIGKILL);
    // Whatever happens below, the node comes back for the other tests.
    let _back = RestartOnPanic(c, victim);
    let mut disconnected = 0;
    let start = Instant::now();
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let k = format!("{{{tag}}}k{i}");
        i += 1;
        let r = if i % 10 == 1 {
            // A transaction too, on a dedicated connection. One that took a
            // connection to the dead node just before the kill loses its
            // state: EXEC answers EXECABORT (issue 18; a disconnect before),
            // never told it ran, never half run.
            let tx = std::panic::catch_unwind(|| {
                let mut t = Raw::connect(proxy.port);
                t.call(&["MULTI"]);
                t.call(&["SET", &k, "v"]);
                t.call(&["EXEC"])
            });
            match tx.as_deref() {
                Ok("*1\r\n+OK\r\n") => "+OK\r\n".to_string(),
                Ok(other) if other.starts_with("-EXECABORT") => {
                    disconnected += 1;
                    continue;
                }
                Ok(other) => other.to_string(),
                Err(_) => {
                    disconnected += 1;
                    continue;
                }
            }
        } else {
            w.call(&["SET", &k, "v"])
        };
        if r == "+OK\r\n" {
            ok.push(k);
        } else {
            errors.push(r);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in &ok {
        assert_eq!(
            w.call(&["GET", k]),
            "$1\r\nv\r\n",
            "{k} acknowledged, then lost"
        );
    }
    // The dead node comes back (as a replica): the proxy has forgotten it.
    c.restart(victim);
    c.wait_converged();
    c.wait_replicas_synced();
    std::thread::sleep(Duration::from_secs(3));
    let back = proxy_conns(c, cluster::USER)
        .into_iter()
        .filter(|(p, _, _)| *p == victim)
        .count();
    eprintln!(
        "kill -9 of a primary: {} SETs acknowledged, {} errors {:?}, {disconnected} transactions aborted whole (EXECABORT or disconnected); {back} proxy connections on it once back",
        ok.len(),
        errors.len(),
        errors
    );
    // At most the one SET in flight when the node died (it may or may not
    // have run: said so, never retried).
    let lost = errors
        .iter()
        .filter(|e| e.contains("may or may not"))
        .count();
    assert!(
        lost <= 1 && errors.len() == lost,
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert_eq!(
        back, 0,
        "the proxy still dials a node that left the topology"
    );
}

/// Thaws the frozen node and gives the cluster its node timeout back when
/// dropped, whatever happened in between (panics included).
/// A proxy (with `env`'s settings and its admin port) and a key of tag `tag`
/// whose primary is frozen (SIGSTOP) now; thawed when this goes.
struct FrozenKey<'a> {
    proxy: common::proxy::Proxy,
    admin: u16,
    key: String,
    victim: u16,
    replica: u16,
    _thaw: Thaw<'a>,
}

fn freeze_the_owner<'a>(
    c: &'a Cluster,
    mut env: Vec<(String, String)>,
    tag: &str,
) -> FrozenKey<'a> {
    let admin = common::proxy::enable_admin(&mut env);
    let proxy = common::proxy::Proxy::start(&env);
    let key = format!("{{{}}}k", tag_off_seed(c, tag));
    let victim = owner_of(c, &key);
    let replica = replica_of(c, victim);
    let mut w = Raw::connect(proxy.port);
    assert_eq!(w.call(&["DEL", &key]), ":0\r\n");
    c.wait_replicas_synced();
    let pid = c.pid(victim);
    c.signal(pid, libc::SIGSTOP);
    FrozenKey {
        proxy,
        admin,
        key,
        victim,
        replica,
        _thaw: Thaw { c, pid },
    }
}

impl FrozenKey<'_> {
    /// The command (`what`) was written on the promoted replica, and the
    /// proxy gave up at least one dial to the frozen primary for it.
    fn assert_gave_way(&self, c: &Cluster, what: &str) {
        let on_replica = c.cli(self.replica, &["GET", &self.key]);
        let metrics = common::proxy::http(self.admin, "GET", "/metrics").1;
        let abandoned =
            common::proxy::metric_sum(&metrics, "redis_entra_proxy_cluster_dials_abandoned_total");
        eprintln!(
            "{what}; GET on {}: {on_replica:?}; dials abandoned: {abandoned}",
            self.replica
        );
        assert_eq!(on_replica.trim(), "v", "written on the promoted replica");
        assert!(
            abandoned >= 1.0,
            "the dial to the frozen node was not given up"
        );
    }
}

struct Thaw<'a> {
    c: &'a Cluster,
    pid: i32,
}

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.c.signal(self.pid, libc::SIGCONT);
        for &p in &self.c.ports {
            self.c
                .cli(p, &["CONFIG", "SET", "cluster-node-timeout", "3000"]);
        }
        self.c.wait_converged();
    }
}

/// The slots `port` serves, from its own `CLUSTER NODES` line.
fn slots_of(c: &Cluster, port: u16) -> Vec<(u16, u16)> {
    let nodes = c.cli(port, &["CLUSTER", "NODES"]);
    let me = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .expect("myself line");
    me.split(' ')
        .skip(8)
        .filter(|r| !r.starts_with('['))
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Finding 2: one frozen shard (SIGSTOP of a primary that is not the
/// configured host) delays only the commands for its keys. Dozens of
/// clients on the other shards (several of them sharing each dispatcher
/// before the fix) go on while it is stopped; the clients of the frozen
/// shard get their own replies once it is back, never another client's.
#[test]
fn a_frozen_shard_delays_only_its_own_keys() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    let victim = c
        .primaries()
        .into_iter()
        .find(|&p| p != c.ports[0])
        .expect("a primary other than the configured node");
    let frozen_slots = slots_of(c, victim);
    assert!(!frozen_slots.is_empty(), "{victim} serves no slot");
    let on_victim = |k: &str| {
        let s = redis_entra_proxy::command::keys::slot(k.as_bytes());
        frozen_slots.iter().any(|&(a, b)| a <= s && s <= b)
    };
    // 66 clients, one in 11 on the frozen shard: with the default two
    // dispatchers, clients of both kinds share each one.
    let n = 66;
    let mut keys = Vec::new();
    let mut j = 0;
    for i in 0..n {
        let want_frozen = i % 11 == 0;
        let k = loop {
            let k = format!("iso:{j}");
            j += 1;
            if on_victim(&k) == want_frozen {
                break k;
            }
        };
        keys.push((k, want_frozen));
    }
    // No failover while it is stopped: the node timeout outlasts the stop.
    for &p in &c.ports {
        let out = c.cli(p, &["CONFIG", "SET", "cluster-node-timeout", "30000"]);
        assert_eq!(out.trim(), "OK", "{out}");
    }
    let proxy = proxy_with(c, &[("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "30s")]);
    let pid = c.pid(victim);
    let thaw = Thaw { c, pid };
    let done: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    // Clients connect (and take their shared connection) in this order.
    let mut conns: Vec<Raw> = keys
        .iter()
        .map(|_| {
            let mut r = Raw::connect(proxy.port);
            assert_eq!(r.call(&["PING"]), "+PONG\r\n");
            r
        })
        .collect();
    let (during, after) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, ((k, _), mut r)) in keys.iter().zip(conns.drain(..)).enumerate() {
            let (done, stop) = (&done[i], &stop);
            handles.push(s.spawn(move || {
                let until = Instant::now() + Duration::from_secs(90);
                for it in 0..200_000u64 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > until {
                        break;
                    }
                    // Each value names its client and iteration: a reply
                    // meant for another client cannot pass.
                    let v = format!("c{i}-{it}");
                    assert_eq!(r.call(&["SET", k, &v]), "+OK\r\n", "client {i}");
                    let got = r.call(&["GET", k]);
                    assert_eq!(got, format!("${}\r\n{v}\r\n", v.len()), "client {i}");
                    done.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }
        // Every client under way before the stop.
        let warm = Instant::now() + Duration::from_secs(30);
        while done.iter().any(|d| d.load(Ordering::Relaxed) < 3) && Instant::now() < warm {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.signal(pid, libc::SIGSTOP);
        // The frozen shard's clients are now stuck on it.
        std::thread::sleep(Duration::from_millis(500));
        let at = |i: usize| done[i].load(Ordering::Relaxed);
        let before: Vec<u64> = (0..n).map(at).collect();
        std::thread::sleep(Duration::from_secs(3));
        let during: Vec<u64> = (0..n).map(|i| at(i) - before[i]).collect();
        c.signal(pid, libc::SIGCONT);
        let frozen_at_cont: Vec<u64> = (0..n).map(at).collect();
        // The frozen shard's clients get their replies once it is back.
        let back = Instant::now() + Duration::from_secs(60);
        while keys
            .iter()
            .enumerate()
            .any(|(i, (_, f))| *f && at(i) < frozen_at_cont[i] + 3)
            && Instant::now() < back
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let after: Vec<u64> = (0..n).map(|i| at(i) - frozen_at_cont[i]).collect();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("a client saw a wrong reply");
        }
        (during, after)
    });
    drop(thaw);
    let others: Vec<u64> = keys
        .iter()
        .zip(&during)
        .filter(|((_, f), _)| !f)
        .map(|(_, d)| *d)
        .collect();
    let frozen: Vec<u64> = keys
        .iter()
        .zip(&during)
        .filter(|((_, f), _)| *f)
        .map(|(_, d)| *d)
        .collect();
    let frozen_after: Vec<u64> = keys
        .iter()
        .zip(&after)
        .filter(|((_, f), _)| *f)
        .map(|(_, d)| *d)
        .collect();
    let stalled = others.iter().filter(|&&d| d < 10).count();
    eprintln!(
        "primary {victim} stopped 3 s: SET+GET pairs done meanwhile by the {} clients of other shards: min {} median {} max {} ({stalled} under 10); by the {} of the frozen shard: {frozen:?}; by those after SIGCONT: {frozen_after:?}",
        others.len(),
        others.iter().min().unwrap(),
        {
            let mut o = others.clone();
            o.sort();
            o[o.len() / 2]
        },
        others.iter().max().unwrap(),
        frozen.len(),
    );
    assert_eq!(
        stalled, 0,
        "clients of other shards stalled behind the frozen one: {others:?}"
    );
    assert!(
        frozen.iter().all(|&d| d == 0),
        "commands on a stopped node answered: {frozen:?}"
    );
    assert!(
        frozen_after.iter().all(|&d| d >= 3),
        "the frozen shard's clients did not go on after SIGCONT: {frozen_after:?}"
    );
}

/// A command in flight on a primary that froze and was replaced: when the
/// proxy lets the node go (it left the topology), the client hears that the
/// command may or may not have run there, and on which node; not that the
/// proxy is shutting down (found by scripts/cluster-phases.sh: 61 clients
/// told so during a 15 s SIGSTOP).
#[test]
fn a_command_stuck_on_a_replaced_primary_says_it_may_have_run() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "90s")]);
    let mut w = Raw::connect(proxy.port);
    w.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let tag = tag_off_seed(c, "stuck");
    let victim = owner_of(c, &format!("{{{tag}}}"));
    let key = format!("{{{tag}}}k");
    assert_eq!(w.call(&["SET", &key, "1"]), "+OK\r\n");
    c.wait_replicas_synced();
    let pid = c.pid(victim);
    c.signal(pid, libc::SIGSTOP);
    // Whatever happens below, the node thaws (as a replica) for the others.
    let _thaw = Thaw { c, pid };
    let t = Instant::now();
    w.send(&["INCR", &key]);
    let reply = String::from_utf8(w.read()).unwrap();
    eprintln!("after {:?}: {reply:?}", t.elapsed());
    assert!(
        reply.contains("may or may not have been executed")
            && reply.contains(&format!("127.0.0.1:{victim}")),
        "{reply}"
    );
}

/// A client that stays idle while its node is failed over and back (the
/// node leaves the topology, its connections close after the grace, then
/// it is a primary again): its next command goes to the node's new
/// connections. Found by scripts/cluster-phases.sh after CLUSTER FAILOVER:
/// 51 clients got 'ERR proxy is shutting down' on every command to the
/// promoted node until the end of the run (a client's cached handle to the
/// closed connections was kept because the node was in the map again).
#[test]
fn an_idle_client_reaches_a_node_that_left_and_came_back() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_with(c, &[]);
    let tag = tag_off_seed(c, "back");
    let key = format!("{{{tag}}}k");
    let node = owner_of(c, &key);
    c.wait_converged();
    c.wait_replicas_synced();
    let replica = replica_of(c, node);
    let mut idle = Raw::connect(proxy.port);
    assert_eq!(idle.call(&["SET", &key, "1"]), "+OK\r\n");
    let mut busy = Raw::connect(proxy.port);
    c.wait_replicas_synced();
    // Away: the replica takes over; the other client's command tells the
    // proxy (MOVED, then a new map without the node).
    c.cli(replica, &["CLUSTER", "FAILOVER"]);
    wait_primary(c, replica);
    c.wait_converged();
    assert_eq!(busy.call(&["INCR", &key]), ":2\r\n");
    // Past the grace after which the node's connections close.
    std::thread::sleep(Duration::from_secs(7));
    // And back.
    c.wait_replicas_synced();
    c.cli(node, &["CLUSTER", "FAILOVER"]);
    wait_primary(c, node);
    c.wait_converged();
    assert_eq!(busy.call(&["INCR", &key]), ":3\r\n");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(idle.call(&["GET", &key]), "$1\r\n3\r\n");
    assert_eq!(idle.call(&["INCR", &key]), ":4\r\n");
}

/// A client blocked now and then on a dedicated connection (BLPOP ... 0.1,
/// then BLPOP again: the connection stays the client's in between) whose
/// primary is killed (-9): its next wait was answered 'ERR proxy is
/// shutting down (node ...)' (found by scripts/cluster-phases.sh), though
/// the proxy runs and the command was never written. It waits for the
/// replica's promotion and blocks there, and gets the element pushed.
#[test]
fn a_blocking_wait_after_its_primary_died_goes_to_the_replacement() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    let proxy = proxy_with(c, &[]);
    let tag = tag_off_seed(c, "bdead");
    let key = format!("{{{tag}}}q");
    let victim = owner_of(c, &key);
    let mut w = Raw::connect(proxy.port);
    w.call(&["DEL", &key]);
    let mut b = Raw::connect(proxy.port);
    b.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(b.call(&["BLPOP", &key, "0.1"]), "*-1\r\n");
    let _back = kill_synced(c, victim);
    b.send(&["BLPOP", &key, "30"]);
    std::thread::sleep(Duration::from_millis(200));
    // Held by the shared path until the promotion, then pushed there.
    let pushed = w.call(&["RPUSH", &key, "x"]);
    let got = String::from_utf8(b.read()).unwrap();
    revive(c, victim);
    eprintln!("RPUSH: {pushed:?}; BLPOP after kill -9 of {victim}: {got:?}");
    assert_eq!(pushed, ":1\r\n");
    assert_eq!(
        got,
        format!("*2\r\n${}\r\n{key}\r\n$1\r\nx\r\n", key.len()),
        "BLPOP after its node died"
    );
}

/// The primaries (other than the configured host) that hold none of the
/// proxy's subscriptions (`CLIENT LIST`: a connection of its user with a
/// channel subscribed).
fn primaries_without_the_hub(c: &Cluster) -> Vec<u16> {
    c.primaries()
        .into_iter()
        .filter(|&p| p != c.ports[0])
        .filter(|&p| {
            !c.cli(p, &["CLIENT", "LIST"])
                .lines()
                .any(|l| l.contains(&format!("user={}", cluster::USER)) && !l.contains(" sub=0 "))
        })
        .collect()
}

/// kill -9 of a primary: PUBLISH (keyless) and PUBSUB NUMSUB (every
/// primary) do not fail because one node is down. Found by
/// scripts/cluster-phases.sh: 195 PUBLISH answered 'connect failed' to the
/// dead node (each client's keyless commands go to one primary). PUBLISH
/// goes to a primary that can be reached and counts as one Redis (the
/// proxy's subscriber, whose hub is on another node, is counted once);
/// NUMSUB waits for the promotion and asks the primaries of then.
#[test]
fn publish_and_numsub_survive_a_dead_primary() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    let proxy = proxy_with(c, &[]);
    let mut sub = Raw::connect(proxy.port);
    assert!(sub.call(&["SUBSCRIBE", "pk:news"]).ends_with(":1\r\n"));
    let victim = *primaries_without_the_hub(c)
        .first()
        .expect("a primary without the hub's connection");
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.call(&["PUBLISH", "pk:news", "before"]), ":1\r\n");
    let _back = kill_synced(c, victim);
    // New clients: their keyless commands spread over the primaries, the
    // dead one included.
    let published: Vec<String> = (0..12)
        .map(|i| Raw::connect(proxy.port).call(&["PUBLISH", "pk:news", &format!("m{i}")]))
        .collect();
    let numsub = Raw::connect(proxy.port).call(&["PUBSUB", "NUMSUB", "pk:news"]);
    revive(c, victim);
    eprintln!("after kill -9 of {victim}: PUBLISH {published:?}; NUMSUB {numsub:?}");
    let wrong: Vec<&String> = published.iter().filter(|r| *r != ":1\r\n").collect();
    assert!(wrong.is_empty(), "{} of 12 PUBLISH: {wrong:?}", wrong.len());
    assert_eq!(numsub, "*2\r\n$7\r\npk:news\r\n:1\r\n");
}

/// SIGSTOP of a primary: a transaction that needs a new dedicated
/// connection to it dials a node that accepts TCP but never answers the
/// TLS handshake. The dial is given up when the map names the promoted
/// replica, and the transaction runs there. Found by
/// scripts/cluster-phases.sh: 6 transactions waited the whole
/// upstream.connect_timeout (10 s, though the replica was promoted after
/// about 6 s) and were aborted. Here connect_timeout is 60 s: the dial
/// cannot end by itself before the promotion.
#[test]
fn a_dial_to_a_frozen_primary_gives_way_to_its_replacement() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    c.wait_replicas_synced();
    let mut env = cluster::proxy_env(c);
    env.retain(|(k, _)| k != "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT");
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT".into(),
        "60s".into(),
    ));
    // No warm dedicated connection to take: each one is dialled (what a
    // busy proxy does once its warm ones are in use).
    env.push(("REDIS_ENTRA_PROXY_UPSTREAM__WARM_PINNED".into(), "0".into()));
    let f = freeze_the_owner(c, env, "dial");
    let (proxy, key, victim) = (&f.proxy, &f.key, f.victim);
    let mut t = Raw::connect(proxy.port);
    t.s.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let replies: Vec<String> = [&["MULTI"][..], &["SET", key, "v"], &["EXEC"]]
        .iter()
        .map(|cmd| t.call(cmd))
        .collect();
    assert_eq!(replies[2], "*1\r\n+OK\r\n", "EXEC: {replies:?}");
    f.assert_gave_way(
        c,
        &format!("transaction while {victim} is frozen: {replies:?}"),
    );
}

/// A WATCH held on a dedicated connection whose primary is killed (-9):
/// the transaction after it must not run, and the client is told its
/// connection was lost, never that the proxy is shutting down (the
/// command found the connection closed before it was written).
#[test]
fn a_watch_whose_primary_died_aborts_its_transaction() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    let proxy = proxy_with(c, &[]);
    let key = format!("{{{}}}w", tag_off_seed(c, "wdead"));
    let victim = owner_of(c, &key);
    let mut t = Raw::connect(proxy.port);
    t.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(t.call(&["WATCH", &key]), "+OK\r\n");
    let _back = kill_synced(c, victim);
    for cmd in [&["MULTI"][..], &["SET", &key, "v"], &["EXEC"]] {
        t.send(cmd);
    }
    let replies: Vec<String> = (0..3)
        .map(|_| String::from_utf8(t.read()).unwrap())
        .collect();
    let mut w = Raw::connect(proxy.port);
    let written = w.call(&["GET", &key]);
    revive(c, victim);
    eprintln!("WATCH, kill -9 of {victim}, MULTI; SET; EXEC: {replies:?}; GET: {written:?}");
    assert!(
        replies.iter().all(|r| !r.contains("shutting down")),
        "{replies:?}"
    );
    assert!(
        replies[2].starts_with("-EXECABORT") || replies[2] == "*-1\r\n",
        "EXEC: {replies:?}"
    );
    assert_eq!(written, "$-1\r\n", "a transaction told aborted wrote");
}

/// SIGSTOP of a primary: a command on the shared path whose node's shared
/// connection is dialled while the node is frozen (here the first RESP3
/// client: that connection is opened on first use) waits in the
/// connection's queue, never written. When the map names the promoted
/// replica, the dial is given up and the command goes there. Found by
/// scripts/cluster-phases.sh; connect_timeout and reply_timeout are 60 s
/// here, so neither ends the wait before the promotion (about 6 s).
#[test]
fn a_shared_dial_to_a_frozen_primary_gives_way_to_its_replacement() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    c.wait_replicas_synced();
    let mut env = cluster::proxy_env(c);
    env.retain(|(k, _)| k != "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT");
    for (k, v) in [
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "60s"),
        ("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "60s"),
    ] {
        env.push((k.into(), v.into()));
    }
    let f = freeze_the_owner(c, env, "sdial");
    let (proxy, key, victim) = (&f.proxy, &f.key, f.victim);
    let mut t = Raw::connect(proxy.port);
    t.s.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    assert!(t.call(&["HELLO", "3"]).starts_with('%'));
    let set = t.call(&["SET", key, "v"]);
    assert_eq!(set, "+OK\r\n", "RESP3 SET while {victim} is frozen");
    f.assert_gave_way(c, &format!("RESP3 SET while {victim} is frozen: {set:?}"));
}

/// SIGSTOP of the primary that holds the pub/sub hub's channels (the
/// configured host): once the map names its promoted replica, the
/// channels move to a node that hears the PUBLISHes, while the old primary
/// is still frozen. Found by scripts/cluster-phases.sh: subscribers heard
/// nothing for the whole freeze. connect_timeout and reply_timeout are
/// 60 s here, so no failed dial or read moves the hub first.
#[test]
fn channels_held_on_a_frozen_primary_move_once_it_is_replaced() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.wait_converged();
    c.wait_replicas_synced();
    // Everything that asks the nodes is done before the freeze.
    let primaries = c.primaries();
    let seed = primaries[0];
    let replica = replica_of(c, seed);
    let other = primaries[1];
    let key = (0..1000)
        .map(|i| format!("{{frz{i}}}k"))
        .find(|k| owner_of(c, k) == seed)
        .expect("a key on the seed");
    let mut env = cluster::proxy_env(c);
    env.retain(|(k, _)| {
        k != "REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT"
            && k != "REDIS_ENTRA_PROXY_UPSTREAM__PORT"
    });
    for (k, v) in [
        ("REDIS_ENTRA_PROXY_UPSTREAM__PORT", seed.to_string()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__CONNECT_TIMEOUT", "60s".into()),
        ("REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT", "60s".into()),
    ] {
        env.push((k.into(), v));
    }
    let proxy = common::proxy::Proxy::start(&env);
    let mut sub = Raw::connect(proxy.port);
    let confirm = sub.call(&["SUBSCRIBE", "frz:news"]);
    assert!(confirm.contains("subscribe"), "{confirm}");
    c.cli(other, &["PUBLISH", "frz:news", "before"]);
    let before = sub.try_read(Duration::from_secs(10)).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&before).contains("before"),
        "{before:?}"
    );
    let pid = c.pid(seed);
    c.signal(pid, libc::SIGSTOP);
    let _thaw = Thaw { c, pid };
    // A command for the frozen node's slot: answered once the proxy's map
    // names the promoted replica (a RESP3 client, so the shared connection
    // is dialled now and the dial asks for the map).
    let mut t = Raw::connect(proxy.port);
    t.s.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    assert!(t.call(&["HELLO", "3"]).starts_with('%'));
    let set = t.call(&["SET", &key, "v"]);
    wait_primary(c, replica);
    // Published on another primary (the cluster broadcasts it) while the
    // old primary is still frozen.
    let mut heard = 0;
    let mut published = 0;
    for i in 0..40 {
        c.cli(other, &["PUBLISH", "frz:news", &format!("after{i}")]);
        published += 1;
        while let Some(m) = sub.try_read(Duration::from_millis(250)) {
            if String::from_utf8_lossy(&m).contains("after") {
                heard += 1;
            }
        }
        if heard >= 3 {
            break;
        }
    }
    eprintln!(
        "SET while {seed} (the hub's node) is frozen: {set:?}; {heard} of {published} messages published after {replica}'s promotion heard"
    );
    assert_eq!(set, "+OK\r\n");
    assert!(
        heard >= 1,
        "the subscriber heard nothing after the promotion"
    );
}
