//! Client libraries that cannot be installed here (.NET's
//! StackExchange.Redis, Java's Lettuce): their documented handshakes replayed
//! against the proxy (as Data Contributor, in front of the single TLS server
//! and the six-node TLS cluster), and the conclusion each library draws from
//! the answers checked.
//!
//! - StackExchange.Redis (2.x, `Protocol=Resp3`): `HELLO 3`, `CLIENT SETNAME`,
//!   `CLIENT SETINFO lib-name/lib-ver`, `INFO` (its server type from
//!   `redis_mode`; under a policy that refuses INFO, from HELLO's `mode`),
//!   `ECHO`, `GET __Booksleeve_TieBreak`, `SUBSCRIBE
//!   __Booksleeve_MasterChanged` on its subscription connection. In cluster
//!   mode it would read `CLUSTER NODES` and refuse cross-slot keys itself.
//! - Lettuce (6/7, `RedisClusterClient`): `HELLO 3`, `CLIENT SETINFO`,
//!   `CLIENT MAINT_NOTIFICATIONS ON ...` (Lettuce 7, turned off on an error),
//!   then the topology: `CLUSTER NODES` (parsed as `id host:port@cport flags
//!   master ping pong epoch link slots...`) and `INFO clients`, then one
//!   connection per master at the address `CLUSTER NODES` gives.

mod common;

use common::cluster::{self, proxy_env, Announce};
use common::policies::PASSWORD;
use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;

fn as_contributor(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, v) in env.iter_mut() {
        if k == "REDIS_ENTRA_PROXY_AUTH__USERNAME" {
            *v = "contributor".into();
        }
        if k == "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD" {
            *v = PASSWORD.into();
        }
    }
    env
}

/// A RESP3 map's `field` as text (HELLO's reply).
fn hello_field(reply: &str, field: &str) -> Option<String> {
    let mut lines = reply.split("\r\n");
    while let Some(l) = lines.next() {
        if l == field {
            let v = lines.next()?;
            return Some(if v.starts_with('$') {
                lines.next()?.to_string()
            } else {
                v.trim_start_matches([':', '+']).to_string()
            });
        }
    }
    None
}

/// StackExchange.Redis's server type: `redis_mode` of INFO when it may read
/// INFO, else HELLO's `mode`.
fn se_redis_server_type(hello: &str, info: &str) -> String {
    if let Some(line) = info.lines().find(|l| l.starts_with("redis_mode:")) {
        return line.trim_start_matches("redis_mode:").trim().to_string();
    }
    hello_field(hello, "mode").unwrap_or_else(|| "standalone".into())
}

/// What StackExchange.Redis concludes, then an MGET across slots as it would
/// send it in standalone mode.
fn stackexchange_redis(port: u16) {
    let mut r = Raw::connect(port);
    let hello = r.call(&["HELLO", "3"]);
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert_eq!(r.call(&["CLIENT", "SETNAME", "se-app"]), "+OK\r\n");
    // +OK from Redis 7.2 on, 7.0's unknown subcommand before: the proxy answers
    // as its server would, and StackExchange.Redis ignores a failed SETINFO.
    for (field, value) in [("lib-name", "SE.Redis"), ("lib-ver", "2.8.0")] {
        let setinfo = r.call(&["CLIENT", "SETINFO", field, value]);
        assert!(
            setinfo == "+OK\r\n" || setinfo.starts_with("-ERR unknown subcommand 'SETINFO'"),
            "{setinfo}"
        );
    }
    let info = r.call(&["INFO"]);
    // Under Data Contributor INFO is refused: it reads HELLO's mode instead.
    assert!(info.starts_with("-NOPERM"), "{info}");
    let kind = se_redis_server_type(&hello, &info);
    assert_eq!(kind, "standalone");
    assert_eq!(r.call(&["ECHO", "tracer"]), "$6\r\ntracer\r\n");
    assert!(r.call(&["GET", "__Booksleeve_TieBreak"]).starts_with('_'));
    let mut sub = Raw::connect(port);
    assert!(sub.call(&["HELLO", "3"]).starts_with("%7"));
    let s = sub.call(&["SUBSCRIBE", "__Booksleeve_MasterChanged"]);
    assert!(s.contains("__Booksleeve_MasterChanged"), "{s}");
    // Standalone: it sends cross-slot MGET as it is, and the proxy answers.
    for k in ["se:a", "se:b", "se:c"] {
        assert_eq!(r.call(&["SET", k, k]), "+OK\r\n");
    }
    assert_eq!(
        r.call(&["MGET", "se:a", "se:b", "se:c"]),
        "*3\r\n$4\r\nse:a\r\n$4\r\nse:b\r\n$4\r\nse:c\r\n"
    );
    // The same conclusion from a policy that allows INFO (INFO and HELLO agree).
    let agree = "# Server\r\nredis_mode:standalone\r\n";
    assert_eq!(se_redis_server_type(&hello, agree), "standalone");
}

