//! Back-pressure, not cut-offs: a client that pipelines more than it reads
//! is not read from until it reads, and is served in full; the proxy holds
//! a bounded amount for it meanwhile (issue 19, finding 8).

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;
use std::io::{Read, Write};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "backpressure-token";

/// (VmRSS, VmHWM) of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// 400 GETs of a 1 MB value in one write, nothing read for 2 s, then every
/// reply read and checked. Returns the proxy's (RSS before, peak, after) in
/// MiB.
fn pipeline_400_unread(proxy: &mut Proxy) -> (u64, u64, u64) {
    let value = "v".repeat(1 << 20);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["SET", "big", &value]), "+OK\r\n");
    let pid = proxy.child().id();
    let (before, _) = rss_kib(pid);
    let mut s = proxy.raw();
    let one: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n";
    s.write_all(&one.repeat(400)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let want = format!("$1048576\r\n{value}\r\n");
    let mut got = 0usize;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    while got < 400 {
        let n = match s.read(&mut buf) {
            Ok(0) => panic!("closed after {got} replies"),
            Ok(n) => n,
            Err(e) => panic!("{e} after {got} replies"),
        };
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= want.len() {
            assert!(pending.starts_with(want.as_bytes()), "reply {got} differs");
            pending.drain(..want.len());
            got += 1;
        }
    }
    assert!(pending.is_empty());
    drop(s);
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
    std::thread::sleep(Duration::from_millis(500));
    let (after, peak) = rss_kib(pid);
    (before / 1024, peak / 1024, after / 1024)
}

#[test]
fn a_client_that_pipelines_without_reading_is_served_in_bounded_memory() {
    let redis = RedisServer::start(USER, TOKEN);
    // Default settings.
    let mut proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    let (before, peak, after) = pipeline_400_unread(&mut proxy);
    eprintln!("proxy RSS before {before} MiB, peak {peak} MiB, after {after} MiB");
    assert!(
        peak < before + 48,
        "the proxy held {} MiB for a client that did not read",
        peak - before
    );
    // The Kubernetes manifests' 2 MiB: the same client is served, not closed.
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_LIMITS__MAX_BUFFERED_BYTES".into(),
        "2097152".into(),
    ));
    let mut small = Proxy::start(&env);
    let (before, peak, after) = pipeline_400_unread(&mut small);
    eprintln!("with 2 MiB: proxy RSS before {before} MiB, peak {peak} MiB, after {after} MiB");
    assert!(peak < before + 48, "{} MiB held", peak - before);
}
