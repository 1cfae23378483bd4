//! A pinned connection its client lets go of is reset and reused by the next
//! client instead of being closed: against a real TLS redis-server, counting
//! the connections it accepted, and checking that nothing of the first
//! client's state (database, WATCH, an open MULTI, RESP3) reaches the next.

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::RedisServer;
use redis_entra_proxy::resp::command;
use std::io::Write;
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "reuse-token";

/// Connections the server has accepted so far (the admin's own included).
fn accepted(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

fn setup() -> (RedisServer, Proxy) {
    let redis = RedisServer::start(USER, TOKEN);
    let mut env = static_env(&redis, USER, TOKEN);
    env.push(("REDIS_ENTRA_PROXY_UPSTREAM__WARM_PINNED".into(), "1".into()));
    let proxy = Proxy::start(&env);
    // The shared connections and the warm one are dialled at start.
    std::thread::sleep(Duration::from_millis(500));
    (redis, proxy)
}

#[test]
fn transactions_between_plain_commands_reuse_their_pinned_connection() {
    let (redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
    let before = accepted(&redis);
    for i in 0..20 {
        assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.call(&["INCR", "reuse:n"]), "+QUEUED\r\n");
        assert_eq!(a.call(&["EXEC"]), format!("*1\r\n:{}\r\n", i + 1));
        // A plain command lets go of the pinned connection.
        assert_eq!(
            a.call(&["GET", "reuse:n"]),
            format!("${}\r\n{}\r\n", (i + 1).to_string().len(), i + 1)
        );
        // The released connection is reset in one round trip; a client that
        // comes back at once may find it still resetting and get another.
        std::thread::sleep(Duration::from_millis(30));
    }
    // Each admin `INFO` is one connection; without reuse each transaction
    // took the warm connection and one more was dialled for it (20 in all,
    // 20 seen without the reuse).
    let dialled = accepted(&redis) - before - 1;
    assert!(
        dialled <= 3,
        "{dialled} connections dialled for 20 transactions"
    );
}

#[test]
fn a_reused_connection_carries_no_state_of_its_last_client() {
    let (_redis, proxy) = setup();
    {
        // Pinned by SELECT, with a key in database 3, a WATCH and an open
        // MULTI with a queued write, then gone without a word.
        let mut a = Raw::connect(proxy.port);
        assert_eq!(a.call(&["SELECT", "3"]), "+OK\r\n");
        assert_eq!(a.call(&["SET", "reuse:k", "db3"]), "+OK\r\n");
        assert_eq!(a.call(&["WATCH", "reuse:k"]), "+OK\r\n");
        assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(a.call(&["SET", "reuse:queued", "x"]), "+QUEUED\r\n");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        proxy
            .log_text()
            .contains("pinned connection reset and kept warm"),
        "the first client's connection was not kept"
    );
    let mut b = Raw::connect(proxy.port);
    assert_eq!(b.call(&["WATCH", "reuse:other"]), "+OK\r\n");
    assert_eq!(b.call(&["MULTI"]), "+OK\r\n", "no MULTI left open");
    assert_eq!(b.call(&["GET", "reuse:k"]), "+QUEUED\r\n");
    assert_eq!(b.call(&["GET", "reuse:queued"]), "+QUEUED\r\n");
    // Database 0: the key of database 3 is not there; the queued SET never ran.
    assert_eq!(b.call(&["EXEC"]), "*2\r\n$-1\r\n$-1\r\n");
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    // A RESP3 client's connection comes back to RESP3 clients only, as RESP3.
    let mut c = Raw::connect(proxy.port);
    assert!(c.call(&["HELLO", "3"]).starts_with('%'));
    assert_eq!(c.call(&["HSET", "reuse:h", "f", "v"]), ":1\r\n");
    for _ in 0..2 {
        assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
        assert_eq!(c.call(&["HGETALL", "reuse:h"]), "+QUEUED\r\n");
        assert_eq!(c.call(&["EXEC"]), "*1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut d = Raw::connect(proxy.port);
    assert_eq!(d.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(d.call(&["HGETALL", "reuse:h"]), "+QUEUED\r\n");
    assert_eq!(d.call(&["EXEC"]), "*1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
}

/// Calls of `cmd` the server has counted (INFO commandstats).
fn calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info = redis.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// One optimistic-locking transaction between plain commands: WATCH, read,
/// `MULTI; SET; EXEC` in one write (as client libraries pipeline it), GET.
fn watch_transaction(a: &mut Raw, key: &str, value: &str) {
    assert_eq!(a.call(&["WATCH", key]), "+OK\r\n");
    let _ = a.call(&["GET", key]);
    let mut tx = command(&[b"MULTI"]).to_vec();
    tx.extend_from_slice(&command(&[b"SET", key.as_bytes(), value.as_bytes()]));
    tx.extend_from_slice(&command(&[b"EXEC"]));
    a.s.write_all(&tx).unwrap();
    let replies: Vec<Vec<u8>> = (0..3).map(|_| a.read()).collect();
    assert_eq!(replies.concat(), b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    assert_eq!(a.call(&["GET", "reuse:other"]), "$-1\r\n");
}

#[test]
fn watch_transactions_between_plain_commands_need_no_reset() {
    // What an optimistic-locking client on a pooled connection does: WATCH,
    // read, a transaction sent whole, then plain commands. Its state is
    // known clean after EXEC, so the connection goes back warm as it is: no
    // RESET + HELLO per transaction, and no new connection either, even
    // when the client comes back at once.
    let (redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    assert_eq!(a.call(&["PING"]), "+PONG\r\n");
    let (resets, before) = (calls(&redis, "reset"), accepted(&redis));
    for i in 0..100 {
        watch_transaction(&mut a, "reuse:w", &i.to_string());
    }
    let resets = calls(&redis, "reset") - resets;
    let dialled = accepted(&redis) - before - 2;
    // The warm set's top-up may dial while the client holds one (at most
    // twice `warm_pinned` are kept), not once per transaction.
    assert!(
        resets == 0 && dialled <= 2,
        "for 100 transactions: RESET sent {resets} times, {dialled} connections dialled"
    );
    // A client that leaves after EXEC (its connection still dedicated, with
    // nothing of its own on it) costs no RESET either.
    let resets = calls(&redis, "reset");
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["WATCH", "reuse:w"]), "+OK\r\n");
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["EXEC"]), "*0\r\n");
    drop(c);
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let resets = calls(&redis, "reset") - resets;
    assert_eq!(resets, 0, "RESET after clients left clean");
    // Its state really was clean: the next client's transaction is its own.
    let mut b = Raw::connect(proxy.port);
    assert_eq!(b.call(&["MULTI"]), "+OK\r\n", "no MULTI left open");
    assert_eq!(b.call(&["GET", "reuse:w"]), "+QUEUED\r\n");
    assert_eq!(b.call(&["EXEC"]), "*1\r\n$2\r\n99\r\n");
}

#[test]
fn clients_pinning_in_turn_keep_their_connections() {
    // Eight such clients at once. Had each let go of its dedicated
    // connection at the plain command, how many are pinned would go up and
    // down all the time, and the pool close connections on the dips and dial
    // on the rises; each keeps its own a moment for its next transaction
    // instead, so the proxy dials about one per client, not one per
    // transaction.
    let (redis, proxy) = setup();
    let before = accepted(&redis);
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut a = Raw::connect(port);
                for i in 0..100 {
                    watch_transaction(&mut a, &format!("reuse:turn:{c}"), &i.to_string());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let dialled = accepted(&redis) - before;
    assert!(
        dialled <= 8 + 2,
        "{dialled} connections dialled for 8 clients' 800 transactions"
    );
}

#[test]
fn the_connection_kept_for_the_next_transaction_speaks_the_clients_protocol() {
    // After a WATCH transaction and a plain command the client's dedicated
    // connection is kept a moment for its next one; a HELLO 3 in between
    // makes it a RESP2 connection the client no longer speaks.
    let (_redis, proxy) = setup();
    let mut a = Raw::connect(proxy.port);
    assert_eq!(a.call(&["HSET", "reuse:proto", "f", "v"]), ":1\r\n");
    watch_transaction(&mut a, "reuse:p", "1");
    assert!(a.call(&["HELLO", "3"]).starts_with('%'));
    assert_eq!(a.call(&["WATCH", "reuse:p"]), "+OK\r\n");
    assert_eq!(a.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(a.call(&["HGETALL", "reuse:proto"]), "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]), "*1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
}

/// A client whose dedicated connection switched protocol with it (`HELLO 3`
/// while WATCH held it there) and was then let go of clean must not hand the
/// next client of the old protocol a connection speaking the new one: the
/// pool keeps it warm under the protocol it was handed out for. Found by the
/// long differential run (a RESP2 client's BLPOP timeout answered `_`, a
/// RESP3 client's `$-1`).
#[test]
fn a_connection_that_switched_protocol_goes_back_reset() {
    let (_redis, proxy) = setup();
    for round in 0..3 {
        let mut a = Raw::connect(proxy.port);
        assert_eq!(a.call(&["WATCH", "sp:k"]), "+OK\r\n");
        assert!(a.call(&["HELLO", "3"]).starts_with('%'));
        assert_eq!(a.call(&["UNWATCH"]), "+OK\r\n");
        // Let go of: the spare's moment passes and it goes back to the pool.
        assert_eq!(a.call(&["GET", "sp:k"]), "_\r\n");
        std::thread::sleep(Duration::from_millis(400));
        drop(a);
        let mut b = Raw::connect(proxy.port);
        assert_eq!(
            b.call(&["BLPOP", "sp:none", "0.05"]),
            "*-1\r\n",
            "round {round}: a RESP2 client's dedicated connection speaks RESP2"
        );
    }
}
