//! `db.client.operation.duration`: client command durations by command name, with
//! a bounded set of names (the common commands; the rest are `other`), kept in
//! fixed buckets of atomics so that recording is a few atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};

/// Command names recorded under their own name, sorted (binary search).
pub const KNOWN: &[&str] = &[
    "APPEND",
    "AUTH",
    "BLMOVE",
    "BLPOP",
    "BRPOP",
    "BZPOPMIN",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "DBSIZE",
    "DECR",
    "DECRBY",
    "DEL",
    "DISCARD",
    "EVAL",
    "EVALSHA",
    "EXEC",
    "EXISTS",
    "EXPIRE",
    "EXPIREAT",
    "FCALL",
    "GET",
    "GETDEL",
    "GETEX",
    "GETSET",
    "HDEL",
    "HELLO",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HINCRBY",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HSCAN",
    "HSET",
    "INCR",
    "INCRBY",
    "INFO",
    "KEYS",
    "LINDEX",
    "LLEN",
    "LPOP",
    "LPUSH",
    "LRANGE",
    "LREM",
    "LTRIM",
    "MGET",
    "MSET",
    "MULTI",
    "PEXPIRE",
    "PING",
    "PSUBSCRIBE",
    "PTTL",
    "PUBLISH",
    "RPOP",
    "RPUSH",
    "SADD",
    "SCAN",
    "SCARD",
    "SELECT",
    "SET",
    "SETEX",
    "SETNX",
    "SISMEMBER",
    "SMEMBERS",
    "SPOP",
    "SREM",
    "SSCAN",
    "SSUBSCRIBE",
    "SUBSCRIBE",
    "TTL",
    "TYPE",
    "UNLINK",
    "UNSUBSCRIBE",
    "WATCH",
    "XACK",
    "XADD",
    "XLEN",
    "XRANGE",
    "XREAD",
    "XREADGROUP",
    "ZADD",
    "ZCARD",
    "ZINCRBY",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZREM",
    "ZREVRANGE",
    "ZSCAN",
    "ZSCORE",
];

/// An index into [`names`]: a known command, `other`, or `pipeline` (a batch of
/// different commands sent together, measured as one).
pub type Op = u8;
/// Any command not in [`KNOWN`].
pub const OTHER: Op = KNOWN.len() as Op;
/// A pipelined batch of different commands.
pub const PIPELINE: Op = OTHER + 1;
/// How many names there are.
pub const COUNT: usize = KNOWN.len() + 2;

/// The name recorded for `op` (`db.operation.name`).
pub fn name(op: Op) -> &'static str {
    match op {
        OTHER => "other",
        PIPELINE => "pipeline",
        i => KNOWN.get(usize::from(i)).copied().unwrap_or("other"),
    }
}

/// The op for a command name as sent (any case).
pub fn lookup(cmd: &[u8]) -> Op {
    let mut buf = [0u8; 16];
    if cmd.len() > buf.len() {
        return OTHER;
    }
    let upper = &mut buf[..cmd.len()];
    upper.copy_from_slice(cmd);
    upper.make_ascii_uppercase();
    match KNOWN.binary_search_by(|k| k.as_bytes().cmp(upper)) {
        Ok(i) => i as Op,
        Err(_) => OTHER,
    }
}

/// The op of a batch that held `prev` (none yet) and now `next`.
pub fn merge(prev: Option<Op>, next: Op) -> Op {
    match prev {
        None => next,
        Some(p) if p == next => p,
        Some(_) => PIPELINE,
    }
}

/// The bucket bounds the semantic conventions advise for
/// `db.client.operation.duration`, in seconds.
pub const BOUNDS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// One histogram per op: bucket counts (not cumulative; the last is +Inf), the
/// count and the sum in nanoseconds.
pub struct Durations {
    buckets: Vec<[AtomicU64; BOUNDS.len() + 1]>,
    sum_nanos: Vec<AtomicU64>,
}

/// What one op's histogram holds at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub op: Op,
    pub buckets: [u64; BOUNDS.len() + 1],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Default for Durations {
    fn default() -> Self {
        Self {
            buckets: (0..COUNT).map(|_| Default::default()).collect(),
            sum_nanos: (0..COUNT).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Durations {
    /// Record `n` commands of `op` that took `seconds` each.
    pub fn record(&self, op: Op, seconds: f64, n: u64) {
        let i = usize::from(op).min(COUNT - 1);
        let b = BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[i][b].fetch_add(n, Ordering::Relaxed);
        let nanos = (seconds.max(0.0) * 1e9) as u64;
        self.sum_nanos[i].fetch_add(nanos.saturating_mul(n), Ordering::Relaxed);
    }

    /// Every op with at least one command recorded.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let mut out = Vec::new();
        for (i, row) in self.buckets.iter().enumerate() {
            let buckets: [u64; BOUNDS.len() + 1] =
                std::array::from_fn(|b| row[b].load(Ordering::Relaxed));
            let count: u64 = buckets.iter().sum();
            if count == 0 {
                continue;
            }
            out.push(Snapshot {
                op: i as Op,
                buckets,
                count,
                sum_seconds: self.sum_nanos[i].load(Ordering::Relaxed) as f64 / 1e9,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_is_sorted_and_short_enough() {
        assert!(KNOWN.windows(2).all(|w| w[0] < w[1]));
        assert!(KNOWN.iter().all(|k| k.len() <= 16));
        assert!(COUNT < usize::from(u8::MAX));
    }

    #[test]
    fn lookup_any_case_and_other() {
        assert_eq!(name(lookup(b"get")), "GET");
        assert_eq!(name(lookup(b"ZRangeByScore")), "ZRANGEBYSCORE");
        assert_eq!(name(lookup(b"no-such-command")), "other");
        assert_eq!(name(lookup(b"averyveryverylongcommandname")), "other");
        assert_eq!(name(lookup(b"")), "other");
        assert_eq!(name(lookup(&[0xff, 0x00])), "other");
    }

    #[test]
    fn batches_of_one_name_keep_it() {
        let get = lookup(b"GET");
        assert_eq!(merge(None, get), get);
        assert_eq!(merge(Some(get), get), get);
        assert_eq!(name(merge(Some(get), lookup(b"SET"))), "pipeline");
    }

    #[test]
    fn record_fills_the_right_bucket() {
        let d = Durations::default();
        d.record(lookup(b"GET"), 0.0005, 3);
        d.record(lookup(b"GET"), 0.2, 1);
        d.record(OTHER, 100.0, 1);
        let s = d.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(name(s[0].op), "GET");
        assert_eq!(s[0].count, 4);
        assert_eq!(s[0].buckets[0], 3);
        assert_eq!(s[0].buckets[5], 1);
        assert!((s[0].sum_seconds - 0.2015).abs() < 1e-6);
        assert_eq!(name(s[1].op), "other");
        assert_eq!(s[1].buckets[BOUNDS.len()], 1);
    }
}
