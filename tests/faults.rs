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
    // The transaction's connection is gone with its state: the client is
    // closed (as a direct Redis connection would be), never left hanging.
    let t = Instant::now();
    let rest = common::proxy::read_to_close(&mut tx.s);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
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
    // The transaction client was closed with its state; a new connection starts over.
    let mut tx = Raw::connect(proxy.port);
    assert_eq!(tx.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(tx.call(&["INCR", "k"]), "+QUEUED\r\n");
    assert_eq!(tx.call(&["EXEC"]), "*1\r\n:3\r\n");
}
