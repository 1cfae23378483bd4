//! The first end-to-end contract: plain RESP in, TLS with the proxy's own AUTH
//! out, against a real TLS-only redis-server whose default user is disabled (so
//! nothing reaches Redis without the proxy's AUTH).

mod common;

use common::proxy::{read_n, read_to_close, roundtrip, static_env, Proxy};
use common::redis::RedisServer;
use std::io::Write;
use std::process::Command;

const USER: &str = "proxyuser";
const TOKEN: &str = "token-generation-1";

fn setup() -> (RedisServer, Proxy) {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    (redis, proxy)
}

async fn client(proxy: &Proxy) -> redis::aio::MultiplexedConnection {
    // redis-rs times replies out after 500 ms by default; a 64 MB value on a
    // shared 2-core machine can take longer, and this test is not about speed.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(10)))
        .set_response_timeout(Some(std::time::Duration::from_secs(60)));
    redis::Client::open(proxy.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_round_trips_binary_safe_values() {
    let (redis, proxy) = setup();
    let mut con = client(&proxy).await;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut con)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v, "v");

    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let _: () = redis::cmd("SET")
        .arg("bin")
        .arg(&all_bytes)
        .query_async(&mut con)
        .await
        .unwrap();
    let got: Vec<u8> = redis::cmd("GET")
        .arg("bin")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, all_bytes);

    for size in [1 << 20, 64 << 20] {
        let value: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let _: () = redis::cmd("SET")
            .arg("big")
            .arg(&value)
            .query_async(&mut con)
            .await
            .unwrap();
        let got: Vec<u8> = redis::cmd("GET")
            .arg("big")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(got.len(), size);
        assert!(got == value, "{size}-byte value changed on the way");
    }
    // The value really is in Redis, written through the proxy's AUTH.
    assert_eq!(redis.cli(&["GET", "k"]).trim(), "v");
}

#[test]
fn redis_cli_without_password_or_tls() {
    let (_redis, proxy) = setup();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello");
    // A legacy app still sending its old access key keeps working.
    assert_eq!(
        cli(&[
            "-a",
            "old-access-key",
            "--no-auth-warning",
            "GET",
            "greeting"
        ]),
        "hello"
    );
}

#[test]
fn ten_thousand_pipelined_commands_in_one_write_return_in_order() {
    let (_redis, proxy) = setup();
    let mut s = proxy.raw();
    let mut input = Vec::new();
    let mut expect = Vec::new();
    for i in 0..10_000 {
        let v = i.to_string();
        input.extend_from_slice(format!("*2\r\n$4\r\nECHO\r\n${}\r\n{v}\r\n", v.len()).as_bytes());
        expect.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    let got = roundtrip(&mut s, &input, expect.len());
    assert!(got == expect, "replies out of order or missing");
}

#[test]
fn inline_commands_like_telnet() {
    let (_redis, proxy) = setup();
    let mut s = proxy.raw();
    let got = roundtrip(&mut s, b"PING\r\nSET inl  ine\nGET inl\r\n", 7 + 5 + 9);
    assert_eq!(got, b"+PONG\r\n+OK\r\n$3\r\nine\r\n");
    // A long inline line keeps every word.
    let got = roundtrip(&mut s, b"MSET a 1 b 2 c 3 d 4 e 5\r\nGET e\r\n", 5 + 7);
    assert_eq!(got, b"+OK\r\n$1\r\n5\r\n");
}

#[test]
fn client_auth_is_checked_against_listen_password() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__PASSWORD".into(),
        "local-secret".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut s = proxy.raw();
    let got = roundtrip(&mut s, b"*1\r\n$4\r\nPING\r\n", 10);
    assert!(
        got.starts_with(b"-NOAUTH"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let got = roundtrip(&mut s, b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n", 10);
    assert!(
        got.starts_with(b"-WRONGPASS"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let got = roundtrip(
        &mut s,
        b"*3\r\n$4\r\nAUTH\r\n$3\r\nany\r\n$12\r\nlocal-secret\r\n",
        5,
    );
    assert_eq!(got, b"+OK\r\n");
    let got = roundtrip(&mut s, b"*1\r\n$4\r\nPING\r\n", 7);
    assert_eq!(got, b"+PONG\r\n");
    // The client's password never reaches Redis: only the proxy's user AUTHed.
    let acl_log = redis.cli(&["ACL", "LOG"]);
    assert!(!acl_log.contains("local-secret"), "{acl_log}");
}

#[test]
fn wrong_ca_or_host_name_gives_a_clear_error() {
    let redis = RedisServer::start(USER, TOKEN);
    let other = common::certs::make(redis.dir.path(), "other", &["localhost"]);
    let mut env = static_env(&redis, USER, TOKEN);
    env.retain(|(k, _)| k != "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE");
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__CA_FILE".into(),
        other.ca_pem.display().to_string(),
    ));
    let proxy = Proxy::start(&env);
    let mut s = proxy.raw();
    let got = String::from_utf8_lossy(&roundtrip(&mut s, b"GET k\r\n", 20)).into_owned();
    let got = got + &String::from_utf8_lossy(&read_line_rest(&mut s));
    assert!(got.starts_with("-ERR upstream localhost:"), "{got}");
    assert!(
        got.contains("TLS handshake failed") && got.contains("UnknownIssuer"),
        "{got}"
    );
    drop(proxy);

    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__SERVER_NAME".into(),
        "mycache.redis.cache.windows.net".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut s = proxy.raw();
    let got = String::from_utf8_lossy(&roundtrip(&mut s, b"GET k\r\n", 20)).into_owned();
    let got = got + &String::from_utf8_lossy(&read_line_rest(&mut s));
    assert!(
        got.contains("TLS handshake failed") && got.contains("not valid for name"),
        "{got}"
    );
}

#[test]
fn wrong_upstream_password_and_refused_port_are_named() {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, "not-the-token"));
    let mut s = proxy.raw();
    let got = String::from_utf8_lossy(&roundtrip(&mut s, b"GET k\r\n", 20)).into_owned();
    let got = got + &String::from_utf8_lossy(&read_line_rest(&mut s));
    assert!(
        got.contains("authentication failed") && got.contains("WRONGPASS"),
        "{got}"
    );
    assert!(!got.contains("not-the-token"), "secret in an error: {got}");
    drop(proxy);

    let mut env = static_env(&redis, USER, TOKEN);
    let closed = common::redis::free_port();
    env.retain(|(k, _)| k != "REDIS_ENTRA_PROXY_UPSTREAM__PORT");
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__PORT".into(),
        closed.to_string(),
    ));
    let proxy = Proxy::start(&env);
    let mut s = proxy.raw();
    let got = String::from_utf8_lossy(&roundtrip(&mut s, b"GET k\r\n", 20)).into_owned();
    let got = got + &String::from_utf8_lossy(&read_line_rest(&mut s));
    assert!(
        got.contains("connect failed") && got.contains("refused"),
        "{got}"
    );
}

