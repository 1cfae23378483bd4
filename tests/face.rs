//! The cluster face: what cluster-aware clients see of the proxy (one node
//! owning every slot at the address they connected to), compared with a real
//! redis-server in cluster mode (one node owning every slot: the twin), in
//! front of a single TLS redis-server and in front of the six-node TLS
//! cluster.

mod common;

use common::cluster::{self, proxy_env, Announce};
use common::proxy::{static_env, Proxy, Raw};
use common::redis::{PlainRedis, RedisServer};
use std::time::{Duration, Instant};

/// A cluster-mode redis-server owning all 16384 slots, for comparison.
fn twin() -> PlainRedis {
    let t = PlainRedis::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    let mut r = Raw::connect(t.port);
    assert_eq!(
        r.call(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]),
        "+OK\r\n"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !r.call(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        assert!(Instant::now() < deadline, "twin cluster not ok");
        std::thread::sleep(Duration::from_millis(50));
    }
    t
}

/// The commands whose replies must be the twin's, byte for byte.
const SAME: &[&[&str]] = &[
    &["CLUSTER"],
    &["cluster", "slots", "x"],
    &["CLUSTER", "SHARDS", "x"],
    &["CLUSTER", "NODES", "x"],
    &["CLUSTER", "INFO", "x"],
    &["CLUSTER", "MYID", "x"],
    &["CLUSTER", "KEYSLOT"],
    &["CLUSTER", "KEYSLOT", "a", "b"],
    &["CLUSTER", "KEYSLOT", "{user1000}.following"],
    &["cluster", "keyslot", "somekey"],
    &["CLUSTER", "COUNTKEYSINSLOT"],
    &["CLUSTER", "COUNTKEYSINSLOT", "x"],
    &["CLUSTER", "COUNTKEYSINSLOT", "16384"],
    &["CLUSTER", "COUNTKEYSINSLOT", "-1"],
    &["CLUSTER", "GETKEYSINSLOT", "5"],
    &["CLUSTER", "GETKEYSINSLOT", "5", "x"],
    &["CLUSTER", "GETKEYSINSLOT", "5", "-1"],
    &["CLUSTER", "GETKEYSINSLOT", "16384", "1"],
    &["CLUSTER", "FOO"],
    &["READONLY"],
    &["READWRITE"],
    &["ASKING"],
    &["READONLY", "x"],
    &["readwrite", "x"],
    &["ASKING", "x"],
    &["GET", "face-k"],
];

fn same_as_twin(proxy_port: u16, twin_port: u16) {
    let mut p = Raw::connect(proxy_port);
    let mut t = Raw::connect(twin_port);
    for cmd in SAME {
        assert_eq!(p.call(cmd), t.call(cmd), "{cmd:?}");
    }
}

/// The one node as the proxy shows it to a client on `port` of `host`.
fn check_one_node(call: &mut dyn FnMut(&[&str]) -> String, host: &str, port: u16) {
    let id = call(&["CLUSTER", "MYID"]);
    assert!(id.starts_with("$40\r\n"), "{id}");
    let id = id[5..45].to_string();
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(
        call(&["CLUSTER", "SLOTS"]),
        format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*4\r\n${}\r\n{host}\r\n:{port}\r\n$40\r\n{id}\r\n*0\r\n",
            host.len()
        )
    );
    let nodes = call(&["CLUSTER", "NODES"]);
    assert!(
        nodes.contains(&format!(
            "{id} {host}:{port}@0 myself,master - 0 0 1 connected 0-16383\n"
        )),
        "{nodes}"
    );
    let shards = call(&["CLUSTER", "SHARDS"]);
    for part in [&id, host, "master", "online"] {
        assert!(shards.contains(part), "{part}: {shards}");
    }
    let info = call(&["CLUSTER", "INFO"]);
    for line in [
        "cluster_state:ok",
        "cluster_slots_assigned:16384",
        "cluster_known_nodes:1",
        "cluster_size:1",
    ] {
        assert!(info.contains(&format!("{line}\r\n")), "{line}: {info}");
    }
}

