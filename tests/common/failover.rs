//! A primary and a replica TLS redis-server (the replica `replicaof` the
//! primary over TLS) behind a [`Front`] that stands in for Azure's cache
//! endpoint, and the failovers Azure's clients live through:
//!
//! - planned (patching): `NodeMaintenanceStarting` and `NodeMaintenanceStart`
//!   on `AzureRedisEvents` ahead, then every connection through the endpoint
//!   closed, new ones refused for a gap, the replica promoted and routed to,
//!   `NodeMaintenanceFailoverComplete` and `NodeMaintenanceEnded` after;
//! - unplanned: kill -9 of the primary, the replica promoted a few seconds later;
//! - a blip: the endpoint closes everything and refuses for a while, then the
//!   same server again.
//!
//! Azure's timing (Starting about 20 s ahead, Start under 5 s ahead, a 9-10 s
//! gap) is scaled down by [`Timing`] so that a test takes seconds.

use super::front::Front;
use super::redis::{RedisServer, ADMIN_PASSWORD};
use std::time::{Duration, Instant};

/// When the steps of a planned failover happen.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// `NodeMaintenanceStarting` this long before the connections close (Azure: ~20 s).
    pub starting_ahead: Duration,
    /// `NodeMaintenanceStart` this long before (Azure: under 5 s).
    pub start_ahead: Duration,
    /// New connections refused this long (Azure: 9-10 s).
    pub gap: Duration,
}

impl Timing {
    /// Azure's timing scaled down: the lead by 10, the gap by 4.
    pub fn scaled() -> Timing {
        Timing {
            starting_ahead: Duration::from_secs(2),
            start_ahead: Duration::from_millis(500),
            gap: Duration::from_millis(2500),
        }
    }
}

pub struct Pair {
    pub servers: Vec<RedisServer>,
    pub front: Front,
    /// Index of the primary in `servers`.
    pub primary: usize,
}

const REPL: &str = "tls-replication yes\nmasteruser admin\n";

impl Pair {
    /// Primary, replica (synced), and a front routing to the primary.
    pub fn start(user: &str, password: &str) -> Pair {
        let extra = format!("{REPL}masterauth {ADMIN_PASSWORD}\n");
        let primary = RedisServer::start_with(user, password, None, &extra);
        let replica_conf = format!("{extra}replicaof 127.0.0.1 {}\n", primary.port);
        let replica = RedisServer::start_with(user, password, Some(&primary.pki), &replica_conf);
        let front = Front::start(0, primary.port);
        let pair = Pair {
            servers: vec![primary, replica],
            front,
            primary: 0,
        };
        pair.wait_synced(Duration::from_secs(20));
        pair
    }

    pub fn primary(&self) -> &RedisServer {
        &self.servers[self.primary]
    }

    pub fn replica(&self) -> &RedisServer {
        &self.servers[1 - self.primary]
    }

    /// The proxy's environment: a static credential, the front as its upstream.
    pub fn env(&self, user: &str, password: &str) -> Vec<(String, String)> {
        let mut env = super::proxy::static_env(&self.servers[0], user, password);
        for (k, v) in env.iter_mut() {
            if k == "REDIS_ENTRA_PROXY_UPSTREAM__PORT" {
                *v = self.front.port.to_string();
            }
        }
        env
    }

    /// An `AzureRedisEvents` message as Azure Cache for Redis formats it.
    pub fn notice(&self, kind: &str, start_in: Duration, is_replica: bool) -> String {
        let at = std::time::SystemTime::now() + start_in;
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        format!(
            "NotificationType|{kind}|StartTimeInUTC|{}|IsReplica|{is_replica}|IPAddress|127.0.0.1|SSLPort|{}|NonSSLPort|6379",
            iso8601(secs),
            self.front.port
        )
    }

    /// Publish a notice on the primary (replicated to the replica too).
    pub fn publish(&self, kind: &str, start_in: Duration) -> String {
        let msg = self.notice(kind, start_in, false);
        self.primary().cli(&["PUBLISH", "AzureRedisEvents", &msg])
    }

    /// Wait until the replica has everything the primary wrote.
    pub fn wait_synced(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.primary().cli(&["INFO", "replication"]);
            let r = self.replica().cli(&["INFO", "replication"]);
            let p_off = field(&p, "master_repl_offset");
            let r_up = field(&r, "master_link_status").as_deref() == Some("up");
            let r_off = field(&r, "slave_repl_offset");
            if r_up && p_off.is_some() && p_off == r_off {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica not in sync: primary {p_off:?}, replica {r_off:?} up {r_up}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Make the replica the primary; the old one (if alive) replicates from it.
    fn promote(&mut self, old_alive: bool) {
        let new = 1 - self.primary;
        let out = self.servers[new].cli(&["REPLICAOF", "NO", "ONE"]);
        assert!(out.contains("OK"), "REPLICAOF NO ONE: {out}");
        if old_alive {
            let port = self.servers[new].port.to_string();
            let out = self.servers[self.primary].cli(&["REPLICAOF", "127.0.0.1", &port]);
            assert!(out.contains("OK"), "REPLICAOF: {out}");
        }
        self.primary = new;
    }

    /// A planned failover as Azure runs one (see the module comment).
    /// `notices`: publish on `AzureRedisEvents`; without, the same steps unannounced.
    pub fn planned_failover(&mut self, t: Timing, notices: bool) {
        if notices {
            self.publish("NodeMaintenanceStarting", t.starting_ahead);
        }
        std::thread::sleep(t.starting_ahead.saturating_sub(t.start_ahead));
        if notices {
            self.publish("NodeMaintenanceStart", t.start_ahead);
        }
        std::thread::sleep(t.start_ahead);
        let began = Instant::now();
        self.front.refuse();
        self.front.close_all();
        // Nothing reaches the old primary now: once the replica has all of
        // it, promoting loses no acknowledged write.
        self.wait_synced(Duration::from_secs(10));
        self.promote(true);
        self.front.route(self.primary().port);
        std::thread::sleep(t.gap.saturating_sub(began.elapsed()));
        self.front.accept();
        if notices {
            // Published once clients are back on the new primary (listeners
            // re-subscribe within a few hundred milliseconds).
            std::thread::sleep(Duration::from_millis(800));
            self.publish("NodeMaintenanceFailoverComplete", Duration::ZERO);
            self.publish("NodeMaintenanceEnded", Duration::ZERO);
        }
    }

    /// kill -9 of the primary; the replica promoted and routed to `after` later.
    pub fn kill_primary_then_promote(&mut self, after: Duration) {
        let old = self.primary;
        self.servers[old].kill();
        std::thread::sleep(after);
        self.promote(false);
        self.front.route(self.primary().port);
    }

    /// Close everything and refuse for `gap`, then the same server again.
    pub fn blip(&self, gap: Duration) {
        self.front.refuse();
        self.front.close_all();
        std::thread::sleep(gap);
        self.front.accept();
    }
}

/// `name:value` from an INFO text.
pub fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC).
fn iso8601(secs: f64) -> String {
    let s = secs as i64;
    let (days, rem) = (s.div_euclid(86400), s.rem_euclid(86400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
