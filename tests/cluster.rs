//! Clustered caches: the proxy in front of a real six-node TLS Redis Cluster
//! on loopback (one cluster per announce variant, shared by every test here).
//! Tests that change the topology (resharding, failover) hold [`EXCLUSIVE`]
//! for writing; the others for reading. The fan-out comparisons (FLUSHALL,
//! DBSIZE, KEYS) run alone on the host-name cluster.

mod common;

use common::cluster::{self, proxy_env, Announce, Cluster};
use common::cluster_load::{key_per_slot, load, node_id, proxy_conns, scan_all, sorted_array};
use common::proxy::{enable_admin, http, metric_sum, Proxy, Raw};
use std::sync::RwLock;

static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn proxy_for(c: &Cluster) -> Proxy {
    Proxy::start(&proxy_env(c))
}

#[test]
fn keys_in_every_slot_round_trip() {
    let _g = EXCLUSIVE.read().unwrap();
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let mut r = Raw::connect(proxy.port);
    assert_eq!(r.call(&["PING"]), "+PONG\r\n");
    let keys = key_per_slot();
    // Pipelined: every SET, then every GET, in batches of 512.
    for chunk in keys.chunks(512) {
        for k in chunk {
            r.send(&["SET", k, &format!("v-{k}")]);
        }
        for k in chunk {
            assert_eq!(r.read(), b"+OK\r\n", "SET {k}");
        }
    }
    for chunk in keys.chunks(512) {
        for k in chunk {
            r.send(&["GET", k]);
        }
        for k in chunk {
            let v = format!("v-{k}");
            assert_eq!(
                String::from_utf8(r.read()).unwrap(),
                format!("${}\r\n{v}\r\n", v.len())
            );
        }
    }
    // Every primary got its share.
    for p in c.primaries() {
        let n: usize = c.cli(p, &["DBSIZE"]).trim().parse().unwrap();
        assert!(n >= 3000, "primary {p} holds {n} keys");
    }
    for k in &keys {
        r.send(&["DEL", k]);
    }
    for _ in &keys {
        assert_eq!(r.read(), b":1\r\n");
    }
    let log = proxy.log_text();
    assert!(log.contains("Redis Cluster"), "{log}");
}

