//! The pub/sub hub against a real TLS redis-server: many local subscribers of
//! a channel share one upstream subscription on one RESP3 connection; RESP2 and
//! RESP3 clients get their own protocol's frames, byte for byte what a direct
//! redis-server sends; subscriptions survive the hub's connection being killed;
//! a subscriber that does not read is cut off without holding up the others.

mod common;

use common::proxy::{enable_admin, http, metric_sum, read_to_close, static_env, Proxy, Raw};
use common::redis::{PlainRedis, RedisServer};
use std::io::Write;
use std::time::{Duration, Instant};

const USER: &str = "proxyuser";
const TOKEN: &str = "pubsub-token";

fn setup(extra: &[(&str, &str)]) -> (RedisServer, Proxy, u16) {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    let admin = enable_admin(&mut env);
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    let proxy = Proxy::start(&env);
    (redis, proxy, admin)
}

/// Sum of the samples of a metric whose line starts with `prefix`.
fn metric(admin: u16, prefix: &str) -> f64 {
    metric_sum(&http(admin, "GET", "/metrics").1, prefix)
}

/// Subscribers of `chan` as the server counts them.
fn numsub(redis: &RedisServer, chan: &str) -> u32 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", chan]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(chan), "{out}");
    lines
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect(&out)
}

/// The proxy's upstream connections in pub/sub mode (`flags=P`).
fn pubsub_conns(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(&format!(" user={USER} ")))
        .filter(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .is_some_and(|f| f.contains('P'))
        })
        .map(str::to_string)
        .collect()
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(name).and_then(|f| f.strip_prefix('=')))
        .unwrap_or("")
}

/// Wait (bounded) until `f` holds.
fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn message(chan: &str, payload: &str) -> String {
    format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{chan}\r\n${}\r\n{payload}\r\n",
        chan.len(),
        payload.len()
    )
}

