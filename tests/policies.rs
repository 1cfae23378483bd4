//! Azure's built-in data access policies (Data Owner, Contributor, Reader,
//! and a custom narrow one) on the identity the proxy authenticates as, in
//! front of a single TLS redis-server and in front of the six-node TLS
//! cluster: what the proxy sends on its own behalf works under each policy
//! or falls back with a log line, and a command the policy refuses reaches
//! the client as the server's NOPERM, unchanged.

mod common;

use common::cluster::{self, proxy_env, Announce};
use common::policies::PASSWORD;
use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;

/// `env` with the proxy's identity switched to the policy user `user`.
fn as_user(mut env: Vec<(String, String)>, user: &str) -> Vec<(String, String)> {
    for (k, v) in env.iter_mut() {
        if k == "REDIS_ENTRA_PROXY_AUTH__USERNAME" {
            *v = user.into();
        }
        if k == "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD" {
            *v = PASSWORD.into();
        }
    }
    env
}

fn bulk(v: &str) -> String {
    format!("${}\r\n{v}\r\n", v.len())
}

/// Keys spread over the three shards (the slot of `pol:{i}` differs per i).
fn keys(prefix: &str) -> Vec<String> {
    (0..30).map(|i| format!("{prefix}:{i}")).collect()
}

/// SETs and an MGET across slots, as an app does them.
fn writes_and_reads_across_slots(r: &mut Raw, prefix: &str) {
    let ks = keys(prefix);
    for k in &ks {
        assert_eq!(r.call(&["SET", k, &format!("v-{k}")]), "+OK\r\n", "SET {k}");
    }
    let mut mget = vec!["MGET"];
    mget.extend(ks.iter().map(String::as_str));
    let want: String = format!("*{}\r\n", ks.len())
        + &ks
            .iter()
            .map(|k| bulk(&format!("v-{k}")))
            .collect::<String>();
    assert_eq!(r.call(&mget), want);
}

#[test]
fn cluster_under_each_policy_is_one_redis() {
    let c = cluster::shared(Announce::Ip);
    for user in ["owner", "contributor"] {
        let proxy = Proxy::start(&as_user(proxy_env(c), user));
        let mut r = Raw::connect(proxy.port);
        writes_and_reads_across_slots(&mut r, &format!("pol-{user}"));
        let log = proxy.log_text();
        assert!(log.contains("Redis Cluster"), "{user}: {log}");
        if user == "contributor" {
            // Refused by the policy: the server's own words.
            assert_eq!(
                r.call(&["INFO", "server"]),
                "-NOPERM this user has no permissions to run the 'info' command\r\n"
            );
        }
    }
    // Data Reader: reads across slots; writes refused by the server.
    let proxy = Proxy::start(&as_user(proxy_env(c), "reader"));
    let mut r = Raw::connect(proxy.port);
    let ks = keys("pol-owner");
    let mut mget = vec!["MGET"];
    mget.extend(ks.iter().map(String::as_str));
    let want: String = format!("*{}\r\n", ks.len())
        + &ks
            .iter()
            .map(|k| bulk(&format!("v-{k}")))
            .collect::<String>();
    assert_eq!(r.call(&mget), want);
    for k in &ks {
        assert_eq!(r.call(&["GET", k]), bulk(&format!("v-{k}")), "GET {k}");
        assert_eq!(
            r.call(&["SET", k, "x"]),
            "-NOPERM this user has no permissions to run the 'set' command\r\n",
            "SET {k}"
        );
    }
    // Pub/sub is not in Data Reader: the hub's subscription is refused and
    // the client hears the server's refusal.
    assert_eq!(
        r.call(&["SUBSCRIBE", "news"]),
        "-NOPERM this user has no permissions to run the 'subscribe' command\r\n"
    );
    assert_eq!(r.call(&["PING"]), "+PONG\r\n");
    let log = proxy.log_text();
    assert!(log.contains("Redis Cluster"), "reader: {log}");
    // CLUSTER SHARDS is not in Data Reader: the proxy says so once and reads
    // CLUSTER SLOTS instead.
    assert!(
        log.contains("CLUSTER SHARDS") && log.contains("cluster|shards"),
        "reader: {log}"
    );
}

/// A custom policy without CLUSTER SLOTS on a clustered cache: the proxy
/// cannot read the slot map and says which rule it needs.
#[test]
fn cluster_under_a_policy_without_cluster_slots_is_named() {
    let c = cluster::shared(Announce::Ip);
    let proxy = Proxy::start(&as_user(proxy_env(c), "narrow"));
    let mut r = Raw::connect(proxy.port);
    assert_eq!(r.call(&["PING"]), "+PONG\r\n");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = proxy.log_text();
        if log.contains("refused CLUSTER SLOTS") {
            assert!(
                log.contains("+cluster|slots (in Data Owner, Data Contributor and Data Reader)"),
                "{log}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn single_server_under_each_policy() {
    let redis = RedisServer::start("proxyuser", "unused");
    for user in ["owner", "contributor", "reader", "narrow"] {
        let proxy = Proxy::start(&as_user(static_env(&redis, "x", "x"), user));
        let mut r = Raw::connect(proxy.port);
        let k = format!("single-{user}");
        if user == "reader" {
            assert_eq!(
                r.call(&["SET", &k, "v"]),
                "-NOPERM this user has no permissions to run the 'set' command\r\n"
            );
            assert_eq!(r.call(&["GET", &k]), "$-1\r\n");
        } else {
            assert_eq!(r.call(&["SET", &k, "v"]), "+OK\r\n", "{user}");
            assert_eq!(r.call(&["GET", &k]), bulk("v"), "{user}");
        }
        if user != "owner" {
            assert_eq!(
                r.call(&["INFO"]),
                "-NOPERM this user has no permissions to run the 'info' command\r\n",
                "{user}"
            );
        }
        let log = proxy.log_text();
        assert!(log.contains("not a cluster"), "{user}: {log}");
        if user == "narrow" {
            // No COMMAND, no CLUSTER: each named once with what it needs.
            assert!(log.contains("+command"), "{log}");
        }
    }
}

/// CLIENT UNBLOCK of a client of the proxy is sent upstream by the proxy;
/// Data Contributor refuses it (`@dangerous`): the asking client gets the
/// server's NOPERM, the log says once which rule it needs, and the blocked
/// client is left as the server left it (it times out on its own).
#[test]
fn client_unblock_under_contributor() {
    let redis = RedisServer::start("proxyuser", "unused");
    let proxy = Proxy::start(&as_user(static_env(&redis, "x", "x"), "contributor"));
    let mut blocked = Raw::connect(proxy.port);
    let id = blocked.call(&["CLIENT", "ID"]);
    let id = id.trim_start_matches(':').trim().to_string();
    blocked.send(&["BLPOP", "unblock-list", "2"]);
    let mut other = Raw::connect(proxy.port);
    // Let the BLPOP reach the server.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        other.call(&["CLIENT", "UNBLOCK", &id]),
        "-NOPERM this user has no permissions to run the 'client|unblock' command\r\n"
    );
    assert_eq!(blocked.read(), b"*-1\r\n");
    let log = proxy.log_text();
    assert!(
        log.contains("refused CLIENT UNBLOCK") && log.contains("+client|unblock"),
        "{log}"
    );
}
