//! Every command does what it does on Redis, or gets a clear refusal, and no
//! client can hurt another: regression tests for the defects found by running
//! Redis's own test suite and hostile clients through the proxy, each against
//! a real TLS redis-server.

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const USER: &str = "proxyuser";
const TOKEN: &str = "transparency-token";

fn env_with(redis: &RedisServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = static_env(redis, USER, TOKEN);
    for (k, v) in extra {
        env.push((format!("REDIS_ENTRA_PROXY_{k}"), v.to_string()));
    }
    env
}

fn setup(extra: &[(&str, &str)]) -> (RedisServer, Proxy) {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&env_with(&redis, extra));
    (redis, proxy)
}

/// What `session` sees straight from a twin plain redis-server, having checked
/// that the same session through the proxy sees the same.
fn as_redis<T: PartialEq + std::fmt::Debug>(mut session: impl FnMut(u16) -> T) -> T {
    let (_redis, proxy) = setup(&[]);
    let twin = common::redis::PlainRedis::start();
    let direct = session(twin.port);
    let through = session(proxy.port);
    assert_eq!(through, direct, "through the proxy, then directly");
    direct
}

/// A worker blocked in BLPOP that goes away must not take the next job: its
/// upstream wait is cancelled, so the element stays in the list (as it does
/// when a direct client disconnects). Also for a wait the proxy re-issues in
/// pieces (reply timeout shorter than the wait).
#[test]
fn a_blocked_client_that_leaves_consumes_nothing() {
    let (redis, proxy) = setup(&[("UPSTREAM__REPLY_TIMEOUT", "1500ms")]);
    for (i, key) in ["jobs", "jobs2"].iter().enumerate() {
        let mut worker = Raw::connect(proxy.port);
        worker.send(&["BLPOP", key, "0"]);
        if i == 1 {
            // Past one re-issued piece.
            std::thread::sleep(Duration::from_millis(1500));
        }
        wait_blocked(&redis, 1);
        drop(worker);
        // The server forgets the wait (its connection is closed) before
        // anything is pushed; with the defect it never did.
        wait_blocked(&redis, 0);
        let mut producer = Raw::connect(proxy.port);
        assert_eq!(producer.call(&["RPUSH", key, "job"]), ":1\r\n");
        // Past the next re-issue, had there been one.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            producer.call(&["LLEN", key]),
            ":1\r\n",
            "a disconnected worker consumed the job ({key})"
        );
    }
    // Same for a stream consumer group.
    assert_eq!(
        redis
            .cli(&["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"])
            .trim(),
        "OK"
    );
    let mut consumer = Raw::connect(proxy.port);
    consumer.send(&[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "BLOCK",
        "0",
        "STREAMS",
        "s",
        ">",
    ]);
    wait_blocked(&redis, 1);
    drop(consumer);
    wait_blocked(&redis, 0);
    let mut producer = Raw::connect(proxy.port);
    producer.call(&["XADD", "s", "*", "f", "v"]);
    std::thread::sleep(Duration::from_millis(1500));
    let pending = producer.call(&["XPENDING", "s", "g"]);
    assert!(
        pending.starts_with("*4\r\n:0\r\n"),
        "a disconnected consumer took the entry: {pending}"
    );
}

/// Wait (up to 20 s) until the server has `n` blocked clients.
fn wait_blocked(redis: &RedisServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = redis.cli(&["INFO", "clients"]);
        if info.contains(&format!("blocked_clients:{n}\r"))
            || info.contains(&format!("blocked_clients:{n}\n"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} blocked clients: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `XREAD STREAMS block 0` reads a stream named `block`: it does not block.
#[test]
fn a_stream_named_block_is_not_a_block_argument() {
    let (_redis, proxy) = setup(&[]);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["XREAD", "STREAMS", "block", "0"]), "*-1\r\n");
    c.call(&["XADD", "block", "1-1", "f", "v"]);
    let got = c.call(&["XREAD", "STREAMS", "block", "0"]);
    assert!(got.contains("1-1"), "{got}");
    // A real BLOCK before STREAMS still blocks (and times out as asked).
    assert_eq!(
        c.call(&["XREAD", "BLOCK", "100", "STREAMS", "block", "$"]),
        "*-1\r\n"
    );
}

