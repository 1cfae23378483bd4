//! Clients of the proxy for the cluster tests (`tests/cluster.rs`): keys that
//! cover every slot, SCAN to the end, a verified INCR load, and what the
//! proxy's connections look like on each node.

use super::cluster::Cluster;
use super::proxy::Raw;

/// A key for every hash slot (`k<n>`, the first n that lands there).
pub fn key_per_slot() -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; 16384];
    let mut left = 16384;
    let mut n = 0u64;
    while left > 0 {
        let k = format!("slot:{n}");
        let s = redis_entra_proxy::command::keys::slot(k.as_bytes()) as usize;
        if keys[s].is_none() {
            keys[s] = Some(k);
            left -= 1;
        }
        n += 1;
    }
    keys.into_iter().map(Option::unwrap).collect()
}

/// Every key SCAN returns, from cursor 0 until it says 0 (bounded).
pub fn scan_all(r: &mut Raw) -> Vec<String> {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    for _ in 0..10_000 {
        r.send(&["SCAN", &cursor, "COUNT", "3"]);
        let reply = String::from_utf8(r.read()).unwrap();
        let lines: Vec<&str> = reply.split("\r\n").collect();
        // *2, $n, cursor, *k, then $len/key pairs.
        cursor = lines[2].to_string();
        keys.extend(lines[4..].iter().skip(1).step_by(2).map(|s| s.to_string()));
        if cursor == "0" {
            keys.retain(|k| !k.is_empty());
            keys.sort();
            keys.dedup();
            return keys;
        }
    }
    panic!("SCAN did not finish");
}

pub fn sorted_array(reply: &str) -> Vec<String> {
    let mut v: Vec<String> = reply
        .split("\r\n")
        .skip(1)
        .skip(1)
        .step_by(2)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// What one load client saw.
#[derive(Default, Debug)]
pub struct Tally {
    pub ok: u64,
    /// Errors the client saw, by text.
    pub errors: Vec<String>,
    /// Per key: increments acknowledged, and increments that got an error
    /// (may or may not have run).
    pub acked: std::collections::HashMap<String, (i64, i64)>,
}

/// INCR (and cross-slot MGET) on `keys` until `stop`, bounded in count and time.
pub fn load(
    port: u16,
    keys: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Tally {
    use std::sync::atomic::Ordering;
    let mut r = Raw::connect(port);
    let mut t = Tally::default();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    for i in 0..1_000_000usize {
        if stop.load(Ordering::Relaxed) || std::time::Instant::now() > until {
            break;
        }
        let k = &keys[i % keys.len()];
        let reply = r.call(&["INCR", k]);
        let e = t.acked.entry(k.clone()).or_default();
        if let Some(n) = reply.strip_prefix(':') {
            let n: i64 = n.trim().parse().unwrap();
            // Each key is this client's alone: the count goes up by one per
            // INCR that ran.
            assert!(n > e.0 && n <= e.0 + e.1 + 1, "{k}: {n} after {e:?}");
            *e = (n, e.1 - (n - e.0 - 1));
            t.ok += 1;
        } else {
            e.1 += 1;
            t.errors.push(reply);
        }
        if i % 50 == 0 {
            let a = &keys[(i / 50) % keys.len()];
            let b = &keys[(i / 50 + 7) % keys.len()];
            let reply = r.call(&["MGET", a, b]);
            if !reply.starts_with("*2\r\n") {
                t.errors.push(reply);
            }
        }
    }
    t
}

pub fn node_id(c: &Cluster, port: u16) -> String {
    c.cli(port, &["CLUSTER", "MYID"]).trim().to_string()
}

/// The proxy's connections on every node: (node port, client id, user).
pub fn proxy_conns(c: &Cluster, prefix: &str) -> Vec<(u16, String, String)> {
    let mut out = Vec::new();
    for &p in &c.ports {
        for l in c.cli(p, &["CLIENT", "LIST"]).lines() {
            let field = |n: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(n))
                    .unwrap_or_default()
                    .to_string()
            };
            let user = field("user=");
            if user.starts_with(prefix) {
                out.push((p, field("id="), user));
            }
        }
    }
    out
}
