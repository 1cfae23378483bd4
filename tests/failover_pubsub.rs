//! Pub/sub through a failover or a blip, with the failover front
//! (tests/common/front.rs, failover.rs): the hub subscribes again before the
//! PUBLISHes held through the gap go out, so subscribers miss none of them.

mod common;

use common::failover::Pair;
use common::proxy::{Proxy, Raw};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "failover-token";

/// PUBLISHes sent in the gap wait in the hold; once the endpoint is back
/// they reach the server only after the hub has subscribed again, so the
/// subscriber gets every one of them, and every one published right after.
#[test]
fn messages_published_in_the_gap_reach_the_subscriber() {
    let pair = Pair::start(USER, TOKEN);
    let proxy = Proxy::start(&pair.env(USER, TOKEN));
    let mut sub = Raw::connect(proxy.port);
    let confirm = sub.call(&["SUBSCRIBE", "fo:chan"]);
    assert!(confirm.contains("subscribe"), "{confirm}");
    let mut publisher = Raw::connect(proxy.port);
    assert_eq!(publisher.call(&["PUBLISH", "fo:chan", "m0"]), ":1\r\n");
    assert!(String::from_utf8_lossy(&sub.read()).contains("m0"));
    const N: usize = 20;
    const AFTER: usize = 20;
    pair.front.refuse();
    pair.front.close_all();
    // Sent in the gap: held by the proxy.
    for i in 1..=N {
        publisher.send(&["PUBLISH", "fo:chan", &format!("m{i}")]);
    }
    // A gap long enough for the hub's redial backoff to grow (Azure's is 9-10 s).
    std::thread::sleep(Duration::from_secs(4));
    pair.front.accept();
    let mut receivers = Vec::new();
    for _ in 1..=N {
        receivers.push(String::from_utf8_lossy(&publisher.read()).into_owned());
    }
    // And right after the gap, as a producer keeps publishing.
    for i in N + 1..=N + AFTER {
        let r = publisher.call(&["PUBLISH", "fo:chan", &format!("m{i}")]);
        receivers.push(r);
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = N + AFTER;
    let mut got = Vec::new();
    while let Some(m) = sub.try_read(Duration::from_secs(3)) {
        got.push(String::from_utf8_lossy(&m).into_owned());
        if got.len() == n {
            break;
        }
    }
    assert_eq!(
        got.len(),
        n,
        "the subscriber got {} of {n} messages published in and right after the gap (PUBLISH replies {receivers:?})",
        got.len()
    );
    for (i, m) in got.iter().enumerate() {
        assert!(m.contains(&format!("m{}", i + 1)), "in order: {got:?}");
    }
}
