//! Clustered caches as a busy application uses them: many short clients,
//! a limit reached, a slot migrating, a reshard under a SCAN. The proxy in
//! front of the real six-node TLS cluster (one per test binary, shared).
//! Tests that change the topology hold [`EXCLUSIVE`] for writing.

mod common;

use common::cluster::{self, proxy_env, Announce, Cluster};
use common::cluster_load::proxy_conns;
use common::proxy::{Proxy, Raw};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn proxy_with(c: &Cluster, extra: &[(&str, &str)]) -> Proxy {
    let mut env = proxy_env(c);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Proxy::start(&env)
}

/// The proxy's connections per node port now.
fn per_node(c: &Cluster) -> HashMap<u16, usize> {
    let mut m: HashMap<u16, usize> = c.ports.iter().map(|&p| (p, 0)).collect();
    for (p, _, _) in proxy_conns(c, cluster::USER) {
        *m.entry(p).or_default() += 1;
    }
    m
}

/// Run `f(i)` for `i in 0..n` on `threads` threads.
fn spread(n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    f(i);
                }
            });
        }
    });
}

/// Finding 1: a dedicated connection goes back to its node (or is closed)
/// when its client's transaction or blocking wait ends, or the client
/// leaves: the per-node count returns to its idle value.
#[test]
fn dedicated_connections_return_to_their_node_after_one_shot_clients() {
    let _g = EXCLUSIVE.read().unwrap();
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
    let _g = EXCLUSIVE.read().unwrap();
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