/// One node of Lettuce's partition table.
#[derive(Debug)]
struct LettuceNode {
    id: String,
    host: String,
    port: u16,
    flags: Vec<String>,
    slots: Vec<(u16, u16)>,
}

/// Lettuce's `ClusterPartitionParser`, as far as the conclusion needs.
fn lettuce_partitions(nodes: &str) -> Vec<LettuceNode> {
    nodes
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let addr = f[1].split('@').next().unwrap();
            let (host, port) = addr.rsplit_once(':').unwrap();
            LettuceNode {
                id: f[0].into(),
                host: host.into(),
                port: port.parse().unwrap(),
                flags: f[2].split(',').map(String::from).collect(),
                slots: f[8..]
                    .iter()
                    .map(|r| {
                        let (a, b) = r.split_once('-').unwrap_or((r, r));
                        (a.parse().unwrap(), b.parse().unwrap())
                    })
                    .collect(),
            }
        })
        .collect()
}

fn lettuce(port: u16) {
    let mut r = Raw::connect(port);
    assert!(r.call(&["HELLO", "3"]).starts_with("%7"));
    // What the server itself says: +OK from 7.2 on, Redis 7.0's unknown
    // subcommand before (the proxy answers as the server would). Lettuce goes on
    // either way: it ignores a failed CLIENT SETINFO.
    let setinfo = r.call(&["CLIENT", "SETINFO", "lib-name", "Lettuce"]);
    assert!(
        setinfo == "+OK\r\n" || setinfo.starts_with("-ERR unknown subcommand 'SETINFO'"),
        "{setinfo}"
    );
    let maint = r.call(&[
        "CLIENT",
        "MAINT_NOTIFICATIONS",
        "ON",
        "moving-endpoint-type",
        "external-ip",
    ]);
    // An error: Lettuce 7 in its default mode goes on without it.
    assert!(maint.starts_with("-ERR unknown subcommand"), "{maint}");
    let nodes = r.call(&["CLUSTER", "NODES"]);
    let body = nodes.split_once("txt:").map(|(_, b)| b).unwrap_or(&nodes);
    let parts = lettuce_partitions(body.trim_end_matches("\r\n"));
    assert_eq!(parts.len(), 1, "{parts:?}");
    let n = &parts[0];
    assert_eq!(n.id.len(), 40);
    assert!(n.flags.contains(&"myself".to_string()) && n.flags.contains(&"master".to_string()));
    assert_eq!(n.slots, vec![(0, 16383)]);
    assert_eq!((n.host.as_str(), n.port), ("127.0.0.1", port));
    // Contributor refuses INFO: Lettuce keeps the topology without client counts.
    let info = r.call(&["INFO", "clients"]);
    assert!(info.starts_with("-NOPERM"), "{info}");
    // Its node connection, where CLUSTER NODES says, serves every slot.
    let mut node = Raw::connect(n.port);
    assert!(node.call(&["HELLO", "3"]).starts_with("%7"));
    for k in ["lt:a", "lt:b", "lt:c", "{lt}d"] {
        assert_eq!(node.call(&["SET", k, "1"]), "+OK\r\n");
        assert_eq!(node.call(&["GET", k]), "$1\r\n1\r\n");
    }
}

#[test]
fn stackexchange_redis_and_lettuce_handshakes() {
    let single = RedisServer::start("proxyuser", "unused");
    let c = cluster::shared(Announce::Ip);
    for env in [
        as_contributor(static_env(&single, "x", "x")),
        as_contributor(proxy_env(c)),
    ] {
        let proxy = Proxy::start(&env);
        stackexchange_redis(proxy.port);
        lettuce(proxy.port);
    }
}