#[test]
fn fifty_subscribers_share_one_upstream_subscription_and_get_every_message_in_order() {
    let (redis, proxy, admin) = setup(&[]);
    let mut subs: Vec<Raw> = (0..50).map(|_| Raw::connect(proxy.port)).collect();
    for s in subs.iter_mut() {
        assert_eq!(
            s.call(&["SUBSCRIBE", "news"]),
            "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        );
    }
    // One subscription, on one upstream connection, for fifty clients.
    assert_eq!(numsub(&redis, "news"), 1);
    let conns = pubsub_conns(&redis);
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(field(&conns[0], "sub"), "1", "{}", conns[0]);
    assert_eq!(field(&conns[0], "resp"), "3", "{}", conns[0]);
    assert_eq!(metric(admin, "redis_entra_proxy_pubsub_channels "), 1.0);
    assert_eq!(
        metric(
            admin,
            "redis_entra_proxy_upstream_connections{kind=\"pubsub\",state=\"up\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(admin, "redis_entra_proxy_commands_total{route=\"pubsub\"}"),
        50.0
    );

    const N: usize = 200;
    let mut publisher = Raw::connect(proxy.port);
    for i in 0..N {
        // The server sees one receiver, the hub; the client is told 50,
        // as one Redis would count them.
        assert_eq!(
            publisher.call(&["PUBLISH", "news", &format!("msg-{i}")]),
            ":50\r\n"
        );
    }
    for (k, s) in subs.iter_mut().enumerate() {
        for i in 0..N {
            assert_eq!(
                String::from_utf8_lossy(&s.read()),
                message("news", &format!("msg-{i}")),
                "subscriber {k}, message {i}"
            );
        }
    }

    // Half leave by disconnecting, all but one of the rest by UNSUBSCRIBE: the
    // upstream subscription stays while anyone is left.
    subs.truncate(25);
    for s in subs.iter_mut().take(24) {
        assert_eq!(
            s.call(&["UNSUBSCRIBE", "news"]),
            "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(numsub(&redis, "news"), 1);
    assert_eq!(publisher.call(&["PUBLISH", "news", "last"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&subs[24].read()),
        message("news", "last")
    );
    // The unsubscribed ones got nothing more and are back in normal mode.
    assert_eq!(subs[0].call(&["PING"]), "+PONG\r\n");
    // The last one leaving takes the upstream subscription with it.
    assert_eq!(
        subs[24].call(&["UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
    );
    eventually("no upstream subscriber of news", 5, || {
        numsub(&redis, "news") == 0
    });
    eventually("pubsub_channels back to 0", 5, || {
        metric(admin, "redis_entra_proxy_pubsub_channels ") == 0.0
    });
    assert_eq!(publisher.call(&["PUBLISH", "news", "nobody"]), ":0\r\n");
}

#[test]
fn resp2_and_resp3_subscribers_get_their_own_frames_between_whole_replies() {
    let (_redis, proxy, _admin) = setup(&[]);
    let mut r2 = Raw::connect(proxy.port);
    let mut r3 = Raw::connect(proxy.port);
    assert!(r3.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert_eq!(
        r2.call(&["SUBSCRIBE", "mix"]),
        "*3\r\n$9\r\nsubscribe\r\n$3\r\nmix\r\n:1\r\n"
    );
    assert_eq!(
        r2.call(&["PSUBSCRIBE", "mi*"]),
        "*3\r\n$10\r\npsubscribe\r\n$3\r\nmi*\r\n:2\r\n"
    );
    assert_eq!(
        r3.call(&["SUBSCRIBE", "mix"]),
        ">3\r\n$9\r\nsubscribe\r\n$3\r\nmix\r\n:1\r\n"
    );
    assert_eq!(
        r3.call(&["PSUBSCRIBE", "mi*"]),
        ">3\r\n$10\r\npsubscribe\r\n$3\r\nmi*\r\n:2\r\n"
    );
    const M: usize = 150;
    let mut setter = Raw::connect(proxy.port);
    for i in 0..M {
        assert_eq!(
            setter.call(&["SET", &format!("k{i}"), &format!("value-{i}")]),
            "+OK\r\n"
        );
    }
    // The RESP3 subscriber pipelines GETs while messages are being published.
    let port = proxy.port;
    let publisher = std::thread::spawn(move || {
        let mut p = Raw::connect(port);
        for j in 0..M {
            // Two clients, each by channel and by pattern: four receivers,
            // as one Redis counts them (upstream: the hub's two).
            assert_eq!(p.call(&["PUBLISH", "mix", &format!("m{j}")]), ":4\r\n");
        }
    });
    for i in 0..M {
        r3.send(&["GET", &format!("k{i}")]);
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    publisher.join().unwrap();
    // Every frame whole; replies in order; pushes in order; nothing else.
    let (mut replies, mut pushes) = (0usize, 0usize);
    while replies < M || pushes < 2 * M {
        let f = String::from_utf8_lossy(&r3.read()).into_owned();
        if f.starts_with('>') {
            let j = pushes / 2;
            let want = if pushes % 2 == 0 {
                format!(
                    ">3\r\n$7\r\nmessage\r\n$3\r\nmix\r\n${}\r\nm{j}\r\n",
                    1 + j.to_string().len()
                )
            } else {
                format!(
                    ">4\r\n$8\r\npmessage\r\n$3\r\nmi*\r\n$3\r\nmix\r\n${}\r\nm{j}\r\n",
                    1 + j.to_string().len()
                )
            };
            assert_eq!(f, want, "push {pushes}");
            pushes += 1;
        } else {
            let v = format!("value-{replies}");
            assert_eq!(f, format!("${}\r\n{v}\r\n", v.len()), "reply {replies}");
            replies += 1;
        }
    }
    assert_eq!((replies, pushes), (M, 2 * M));
    // The RESP2 subscriber got the same messages as arrays.
    for j in 0..M {
        let p = format!("m{j}");
        assert_eq!(String::from_utf8_lossy(&r2.read()), message("mix", &p));
        assert_eq!(
            String::from_utf8_lossy(&r2.read()),
            format!(
                "*4\r\n$8\r\npmessage\r\n$3\r\nmi*\r\n$3\r\nmix\r\n${}\r\n{p}\r\n",
                p.len()
            )
        );
    }
    assert_eq!(r3.call(&["PING"]), "+PONG\r\n");
    assert_eq!(r2.call(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
}

/// Send all of `cmds` in one write and read until the reply to the final
/// `ECHO end-of-sequence`.
fn pipelined(port: u16, hello3: bool, cmds: &[Vec<&str>]) -> String {
    let mut c = Raw::connect(port);
    if hello3 {
        // Not compared: the proxy answers HELLO with its own client id.
        let h = c.call(&["HELLO", "3"]);
        assert!(h.starts_with('%'), "{h}");
    }
    let mut all = Vec::new();
    for cmd in cmds {
        let refs: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
        all.extend_from_slice(&redis_entra_proxy::resp::command(&refs));
    }
    all.extend_from_slice(&redis_entra_proxy::resp::command(&[
        b"ECHO",
        b"end-of-sequence",
    ]));
    c.s.write_all(&all).unwrap();
    let end = "$15\r\nend-of-sequence\r\n";
    let mut out = String::new();
    for _ in 0..1000 {
        out.push_str(&String::from_utf8_lossy(&c.read()));
        if out.ends_with(end) {
            return out;
        }
    }
    panic!("no end marker: {out}");
}

#[test]
fn confirmation_frames_equal_a_direct_redis_server_byte_for_byte() {
    let (_redis, proxy, _admin) = setup(&[]);
    let direct = PlainRedis::start();
    let many: Vec<String> = (1..=10).map(|i| format!("c{i}")).collect();
    let mut sub_many = vec!["SUBSCRIBE"];
    sub_many.extend(many.iter().map(String::as_str));
    let mut unsub_most = vec!["UNSUBSCRIBE", "a", "b", "c"];
    unsub_most.extend(many.iter().take(9).map(String::as_str));
    let seq: Vec<Vec<&str>> = vec![
        vec!["UNSUBSCRIBE"],
        vec!["PUNSUBSCRIBE"],
        vec!["SUNSUBSCRIBE"],
        vec!["UNSUBSCRIBE", "x", "y"],
        vec!["SUBSCRIBE", "a", "b", "a"],
        vec!["PSUBSCRIBE", "p*", "q*"],
        vec!["SSUBSCRIBE", "s1", "s2"],
        vec!["SUBSCRIBE", "c"],
        vec!["PING"],
        vec!["PING", "hi"],
        vec!["GET", "x"],
        vec!["UNSUBSCRIBE", "zz"],
        vec!["PUNSUBSCRIBE", "q*"],
        vec!["SUNSUBSCRIBE", "s1"],
        sub_many,
        vec!["PUNSUBSCRIBE"],
        unsub_most,
        // Only c10 left: the no-argument form has one frame, in any server.
        vec!["UNSUBSCRIBE"],
        vec!["PUNSUBSCRIBE"],
        vec!["SUNSUBSCRIBE"],
        vec!["SUNSUBSCRIBE"],
        vec!["SUBSCRIBE"],
        vec!["PSUBSCRIBE", "r*"],
        vec!["SSUBSCRIBE", "s3"],
        vec!["RESET"],
        vec!["UNSUBSCRIBE", "r*"],
    ];
    for hello3 in [false, true] {
        let want = pipelined(direct.port, hello3, &seq);
        let got = pipelined(proxy.port, hello3, &seq);
        assert_eq!(got, want, "RESP{}", if hello3 { 3 } else { 2 });
        // And one command at a time gives the same bytes.
        let mut a = Raw::connect(direct.port);
        let mut b = Raw::connect(proxy.port);
        if hello3 {
            a.call(&["HELLO", "3"]);
            b.call(&["HELLO", "3"]);
        }
        for cmd in &seq {
            let refs: Vec<&[u8]> = cmd.iter().map(|x| x.as_bytes()).collect();
            let bytes = redis_entra_proxy::resp::command(&refs);
            a.s.write_all(&bytes).unwrap();
            b.s.write_all(&bytes).unwrap();
            a.send(&["ECHO", "next"]);
            b.send(&["ECHO", "next"]);
            let (mut x, mut y) = (String::new(), String::new());
            while !x.ends_with("$4\r\nnext\r\n")
                && !x.ends_with("*2\r\n$4\r\npong\r\n$4\r\nnext\r\n")
                && !x.contains("-ERR Can't execute 'echo'")
            {
                x.push_str(&String::from_utf8_lossy(&a.read()));
            }
            while y.len() < x.len() {
                y.push_str(&String::from_utf8_lossy(&b.read()));
            }
            assert_eq!(y, x, "{cmd:?} RESP{}", if hello3 { 3 } else { 2 });
        }
    }
    // Sanity: the sequence exercised both subscribed-mode refusals and frames.
    let r2 = pipelined(direct.port, false, &seq);
    assert!(r2.contains("only (P|S)SUBSCRIBE"), "{r2}");
    assert!(
        r2.contains("*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"),
        "{r2}"
    );
}

#[test]
fn killing_the_hub_connection_resubscribes_and_keeps_clients() {
    let (redis, proxy, admin) = setup(&[]);
    let mut r2 = Raw::connect(proxy.port);
    let mut r3 = Raw::connect(proxy.port);
    assert!(r3.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert!(r2.call(&["SUBSCRIBE", "k1"]).ends_with(":1\r\n"));
    assert!(r2.call(&["PSUBSCRIBE", "k*"]).ends_with(":2\r\n"));
    assert!(r3.call(&["SSUBSCRIBE", "ks"]).ends_with(":1\r\n"));
    let before = pubsub_conns(&redis);
    assert_eq!(before.len(), 1, "{before:?}");
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "1", "{killed}");
    // The hub reconnects and makes every subscription again.
    eventually("k1 subscribed again", 10, || numsub(&redis, "k1") == 1);
    eventually("k* and ks subscribed again", 10, || {
        redis.cli(&["PUBSUB", "NUMPAT"]).trim() == "1"
            && redis.cli(&["PUBSUB", "SHARDNUMSUB", "ks"]).lines().nth(1) == Some("1")
    });
    let after = pubsub_conns(&redis);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(field(&after[0], "id"), field(&before[0], "id"));
    assert_eq!(
        (
            field(&after[0], "sub"),
            field(&after[0], "psub"),
            field(&after[0], "ssub")
        ),
        ("1", "1", "1"),
        "{}",
        after[0]
    );
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.call(&["PUBLISH", "k1", "after-kill"]), ":2\r\n");
    assert_eq!(p.call(&["SPUBLISH", "ks", "shard-after"]), ":1\r\n");
    // The clients were never closed and get what was published afterwards.
    assert_eq!(
        String::from_utf8_lossy(&r2.read()),
        message("k1", "after-kill")
    );
    assert_eq!(
        String::from_utf8_lossy(&r2.read()),
        "*4\r\n$8\r\npmessage\r\n$2\r\nk*\r\n$2\r\nk1\r\n$10\r\nafter-kill\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&r3.read()),
        ">3\r\n$8\r\nsmessage\r\n$2\r\nks\r\n$11\r\nshard-after\r\n"
    );
    assert_eq!(r2.call(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_eq!(r3.call(&["PING"]), "+PONG\r\n");
    assert!(metric(admin, "redis_entra_proxy_upstream_reconnects_total") >= 1.0);
    assert_eq!(metric(admin, "redis_entra_proxy_pubsub_channels "), 3.0);
}

#[test]
fn a_subscription_the_server_refuses_gets_its_error_and_the_hub_carries_on() {
    let (redis, proxy, _admin) = setup(&[]);
    // The identity may use `allowed:*` channels only.
    let out = redis.cli(&["ACL", "SETUSER", USER, "resetchannels", "&allowed:*"]);
    assert_eq!(out.trim(), "OK", "{out}");
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    assert!(b.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert_eq!(
        a.call(&["SUBSCRIBE", "allowed:1"]),
        "*3\r\n$9\r\nsubscribe\r\n$9\r\nallowed:1\r\n:1\r\n"
    );
    // Refused as a whole, as Redis does: no confirmation for allowed:2 either.
    let refused = a.call(&["SUBSCRIBE", "allowed:2", "secret"]);
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    assert_eq!(numsub(&redis, "allowed:2"), 0);
    let refused = b.call(&["PSUBSCRIBE", "*"]);
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    // The client and the hub's connection carry on.
    assert_eq!(b.call(&["SET", "after", "1"]), "+OK\r\n");
    assert_eq!(
        b.call(&["SUBSCRIBE", "allowed:3"]),
        ">3\r\n$9\r\nsubscribe\r\n$9\r\nallowed:3\r\n:1\r\n"
    );
    assert_eq!(
        a.call(&["UNSUBSCRIBE", "allowed:2"]),
        "*3\r\n$11\r\nunsubscribe\r\n$9\r\nallowed:2\r\n:1\r\n"
    );
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.call(&["PUBLISH", "allowed:1", "x"]), ":1\r\n");
    assert_eq!(p.call(&["PUBLISH", "allowed:3", "y"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&a.read()),
        message("allowed:1", "x")
    );
    assert_eq!(
        String::from_utf8_lossy(&b.read()),
        ">3\r\n$7\r\nmessage\r\n$9\r\nallowed:3\r\n$1\r\ny\r\n"
    );
    assert_eq!(pubsub_conns(&redis).len(), 1);
    let log = proxy.log_text();
    assert!(
        log.contains("upstream refused a pub/sub subscription"),
        "{log}"
    );
    assert!(!log.contains("pub/sub hub connection failed"), "{log}");
}

#[test]
fn a_subscriber_that_does_not_read_is_disconnected_and_the_others_get_everything() {
    let (redis, proxy, admin) = setup(&[(
        "REDIS_ENTRA_PROXY_LIMITS__MAX_PUBSUB_QUEUED_BYTES",
        "1048576",
    )]);
    let mut slow = Raw::connect(proxy.port);
    assert!(slow.call(&["SUBSCRIBE", "firehose"]).ends_with(":1\r\n"));
    // Another that also sends commands it never reads the replies of: answered
    // by the proxy one by one, they fill its session's reply queue, so the
    // session stops reading it and waits on the client.
    let mut slow3 = Raw::connect(proxy.port);
    assert!(slow3.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert!(slow3.call(&["SUBSCRIBE", "firehose"]).ends_with(":1\r\n"));
    let mut w = slow3.s.try_clone().unwrap();
    std::thread::spawn(move || {
        let cmd = redis_entra_proxy::resp::command(&[b"CLIENT", b"GETNAME"]);
        let batch: Vec<u8> = (0..1000).flat_map(|_| cmd.to_vec()).collect();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until && w.write_all(&batch).is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut fast = Raw::connect(proxy.port);
    assert!(fast.call(&["SUBSCRIBE", "firehose"]).ends_with(":1\r\n"));
    // 600 messages of 64 KB (38 MB): far more than the socket buffers of the
    // slow client's connection and its 1 MB queue can hold.
    const N: usize = 600;
    let payload = "z".repeat(64 * 1024);
    // The fast one reads as it goes; the publisher stays at most 8 messages
    // (512 KB) ahead of it, so only the slow ones can reach the cap.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let read_so_far = progress.clone();
    let reader = std::thread::spawn(move || {
        for i in 0..N {
            let m = fast.read();
            read_so_far.store(i + 1, std::sync::atomic::Ordering::Release);
            let tail = format!("{i:05}\r\n");
            assert!(m.ends_with(tail.as_bytes()), "message {i} out of order");
            assert_eq!(m.len(), 64 * 1024 + 5 + 41, "message {i}");
        }
        fast
    });
    let mut p = Raw::connect(proxy.port);
    for i in 0..N {
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress.load(std::sync::atomic::Ordering::Acquire) + 8 < i {
            assert!(
                Instant::now() < deadline,
                "the fast subscriber stalled at {i}"
            );
            assert!(!reader.is_finished(), "the fast subscriber failed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = p.call(&["PUBLISH", "firehose", &format!("{payload}{i:05}")]);
        // Three subscribers until the slow ones are cut off.
        assert!(
            [":3\r\n", ":2\r\n", ":1\r\n"].contains(&&r[..]),
            "publish {i}: {r}"
        );
    }
    let mut fast = reader
        .join()
        .expect("the fast subscriber got every message in order");
    // Both slow ones are closed by the proxy before anyone reads them (reading
    // would unblock a stuck session by itself): only `fast` and `p` are left.
    eventually("both slow subscribers closed", 15, || {
        metric(admin, "redis_entra_proxy_client_connections ") == 2.0
    });
    // The slow one is cut off: what was in flight drains, then the proxy closed it.
    slow.s
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = Instant::now();
    let rest = read_to_close(&mut slow.s);
    assert!(t.elapsed() < Duration::from_secs(25), "not closed");
    assert!(rest.len() < N * 64 * 1024, "{} bytes", rest.len());
    slow3
        .s
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = Instant::now();
    let rest = read_to_close(&mut slow3.s);
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "RESP3 one not closed"
    );
    assert!(rest.len() < N * 64 * 1024, "{} bytes", rest.len());
    let log = proxy.log_text();
    assert_eq!(
        log.matches("closing a pub/sub subscriber that does not read its messages")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        metric(admin, "redis_entra_proxy_errors_total{kind=\"limit\"}"),
        2.0
    );
    // The fast one is still subscribed, alone.
    assert_eq!(numsub(&redis, "firehose"), 1);
    assert_eq!(p.call(&["PUBLISH", "firehose", "tail"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&fast.read()),
        message("firehose", "tail")
    );
}

#[test]
fn redis_cli_subscribers_in_resp2_and_resp3_through_the_proxy() {
    use std::io::BufRead;
    let (redis, proxy, _admin) = setup(&[]);
    let port = proxy.port.to_string();
    let mut children = Vec::new();
    let mut lines = Vec::new();
    for proto in ["-2", "-3"] {
        let mut child = std::process::Command::new("redis-cli")
            .args([proto, "-p", &port, "SUBSCRIBE", "cli-news"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run redis-cli");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        children.push(child);
        lines.push(rx);
    }
    let next = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a line from redis-cli")
    };
    for rx in &lines {
        assert_eq!(
            [next(rx), next(rx), next(rx)],
            ["subscribe", "cli-news", "1"]
        );
    }
    assert_eq!(numsub(&redis, "cli-news"), 1);
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.call(&["PUBLISH", "cli-news", "hello cli"]), ":2\r\n");
    for rx in &lines {
        assert_eq!(
            [next(rx), next(rx), next(rx)],
            ["message", "cli-news", "hello cli"]
        );
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    eventually("the hub lets cli-news go", 5, || {
        numsub(&redis, "cli-news") == 0
    });
}
