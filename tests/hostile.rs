//! Regression tests for defects found by the hostile runs (scripts/hostile.sh):
//! bytes one client sends must not grow the proxy without bound, stop it, or
//! break another client's connection. Each against a real TLS redis-server.

mod common;

use common::proxy::{read_to_close, static_env, Proxy, Raw};
use common::redis::RedisServer;
use std::io::{Read, Write};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "hostile-token";

fn setup() -> (RedisServer, Proxy) {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    (redis, proxy)
}

/// Read one reply (or what came before a close) within `secs`.
fn read_some(s: &mut std::net::TcpStream, secs: u64) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) => panic!("no reply within {secs} s: {e}"),
    }
}

/// A NUL byte in an inline command (`\x00\r\n`, from a fuzzer or a wrong
/// port) made the inline splitter loop for ever, pushing empty words: the
/// proxy grew by about 1 GB a second until the kernel killed it. Now the
/// line is an ordinary (unknown) command and the connection goes on.
#[test]
fn a_nul_byte_in_an_inline_command_is_a_word() {
    let (_redis, proxy) = setup();
    let mut c = proxy.raw();
    // Short: without the fix the proxy allocates without bound while we wait.
    c.write_all(b"\x00\r\n").unwrap();
    let got = read_some(&mut c, 3);
    assert!(
        got.starts_with(b"-ERR unknown command"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    c.write_all(b"ECHO a\x00b\r\n").unwrap();
    assert_eq!(read_some(&mut c, 3), b"$3\r\na\x00b\r\n");
    // Another client is fine.
    let mut other = Raw::connect(proxy.port);
    assert_eq!(other.call(&["PING"]), "+PONG\r\n");
}

/// An HTTP request sent to the proxy's port (a browser page can make one to
/// 127.0.0.1): Redis closes a connection whose command is `POST` or `Host:`
/// so that nothing after it runs. The proxy forwarded it to a shared
/// connection, Redis closed that connection (failing every other client's
/// command in flight on it), and the lines after it ran.
#[test]
fn an_http_request_is_closed_and_runs_nothing() {
    let (redis, proxy) = setup();
    let mut other = Raw::connect(proxy.port);
    assert_eq!(other.call(&["SET", "other", "1"]), "+OK\r\n");
    for req in [
        &b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nSET pwned 1\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nSET pwned 1\r\n"[..],
    ] {
        let mut c = proxy.raw();
        c.write_all(req).unwrap();
        let _ = read_to_close(&mut c);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(redis.cli(&["EXISTS", "pwned"]).trim(), "0");
    // The same words as RESP arrays: refused, never sent to a shared connection.
    let mut c = Raw::connect(proxy.port);
    for name in ["POST", "Host:"] {
        let r = c.call(&[name, "/"]);
        assert!(r.starts_with("-ERR"), "{r}");
    }
    // Nothing reached the server, so no shared connection was closed under
    // the other client.
    let log = std::fs::read_to_string(redis.log_path()).unwrap_or_default();
    assert!(!log.contains("SECURITY ATTACK"), "{log}");
    assert!(
        !proxy.log_text().contains("upstream connection closed"),
        "{}",
        proxy.log_text()
    );
    assert_eq!(other.call(&["INCR", "other"]), ":2\r\n");
}

/// A client that does not read a reply larger than
/// `limits.max_buffered_bytes` is closed (as a MONITOR client over its limit
/// is), instead of the proxy holding it for as long as the client stays
/// connected. Many smaller replies are not a reason: back-pressure keeps
/// them within a window (tests/backpressure.rs).
#[test]
fn unread_large_replies_over_the_byte_limit_close_the_client() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_LIMITS__MAX_BUFFERED_BYTES".into(),
        "4194304".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut c = Raw::connect(proxy.port);
    // 8 MB (zero bytes and a `v`): larger than the limit on its own.
    assert_eq!(c.call(&["SETRANGE", "big", "8388607", "v"]), ":8388608\r\n");
    let mut s = proxy.raw();
    let one: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n";
    s.write_all(&one.repeat(20)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // What reaches the client: what the kernel's socket buffers held plus
    // at most one reply, then the close; never all 160 MB.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("still open after {total} bytes: {e}"),
        }
        assert!(
            total < 100 << 20,
            "{total} bytes of replies held for a client that did not read"
        );
    }
    assert!(proxy.log_text().contains("limits.max_buffered_bytes"));
    // The other client is fine.
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
}
