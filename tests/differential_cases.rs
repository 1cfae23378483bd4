//! Where the proxy answers or tracks a command itself (transactions, modes,
//! CLIENT, HELLO, subscribed mode), the same command sequences go to the
//! proxy and to a plain redis-server, and the replies must be the same bytes.
//! Each case is a defect found by the differential run (issue 19).

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::{PlainRedis, RedisServer};
use common::twin::{both, both_stepwise};
use std::io::{Read, Write};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "differential-token";

fn setup() -> (RedisServer, Proxy, PlainRedis) {
    let redis = RedisServer::start(USER, TOKEN);
    let proxy = Proxy::start(&static_env(&redis, USER, TOKEN));
    (redis, proxy, PlainRedis::start())
}

fn same(direct: u16, proxy: u16, setup: &[&str], lines: &[&str]) {
    let (want, got) = both(direct, proxy, setup, lines);
    assert_eq!(
        got.replace("\r\n", "\\r\\n\n"),
        want.replace("\r\n", "\\r\\n\n"),
        "pipelined {lines:?}"
    );
    if setup.is_empty() {
        let (want, got) = both_stepwise(direct, proxy, lines);
        assert_eq!(got, want, "one at a time");
    }
}

/// The commands the proxy answers or tracks check their arity (and that the
/// server has them) before anything else, with Redis's own errors; a MULTI,
/// RESET or DISCARD with extra words changes nothing.
#[test]
fn arity_and_unknown_subcommands_first() {
    let (_redis, proxy, direct) = setup();
    let (d, p) = (direct.port, proxy.port);
    same(
        d,
        p,
        &[],
        &[
            "MULTI x",
            "SET k 1",
            "GET k",
            "EXEC x",
            "CLIENT ID x",
            "UNWATCH x",
            "SELECT",
            "AUTH a b c",
            "CLIENT SETINFO lib-name x",
            "CLIENT GETNAME x",
            "CLIENT SETNAME",
            "HELLO x",
            "HELLO 4",
            "HELLO 03",
            "CLIENT NOSUCH",
            "NOSUCH a b",
            "RESET x",
            "GET k",
            "EXEC",
            "DISCARD",
        ],
    );
    // Inside a transaction: DISCARD x leaves it open (and doomed), EXEC x
    // ends it.
    same(
        d,
        p,
        &[],
        &[
            "MULTI",
            "SET k 2",
            "DISCARD x",
            "GET k",
            "EXEC",
            "GET k",
            "MULTI",
            "SET k 3",
            "EXEC x",
            "EXEC",
            "GET k",
            "MULTI",
            "CLIENT ID x",
            "EXEC",
            "DEL k",
        ],
    );
}

/// Regression: `MULTI x` opened the proxy's transaction, and with CLIENT
/// REPLY OFF/ON around it every later reply shifted by two.
#[test]
fn a_refused_multi_opens_nothing() {
    let (_redis, proxy, direct) = setup();
    same(
        direct.port,
        proxy.port,
        &[],
        &[
            "CLIENT REPLY OFF",
            "MULTI x",
            "CLIENT REPLY ON",
            "SET k v",
            "GET k",
            "CLIENT GETNAME",
            "SUBSCRIBE a b c",
        ],
    );
}

/// RESP2 subscribed mode: unknown commands and wrong arity are reported
/// first, the refusal names the subcommand, EXEC's is an EXECABORT.
#[test]
fn resp2_subscribed_mode_errors() {
    let (_redis, proxy, direct) = setup();
    same(
        direct.port,
        proxy.port,
        &["SUBSCRIBE c"],
        &[
            "CLIENT GETNAME",
            "CLIENT GETNAME x",
            "CLIENT SETINFO a b",
            "GET",
            "NOSUCH",
            "EXEC",
            "PING a b c",
            "PING a",
            "MULTI",
            "SELECT 1",
            "AUTH a b c",
            "HELLO x",
            "RESET x",
            "UNSUBSCRIBE",
        ],
    );
}

/// Regression: a SUBSCRIBE the proxy refuses inside MULTI let EXEC run the
/// rest of the transaction; it must abort it (as the README promises).
#[test]
fn subscribe_inside_multi_aborts_exec() {
    let (_redis, proxy, _direct) = setup();
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "k", "1"]), "+QUEUED\r\n");
    assert!(c.call(&["SUBSCRIBE", "ch"]).starts_with("-ERR"));
    assert_eq!(
        c.call(&["EXEC"]),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(c.call(&["GET", "k"]), "$-1\r\n");
}

