//! Clustered caches: the proxy in front of a real six-node TLS Redis Cluster
//! on loopback (one cluster per announce variant, shared by every test here).
//! Tests that change the topology (resharding, failover) hold [`EXCLUSIVE`]
//! for writing; the others for reading. The fan-out comparisons (FLUSHALL,
//! DBSIZE, KEYS) run alone on the host-name cluster.

mod common;

use common::cluster::{self, proxy_env, Announce, Cluster};
use common::proxy::{Proxy, Raw};
use std::sync::RwLock;

static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn proxy_for(c: &Cluster) -> Proxy {
    Proxy::start(&proxy_env(c))
}

/// A key for every hash slot (`k<n>`, the first n that lands there).
fn key_per_slot() -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; 16384];
    let mut left = 16384;
    let mut n = 0u64;
    while left > 0 {
        let k = format!("slot:{n}");
        let s = redis_entra_proxy::keys::slot(k.as_bytes()) as usize;
        if keys[s].is_none() {
            keys[s] = Some(k);
            left -= 1;
        }
        n += 1;
    }
    keys.into_iter().map(Option::unwrap).collect()
}

#[test]
fn keys_in_every_slot_round_trip() {
    let _g = EXCLUSIVE.read().unwrap();
    let c = cluster::shared(Announce::Ip);
    let proxy = proxy_for(c);
    let mut r = Raw::connect(proxy.port);
    assert_eq!(r.call(&["PING"]), "+PONG\r\n");
    let keys = key_per_slot();
    // Pipelined: every SET, then every GET, in batches of 512.
    for chunk in keys.chunks(512) {
        for k in chunk {
            r.send(&["SET", k, &format!("v-{k}")]);
        }
        for k in chunk {
            assert_eq!(r.read(), b"+OK\r\n", "SET {k}");
        }
    }
    for chunk in keys.chunks(512) {
        for k in chunk {
            r.send(&["GET", k]);
        }
        for k in chunk {
            let v = format!("v-{k}");
            assert_eq!(
                String::from_utf8(r.read()).unwrap(),
                format!("${}\r\n{v}\r\n", v.len())
            );
        }
    }
    // Every primary got its share.
    for p in c.primaries() {
        let n: usize = c.cli(p, &["DBSIZE"]).trim().parse().unwrap();
        assert!(n >= 5000, "primary {p} holds {n} keys");
    }
    for k in &keys {
        r.send(&["DEL", k]);
    }
    for _ in &keys {
        assert_eq!(r.read(), b":1\r\n");
    }
    let log = proxy.log_text();
    assert!(log.contains("Redis Cluster"), "{log}");
}
