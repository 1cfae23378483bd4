//! Clustered caches: the proxy in front of a real six-node TLS Redis Cluster
//! on loopback (one cluster per announce variant, shared by every test here).

mod common;

use common::cluster::{self, Announce};

#[test]
fn harness_cluster_is_up_with_three_primaries() {
    for a in [Announce::Ip, Announce::Hostname] {
        let c = cluster::shared(a);
        assert_eq!(c.primaries().len(), 3, "{a:?}");
        let shards = c.cli(c.ports[0], &["CLUSTER", "SHARDS"]);
        let want = match a {
            Announce::Ip => "127.0.0.1",
            Announce::Hostname => "localhost",
        };
        assert!(shards.contains(want), "{a:?}: {shards}");
    }
}
