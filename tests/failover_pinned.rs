//! Dedicated (pinned) connections through failovers and blips, with the
//! failover front (tests/common/front.rs, failover.rs): a transaction never
//! runs half, a blocked pop that took nothing is waited again on a new
//! connection, a client that needs a connection in the gap waits for it.

mod common;

use common::failover::Pair;
use common::proxy::{Proxy, Raw};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "failover-token";

fn text(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

/// A client blocked in BLPOP when the endpoint closes every connection and
/// refuses for a while: its wait took nothing, so it is made again on a new
/// connection once the endpoint is back, and the job pushed then reaches it.
#[test]
fn a_blocked_pop_rides_through_a_blip() {
    let pair = Pair::start(USER, TOKEN);
    let proxy = Proxy::start(&pair.env(USER, TOKEN));
    let mut worker = Raw::connect(proxy.port);
    worker.send(&["BLPOP", "fo:jobs", "30"]);
    // Blocked server-side on its pinned connection.
    std::thread::sleep(Duration::from_millis(500));
    pair.blip(Duration::from_secs(2));
    let mut producer = Raw::connect(proxy.port);
    let pushed = producer.call(&["LPUSH", "fo:jobs", "job-1"]);
    assert!(pushed.starts_with(':'), "{pushed}");
    let got = text(worker.read());
    assert!(got.contains("job-1"), "the worker got {got:?}");
    // Taken once.
    assert_eq!(producer.call(&["LLEN", "fo:jobs"]), ":0\r\n");
}

/// A client that needs a dedicated connection while the endpoint refuses
/// (a blocking command sent in the gap) waits for it within
/// `upstream.hold` instead of failing at once.
#[test]
fn a_blocking_command_in_the_gap_waits_for_the_endpoint() {
    let pair = Pair::start(USER, TOKEN);
    let proxy = Proxy::start(&pair.env(USER, TOKEN));
    let mut producer = Raw::connect(proxy.port);
    assert_eq!(producer.call(&["PING"]), "+PONG\r\n");
    pair.front.refuse();
    pair.front.close_all();
    let mut worker = Raw::connect(proxy.port);
    worker.send(&["BLPOP", "fo:gap", "30"]);
    let early = worker.try_read(Duration::from_millis(1500)).map(text);
    pair.front.accept();
    assert_eq!(early, None, "answered in the gap");
    let pushed = producer.call(&["LPUSH", "fo:gap", "job-2"]);
    assert!(pushed.starts_with(':'), "{pushed}");
    let got = text(worker.read());
    assert!(got.contains("job-2"), "the worker got {got:?}");
}

/// A client in MULTI whose connection drops: the commands it queued went
/// with the connection, so EXEC answers EXECABORT (nothing of it runs, not
/// half), and the client keeps its connection to the proxy and can run the
/// transaction again.
#[test]
fn a_transaction_whose_connection_drops_is_aborted_whole() {
    let pair = Pair::start(USER, TOKEN);
    let proxy = Proxy::start(&pair.env(USER, TOKEN));
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "fo:tx:a", "1"]), "+QUEUED\r\n");
    pair.blip(Duration::from_secs(1));
    // Queued after the drop: refused, not run.
    let after = c.call(&["SET", "fo:tx:b", "2"]);
    assert!(after.starts_with("-ERR"), "{after}");
    let exec = c.call(&["EXEC"]);
    assert!(exec.starts_with("-EXECABORT"), "{exec}");
    let mut other = Raw::connect(proxy.port);
    assert_eq!(other.call(&["EXISTS", "fo:tx:a", "fo:tx:b"]), ":0\r\n");
    // The same client runs it again, whole.
    assert_eq!(c.call(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.call(&["SET", "fo:tx:a", "1"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["SET", "fo:tx:b", "2"]), "+QUEUED\r\n");
    assert_eq!(c.call(&["EXEC"]), "*2\r\n+OK\r\n+OK\r\n");
    assert_eq!(other.call(&["EXISTS", "fo:tx:a", "fo:tx:b"]), ":2\r\n");
}
