use super::*;

fn face() -> Face {
    Face::new(true, "cache.example:10000", None)
}

fn me4() -> Option<SocketAddr> {
    Some("127.0.0.1:6379".parse().unwrap())
}

fn reply(args: &[&str], me: Option<SocketAddr>, proto: Proto) -> String {
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    match answer(&face(), &refs, me, proto) {
        Answer::Reply(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => format!("{other:?}"),
    }
}

#[test]
fn node_id_is_stable_40_hex() {
    let a = node_id("cache.example:10000");
    assert_eq!(a.len(), 40);
    assert!(a
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(a, node_id("cache.example:10000"));
    assert_ne!(a, node_id("other.example:10000"));
}

#[test]
fn claims_what_the_face_answers() {
    let on = |a: &[&[u8]]| claims(true, a);
    let off = |a: &[&[u8]]| claims(false, a);
    assert!(on(&[b"cluster", b"slots"]) && on(&[b"READONLY"]) && on(&[b"asking"]));
    assert!(!off(&[b"CLUSTER", b"SLOTS"]) && !off(&[b"READWRITE"]));
    // INFO whatever the setting: it agrees with HELLO.
    assert!(off(&[b"info"]) && on(&[b"INFO", b"server"]));
    // MAINT_NOTIFICATIONS whatever the setting: never on a shared connection.
    assert!(off(&[b"CLIENT", b"maint_notifications", b"on"]));
    assert!(!on(&[b"CLIENT", b"ID"]) && !on(&[b"GET", b"k"]) && !on(&[]));
}

#[test]
fn slots_shards_nodes_show_one_node_at_the_clients_address() {
    let id = face().id;
    assert_eq!(
        reply(&["CLUSTER", "SLOTS"], me4(), Proto::Resp2),
        format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:6379\r\n$40\r\n{id}\r\n*0\r\n"
        )
    );
    let v6 = Some("[::1]:7000".parse().unwrap());
    assert_eq!(
        reply(&["cluster", "slots"], v6, Proto::Resp3),
        format!("*1\r\n*3\r\n:0\r\n:16383\r\n*4\r\n$3\r\n::1\r\n:7000\r\n$40\r\n{id}\r\n%0\r\n")
    );
    let nodes = reply(&["CLUSTER", "NODES"], v6, Proto::Resp2);
    assert!(
        nodes.ends_with(&format!(
            "{id} ::1:7000@0 myself,master - 0 0 1 connected 0-16383\n\r\n"
        )),
        "{nodes}"
    );
    // Both shapes decode, and the proxy's own parser reads the map back.
    for proto in [Proto::Resp2, Proto::Resp3] {
        let s = reply(&["CLUSTER", "SHARDS"], me4(), proto);
        let map = crate::upstream::topology::parse_shards(s.as_bytes(), "x", false).unwrap();
        assert_eq!(map.nodes.len(), 1);
        assert_eq!(map.owner(16383).unwrap().to_string(), "127.0.0.1:6379");
        let s = reply(&["CLUSTER", "SLOTS"], me4(), proto);
        let map = crate::upstream::topology::parse_slots(s.as_bytes(), "x").unwrap();
        assert_eq!(map.uncovered(), 0);
    }
    // A Unix-socket client of a proxy without TCP listener: a clear error.
    assert!(reply(&["CLUSTER", "SLOTS"], None, Proto::Resp2)
        .starts_with("-ERR redis-entra-proxy has no TCP listener"));
}

#[test]
fn answers_and_errors_in_redis_words() {
    let r = |a: &[&str]| reply(a, me4(), Proto::Resp2);
    assert_eq!(
        r(&["CLUSTER"]),
        "-ERR wrong number of arguments for 'cluster' command\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "SLOTS", "x"]),
        "-ERR wrong number of arguments for 'cluster|slots' command\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "keyslot"]),
        "-ERR wrong number of arguments for 'cluster|keyslot' command\r\n"
    );
    assert_eq!(r(&["CLUSTER", "KEYSLOT", "{a}b"]), ":15495\r\n");
    assert_eq!(r(&["CLUSTER", "KEYSLOT", "foo"]), ":12182\r\n");
    assert_eq!(r(&["CLUSTER", "MYID"]), format!("$40\r\n{}\r\n", face().id));
    assert_eq!(
        r(&["CLUSTER", "COUNTKEYSINSLOT", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "COUNTKEYSINSLOT", "16384"]),
        "-ERR Invalid slot\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "COUNTKEYSINSLOT", "-1"]),
        "-ERR Invalid slot\r\n"
    );
    assert_eq!(r(&["CLUSTER", "COUNTKEYSINSLOT", "5"]), "ToSlotOwner(5)");
    assert_eq!(
        r(&["CLUSTER", "GETKEYSINSLOT", "5"]),
        "-ERR wrong number of arguments for 'cluster|getkeysinslot' command\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "GETKEYSINSLOT", "5", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "GETKEYSINSLOT", "5", "-1"]),
        "-ERR Invalid slot or number of keys\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "GETKEYSINSLOT", "16384", "1"]),
        "-ERR Invalid slot or number of keys\r\n"
    );
    assert_eq!(
        r(&["CLUSTER", "GETKEYSINSLOT", "15495", "10"]),
        "ToSlotOwner(15495)"
    );
    assert_eq!(
        r(&["CLUSTER", "FOO"]),
        "-ERR unknown subcommand 'FOO'. Try CLUSTER HELP.\r\n"
    );
    assert!(r(&["CLUSTER", "meet", "1.2.3.4", "5"])
        .starts_with("-ERR CLUSTER MEET is not supported through redis-entra-proxy"));
    assert_eq!(r(&["READONLY"]), "+OK\r\n");
    assert_eq!(r(&["readwrite"]), "+OK\r\n");
    assert_eq!(r(&["ASKING"]), "+OK\r\n");
    assert_eq!(
        r(&["READONLY", "x"]),
        "-ERR wrong number of arguments for 'readonly' command\r\n"
    );
    assert_eq!(
        r(&["asking", "x"]),
        "-ERR wrong number of arguments for 'asking' command\r\n"
    );
    assert_eq!(
        r(&[
            "CLIENT",
            "maint_notifications",
            "on",
            "moving-endpoint-type",
            "internal-ip"
        ]),
        "-ERR unknown subcommand 'maint_notifications'. Try CLIENT HELP.\r\n"
    );
    let info = r(&["CLUSTER", "INFO"]);
    assert!(
        info.contains("cluster_state:ok\r\n") && info.contains("cluster_known_nodes:1\r\n"),
        "{info}"
    );
    assert_eq!(r(&["INFO"]), "Info");
}

#[test]
fn info_says_standalone_as_hello_does() {
    let text = "# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n# Cluster\r\ncluster_enabled:1\r\n";
    let rewritten = rewrite_info(resp::bulk(text.as_bytes()));
    let want = text
        .replace("redis_mode:cluster", "redis_mode:standalone")
        .replace("cluster_enabled:1", "cluster_enabled:0");
    assert_eq!(rewritten, resp::bulk(want.as_bytes()));
    let v = rewrite_info(resp::verbatim(Proto::Resp3, text.as_bytes()));
    assert_eq!(v, resp::verbatim(Proto::Resp3, want.as_bytes()));
    // Unchanged: standalone already, errors, other shapes, a truncated frame.
    for same in [
        resp::bulk(want.as_bytes()),
        resp::error("NOPERM this user has no permissions to run the 'info' command"),
        Bytes::from_static(b"$5\r\nab"),
        Bytes::from_static(b"$"),
        Bytes::new(),
    ] {
        assert_eq!(rewrite_info(same.clone()), same);
    }
    assert!(standalone_slot_reply(resp::error(
        "ERR This instance has cluster support disabled"
    ))
    .starts_with(b"-ERR the cache behind"));
    assert_eq!(standalone_slot_reply(resp::integer(3)), resp::integer(3));
}