#[test]
fn multi_key_and_fan_out_commands_answer_like_one_redis() {
    let c = cluster::shared(Announce::Hostname);
    let proxy = proxy_for(c);
    let plain = common::redis::PlainRedis::start();
    let mut p = Raw::connect(proxy.port);
    let mut r = Raw::connect(plain.port);
    let lib = "#!lua name=mylib\nredis.register_function('echo1', function(keys, args) return args[1] end)";
    let script: Vec<Vec<&str>> = vec![
        vec!["FLUSHALL"],
        vec!["MSET", "a", "1", "b", "2", "c", "3", "{a}d", "4", "e", "5"],
        vec!["MGET", "a", "b", "nope", "c", "{a}d", "e"],
        vec!["EXISTS", "a", "b", "nope", "c", "a"],
        vec!["TOUCH", "a", "b", "nope"],
        vec!["DBSIZE"],
        vec!["DEL", "a", "nope", "b"],
        vec!["UNLINK", "c", "{a}d"],
        vec!["DBSIZE"],
        vec!["SADD", "{t}a", "x", "y"],
        vec!["SADD", "{t}b", "y", "z"],
        vec!["SUNIONSTORE", "{t}d", "{t}a", "{t}b"],
        vec!["SINTERCARD", "2", "{t}a", "{t}b"],
        vec!["EVAL", "return redis.call('get', KEYS[1])", "1", "e"],
        vec!["SCRIPT", "LOAD", "return 42"],
        vec!["EVALSHA", "1fa00e76656cc152ad327c13fe365858fd7be306", "0"],
        vec![
            "SCRIPT",
            "EXISTS",
            "1fa00e76656cc152ad327c13fe365858fd7be306",
            "ffffffffffffffffffffffffffffffffffffffff",
        ],
        vec!["SCRIPT", "FLUSH"],
        vec![
            "SCRIPT",
            "EXISTS",
            "1fa00e76656cc152ad327c13fe365858fd7be306",
        ],
        vec!["FUNCTION", "LOAD", lib],
        vec!["FCALL", "echo1", "0", "hello"],
        vec!["FUNCTION", "DELETE", "mylib"],
        vec!["FUNCTION", "LOAD", lib],
        vec!["FUNCTION", "FLUSH"],
        vec!["FCALL", "echo1", "0", "hello"],
        vec!["FLUSHDB"],
        vec!["DBSIZE"],
        vec!["RANDOMKEY"],
        vec!["MGET", "a", "b"],
    ];
    for cmd in &script {
        let got = p.call(cmd);
        let want = r.call(cmd);
        assert_eq!(got, want, "{cmd:?}");
    }
    // Many keys over every shard: KEYS, SCAN, RANDOMKEY, DBSIZE.
    let keys: Vec<String> = (0..300).map(|i| format!("fan:{i}")).collect();
    for k in &keys {
        assert_eq!(p.call(&["SET", k, "v"]), r.call(&["SET", k, "v"]));
    }
    assert_eq!(p.call(&["DBSIZE"]), ":300\r\n");
    assert_eq!(
        sorted_array(&p.call(&["KEYS", "fan:*"])),
        sorted_array(&r.call(&["KEYS", "fan:*"]))
    );
    let mut want = keys.clone();
    want.sort();
    assert_eq!(scan_all(&mut p), want);
    let rk = p.call(&["RANDOMKEY"]);
    assert!(rk.contains("fan:"), "{rk}");
    // The shards really hold them apart.
    let per_node: Vec<usize> = c
        .primaries()
        .iter()
        .map(|&port| c.cli(port, &["DBSIZE"]).trim().parse().unwrap())
        .collect();
    assert!(per_node.iter().all(|&n| n > 50), "{per_node:?}");
    // Refused as the Enterprise policy's proxy refuses them.
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_eq!(p.call(&["SUNION", "fan:1", "fan:2"]), crossslot);
    assert_eq!(p.call(&["MSETNX", "x1", "1", "x2", "2"]), crossslot);
    // Cluster commands get the proxy's cluster face: one node, every slot.
    assert!(p
        .call(&["CLUSTER", "SLOTS"])
        .starts_with("*1\r\n*3\r\n:0\r\n:16383\r\n"));
    // A client's HELLO shows one plain server.
    let hello = p.call(&["HELLO", "3"]);
    assert!(
        hello.contains("standalone") && !hello.contains("cluster"),
        "{hello}"
    );
    assert_eq!(p.call(&["FLUSHALL"]), "+OK\r\n");
    assert_eq!(p.call(&["DBSIZE"]), ":0\r\n");
}

