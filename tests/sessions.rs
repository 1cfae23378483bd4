//! A legacy app must not notice the proxy: transactions, blocking pops,
//! pub/sub, SELECT, RESP3 and client-side caching through shared and pinned
//! upstream connections, against a real TLS redis-server.

mod common;

use common::proxy::{enable_admin, http, static_env, Proxy, Raw};
use common::redis::RedisServer;
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "session-token";

fn setup() -> (RedisServer, Proxy) {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    (redis, proxy)
}

#[test]
fn transactions_with_watch_conflicts() {
    let (_redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    assert_eq!(a.call(&["SET", "balance", "10"]), "+OK\r\n");
    assert_eq!(a.call(&["WATCH", "balance"]), "+OK\r\n");
    assert_eq!(b.call(&["SET", "balance", "20"]), "+OK\r\n");
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["INCR", "balance"]), "+QUEUED\r\n");
    assert_eq!(
        a.call(&["EXEC"]),
        "*-1\r\n",
        "WATCH conflict must abort EXEC"
    );
    // Without a conflict the transaction runs.
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["INCR", "balance"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]), "*1\r\n:21\r\n");
    assert_eq!(a.call(&["EXEC"]), "-ERR EXEC without MULTI\r\n");
    // After the transaction the client is back on shared connections.
    assert_eq!(a.call(&["GET", "balance"]), "$2\r\n21\r\n");
}