/// When the proxy cannot give MULTI (or WATCH) a connection, the transaction
/// runs not at all: no queued command runs alone, and EXEC says EXECABORT.
#[test]
fn a_transaction_that_cannot_be_pinned_runs_not_at_all() {
    let (_redis, proxy) = setup(&[
        ("UPSTREAM__MAX_PINNED", "0"),
        ("UPSTREAM__WARM_PINNED", "0"),
    ]);
    let mut c = Raw::connect(proxy.port);
    let multi = c.call(&["MULTI"]);
    assert!(multi.starts_with("-ERR"), "{multi}");
    let queued = c.call(&["SET", "tx:k", "v"]);
    assert!(
        queued.starts_with("-"),
        "ran outside its transaction: {queued}"
    );
    let exec = c.call(&["EXEC"]);
    assert!(exec.starts_with("-EXECABORT"), "{exec}");
    assert_eq!(c.call(&["GET", "tx:k"]), "$-1\r\n");
    // A failed WATCH dooms the transaction that follows it.
    let watch = c.call(&["WATCH", "tx:w"]);
    assert!(watch.starts_with("-ERR"), "{watch}");
    assert!(c.call(&["MULTI"]).starts_with('-'));
    assert!(c.call(&["INCR", "tx:w"]).starts_with('-'));
    assert!(c.call(&["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(c.call(&["GET", "tx:w"]), "$-1\r\n");
    // And the client is usable afterwards.
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
}

/// The keepalive PING is never sent inside MULTI (its +PONG would be queued
/// into the EXEC array).
#[test]
fn no_keepalive_inside_a_transaction() {
    let (_redis, proxy) = setup(&[("UPSTREAM__KEEPALIVE", "300ms")]);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "ka", "1"]), "+QUEUED\r\n");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(c.call(&["EXEC"]), "*1\r\n+OK\r\n");
}

/// WAIT and WAITAOF cannot be answered truthfully for one client's writes on
/// multiplexed connections: they are refused with a reason, never answered
/// with another connection's (zero) offset.
#[test]
fn wait_is_refused_clearly() {
    let (_redis, proxy) = setup(&[]);
    let mut c = Raw::connect(proxy.port);
    c.call(&["SET", "w", "1"]);
    for cmd in [&["WAIT", "1", "100"][..], &["WAITAOF", "0", "1", "100"][..]] {
        let r = c.call(cmd);
        assert!(r.starts_with("-ERR") && r.contains(cmd[0]), "{r}");
    }
}

/// CLIENT REPLY OFF / SKIP / ON behave as on Redis.
#[test]
fn client_reply_modes() {
    let (_redis, proxy) = setup(&[("UPSTREAM__REPLY_TIMEOUT", "1s")]);
    let mut c = Raw::connect(proxy.port);
    c.send(&["CLIENT", "REPLY", "OFF"]);
    c.send(&["SET", "r1", "a"]);
    c.send(&["GET", "r1"]);
    assert_eq!(c.call(&["CLIENT", "REPLY", "ON"]), "+OK\r\n");
    assert_eq!(c.call(&["GET", "r1"]), "$1\r\na\r\n");
    c.send(&["CLIENT", "REPLY", "SKIP"]);
    c.send(&["SET", "r2", "b"]);
    assert_eq!(c.call(&["GET", "r2"]), "$1\r\nb\r\n");
    // No reply is owed for the silenced commands: nothing times out later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
    assert_eq!(c.call(&["INCR", "rn"]), ":1\r\n");
    assert!(
        !proxy.log_text().contains("timed out"),
        "{}",
        proxy.log_text()
    );
}

/// Commands the proxy answers itself are QUEUED inside MULTI and answered in
/// their place in the EXEC array.
#[test]
fn local_commands_inside_multi_are_queued() {
    let (_redis, proxy) = setup(&[]);
    let mut c = Raw::connect(proxy.port);
    let id = c.call(&["CLIENT", "ID"]);
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["CLIENT", "SETNAME", "worker"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["SET", "m", "1"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["CLIENT", "GETNAME"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["CLIENT", "ID"]), "+QUEUED\r\n");
    assert_eq!(
        c.call(&["EXEC"]),
        format!("*4\r\n+OK\r\n+OK\r\n$6\r\nworker\r\n{id}")
    );
    assert_eq!(c.call(&["CLIENT", "GETNAME"]), "$6\r\nworker\r\n");
    // A discarded transaction applies none of them.
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["CLIENT", "SETNAME", "other"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["DISCARD"]), "+OK\r\n");
    assert_eq!(c.call(&["CLIENT", "GETNAME"]), "$6\r\nworker\r\n");
}