#[test]
fn transactions_and_blocking_commands_run_on_the_node_of_their_keys() {
    let _g = EXCLUSIVE.read().unwrap();
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    // A transaction on one slot (whichever node owns it).
    for tag in ["tx1", "tx2", "tx3", "tx4"] {
        let k = format!("{{{tag}}}n");
        assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.call(&["SET", &k, "1"]), "+QUEUED\r\n");
        assert_eq!(a.call(&["INCR", &k]), "+QUEUED\r\n");
        assert_eq!(a.call(&["PING"]), "+QUEUED\r\n");
        assert_eq!(a.call(&["EXEC"]), "*3\r\n+OK\r\n:2\r\n+PONG\r\n");
        assert_eq!(b.call(&["GET", &k]), "$1\r\n2\r\n");
    }
    // Keyless first, keys after: the queue waits for a node.
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["PING"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["INCR", "{tx1}n"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]), "*2\r\n+PONG\r\n:3\r\n");
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["PING"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]), "*1\r\n+PONG\r\n");
    // Another slot inside the transaction: CROSSSLOT, and EXEC discards.
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["INCR", "{tx1}n"]), "+QUEUED\r\n");
    assert!(a.call(&["INCR", "{tx2}n"]).starts_with("-CROSSSLOT"));
    assert!(a.call(&["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(b.call(&["GET", "{tx1}n"]), "$1\r\n3\r\n");
    // WATCH pins to its key's node; a change by another client aborts.
    assert_eq!(a.call(&["WATCH", "{tx3}n"]), "+OK\r\n");
    assert_eq!(b.call(&["SET", "{tx3}n", "9"]), "+OK\r\n");
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["SET", "{tx3}n", "10"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]), "*-1\r\n");
    assert_eq!(a.call(&["WATCH", "{tx3}n"]), "+OK\r\n");
    assert!(a.call(&["GET", "{tx4}n"]).starts_with("-CROSSSLOT"));
    assert_eq!(a.call(&["UNWATCH"]), "+OK\r\n");
    assert_eq!(a.call(&["GET", "{tx4}n"]), "$1\r\n2\r\n");
    // Blocking commands wait on the owner of their keys, wherever it is.
    for (i, q) in ["q:a", "q:b", "q:c", "q:d", "q:e"].iter().enumerate() {
        a.send(&["BLPOP", q, "10"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let v = format!("v{i}");
        assert_eq!(b.call(&["RPUSH", q, &v]), ":1\r\n");
        assert_eq!(
            String::from_utf8(a.read()).unwrap(),
            format!("*2\r\n${}\r\n{q}\r\n$2\r\n{v}\r\n", q.len())
        );
        assert_eq!(a.call(&["GET", "{tx1}n"]), "$1\r\n3\r\n");
    }
    assert!(a
        .call(&["BLPOP", "q:a", "q:b", "1"])
        .starts_with("-CROSSSLOT"));
    assert_eq!(a.call(&["BLPOP", "{q}a", "{q}b", "0.1"]), "*-1\r\n");
    // CLIENT UNBLOCK reaches a client blocked on any node, as on one Redis.
    let id = a.call(&["CLIENT", "ID"]);
    let id = id.trim_start_matches(':').trim();
    for (q, how, reply) in [
        ("q:a", None, "*-1\r\n"),
        (
            "q:b",
            Some("ERROR"),
            "-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n",
        ),
        ("q:c", Some("TIMEOUT"), "*-1\r\n"),
        ("q:d", None, "*-1\r\n"),
    ] {
        a.send(&["BLPOP", q, "0"]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut cmd = vec!["CLIENT", "UNBLOCK", id];
        cmd.extend(how);
        assert_eq!(b.call(&cmd), ":1\r\n", "CLIENT UNBLOCK of a BLPOP on {q}");
        assert_eq!(String::from_utf8(a.read()).unwrap(), reply);
        assert_eq!(b.call(&cmd), ":0\r\n", "not blocked any more");
    }
}

#[test]
fn redis_benchmark_through_the_proxy_sees_no_error() {
    let _g = EXCLUSIVE.read().unwrap();
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string()])
        .args(["-r", "100000", "-n", "20000", "-c", "20", "-P", "4", "-q"])
        .args([
            "-t",
            "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,lrange_100,mset",
        ])
        .output()
        .expect("run redis-benchmark");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for t in [
        "SET",
        "GET",
        "INCR",
        "MSET (10 keys)",
        "LRANGE_100 (first 100 elements)",
    ] {
        assert!(text.contains(&format!("{t}:")), "{t} missing: {text}");
    }
    for bad in ["MOVED", "ASK", "CROSSSLOT", "ERR", "rror"] {
        assert!(!text.contains(bad), "{bad}: {text}");
    }
}

#[test]
fn resharding_and_failover_under_load_lose_no_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    // A subscriber to a notification channel held on every primary, kept
    // through the resharding and the failover.
    let mut sub = Raw::connect(proxy.port);
    assert!(sub
        .call(&["SUBSCRIBE", "__keyevent@0__:set"])
        .ends_with(":1\r\n"));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let keys: Vec<String> = (0..300).map(|i| format!("load:{t}:{i}")).collect();
            let stop = stop.clone();
            let port = proxy.port;
            std::thread::spawn(move || load(port, keys, stop))
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Move 1000 slots (with their keys) from one primary to another.
    let primaries = c.primaries();
    let (from, to) = (node_id(c, primaries[0]), node_id(c, primaries[1]));
    let out = c.cluster_cli(&[
        "reshard",
        &format!("127.0.0.1:{}", primaries[0]),
        "--cluster-from",
        &from,
        "--cluster-to",
        &to,
        "--cluster-slots",
        "1000",
        "--cluster-yes",
        "--cluster-pipeline",
        "50",
    ]);
    assert!(out.contains("Moving slot"), "reshard: {out}");
    c.wait_converged();
    // A replica takes over from its primary (manual failover).
    let replica = c
        .ports
        .iter()
        .copied()
        .find(|&p| c.cli(p, &["ROLE"]).starts_with("slave"))
        .expect("a replica");
    assert!(c.cli(replica, &["CLUSTER", "FAILOVER"]).contains("OK"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !c.cli(replica, &["ROLE"]).starts_with("master") {
        assert!(
            std::time::Instant::now() < deadline,
            "failover did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.wait_converged();
    std::thread::sleep(std::time::Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let mut hung = 0;
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut check = Raw::connect(proxy.port);
    let mut lost = 0;
    for th in threads {
        match th.join() {
            Ok(t) => {
                ok += t.ok;
                errors.extend(t.errors);
                for (k, (acked, unsure)) in t.acked {
                    let v: i64 = check
                        .call(&["GET", &k])
                        .split("\r\n")
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if v < acked || v > acked + unsure {
                        lost += 1;
                        eprintln!("{k}: value {v}, acknowledged {acked}, unsure {unsure}");
                    }
                }
            }
            Err(_) => hung += 1,
        }
    }
    eprintln!(
        "resharding + failover under load: {ok} acknowledged INCRs, {} errors {:?}, {hung} hung, {lost} keys off",
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    let log = proxy.log_text();
    let redirects = log.matches("cluster redirection").count();
    let maps = log.matches("cluster topology").count();
    eprintln!("proxy followed {redirects} redirections and read {maps} slot maps");
    assert!(redirects > 0 && maps > 1, "{log}");
    assert_eq!(hung, 0);
    assert_eq!(lost, 0);
    assert!(ok > 1000, "{ok}");
    // Errors only for commands in flight on a dropped connection.
    for e in &errors {
        assert!(e.contains("may or may not have been executed"), "{e}");
    }
    // The subscriber hears the SETs of every shard, the new primary's too,
    // each once (the old primary, a replica now, is no longer listened to).
    c.on_every_node(&["CONFIG", "SET", "notify-keyspace-events", "E$"]);
    let keys: Vec<String> = (0..30).map(|i| format!("fo:{i}")).collect();
    let mut heard = Vec::new();
    for _round in 0..10 {
        for k in &keys {
            assert_eq!(check.call(&["SET", k, "v"]), "+OK\r\n");
        }
        heard.clear();
        while let Some(m) = sub.try_read(std::time::Duration::from_millis(1500)) {
            let m = String::from_utf8(m).unwrap();
            heard.push(m.split("\r\n").nth(6).unwrap_or_default().to_string());
        }
        if heard.len() >= keys.len() {
            break;
        }
    }
    c.on_every_node(&["CONFIG", "SET", "notify-keyspace-events", ""]);
    heard.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(heard, want, "each SET notified once after the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The guard only keeps the resharding test out; the test's own future is
// driven by block_on on this thread, so holding it across awaits is fine.
#[allow(clippy::await_holding_lock)]
async fn tokens_rotate_into_every_nodes_connections_under_load() {
    use common::token_emulator::{EmulatorConfig, Issued, TokenEmulator};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};
    const LIFETIME: Duration = Duration::from_secs(8);
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let emu = TokenEmulator::start(EmulatorConfig {
        lifetime: LIFETIME,
        oid_prefix: "cgen-".into(),
        ..Default::default()
    })
    .await;
    // Each generation is an ACL user on every node, made before its token is
    // handed out and deleted when it expires (the server then closes any
    // connection still authenticated as it, as Azure does).
    emu.on_issue(move |t: Issued| async move {
        let pass = format!(">{}", t.token);
        let c = cluster::shared(Announce::Ip);
        c.on_every_node(&["ACL", "SETUSER", &t.oid, "on", &pass, "~*", "&*", "+@all"]);
        tokio::spawn(async move {
            let wait = t
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            tokio::task::spawn_blocking(move || {
                cluster::shared(Announce::Ip).on_every_node(&["ACL", "DELUSER", &t.oid])
            })
            .await
            .unwrap();
        });
    });
    let mut env: Vec<(String, String)> = proxy_env(c)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("REDIS_ENTRA_PROXY_AUTH__"))
        .collect();
    for (k, v) in [
        ("REDIS_ENTRA_PROXY_AUTH__SOURCE", "entra".to_string()),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__CREDENTIAL",
            "managed-identity".into(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__IMDS_ENDPOINT",
            emu.imds_endpoint(),
        ),
        (
            "REDIS_ENTRA_PROXY_AUTH__ENTRA__ATTEMPT_TIMEOUT",
            "2s".into(),
        ),
        ("REDIS_ENTRA_PROXY_AUTH__ENTRA__MAX_BACKOFF", "1s".into()),
    ] {
        env.push((k.to_string(), v));
    }
    let admin = enable_admin(&mut env);
    let proxy = Proxy::start(&env);
    emu.wait_issued(1, Duration::from_secs(10)).await;
    // Until the proxy holds the first token its clients' commands wait for it
    // (half the connect timeout at most): start the load once it is ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            http(admin, "GET", "/readyz")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pport = proxy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..6u64 {
        let stop = stop.clone();
        load.push(tokio::task::spawn_blocking(move || {
            let mut r = Raw::connect(pport);
            let keys: Vec<String> = (0..64).map(|k| format!("rot:{i}:{k}")).collect();
            let mut n = 0u64;
            let mut errors = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                // One INCR per key (all slots of this client), pipelined.
                for k in &keys {
                    r.send(&["INCR", k]);
                }
                n += 1;
                for k in &keys {
                    let got = String::from_utf8(r.read()).unwrap();
                    if got != format!(":{n}\r\n") {
                        errors.push(format!("{k}: {got}"));
                    }
                }
                let got = r.call(&["MGET", &keys[0], &keys[1], &keys[2]]);
                if !got.starts_with("*3\r\n") {
                    errors.push(got);
                }
            }
            (n, errors)
        }));
    }
    // A transaction and a BLPOP on other nodes' slots across the rotations too.
    let blpop = tokio::task::spawn_blocking(move || {
        let mut r = Raw::connect(pport);
        r.s.set_read_timeout(Some(LIFETIME * 8)).unwrap();
        r.call(&["BLPOP", "rot:queue", "0"])
    });
    // Subscriptions held on every primary (a keyevent pattern) and on a
    // shard channel's owner, kept across the rotations too.
    let mut sub = Raw::connect(pport);
    sub.s.set_read_timeout(Some(LIFETIME * 8)).unwrap();
    assert!(sub
        .call(&["PSUBSCRIBE", "__keyevent@0__:*"])
        .ends_with(":1\r\n"));
    let r = sub.call(&["SSUBSCRIBE", "rot:feed"]);
    assert!(r.ends_with(":1\r\n"), "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_start = proxy_conns(c, "cgen-");
    let last = emu.wait_issued(4, LIFETIME * 5).await;
    // Past the expiry of the generation before the last (its users deleted).
    let wait = last.issued_at + LIFETIME / 2;
    tokio::time::sleep(wait.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let tx = tokio::task::spawn_blocking(move || {
        let mut r = Raw::connect(pport);
        let a = r.call(&["MULTI"]);
        let b = r.call(&["INCR", "{rot}tx"]);
        let e = r.call(&["EXEC"]);
        let p = r.call(&["RPUSH", "rot:queue", "x"]);
        (a, b, e, p)
    })
    .await
    .unwrap();
    assert_eq!(tx.0, "+OK\r\n");
    assert_eq!(tx.1, "+QUEUED\r\n");
    assert!(tx.2.starts_with("*1\r\n:"), "{tx:?}");
    assert_eq!(tx.3, ":1\r\n");
    assert_eq!(blpop.await.unwrap(), "*2\r\n$9\r\nrot:queue\r\n$1\r\nx\r\n");
    let mut publisher = Raw::connect(pport);
    assert_eq!(
        publisher.call(&["SPUBLISH", "rot:feed", "after-rotations"]),
        ":1\r\n"
    );
    let m = String::from_utf8(sub.read()).unwrap();
    assert!(
        m.contains("smessage") && m.contains("after-rotations"),
        "{m}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for l in load {
        let (n, errors) = l.await.unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        rounds += n;
    }
    // The shared connections that were up at the start are still up, on
    // every primary, authenticated as a newer generation.
    let now = proxy_conns(c, "cgen-");
    let nodes_at_start: std::collections::HashSet<u16> = at_start.iter().map(|x| x.0).collect();
    assert!(nodes_at_start.len() >= 3, "{at_start:?}");
    let metrics = http(admin, "GET", "/metrics").1;
    let reconnects = metric_sum(&metrics, "redis_entra_proxy_upstream_reconnects_total");
    let reauths = metric_sum(&metrics, "redis_entra_proxy_reauth");
    eprintln!(
        "rotation over the cluster: {} generations, {rounds} rounds of 64 INCRs per client, {} proxy connections on {} nodes, {reauths} re-AUTH samples, {reconnects} reconnects",
        last.generation,
        now.len(),
        nodes_at_start.len()
    );
    assert_eq!(reconnects, 0.0, "{metrics}");
    for (node, id, user) in &now {
        assert_ne!(
            user, "cgen-1",
            "node {node} connection {id} still on the first token"
        );
    }
    let kept = at_start
        .iter()
        .filter(|(p, id, _)| now.iter().any(|(q, j, _)| p == q && id == j))
        .count();
    assert!(
        kept >= 6,
        "shared connections replaced instead of re-authenticated: {at_start:?} -> {now:?}"
    );
}

#[test]
fn every_shard_certificate_is_checked_against_the_caches_name() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    // The nodes' certificate names only `localhost`, the topology names
    // 127.0.0.1: the keys test above reaches every shard because the proxy
    // checks (and sends as SNI) `upstream.server_name`. Another name fails.
    let mut env = proxy_env(c);
    for (k, v) in env.iter_mut() {
        if k == "REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME" {
            *v = "other.example".into();
        }
    }
    let proxy = Proxy::start(&env);
    let reply = Raw::connect(proxy.port).call(&["GET", "k"]);
    assert!(reply.contains("certificate not valid for name"), "{reply}");
}

#[test]
fn channel_subscriptions_get_messages_published_on_any_shard() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let mut sub = Raw::connect(proxy.port);
    assert_eq!(
        sub.call(&["SUBSCRIBE", "news"]),
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    let mut publisher = Raw::connect(proxy.port);
    // PUBLISH through the proxy, and straight to each primary: Redis Cluster
    // broadcasts it, the proxy's one subscription hears all.
    let n: usize = publisher.call(&["PUBLISH", "news", "via-proxy"])[1..]
        .trim()
        .parse()
        .unwrap();
    assert!(n >= 1);
    let primaries = c.primaries();
    for p in &primaries {
        c.cli(*p, &["PUBLISH", "news", &format!("from-{p}")]);
    }
    let mut got = vec![String::from_utf8(sub.read()).unwrap()];
    for _ in &primaries {
        got.push(String::from_utf8(sub.read()).unwrap());
    }
    assert!(got[0].ends_with("$9\r\nvia-proxy\r\n"), "{got:?}");
    for (p, m) in primaries.iter().zip(&got[1..]) {
        assert!(m.contains(&format!("from-{p}")), "{got:?}");
    }
}

/// The primary that owns `name`'s slot: the one that does not answer MOVED.
fn owner_of(c: &Cluster, name: &str) -> u16 {
    c.primaries()
        .into_iter()
        .find(|&p| {
            let out = c.cli(p, &["SPUBLISH", name, "probe"]);
            out.trim().chars().all(|ch| ch.is_ascii_digit())
        })
        .expect("an owner")
}

#[test]
fn keyspace_notifications_and_shard_channels_reach_subscribers_from_every_shard() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    c.on_every_node(&["CONFIG", "SET", "notify-keyspace-events", "KA"]);
    let proxy = proxy_for(c);
    let mut publisher = Raw::connect(proxy.port);

    // Keyspace notifications: each shard sends those of its own keys.
    let mut sub = Raw::connect(proxy.port);
    assert_eq!(
        sub.call(&["PSUBSCRIBE", "__keyspace@0__:ks:*"]),
        "*3\r\n$10\r\npsubscribe\r\n$19\r\n__keyspace@0__:ks:*\r\n:1\r\n"
    );
    let keys: Vec<String> = (0..30).map(|i| format!("ks:{i}")).collect();
    let owners: std::collections::HashSet<u16> = keys.iter().map(|k| owner_of(c, k)).collect();
    assert_eq!(owners.len(), 3, "the keys span every shard");
    for k in &keys {
        assert_eq!(publisher.call(&["SET", k, "v"]), "+OK\r\n");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in &keys {
        let m = String::from_utf8(sub.read()).unwrap();
        // pmessage, the pattern, the channel, the event.
        let key = m
            .split("\r\n")
            .nth(6)
            .and_then(|l| l.strip_prefix("__keyspace@0__:"))
            .unwrap_or_else(|| panic!("a keyspace notification: {m}"))
            .to_string();
        assert!(m.ends_with("$3\r\nset\r\n"), "{m}");
        assert!(seen.insert(key.clone()), "{key} notified twice");
    }
    let want: std::collections::HashSet<String> = keys.iter().cloned().collect();
    assert_eq!(seen, want);
    // Nothing more (no copy from another connection): the next frame is the
    // answer to this PING.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sub.call(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");

    // Shard channels: one per shard, each subscribed on its owner.
    let mut names: Vec<(String, u16)> = Vec::new();
    for i in 0..200 {
        let n = format!("feed:{i}");
        let o = owner_of(c, &n);
        if names.iter().all(|(_, p)| *p != o) {
            names.push((n, o));
        }
        if names.len() == 3 {
            break;
        }
    }
    assert_eq!(names.len(), 3);
    let mut ssub = Raw::connect(proxy.port);
    for (i, (n, _)) in names.iter().enumerate() {
        let r = ssub.call(&["SSUBSCRIBE", n]);
        assert!(r.ends_with(&format!(":{}\r\n", i + 1)), "{r}");
    }
    for (n, _) in &names {
        assert_eq!(
            publisher.call(&["SPUBLISH", n, &format!("to-{n}")]),
            ":1\r\n"
        );
        let m = String::from_utf8(ssub.read()).unwrap();
        assert!(
            m.contains("smessage") && m.contains(&format!("to-{n}")),
            "{m}"
        );
    }

    // Move the first channel's slot (it holds no key) to another primary:
    // the old owner drops the subscription, the proxy makes it again on the
    // new owner, and the client sees nothing of it.
    let (name, from) = names[0].clone();
    let to = names[1].1;
    let slot = c
        .cli(from, &["CLUSTER", "KEYSLOT", &name])
        .trim()
        .to_string();
    assert_eq!(
        c.cli(from, &["CLUSTER", "COUNTKEYSINSLOT", &slot]).trim(),
        "0"
    );
    let to_id = node_id(c, to);
    for p in [to, from] {
        let out = c.cli(p, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        assert!(out.contains("OK"), "{out}");
    }
    c.wait_converged();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = publisher.call(&["SPUBLISH", &name, "after-move"]);
        if r == ":1\r\n" {
            break;
        }
        assert_eq!(r, ":0\r\n", "SPUBLISH through the proxy after the move");
        assert!(
            std::time::Instant::now() < deadline,
            "not subscribed again on the new owner"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let m = String::from_utf8(ssub.read()).unwrap();
    assert!(m.contains("smessage") && m.contains("after-move"), "{m}");
    assert_eq!(owner_of(c, &name), to);
    let log = proxy.log_text();
    assert!(
        log.contains("upstream dropped a pub/sub subscription"),
        "{log}"
    );
    c.on_every_node(&["CONFIG", "SET", "notify-keyspace-events", ""]);
}

#[test]
fn client_modes_follow_keys_to_every_shard() {
    let _g = EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let keys: Vec<String> = (0..12).map(|i| format!("cm:{i}")).collect();
    let owners: std::collections::HashSet<u16> = keys.iter().map(|k| owner_of(c, k)).collect();
    assert_eq!(owners.len(), 3, "the keys span every shard");
    let mut w = Raw::connect(proxy.port);
    for k in &keys {
        assert_eq!(w.call(&["SET", k, "v1"]), "+OK\r\n");
    }
    // RESP3 client-side caching: tracking is on for every shard the client
    // reads from, and invalidations of all of them arrive on its connection.
    let mut t = Raw::connect(proxy.port);
    assert!(t.call(&["HELLO", "3"]).starts_with('%'));
    assert_eq!(t.call(&["CLIENT", "TRACKING", "on"]), "+OK\r\n");
    for k in &keys {
        assert_eq!(
            t.call(&["GET", k]),
            "$2\r\nv1\r\n",
            "GET {k} while tracking"
        );
    }
    for k in &keys {
        assert_eq!(w.call(&["SET", k, "v2"]), "+OK\r\n");
    }
    let mut invalidated = std::collections::HashSet::new();
    for _ in &keys {
        let m = String::from_utf8(t.read()).unwrap();
        assert!(m.starts_with(">2\r\n$10\r\ninvalidate\r\n"), "{m}");
        // `>2 invalidate *1 $n key`
        let key = m.split("\r\n").nth(5).unwrap_or_default().to_string();
        invalidated.insert(key);
    }
    let want: std::collections::HashSet<String> = keys.iter().cloned().collect();
    assert_eq!(invalidated, want);
    // READONLY binds too: reads of every shard still answer.
    let mut r = Raw::connect(proxy.port);
    assert_eq!(r.call(&["READONLY"]), "+OK\r\n");
    for k in &keys {
        assert_eq!(
            r.call(&["GET", k]),
            "$2\r\nv2\r\n",
            "GET {k} after READONLY"
        );
    }
    // RESP2 tracking redirects to one connection; a cluster has one per
    // shard: refused in words rather than half working.
    let mut s = Raw::connect(proxy.port);
    let id = s.call(&["CLIENT", "ID"]);
    let mut t2 = Raw::connect(proxy.port);
    let reply = t2.call(&[
        "CLIENT",
        "TRACKING",
        "on",
        "REDIRECT",
        id.trim_start_matches(':').trim(),
    ]);
    assert!(
        reply.starts_with("-ERR") && reply.contains("clustered cache"),
        "{reply}"
    );
    assert_eq!(t2.call(&["GET", &keys[0]]), "$2\r\nv2\r\n");
}
