//! Operations on the test cluster for `tests/cluster_life.rs` and
//! `tests/cluster_failures.rs`: who owns a key, a slot migration by hand,
//! resharding, replicas and failovers, the proxy's connections per node.

use super::cluster::{self, Cluster};
use super::cluster_load::proxy_conns;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The proxy's connections per node port now.
pub fn per_node(c: &Cluster) -> HashMap<u16, usize> {
    let mut m: HashMap<u16, usize> = c.ports.iter().map(|&p| (p, 0)).collect();
    for (p, _, _) in proxy_conns(c, cluster::USER) {
        *m.entry(p).or_default() += 1;
    }
    m
}

/// Run `f(i)` for `i in 0..n` on `threads` threads.
pub fn spread(n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    f(i);
                }
            });
        }
    });
}

/// The primary that owns `key`'s slot: the one that does not answer MOVED.
pub fn owner_of(c: &Cluster, key: &str) -> u16 {
    c.primaries()
        .into_iter()
        .find(|&p| !c.cli(p, &["EXISTS", key]).contains("MOVED"))
        .expect("an owner")
}

/// A hash tag `{prefixN}` whose slot is on a primary other than the
/// configured host (whose death tests treat apart).
pub fn tag_off_seed(c: &Cluster, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|t| owner_of(c, &format!("{{{t}}}")) != c.ports[0])
        .expect("a tag")
}

pub fn node_id(c: &Cluster, port: u16) -> String {
    c.cli(port, &["CLUSTER", "MYID"]).trim().to_string()
}

/// A slot being moved from one primary to another with `CLUSTER SETSLOT`.
pub struct Migration {
    pub slot: String,
    pub from: u16,
    pub to: u16,
}

impl Migration {
    /// Start moving `key`'s slot (holding no key yet) to another primary.
    pub fn start(c: &Cluster, key: &str) -> Migration {
        let slot = c
            .cli(c.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .to_string();
        let from = owner_of(c, key);
        let to = c.primaries().into_iter().find(|&p| p != from).unwrap();
        let (fid, tid) = (node_id(c, from), node_id(c, to));
        let out = c.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &fid]);
        assert_eq!(out.trim(), "OK", "{out}");
        let out = c.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &tid]);
        assert_eq!(out.trim(), "OK", "{out}");
        Migration { slot, from, to }
    }

    /// Finish: the slot is the importing node's, told to every primary.
    pub fn finish(&self, c: &Cluster) {
        let tid = node_id(c, self.to);
        for p in [self.to, self.from] {
            let out = c.cli(p, &["CLUSTER", "SETSLOT", &self.slot, "NODE", &tid]);
            assert_eq!(out.trim(), "OK", "{out}");
        }
        for p in c.primaries() {
            c.cli(p, &["CLUSTER", "SETSLOT", &self.slot, "NODE", &tid]);
        }
        c.wait_converged();
    }
}

/// The TLS port of a replica of primary `port`.
pub fn replica_of(c: &Cluster, port: u16) -> u16 {
    let id = node_id(c, port);
    let out = c.cli(port, &["CLUSTER", "REPLICAS", &id]);
    let addr = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no replica: {out}"));
    let port = addr
        .split(['@', ','])
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    port.parse().unwrap()
}

/// Wait until `port` says it is a primary (bounded).
pub fn wait_primary(c: &Cluster, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.cli(port, &["ROLE"]).starts_with("master") {
        assert!(Instant::now() < deadline, "{port} not promoted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until every node's view of slot ownership agrees (bounded): what
/// `redis-cli --cluster reshard` checks first, and refuses to move slots
/// without. After a reshard the last node hears of the new owners by gossip,
/// so a second reshard started at once can find them disagreeing.
pub fn wait_agreed(c: &Cluster, via: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.cluster_cli(&["check", &format!("127.0.0.1:{via}")]);
        if out.contains("All nodes agree about slots configuration") && !out.contains("[ERR]") {
            return;
        }
        assert!(Instant::now() < deadline, "nodes never agreed: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Move `n` slots from one primary to another with `redis-cli --cluster reshard`.
pub fn reshard(c: &Cluster, from: u16, to: u16, n: usize) {
    wait_agreed(c, from);
    let (fid, tid) = (node_id(c, from), node_id(c, to));
    let out = c.cluster_cli(&[
        "reshard",
        &format!("127.0.0.1:{from}"),
        "--cluster-from",
        &fid,
        "--cluster-to",
        &tid,
        "--cluster-slots",
        &n.to_string(),
        "--cluster-yes",
        "--cluster-pipeline",
        "20",
    ]);
    assert!(out.contains("Moving slot"), "reshard: {out}");
}

/// kill -9 of primary `port` once every replica is in sync (its replica
/// takes over), then half a second for the proxy's connections to it to
/// see the close. The guard restarts it should the test panic.
pub fn kill_synced(c: &Cluster, port: u16) -> RestartOnPanic<'_> {
    c.wait_replicas_synced();
    c.signal(c.pid(port), libc::SIGKILL);
    let guard = RestartOnPanic(c, port);
    std::thread::sleep(Duration::from_millis(500));
    guard
}

/// Start a killed node again and wait for the cluster to be whole.
pub fn revive(c: &Cluster, port: u16) {
    c.restart(port);
    c.wait_converged();
    c.wait_replicas_synced();
}

/// Restarts a killed node when dropped while the test panics, so the other
/// tests of the binary find the cluster whole.
pub struct RestartOnPanic<'a>(pub &'a Cluster, pub u16);

impl Drop for RestartOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.restart(self.1);
        }
    }
}