/// Commands that would turn a shared connection into a replica or put it in
/// the Lua debugger are refused; the other clients carry on.
#[test]
fn commands_that_would_change_a_shared_connection_are_refused() {
    let (_redis, proxy) = setup(&[]);
    let mut other = Raw::connect(proxy.port);
    assert_eq!(other.call(&["SET", "o", "1"]), "+OK\r\n");
    let mut c = Raw::connect(proxy.port);
    for cmd in [
        &["SYNC"][..],
        &["PSYNC", "?", "-1"][..],
        &["REPLCONF", "listening-port", "1"][..],
        &["SCRIPT", "DEBUG", "YES"][..],
        &["SCRIPT", "DEBUG", "SYNC"][..],
    ] {
        let r = c.call(cmd);
        assert!(r.starts_with("-ERR"), "{cmd:?}: {r}");
        assert!(r.contains("proxy"), "{cmd:?}: {r}");
    }
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
    for _ in 0..100 {
        assert_eq!(other.call(&["GET", "o"]), "$1\r\n1\r\n");
    }
}

/// A reply timeout bounds every wait, also while the shared connection is
/// being re-dialled to a server that does not answer.
#[test]
fn reply_timeout_bounds_the_wait_while_redialling() {
    let (redis, proxy) = setup(&[
        ("UPSTREAM__REPLY_TIMEOUT", "1s"),
        ("UPSTREAM__CONNECT_TIMEOUT", "20s"),
        ("UPSTREAM__POOL_SIZE", "1"),
        // No hold: the wait for the redial is bounded by the reply timeout
        // (a hold bounds it by itself: tests/failover.rs).
        ("UPSTREAM__HOLD", "0s"),
    ]);
    let mut a = Raw::connect(proxy.port);
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
    redis.pause();
    // The first command times out and retires the connection; the redial
    // then hangs in its TLS handshake.
    let r = a.call(&["GET", "x"]);
    assert!(r.contains("timed out"), "{r}");
    let mut b = Raw::connect(proxy.port);
    let start = Instant::now();
    let r = b.call(&["GET", "x"]);
    let waited = start.elapsed();
    redis.resume();
    assert!(r.starts_with("-ERR"), "{r}");
    // Bounded by the reply timeout (1 s), not by the connect timeout (20 s).
    assert!(
        waited < Duration::from_secs(10),
        "waited {waited:?} for {r}"
    );
}

/// HELLO 3 works after SELECT n (the pinned connection changes protocol).
#[test]
fn hello_3_after_select() {
    let (_redis, proxy) = setup(&[]);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["SELECT", "2"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "h", "db2"]), "+OK\r\n");
    let hello = c.call(&["HELLO", "3"]);
    assert!(hello.starts_with('%'), "{hello}");
    assert_eq!(c.call(&["GET", "h"]), "$3\r\ndb2\r\n");
    // RESP3 replies on that connection now.
    assert_eq!(c.call(&["HSET", "hh", "f", "v"]), ":1\r\n");
    assert_eq!(c.call(&["HGETALL", "hh"]), "%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
}

