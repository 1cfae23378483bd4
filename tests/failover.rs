//! Failovers as Azure runs them, through a front standing in for the cache's
//! endpoint (tests/common/front.rs, failover.rs): clients of the proxy ride
//! through them without an error where none is needed.

mod common;

use common::failover::{Pair, Timing};
use common::proxy::{Proxy, Raw};
use std::time::Duration;

const USER: &str = "proxyuser";
const TOKEN: &str = "failover-token";
/// The front itself: the pair replicates, a failover moves the endpoint to
/// the promoted replica with every write, notices reach subscribers.
#[test]
fn the_front_fails_over_like_azure() {
    let mut pair = Pair::start(USER, TOKEN);
    let proxy = Proxy::start(&pair.env(USER, TOKEN));
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.call(&["SET", "before", "1"]), "+OK\r\n");
    let mut sub = Raw::connect(proxy.port);
    assert!(sub
        .call(&["SUBSCRIBE", "AzureRedisEvents"])
        .contains("subscribe"));
    let old = pair.primary().port;
    let t = Timing {
        starting_ahead: Duration::from_millis(300),
        start_ahead: Duration::from_millis(100),
        gap: Duration::from_millis(800),
    };
    pair.planned_failover(t, true);
    assert_ne!(pair.primary().port, old);
    assert_eq!(pair.front.target(), pair.primary().port);
    let role = pair.primary().cli(&["ROLE"]);
    assert!(role.starts_with("master"), "{role}");
    let role = pair.replica().cli(&["ROLE"]);
    assert!(role.starts_with("slave"), "{role}");
    // Written before the failover, on the new primary now.
    assert_eq!(pair.primary().cli(&["GET", "before"]).trim(), "1");
    let starting = String::from_utf8(sub.read()).unwrap();
    assert!(
        starting.contains("NotificationType|NodeMaintenanceStarting|StartTimeInUTC|"),
        "{starting}"
    );
    assert!(starting.contains("|IsReplica|false|IPAddress|127.0.0.1|SSLPort|"));
    // Service comes back through the front, to the new primary.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if c.call(&["SET", "after", "2"]) == "+OK\r\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pair.primary().cli(&["GET", "after"]).trim(), "2");
}