/// Regression: after a protocol error the proxy closed with the client's
/// input unread, the kernel sent RST, and the client lost the replies not
/// yet delivered and the error line.
#[test]
fn a_protocol_error_reaches_the_client() {
    let (_redis, proxy, direct) = setup();
    let big = "v".repeat(1 << 20);
    for port in [direct.port, proxy.port] {
        let mut c = Raw::connect(port);
        assert_eq!(c.call(&["SET", "big", &big]), "+OK\r\n");
        let mut s = c.s;
        let mut input = Vec::new();
        for _ in 0..16 {
            input.extend_from_slice(&common::twin::cmd("GET big"));
        }
        input.extend_from_slice(b"*x\r\n");
        input.extend(std::iter::repeat_n(b'a', 256 * 1024));
        // The peer may close while this is still being written.
        let _ = s.write_all(&input);
        std::thread::sleep(Duration::from_millis(500));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        let end = loop {
            match s.read(&mut chunk) {
                Ok(0) => break "end of stream".to_string(),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                // Redis itself resets the connection once it wrote
                // everything: what counts is that everything arrived first.
                Err(e) => break e.to_string(),
            }
        };
        let one = format!("$1048576\r\n{big}\r\n");
        let want = one.repeat(16) + "-ERR Protocol error: invalid multibulk length\r\n";
        assert!(
            got == want.as_bytes(),
            "{} (port {port}): {} of {} bytes, then {end}; ends {:?}",
            if port == direct.port {
                "redis"
            } else {
                "proxy"
            },
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[got.len().saturating_sub(60)..])
        );
    }
}

/// A transaction that arrives whole (MULTI ... EXEC in one write, as pooled
/// client libraries send it) runs on the client's shared connection: the
/// same replies as Redis, errors inside and EXECABORT included, and no
/// dedicated connection taken and reset for it. Before: every such block
/// pinned a connection, reset with RESET + HELLO once the client moved on.
#[test]
fn a_whole_transaction_needs_no_dedicated_connection() {
    let (redis, proxy, direct) = setup();
    let round = [
        "MULTI",
        "INCR n",
        "SET k v",
        "EXEC",
        "GET k",
        "MULTI",
        "SET s text",
        "INCR s",
        "GET n",
        "EXEC",
        "MULTI",
        "SET k",
        "INCR n",
        "EXEC",
        "MULTI",
        "INCR n",
        "DISCARD",
        "MULTI",
        "NOSUCH x",
        "EXEC",
        "MULTI",
        "EXEC",
        "GET n",
    ];
    let resets = |r: &RedisServer| {
        let stats = r.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find(|l| l.starts_with("cmdstat_reset:"))
            .map(|l| l.to_string())
            .unwrap_or_default()
    };
    let before = resets(&redis);
    for _ in 0..5 {
        let (want, got) = both(direct.port, proxy.port, &[], &round);
        assert_eq!(got, want);
    }
    // Once the clients are gone, any pinned connection would have been reset.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        resets(&redis),
        before,
        "transactions took dedicated connections"
    );
    // Sent one command at a time, the same replies (on a dedicated one).
    let (want, got) = both_stepwise(direct.port, proxy.port, &round);
    assert_eq!(got, want);
}

/// Found by the differential run (tests/differential.rs): SELECT with a bad
/// index inside MULTI is queued (its error comes in EXEC's array); RESET
/// answers even under CLIENT REPLY OFF; a protocol error under CLIENT REPLY
/// OFF gets no reply either.
#[test]
fn found_by_the_differential_run() {
    let (_redis, proxy, direct) = setup();
    same(
        direct.port,
        proxy.port,
        &[],
        &[
            "MULTI",
            "SELECT x",
            "SET k 1",
            "EXEC",
            "GET k",
            "CLIENT REPLY OFF",
            "RESET",
            "PING",
        ],
    );
    for port in [direct.port, proxy.port] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&common::twin::cmd("CLIENT REPLY OFF")).unwrap();
        s.write_all(b"*1\r\n+PING\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert_eq!(String::from_utf8_lossy(&got), "", "port {port}");
    }
}

/// Found by the long differential run: the proxy's own refusal of
/// SUBSCRIBE inside MULTI was written under CLIENT REPLY OFF (only pub/sub
/// confirmations, which are pushes, pass it).
#[test]
fn a_refusal_under_client_reply_off_is_not_written() {
    let (_redis, proxy, _direct) = setup();
    let mut c = Raw::connect(proxy.port);
    for cmd in [
        &["CLIENT", "REPLY", "OFF"][..],
        &["MULTI"],
        &["SUBSCRIBE", "a"],
        &["DISCARD"],
        &["CLIENT", "REPLY", "ON"],
    ] {
        c.send(cmd);
    }
    assert_eq!(String::from_utf8_lossy(&c.read()), "+OK\r\n");
    assert_eq!(c.call(&["PING"]), "+PONG\r\n");
}

/// Found by the long differential run (seed 8): `SELECT 0` queued in a
/// transaction that is then discarded left the proxy believing the client
/// was on database 0 while its connection stayed on 1; its next commands
/// went to a shared connection, on database 0.
#[test]
fn a_select_in_a_discarded_transaction_changes_nothing() {
    let (_redis, proxy, direct) = setup();
    same(
        direct.port,
        proxy.port,
        &[],
        &[
            "SELECT 1",
            "SET k one",
            "MULTI",
            "SELECT 0",
            "DISCARD",
            "GET k",
            "MULTI",
            "SELECT 0",
            "NOSUCH",
            "EXEC",
            "GET k",
            "SELECT 0",
            "GET k",
        ],
    );
}