/// Read the rest of a one-line reply.
fn read_line_rest(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    while !out.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            _ => break,
        }
    }
    out
}

#[test]
fn oversized_bulk_and_malformed_frame_close_only_that_client() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_LIMITS__MAX_BULK_BYTES".into(),
        "1024".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut good = proxy.raw();
    assert_eq!(roundtrip(&mut good, b"SET a 1\r\n", 5), b"+OK\r\n");

    let mut big = proxy.raw();
    big.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$2048\r\n")
        .unwrap();
    let got = String::from_utf8_lossy(&read_to_close(&mut big)).into_owned();
    assert!(
        got.starts_with("-ERR Protocol error: invalid bulk length (over the proxy's limit of 1024"),
        "{got}"
    );
    assert!(got.contains("limits.max_bulk_bytes"), "{got}");

    let mut bad = proxy.raw();
    bad.write_all(b"*1\r\n+PING\r\n").unwrap();
    let got = String::from_utf8_lossy(&read_to_close(&mut bad)).into_owned();
    assert!(got.starts_with("-ERR Protocol error"), "{got}");

    // Deep nesting: refused at once, no stack growth, proxy unharmed.
    let mut deep = proxy.raw();
    deep.write_all(&b"*1\r\n".repeat(50_000)).unwrap();
    let got = String::from_utf8_lossy(&read_to_close(&mut deep)).into_owned();
    assert!(got.starts_with("-ERR Protocol error"), "{got}");

    assert_eq!(roundtrip(&mut good, b"GET a\r\n", 7), b"$1\r\n1\r\n");
    let mut fresh = proxy.raw();
    assert_eq!(roundtrip(&mut fresh, b"PING\r\n", 7), b"+PONG\r\n");
}

#[test]
fn unix_socket_listener() {
    let redis = RedisServer::start(USER, TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET".into(),
        sock.display().to_string(),
    ));
    let _proxy = Proxy::start(&env);
    let out = Command::new("redis-cli")
        .arg("-s")
        .arg(&sock)
        .args(["SET", "u", "x"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET u\r\n").unwrap();
    let mut buf = [0u8; 7];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"$1\r\nx\r\n");
    let _ = read_n;
}

#[test]
fn bad_config_exits_with_status_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .env_clear()
        .env("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h")
        .env("REDIS_ENTRA_PROXY_UPSTREAM__PROT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `upstream.prot`"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .env_clear()
        .env("REDIS_ENTRA_PROXY_UPSTREAM__HOST", "h")
        .env("REDIS_ENTRA_PROXY_LISTEN__ADDRESS", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.password"));
}

/// The proxy learns the server's command table on its first connection; every
/// command a real Redis flags `blocking` must already be pinned by the routing
/// table (a new one would otherwise hold up a shared connection until learned).
#[test]
fn the_routing_table_pins_every_blocking_command_of_a_real_redis() {
    let (_redis, proxy) = setup();
    let mut s = proxy.raw();
    assert_eq!(roundtrip(&mut s, b"PING\r\n", 7), b"+PONG\r\n");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        if let Some(l) = proxy
            .log_text()
            .lines()
            .find(|l| l.contains("learned the server's command table"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no command table learned: {}",
            proxy.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let known: usize = line
        .split("commands=")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert!(known > 200, "{line}");
    assert!(line.contains("blocking_not_in_table=[]"), "{line}");
    // Every pub/sub command of a real Redis is placed by the table.
    assert!(line.contains("refused_unplaced=[]"), "{line}");
}