/// Inline commands take quoted arguments as redis-cli and telnet send them,
/// and protocol errors say what Redis says.
#[test]
fn inline_quotes_and_protocol_errors_as_redis() {
    let (_redis, proxy) = setup(&[]);
    let mut s = proxy.raw();
    s.write_all(b"SET q \"a b\\n\" \r\nGET q\r\n").unwrap();
    let got = common::proxy::read_n(&mut s, 5 + 9);
    assert_eq!(got, b"+OK\r\n$4\r\na b\n\r\n");
    s.write_all(b"SET q 'it''s'\r\n").unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert_eq!(
        rest,
        "-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    for (input, want) in [
        (
            &b"*1\r\nfoo\r\n"[..],
            "-ERR Protocol error: expected '$', got 'f'\r\n",
        ),
        (
            b"*3000000000\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$-10\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$blabla\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
    ] {
        let mut s = proxy.raw();
        s.write_all(input).unwrap();
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        assert!(
            got.starts_with(want.trim_end()),
            "{:?}: {got}",
            String::from_utf8_lossy(input)
        );
    }
    // A negative count is an empty command, ignored as Redis does.
    let mut s = proxy.raw();
    s.write_all(b"*-10\r\n*1\r\n$4\r\nPING\r\n").unwrap();
    assert_eq!(common::proxy::read_n(&mut s, 7), b"+PONG\r\n");
}

fn server_calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info = redis.cli(&["INFO", "commandstats"]);
    info.lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1)?.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A client that pipelines many commands and reads none of the replies
/// gets a bounded number of them run for it (one read of 1,500 GETs used to
/// send all 1,500 and hold every reply in the proxy's memory): back-pressure
/// stops its commands while its unread replies pass the window (here the
/// 4 MiB limit). It is not closed: once it reads, it gets every reply. The
/// kernel's socket buffers on loopback take up to about 36 MB of replies
/// (180 of these) before the proxy sees the client is not reading.
#[test]
fn unread_pipelined_replies_are_bounded_then_served() {
    let (redis, proxy) = setup(&[("LIMITS__MAX_BUFFERED_BYTES", "4194304")]);
    let mut c = Raw::connect(proxy.port);
    let value = "v".repeat(200_000);
    assert_eq!(c.call(&["SET", "big", &value]), "+OK\r\n");
    let before = server_calls(&redis, "get");
    let mut s = proxy.raw();
    let one: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n";
    s.write_all(&one.repeat(1500)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let ran = server_calls(&redis, "get") - before;
    assert!(ran > 0);
    assert!(
        ran <= 1100,
        "{ran} GETs run for a client that read none of their replies"
    );
    // Once it reads, every reply, in full.
    let want = 1500 * (value.len() + "$200000\r\n\r\n".len());
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    while got < want {
        match s.read(&mut buf) {
            Ok(0) => panic!("closed after {got} of {want} bytes"),
            Ok(n) => got += n,
            Err(e) => panic!("{e} after {got} of {want} bytes"),
        }
    }
    assert_eq!(server_calls(&redis, "get") - before, 1500);
    // Other clients are fine.
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
}

/// A MONITOR client that does not read is disconnected once what waits for
/// it passes `limits.max_pubsub_queued_bytes`; the proxy and the other
/// clients carry on.
#[test]
fn a_monitor_that_does_not_read_is_cut_off() {
    let (_redis, proxy) = setup(&[("LIMITS__MAX_PUBSUB_QUEUED_BYTES", "1048576")]);
    let mut monitor = proxy.raw();
    monitor.write_all(b"MONITOR\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Raw::connect(proxy.port);
    let value = "m".repeat(1000);
    let mut s = proxy.raw();
    let cmd = redis_entra_proxy::resp::command(&[b"SET", b"mk", value.as_bytes()]);
    for _ in 0..40 {
        s.write_all(&cmd.repeat(500)).unwrap();
        common::proxy::read_n(&mut s, 5 * 500);
    }
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
    // The monitor's connection was closed: reading drains what the kernel
    // holds, then ends.
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match monitor.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("monitor still open after {total} bytes: {e}"),
        }
    }
    assert!(total < 20_000_000, "{total}");
    assert!(proxy.log_text().contains("limits.max_pubsub_queued_bytes"));
}