#[test]
fn single_server_face_matches_a_cluster_mode_redis() {
    let redis = RedisServer::start("proxyuser", "tok");
    let proxy = Proxy::start(&static_env(&redis, "proxyuser", "tok"));
    let t = twin();
    same_as_twin(proxy.port, t.port);
    let mut r = Raw::connect(proxy.port);
    check_one_node(&mut |a| r.call(a), "127.0.0.1", proxy.port);
    // The same id for every client, and for the next proxy of this cache.
    let id = r.call(&["CLUSTER", "MYID"]);
    assert_eq!(Raw::connect(proxy.port).call(&["CLUSTER", "MYID"]), id);
    let again = Proxy::start(&static_env(&redis, "proxyuser", "tok"));
    assert_eq!(Raw::connect(again.port).call(&["CLUSTER", "MYID"]), id);
    // A single endpoint keeps no slot index: an honest refusal.
    assert!(r
        .call(&["CLUSTER", "COUNTKEYSINSLOT", "5"])
        .starts_with("-ERR the cache behind redis-entra-proxy is not a cluster"));
    assert!(r
        .call(&["CLUSTER", "MEET", "1.2.3.4", "5"])
        .starts_with("-ERR CLUSTER MEET is not supported through redis-entra-proxy"));
    // Inside MULTI: queued, answered in EXEC's array.
    assert_eq!(r.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(r.call(&["CLUSTER", "KEYSLOT", "foo"]), "+QUEUED\r\n");
    assert_eq!(r.call(&["SET", "face-m", "1"]), "+QUEUED\r\n");
    assert_eq!(r.call(&["EXEC"]), "*2\r\n:12182\r\n+OK\r\n");
}

/// One command on any stream, its whole reply.
fn call_on<S: std::io::Read + std::io::Write>(s: &mut S, args: &[&str]) -> String {
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    s.write_all(&redis_entra_proxy::resp::command(&refs))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut scanner = redis_entra_proxy::resp::scan::ReplyScanner::new();
        if let Some(r) = scanner.scan(&buf).unwrap() {
            return String::from_utf8_lossy(&buf[..r.len]).into_owned();
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn face_answers_at_the_address_the_client_used() {
    let redis = RedisServer::start("proxyuser", "tok");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let mut env = static_env(&redis, "proxyuser", "tok");
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__UNIX_SOCKET".into(),
        sock.display().to_string(),
    ));
    let proxy = Proxy::start_on(&env, "localhost");
    // IPv6: the node is ::1 (as Redis announces it, no brackets).
    let mut s = std::net::TcpStream::connect(("::1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    check_one_node(&mut |a| call_on(&mut s, a), "::1", proxy.port);
    // IPv4 on the same proxy: 127.0.0.1.
    let mut r = Raw::connect(proxy.port);
    check_one_node(&mut |a| r.call(a), "127.0.0.1", proxy.port);
    // A Unix-socket client: the first TCP listener, where a cluster client
    // can open its node connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut u = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(u) => break u,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    u.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let slots = call_on(&mut u, &["CLUSTER", "SLOTS"]);
    assert!(slots.contains(&format!(":{}\r\n", proxy.port)), "{slots}");
}

#[test]
fn face_off_forwards_as_before() {
    let redis = RedisServer::start("proxyuser", "tok");
    let mut env = static_env(&redis, "proxyuser", "tok");
    env.push((
        "REDIS_ENTRA_PROXY_LISTEN__CLUSTER_FACE".into(),
        "false".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut r = Raw::connect(proxy.port);
    assert_eq!(
        r.call(&["CLUSTER", "SLOTS"]),
        "-ERR This instance has cluster support disabled\r\n"
    );
    assert_eq!(
        r.call(&["READONLY"]),
        "-ERR This instance has cluster support disabled\r\n"
    );
}

#[test]
fn cluster_face_in_front_of_the_cluster() {
    let c = cluster::shared(Announce::Ip);
    let proxy = Proxy::start(&proxy_env(c));
    let t = twin();
    let mut r = Raw::connect(proxy.port);
    // Keys in one slot of some shard, counted and listed by its owner.
    let keys = ["{face}a", "{face}b", "{face}c"];
    for k in keys {
        assert_eq!(r.call(&["SET", k, "1"]), "+OK\r\n");
        Raw::connect(t.port).call(&["SET", k, "1"]);
    }
    let slot = r.call(&["CLUSTER", "KEYSLOT", "{face}"]);
    let slot = slot.trim_start_matches(':').trim().to_string();
    assert_eq!(r.call(&["CLUSTER", "COUNTKEYSINSLOT", &slot]), ":3\r\n");
    let mut twin = Raw::connect(t.port);
    assert_eq!(
        common::cluster_load::sorted_array(&r.call(&["CLUSTER", "GETKEYSINSLOT", &slot, "10"])),
        common::cluster_load::sorted_array(&twin.call(&["CLUSTER", "GETKEYSINSLOT", &slot, "10"]))
    );
    same_as_twin(proxy.port, t.port);
    check_one_node(&mut |a| r.call(a), "127.0.0.1", proxy.port);
    for k in keys {
        assert_eq!(r.call(&["DEL", k]), ":1\r\n");
    }
}

/// StackExchange.Redis decides cluster or not from INFO's `redis_mode` or
/// HELLO's `mode`: both say standalone, so it leaves cross-slot commands to
/// the proxy (which splits them) instead of refusing them itself.
#[test]
fn info_and_hello_agree_in_front_of_the_cluster() {
    let c = cluster::shared(Announce::Ip);
    let proxy = Proxy::start(&proxy_env(c));
    let mut r = Raw::connect(proxy.port);
    let hello = r.call(&["HELLO", "3"]);
    assert!(
        hello.contains("$4\r\nmode\r\n$10\r\nstandalone\r\n"),
        "{hello}"
    );
    let info = r.call(&["INFO"]);
    assert!(info.contains("redis_mode:standalone\r\n"), "{info}");
    assert!(info.contains("cluster_enabled:0\r\n"), "{info}");
    let info = r.call(&["INFO", "cluster"]);
    assert!(info.contains("cluster_enabled:0\r\n"), "{info}");
    // RESP2 too, and inside a pinned client's state (a database... only 0
    // exists on a cluster: a client mode instead).
    let mut r2 = Raw::connect(proxy.port);
    assert_eq!(r2.call(&["CLIENT", "NO-EVICT", "on"]), "+OK\r\n");
    let info = r2.call(&["INFO", "server"]);
    assert!(info.contains("redis_mode:standalone\r\n"), "{info}");
}

/// RESP3 clients in their default mode (redis-py 7, go-redis 9.16, Lettuce 7,
/// node-redis 5.9) send `CLIENT MAINT_NOTIFICATIONS ON ...` after HELLO 3 and
/// turn the feature off on an error. The proxy answers that error itself:
/// the command never reaches a connection other clients share.
#[test]
fn maint_notifications_are_refused_by_the_proxy() {
    let redis = RedisServer::start("proxyuser", "tok");
    let proxy = Proxy::start(&static_env(&redis, "proxyuser", "tok"));
    let mut r = Raw::connect(proxy.port);
    assert!(r.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert_eq!(r.call(&["SET", "face-mn", "1"]), "+OK\r\n");
    redis.cli(&["CONFIG", "RESETSTAT"]);
    for args in [
        &[
            "CLIENT",
            "MAINT_NOTIFICATIONS",
            "ON",
            "moving-endpoint-type",
            "internal-fqdn",
        ][..],
        &["client", "maint_notifications", "on"],
        &["CLIENT", "MAINT_NOTIFICATIONS", "OFF"],
    ] {
        assert_eq!(
            r.call(args),
            format!(
                "-ERR unknown subcommand '{}'. Try CLIENT HELP.\r\n",
                args[1]
            )
        );
    }
    assert_eq!(r.call(&["GET", "face-mn"]), "$1\r\n1\r\n");
    // Nothing of it reached the server.
    let errors = redis.cli(&["INFO", "errorstats"]);
    assert!(!errors.contains("errorstat_ERR"), "{errors}");
    let stats = redis.cli(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_get:calls=1"), "{stats}");
}

/// Redis refuses a command with the wrong number of arguments or an unknown
/// subcommand before anything else: before MULTI queues it (EXEC then
/// aborts) and before RESP2 subscribed mode's own refusal. So does the
/// proxy for the commands it answers as itself.
#[test]
fn face_commands_are_judged_first_as_redis_judges_them() {
    let redis = RedisServer::start("proxyuser", "tok");
    let proxy = Proxy::start(&static_env(&redis, "proxyuser", "tok"));
    let t = twin();
    let mut p = Raw::connect(proxy.port);
    let mut r = Raw::connect(t.port);
    let steps: &[&[&str]] = &[
        &["MULTI"],
        &["CLUSTER", "SLOTS", "x"],
        &["SET", "face-j", "1"],
        &["EXEC"],
        &["MULTI"],
        &["READONLY", "x"],
        &["CLUSTER", "NOSUCH"],
        &["CLUSTER", "MEET"],
        &["EXEC"],
        &["GET", "face-j"],
        &["SUBSCRIBE", "face-c"],
        &["CLUSTER"],
        &["CLUSTER", "KEYSLOT"],
        &["ASKING", "x"],
        &["CLUSTER", "KEYSLOT", "k"],
        &["CLIENT", "MAINT_NOTIFICATIONS", "on"],
        &["PING"],
    ];
    for cmd in steps {
        assert_eq!(p.call(cmd), r.call(cmd), "{cmd:?}");
    }
}
