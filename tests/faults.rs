//! Upstream drops and restarts never hang a client: commands not yet written go
//! to the new connection, commands in flight get a clear error, and service
//! comes back by itself.

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;
use std::time::{Duration, Instant};

const USER: &str = "proxyuser";
const TOKEN: &str = "fault-token";

/// Call with a bound on time; the reply must be the expected one or a clear error.
fn call_bounded(c: &mut Raw, args: &[&str]) -> (String, Duration) {
    c.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t = Instant::now();
    let r = c.call(args);
    (r, t.elapsed())
}

#[test]
fn killed_upstream_connections_are_replaced_without_errors_when_idle() {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["SET", "k", "1"]), "+OK\r\n");
    // The server drops every connection of the proxy's user (a failover does this).
    let killed = redis.cli(&["CLIENT", "KILL", "USER", USER]);
    assert!(killed.trim().parse::<u32>().unwrap_or(0) >= 2, "{killed}");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        let (r, took) = call_bounded(&mut c, &["INCR", "k"]);
        assert!(r.starts_with(':'), "{r}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    assert_eq!(c.call(&["GET", "k"]), "$2\r\n21\r\n");
}

#[test]
fn a_redis_restart_gives_clear_errors_then_recovers() {
    let mut redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    // Commands wait 1 s for the connection, then fail (the default 15 s
    // rides through a failover: tests/failover.rs).
    env.push(("REDIS_ENTRA_PROXY_UPSTREAM__HOLD".into(), "1s".into()));
    let admin = common::proxy::enable_admin(&mut env);
    let proxy = Proxy::start(&env);
    let mut c = Raw::connect(proxy.port);
    let mut tx = Raw::connect(proxy.port);
    // The hold is short here: on a loaded machine the proxy's first shared
    // connections can take longer than 1 s to open, so wait for them first.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.call(&["SET", "k", "1"]);
        if r == "+OK\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "never served: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(tx.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(tx.call(&["SET", "t", "1"]), "+QUEUED\r\n");
    redis.kill();
    // While it is down: clear errors after the hold, never a hang.
    for i in 0..5 {
        let (r, took) = call_bounded(&mut c, &["GET", "k"]);
        assert!(r.starts_with("-ERR upstream"), "{r}");
        if i > 0 {
            assert!(r.contains("after holding the command for 1.0s"), "{r}");
            assert!(r.contains("it was not sent"), "{r}");
        }
        assert!(
            r.contains("refused") || r.contains("lost") || r.contains("connect failed"),
            "{r}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    // The transaction's connection is gone with what it queued: EXEC
    // answers EXECABORT at once (nothing of it ran), never a hang.
    let t = Instant::now();
    let exec = tx.call(&["EXEC"]);
    assert!(exec.starts_with("-EXECABORT"), "{exec}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The holds that ran out are counted.
    let (_, m) = common::proxy::http(admin, "GET", "/metrics");
    let expired = common::proxy::metric_sum(
        &m,
        "redis_entra_proxy_upstream_hold_dropped_total{reason=\"expired\"}",
    );
    assert!(expired >= 4.0, "{m}");
    redis.start_again();
    // Service comes back without restarting the proxy or the client.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (r, _) = call_bounded(&mut c, &["SET", "k", "2"]);
        if r == "+OK\r\n" {
            break;
        }
        assert!(r.starts_with("-ERR upstream"), "{r}");
        assert!(Instant::now() < deadline, "never recovered: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.call(&["GET", "k"]), "$1\r\n2\r\n");
    // The same transaction client starts over.
    assert_eq!(tx.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(tx.call(&["INCR", "k"]), "+QUEUED\r\n");
    assert_eq!(tx.call(&["EXEC"]), "*1\r\n:3\r\n");
}

/// A client holding WATCH whose dedicated connection is killed while it
/// waits in BLPOP, with its next commands already sent: the wait gets the
/// lost-in-flight error, and the next blocking command and plain command,
/// which found the connection closed before they were written, are told
/// they did not run (not that the proxy is shutting down: it is not). The
/// lost WATCH then aborts the next transaction, and the client goes on.
#[test]
fn a_command_behind_a_killed_dedicated_connection_did_not_run() {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["SET", "fk:w", "1"]), "+OK\r\n");
    assert_eq!(c.call(&["WATCH", "fk:w"]), "+OK\r\n");
    let mut both = redis_entra_proxy::resp::command(&[b"BLPOP", b"fk:q", b"10"]).to_vec();
    both.extend_from_slice(&redis_entra_proxy::resp::command(&[
        b"BLPOP", b"fk:q2", b"10",
    ]));
    both.extend_from_slice(&redis_entra_proxy::resp::command(&[b"GET", b"fk:w"]));
    std::io::Write::write_all(&mut c.s, &both).unwrap();
    // The dedicated connection, blocked server-side.
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let list = redis.cli(&["CLIENT", "LIST"]);
        let line = list.lines().find(|l| l.contains("cmd=blpop"));
        if let Some(id) = line.and_then(|l| l.strip_prefix("id=")?.split(' ').next()) {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "never blocked: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = redis.cli(&["CLIENT", "KILL", "ID", &id]);
    assert_eq!(killed.trim(), "1", "{killed}");
    let blpop = String::from_utf8_lossy(&c.read()).into_owned();
    assert!(blpop.starts_with("-ERR"), "{blpop}");
    for next in ["BLPOP", "GET"] {
        let r = String::from_utf8_lossy(&c.read()).into_owned();
        assert!(!r.contains("shutting down"), "{next}: {r}");
        assert!(r.contains("did not run"), "{next}: {r}");
    }
    // The WATCH went with the connection: the transaction aborts; then the
    // client is served as before.
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "fk:w", "2"]), "+QUEUED\r\n");
    let exec = c.call(&["EXEC"]);
    assert!(
        exec.starts_with("-EXECABORT") || exec == "*-1\r\n",
        "{exec}"
    );
    assert_eq!(c.call(&["GET", "fk:w"]), "$1\r\n1\r\n");
}