#[test]
fn blpop_woken_by_another_client() {
    let (_redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    a.send(&["BLPOP", "queue", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.call(&["RPUSH", "queue", "job-1"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&a.read()),
        "*2\r\n$5\r\nqueue\r\n$5\r\njob-1\r\n"
    );
    // A timed-out BLPOP gives the client its own nil.
    assert_eq!(a.call(&["BLPOP", "empty", "0.2"]), "*-1\r\n");
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
}

/// A blocking wait longer than `upstream.reply_timeout` is the client's to ask
/// for: the proxy waits server-side in pieces shorter than the reply timeout
/// and re-issues, so neither a long BLPOP nor BLPOP 0 ends in a timeout error.
#[test]
fn blocking_waits_longer_than_the_reply_timeout() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    env.push((
        "REDIS_ENTRA_PROXY_UPSTREAM__REPLY_TIMEOUT".into(),
        "1500ms".into(),
    ));
    let proxy = Proxy::start(&env);
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    // Its own timeout (3 s, twice the reply timeout) ends in its own nil.
    assert_eq!(a.call(&["BLPOP", "empty", "3"]), "*-1\r\n");
    // Forever, woken after 3.5 s by another client.
    a.send(&["BLPOP", "queue", "0"]);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(b.call(&["RPUSH", "queue", "late"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&a.read()),
        "*2\r\n$5\r\nqueue\r\n$4\r\nlate\r\n"
    );
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
    assert!(
        !proxy.log_text().contains("timed out"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn select_is_per_client() {
    let (_redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    assert_eq!(a.call(&["SELECT", "1"]), "+OK\r\n");
    assert_eq!(a.call(&["SET", "k", "db1"]), "+OK\r\n");
    assert_eq!(b.call(&["GET", "k"]), "$-1\r\n");
    assert_eq!(b.call(&["SELECT", "1"]), "+OK\r\n");
    assert_eq!(b.call(&["GET", "k"]), "$3\r\ndb1\r\n");
    assert_eq!(a.call(&["SELECT", "0"]), "+OK\r\n");
    assert_eq!(a.call(&["GET", "k"]), "$-1\r\n");
}

#[test]
fn pubsub_resp2_and_resp3_patterns_and_many_subscribers() {
    let (_redis, proxy) = setup();
    let mut subs: Vec<Raw> = (0..5).map(|_| Raw::connect(proxy.port)).collect();
    for s in subs.iter_mut() {
        assert_eq!(
            s.call(&["SUBSCRIBE", "news"]),
            "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        );
    }
    let mut psub = Raw::connect(proxy.port);
    assert_eq!(
        psub.call(&["PSUBSCRIBE", "n*"]),
        "*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:1\r\n"
    );
    let mut r3 = Raw::connect(proxy.port);
    assert!(r3.call(&["HELLO", "3"]).starts_with("%7\r\n"));
    assert_eq!(
        r3.call(&["SUBSCRIBE", "news"]),
        ">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    // RESP3 subscribers may run other commands.
    assert_eq!(r3.call(&["SET", "x", "1"]), "+OK\r\n");
    let mut publisher = Raw::connect(proxy.port);
    // Seven local subscribers (the server sees the hub's one subscription to
    // `news` and one to `n*`): seven receivers, as one Redis counts them.
    assert_eq!(publisher.call(&["PUBLISH", "news", "hello"]), ":7\r\n");
    for s in subs.iter_mut() {
        assert_eq!(
            String::from_utf8_lossy(&s.read()),
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&psub.read()),
        "*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&r3.read()),
        ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    // RESP2 subscribed mode: PING answered as Redis does, other commands refused.
    assert_eq!(subs[0].call(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert!(subs[0]
        .call(&["GET", "x"])
        .starts_with("-ERR Can't execute 'get'"));
    assert_eq!(
        subs[0].call(&["UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
    );
    assert_eq!(subs[0].call(&["GET", "x"]), "$1\r\n1\r\n");
    // Sharded channels.
    let mut ssub = Raw::connect(proxy.port);
    assert_eq!(
        ssub.call(&["SSUBSCRIBE", "shard"]),
        "*3\r\n$10\r\nssubscribe\r\n$5\r\nshard\r\n:1\r\n"
    );
    assert_eq!(publisher.call(&["SPUBLISH", "shard", "s1"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&ssub.read()),
        "*3\r\n$8\r\nsmessage\r\n$5\r\nshard\r\n$2\r\ns1\r\n"
    );
}

#[test]
fn hello_3_and_client_tracking_invalidations() {
    let (_redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    let hello = a.call(&["HELLO", "3", "SETNAME", "app-1"]);
    assert!(
        hello.starts_with("%7\r\n") && hello.contains("proto\r\n:3"),
        "{hello}"
    );
    assert_eq!(a.call(&["CLIENT", "GETNAME"]), "$5\r\napp-1\r\n");
    assert_eq!(a.call(&["SET", "cached", "v1"]), "+OK\r\n");
    assert_eq!(a.call(&["CLIENT", "TRACKING", "on"]), "+OK\r\n");
    assert_eq!(a.call(&["GET", "cached"]), "$2\r\nv1\r\n");
    let mut b = Raw::connect(proxy.port);
    assert_eq!(b.call(&["SET", "cached", "v2"]), "+OK\r\n");
    let push = String::from_utf8_lossy(&a.read()).into_owned();
    assert!(
        push.starts_with(">2\r\n$10\r\ninvalidate\r\n") && push.contains("cached"),
        "{push}"
    );
    // RESP2 clients get RESP2 replies from the same proxy.
    assert_eq!(b.call(&["HGETALL", "nohash"]), "*0\r\n");
    assert_eq!(a.call(&["HGETALL", "nohash"]), "%0\r\n");
}

#[test]
fn admin_metrics_readiness_and_quitquitquit() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    let admin = enable_admin(&mut env);
    let mut proxy = Proxy::start(&env);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/readyz").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {:?}",
            http(admin, "GET", "/readyz")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http(admin, "GET", "/startup").0, 200);
    assert_eq!(http(admin, "GET", "/livez").0, 200);
    let count = |m: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with("redis_entra_proxy_commands_total{route=\"shared\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let before = count(&http(admin, "GET", "/metrics").1);
    let mut c = Raw::connect(proxy.port);
    for i in 0..25 {
        assert_eq!(c.call(&["SET", &format!("m{i}"), "v"]), "+OK\r\n");
    }
    let metrics = http(admin, "GET", "/metrics").1;
    assert_eq!(count(&metrics) - before, 25.0, "{metrics}");
    assert!(
        metrics.contains("redis_entra_proxy_client_connections 1"),
        "{metrics}"
    );
    assert_eq!(http(admin, "GET", "/quitquitquit").0, 405);
    assert_eq!(http(admin, "POST", "/quitquitquit").0, 200);
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = proxy.child().try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "proxy did not exit after /quitquitquit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", proxy.log_text());
}

#[test]
fn two_hundred_mixed_clients_stay_correct_and_ordered() {
    let (redis, proxy) = setup();
    let port = proxy.port;
    let threads: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                let key = format!("client:{i}");
                for round in 0..10 {
                    match (i + round) % 4 {
                        0 => {
                            // Pipelined: three commands in one write, replies in order.
                            c.send(&["SET", &key, &round.to_string()]);
                            c.send(&["INCR", &key]);
                            c.send(&["GET", &key]);
                            assert_eq!(String::from_utf8_lossy(&c.read()), "+OK\r\n");
                            assert_eq!(
                                String::from_utf8_lossy(&c.read()),
                                format!(":{}\r\n", round + 1)
                            );
                            let v = (round + 1).to_string();
                            assert_eq!(
                                String::from_utf8_lossy(&c.read()),
                                format!("${}\r\n{v}\r\n", v.len())
                            );
                        }
                        1 => {
                            assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
                            assert_eq!(c.call(&["SET", &key, "tx"]), "+QUEUED\r\n");
                            assert_eq!(c.call(&["EXEC"]), "*1\r\n+OK\r\n");
                        }
                        2 => {
                            assert_eq!(c.call(&["BLPOP", &format!("none:{i}"), "0.01"]), "*-1\r\n")
                        }
                        _ => assert_eq!(
                            c.call(&["ECHO", &key]),
                            format!("${}\r\n{key}\r\n", key.len())
                        ),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .expect("a client saw a wrong or out-of-order reply");
    }
    // Upstream connections stay at pool size plus pinned (bounded), not one per client.
    let list = redis.cli(&["CLIENT", "LIST"]);
    let upstream = list
        .lines()
        .filter(|l| l.contains(&format!("user={USER}")))
        .count();
    assert!(upstream <= 2 * 2 + 256, "{upstream} upstream connections");
    assert!(
        upstream < 200,
        "one upstream connection per client: {upstream}"
    );
}

#[test]
fn sigterm_drains_in_flight_commands_then_exits_zero() {
    let redis = RedisServer::start(USER, TOKEN);
    let mut proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    let mut busy = Raw::connect(proxy.port);
    let mut idle = Raw::connect(proxy.port);
    assert_eq!(idle.call(&["PING"]), "+PONG\r\n");
    // In flight when the signal arrives: a blocking pop that times out in 1 s.
    busy.send(&["BLPOP", "drain:q", "1"]);
    std::thread::sleep(Duration::from_millis(200));
    let pid = proxy.child().id().to_string();
    let started = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The in-flight command still gets its own reply, then the client is closed.
    assert_eq!(String::from_utf8_lossy(&busy.read()), "*-1\r\n");
    let rest = common::proxy::read_to_close(&mut busy.s);
    assert!(rest.is_empty(), "{rest:?}");
    let rest = common::proxy::read_to_close(&mut idle.s);
    assert!(rest.is_empty(), "{rest:?}");
    let status = loop {
        if let Some(s) = proxy.child().try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no exit within the grace"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", proxy.log_text());
    // Drained, not cut at the 30 s grace.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.log_text().contains("shutting down"));
}

#[test]
fn monitor_streams_other_clients_commands() {
    let (_redis, proxy) = setup();
    let mut m = Raw::connect(proxy.port);
    assert_eq!(m.call(&["MONITOR"]), "+OK\r\n");
    let mut c = Raw::connect(proxy.port);
    for i in 0..3 {
        assert_eq!(c.call(&["SET", "monitored", &i.to_string()]), "+OK\r\n");
    }
    let mut seen = 0;
    for _ in 0..20 {
        let line = String::from_utf8_lossy(&m.read()).into_owned();
        assert!(line.starts_with('+'), "{line}");
        if line.contains("\"SET\" \"monitored\"") {
            seen += 1;
            if seen == 3 {
                break;
            }
        }
    }
    assert_eq!(seen, 3);
    // The monitored proxy keeps serving everyone else.
    assert_eq!(c.call(&["GET", "monitored"]), "$1\r\n2\r\n");
}