/// RESP2 client-side caching (how Jedis, Lettuce and redis-py do it without
/// RESP3): one connection subscribes to `__redis__:invalidate`, another
/// redirects its tracking there by the first one's CLIENT ID. Through the
/// proxy the redirect names the hub's connection, and the invalidations
/// reach the subscriber.
#[test]
fn client_tracking_redirect_for_resp2_caching() {
    let (redis, proxy) = setup(&[]);
    let mut inval = Raw::connect(proxy.port);
    let id = inval.call(&["CLIENT", "ID"]);
    let id = id.trim_start_matches(':').trim_end();
    assert_eq!(
        inval.call(&["SUBSCRIBE", "__redis__:invalidate"]),
        "*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
    );
    let mut cached = Raw::connect(proxy.port);
    assert_eq!(
        cached.call(&["CLIENT", "TRACKING", "on", "REDIRECT", id]),
        "+OK\r\n"
    );
    assert_eq!(cached.call(&["SET", "tk", "1"]), "+OK\r\n");
    assert_eq!(cached.call(&["GET", "tk"]), "$1\r\n1\r\n");
    let mut writer = Raw::connect(proxy.port);
    assert_eq!(writer.call(&["SET", "tk", "2"]), "+OK\r\n");
    assert_eq!(
        String::from_utf8_lossy(&inval.read()),
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$2\r\ntk\r\n"
    );
    // The tracking connection itself gets no stray frame.
    assert_eq!(cached.call(&["PING"]), "+PONG\r\n");
    // The hub's connection goes: the redirect is broken, so the tracking
    // client is closed (it reconnects and tracks again) rather than left
    // caching without invalidations.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim() != "0", "{killed}");
    let mut rest = Vec::new();
    let _ = cached.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// RESP3 redirect target (Redis's Tcl suite, `unit/tracking`, "Able to
/// redirect to a RESP3 client"): Redis sends a RESP3 client that tracking
/// is redirected to an `invalidate` push, not a pub/sub message; the proxy
/// sent `>3 message __redis__:invalidate [...]`. Compared with a twin plain
/// redis-server, byte for byte.
#[test]
fn client_tracking_redirect_to_a_resp3_subscriber_gets_invalidate_pushes() {
    let got = as_redis(|port| {
        let mut inval = Raw::connect(port);
        inval.call(&["HELLO", "3"]);
        let id = inval.call(&["CLIENT", "ID"]);
        let id = id.trim_start_matches(':').trim_end().to_string();
        assert_eq!(
            inval.call(&["SUBSCRIBE", "__redis__:invalidate"]),
            ">3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
        );
        let mut cached = Raw::connect(port);
        assert_eq!(
            cached.call(&["CLIENT", "TRACKING", "on", "REDIRECT", &id]),
            "+OK\r\n"
        );
        assert_eq!(cached.call(&["SET", "tk3", "1"]), "+OK\r\n");
        assert_eq!(cached.call(&["GET", "tk3"]), "$1\r\n1\r\n");
        let mut writer = Raw::connect(port);
        assert_eq!(writer.call(&["SET", "tk3", "2"]), "+OK\r\n");
        String::from_utf8_lossy(&inval.read()).into_owned()
    });
    assert_eq!(got, ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\ntk3\r\n");
}

/// A RESP3 client with `CLIENT TRACKING on` that has read `key` (set to 1).
fn tracking_client(port: u16, key: &str) -> Raw {
    let mut c = Raw::connect(port);
    assert!(c.call(&["HELLO", "3"]).starts_with('%'));
    assert_eq!(c.call(&["CLIENT", "TRACKING", "on"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", key, "1"]), "+OK\r\n");
    assert_eq!(c.call(&["GET", key]), "$1\r\n1\r\n");
    c
}

/// The next `n` frames `c` receives (replies or pushes), as text.
fn read_text(c: &mut Raw, n: usize) -> String {
    (0..n)
        .map(|_| String::from_utf8_lossy(&c.read()).into_owned())
        .collect()
}

/// A tracking client's invalidation that Redis writes before a reply reaches
/// the client before that reply, as Redis sends them: a client that caches
/// what it reads must not see a key's invalidation after a reply that came
/// later (here another client's `MULTI; SET k; LPUSH l; EXEC` invalidates `k`
/// and serves the tracking client's BLPOP in one write; the proxy wrote the
/// BLPOP reply first, then the push).
#[test]
fn a_tracking_invalidation_written_before_a_reply_arrives_before_it() {
    let got = as_redis(|port| {
        let mut cached = tracking_client(port, "tk5");
        cached.send(&["BLPOP", "tl5", "0"]);
        std::thread::sleep(Duration::from_millis(300));
        let mut writer = Raw::connect(port);
        writer.send(&["MULTI"]);
        writer.send(&["SET", "tk5", "2"]);
        writer.send(&["LPUSH", "tl5", "v"]);
        writer.send(&["EXEC"]);
        for _ in 0..4 {
            writer.read();
        }
        read_text(&mut cached, 2)
    });
    assert_eq!(
        got,
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\ntk5\r\n*2\r\n$3\r\ntl5\r\n$1\r\nv\r\n"
    );
}

/// The same for a plain command's reply: writes held by `CLIENT PAUSE WRITE`
/// run in the order they came when the pause ends, another client's `SET`
/// (invalidating the tracked key) then the tracking client's own `SET`, and
/// Redis writes the invalidation and the `+OK` together.
#[test]
fn a_tracking_invalidation_before_a_queued_reply_arrives_before_it() {
    let got = as_redis(|port| {
        let mut cached = tracking_client(port, "tk6");
        let mut pauser = Raw::connect(port);
        assert_eq!(pauser.call(&["CLIENT", "PAUSE", "700", "WRITE"]), "+OK\r\n");
        let mut writer = Raw::connect(port);
        writer.send(&["SET", "tk6", "2"]);
        std::thread::sleep(Duration::from_millis(200));
        cached.send(&["SET", "other6", "1"]);
        assert_eq!(writer.read(), b"+OK\r\n");
        let mut seen = read_text(&mut cached, 2);
        // The client's own write: Redis sends the invalidation after the reply.
        assert_eq!(cached.call(&["GET", "tk6"]), "$1\r\n2\r\n");
        cached.send(&["SET", "tk6", "3"]);
        seen += &read_text(&mut cached, 2);
        seen
    });
    assert_eq!(
        got,
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\ntk6\r\n+OK\r\n+OK\r\n>2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\ntk6\r\n"
    );
}

/// Redis's own first tracking tests (tests/unit/tracking.tcl): a RESP2 client
/// redirects its invalidations to a subscriber, turns tracking off, then on in
/// BCAST mode; the subscriber's messages are compared with a twin's.
#[test]
fn tracking_redirect_then_bcast_as_redis() {
    as_redis(|port| {
        let mut redir = Raw::connect(port);
        let id = redir.call(&["CLIENT", "ID"]);
        let id = id.trim_start_matches(':').trim_end().to_string();
        redir.call(&["SUBSCRIBE", "__redis__:invalidate"]);
        let mut r = Raw::connect(port);
        let mut seen = Vec::new();
        seen.push(r.call(&["CLIENT", "TRACKING", "on", "REDIRECT", &id]));
        for c in [
            &["SET", "a{t}", "1"][..],
            &["SET", "b{t}", "1"],
            &["GET", "a{t}"],
            &["INCR", "b{t}"],
            &["INCR", "a{t}"],
        ] {
            seen.push(r.call(c));
        }
        seen.push(String::from_utf8_lossy(&redir.read()).into_owned());
        seen.push(r.call(&[
            "MGET", "a{t}", "b{t}", "c{t}", "d{t}", "e{t}", "f{t}", "g{t}",
        ]));
        seen.push(r.call(&["CLIENT", "TRACKING", "off"]));
        seen.push(r.call(&["CLIENT", "TRACKING", "on", "BCAST", "REDIRECT", &id]));
        seen.push(r.call(&["MSET", "a{t}", "1", "b{t}", "2", "c{t}", "3"]));
        seen.push(String::from_utf8_lossy(&redir.read()).into_owned());
        seen
    });
}

/// A client that unsubscribed from its only channel is out of subscribed
/// mode: HELLO 3 then works, as on Redis (Redis's test 'Able to redirect to a
/// RESP3 client' unsubscribes the redirect target from the tracking channel
/// and switches it to RESP3).
#[test]
fn hello_3_after_the_last_unsubscribe() {
    as_redis(|port| {
        let mut seen = Vec::new();
        for channel in ["plainchannel", "__redis__:invalidate"] {
            let mut c = Raw::connect(port);
            let id = c.call(&["CLIENT", "ID"]);
            let id = id.trim_start_matches(':').trim_end().to_string();
            seen.push(c.call(&["SUBSCRIBE", channel]));
            // Another client's invalidations go to it.
            let mut tracker = Raw::connect(port);
            seen.push(tracker.call(&["CLIENT", "TRACKING", "on", "REDIRECT", &id]));
            seen.push(c.call(&["UNSUBSCRIBE", channel]));
            let hello = c.call(&["HELLO", "3"]);
            seen.push(hello.chars().take(1).collect::<String>());
            seen.push(c.call(&["PING"]));
        }
        seen
    });
}

/// A subscribed RESP3 client may switch to RESP2 with HELLO 2, as on Redis
/// (Redis's test 'Able to redirect to a RESP3 client' ends with HELLO 2 on
/// its subscribed redirect target; the proxy refused it): its messages then
/// come as RESP2 arrays, and in RESP2's subscribed mode HELLO is refused.
#[test]
fn hello_2_of_a_subscribed_resp3_client() {
    as_redis(|port| {
        let mut seen = Vec::new();
        let mut c = Raw::connect(port);
        seen.push(c.call(&["HELLO", "3"]).chars().take(1).collect::<String>());
        seen.push(c.call(&["SUBSCRIBE", "h2chan"]));
        let mut p = Raw::connect(port);
        seen.push(p.call(&["PUBLISH", "h2chan", "before"]));
        seen.push(String::from_utf8_lossy(&c.read()).into_owned());
        seen.push(c.call(&["HELLO", "2"]).chars().take(1).collect::<String>());
        seen.push(p.call(&["PUBLISH", "h2chan", "after"]));
        seen.push(String::from_utf8_lossy(&c.read()).into_owned());
        seen.push(c.call(&["PING"]));
        seen.push(c.call(&["HELLO", "3"]));
        seen.push(c.call(&["UNSUBSCRIBE", "h2chan"]));
        seen.push(c.call(&["PING"]));
        seen
    });
}

/// A RESP3 client named as the REDIRECT target of another client's tracking
/// gets its invalidations as pushes though it did not subscribe to
/// `__redis__:invalidate`, and CLIENT REPLY OFF does not silence them (Redis's
/// test 'RESP3 based basic redirect invalidation with client reply off'; the
/// proxy sent it nothing). Another client holds a subscription, as the Tcl
/// unit's redirect client does.
#[test]
fn a_resp3_redirect_target_that_did_not_subscribe_gets_invalidate_pushes() {
    as_redis(|port| {
        let mut seen = Vec::new();
        let mut other = Raw::connect(port);
        seen.push(other.call(&["SUBSCRIBE", "__redis__:invalidate"]));
        let mut target = Raw::connect(port);
        seen.push(
            target
                .call(&["HELLO", "3"])
                .chars()
                .take(1)
                .collect::<String>(),
        );
        let id = target.call(&["CLIENT", "ID"]);
        let id = id.trim_start_matches(':').trim_end().to_string();
        let mut cached = Raw::connect(port);
        seen.push(cached.call(&["CLIENT", "TRACKING", "on", "REDIRECT", &id]));
        seen.push(cached.call(&["SET", "rt3", "1"]));
        seen.push(cached.call(&["GET", "rt3"]));
        target.send(&["CLIENT", "REPLY", "OFF"]);
        let mut writer = Raw::connect(port);
        seen.push(writer.call(&["SET", "rt3", "2"]));
        seen.push(String::from_utf8_lossy(&target.read()).into_owned());
        seen.push(target.call(&["CLIENT", "REPLY", "ON"]));
        seen.push(target.call(&["PING"]));
        seen
    });
}

/// A client named as REDIRECT target while it is RESP2 and not subscribed
/// gets the invalidations once it subscribes to another channel (as a
/// message of `__redis__:invalidate`) or switches to RESP3 (as a push), as
/// from Redis.
#[test]
fn a_redirect_target_named_before_it_subscribes_or_speaks_resp3() {
    as_redis(|port| {
        let mut seen = Vec::new();
        let mut other = Raw::connect(port);
        seen.push(other.call(&["SUBSCRIBE", "__redis__:invalidate"]));
        for (key, then) in [
            ("rl1", &["SUBSCRIBE", "elsewhere"][..]),
            ("rl2", &["HELLO", "3"]),
        ] {
            let mut target = Raw::connect(port);
            let id = target.call(&["CLIENT", "ID"]);
            let id = id.trim_start_matches(':').trim_end().to_string();
            let mut cached = Raw::connect(port);
            seen.push(cached.call(&["CLIENT", "TRACKING", "on", "REDIRECT", &id]));
            seen.push(cached.call(&["GET", key]));
            let r = target.call(then);
            seen.push(r.chars().take(1).collect::<String>());
            let mut writer = Raw::connect(port);
            seen.push(writer.call(&["SET", key, "2"]));
            seen.push(String::from_utf8_lossy(&target.read()).into_owned());
        }
        seen
    });
}

/// CLIENT LIST, KILL and UNBLOCK act on the proxy's clients, as they would
/// on Redis's, and never on the upstream connections other clients share (a
/// forwarded `CLIENT KILL TYPE normal` closed every shared connection).
#[test]
fn client_list_kill_and_unblock_see_the_proxys_clients() {
    let (_redis, proxy) = setup(&[]);
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    assert_eq!(a.call(&["CLIENT", "SETNAME", "alpha"]), "+OK\r\n");
    let b_id = b.call(&["CLIENT", "ID"]);
    let b_id = b_id.trim_start_matches(':').trim_end().to_string();
    let list = a.call(&["CLIENT", "LIST"]);
    assert!(list.contains(" name=alpha "), "{list}");
    assert!(list.contains(&format!("id={b_id} ")), "{list}");
    assert_eq!(
        list.lines().filter(|l| l.starts_with("id=")).count(),
        2,
        "{list}"
    );
    // Another client's command keeps running while clients are killed.
    let mut c = Raw::connect(proxy.port);
    c.send(&["BLPOP", "ulist", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    let killed = a.call(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
    assert_eq!(killed, ":2\r\n");
    let mut rest = Vec::new();
    let _ = b.s.read_to_end(&mut rest);
    // The killer carries on, on the same shared connections.
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
    assert_eq!(a.call(&["CLIENT", "KILL", "ID", &b_id]), ":0\r\n");
    // CLIENT UNBLOCK of a blocked client of the proxy: its own nil, at once.
    let mut d = Raw::connect(proxy.port);
    let d_id = d.call(&["CLIENT", "ID"]);
    let d_id = d_id.trim_start_matches(':').trim_end().to_string();
    d.send(&["BLPOP", "unblockme", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    let list = a.call(&["CLIENT", "LIST", "ID", &d_id]);
    assert!(list.contains(" flags=b "), "{list}");
    assert_eq!(a.call(&["CLIENT", "UNBLOCK", &d_id]), ":1\r\n");
    assert_eq!(String::from_utf8_lossy(&d.read()), "*-1\r\n");
    assert_eq!(d.call(&["PING"]), "+PONG\r\n");
    d.send(&["BLPOP", "unblockme", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.call(&["CLIENT", "UNBLOCK", &d_id, "ERROR"]), ":1\r\n");
    let err = String::from_utf8_lossy(&d.read()).into_owned();
    assert!(err.starts_with("-UNBLOCKED"), "{err}");
    assert_eq!(a.call(&["CLIENT", "UNBLOCK", &d_id]), ":0\r\n");
}

/// SCRIPT KILL reaches the server while a script holds it, also when the
/// script runs on the shared connection the killer's commands use (it used
/// to wait behind the script until the reply timeout).
#[test]
fn script_kill_does_not_wait_behind_the_script() {
    let (_redis, proxy) = setup(&[
        ("UPSTREAM__POOL_SIZE", "1"),
        ("UPSTREAM__REPLY_TIMEOUT", "4s"),
    ]);
    let mut admin = Raw::connect(proxy.port);
    assert_eq!(
        admin.call(&["CONFIG", "SET", "lua-time-limit", "10"]),
        "+OK\r\n"
    );
    let mut runner = Raw::connect(proxy.port);
    runner.send(&["EVAL", "while true do end", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut killer = Raw::connect(proxy.port);
    assert_eq!(killer.call(&["SCRIPT", "KILL"]), "+OK\r\n");
    let killed = String::from_utf8_lossy(&runner.read()).into_owned();
    assert!(killed.contains("killed"), "{killed}");
    assert_eq!(killer.call(&["PING"]), "+PONG\r\n");
    assert_eq!(runner.call(&["PING"]), "+PONG\r\n");
}
