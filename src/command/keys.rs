//! Where a command's keys are, and which cluster hash slot a key lives in.
//!
//! Part of the command model, used by the cluster router
//! ([`crate::upstream::cluster`]): [`slot`] is Redis Cluster's CRC16 of the key
//! (or of its `{hash tag}`) modulo 16384; a [`Spec`] gives the argument
//! positions of a command's keys (first key, last key, step, as the server's
//! own `COMMAND` reply states them for commands and subcommands, or the
//! built-in `BUILTIN` until it has), and the commands whose keys move with
//! their arguments (`movablekeys`: EVAL numkeys, XREAD STREAMS, ZUNION
//! numkeys, SORT ... STORE, MIGRATE KEYS, ...) are read by hand.
//! [`super::Commands::keys`] puts them together. Pure: no I/O.

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

const fn crc16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC16: [u16; 256] = crc16_table();

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for slots.
pub fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16[((crc >> 8) as u8 ^ b) as usize]
    })
}

/// The hash slot of `key`: only the part between the first `{` and the next
/// `}` counts when that part is not empty (a hash tag).
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

/// Key positions of one command as `COMMAND` states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// First key's argument index (0: no keys).
    pub first: i64,
    /// Last key's index; negative counts from the end (-1: the last argument).
    pub last: i64,
    pub step: i64,
    /// Keys depend on other arguments (read by [`movable`]).
    pub movable: bool,
}

impl Spec {
    pub(super) const fn new(first: i64, last: i64, step: i64) -> Spec {
        Spec {
            first,
            last,
            step,
            movable: false,
        }
    }
}

/// Commands whose keys the table below can only find by reading arguments.
pub(super) const MOVABLE: &[&str] = &[
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
    "xread",
    "xreadgroup",
    "zunion",
    "zinter",
    "zdiff",
    "zunionstore",
    "zinterstore",
    "zdiffstore",
    "zintercard",
    "sintercard",
    "lmpop",
    "blmpop",
    "zmpop",
    "bzmpop",
    "migrate",
    "sort",
    "sort_ro",
    "georadius",
    "georadiusbymember",
];

/// What the proxy knows without the server's table: the common commands.
/// `COMMAND` (read at start) overrides it and adds the rest.
pub(super) const BUILTIN: &[(&str, Spec)] = &[
    ("get", Spec::new(1, 1, 1)),
    ("set", Spec::new(1, 1, 1)),
    ("setex", Spec::new(1, 1, 1)),
    ("psetex", Spec::new(1, 1, 1)),
    ("setnx", Spec::new(1, 1, 1)),
    ("getset", Spec::new(1, 1, 1)),
    ("getdel", Spec::new(1, 1, 1)),
    ("getex", Spec::new(1, 1, 1)),
    ("append", Spec::new(1, 1, 1)),
    ("strlen", Spec::new(1, 1, 1)),
    ("incr", Spec::new(1, 1, 1)),
    ("decr", Spec::new(1, 1, 1)),
    ("incrby", Spec::new(1, 1, 1)),
    ("decrby", Spec::new(1, 1, 1)),
    ("incrbyfloat", Spec::new(1, 1, 1)),
    ("getrange", Spec::new(1, 1, 1)),
    ("setrange", Spec::new(1, 1, 1)),
    ("mget", Spec::new(1, -1, 1)),
    ("mset", Spec::new(1, -1, 2)),
    ("msetnx", Spec::new(1, -1, 2)),
    ("del", Spec::new(1, -1, 1)),
    ("unlink", Spec::new(1, -1, 1)),
    ("exists", Spec::new(1, -1, 1)),
    ("touch", Spec::new(1, -1, 1)),
    ("expire", Spec::new(1, 1, 1)),
    ("pexpire", Spec::new(1, 1, 1)),
    ("expireat", Spec::new(1, 1, 1)),
    ("ttl", Spec::new(1, 1, 1)),
    ("pttl", Spec::new(1, 1, 1)),
    ("persist", Spec::new(1, 1, 1)),
    ("type", Spec::new(1, 1, 1)),
    ("rename", Spec::new(1, 2, 1)),
    ("renamenx", Spec::new(1, 2, 1)),
    ("copy", Spec::new(1, 2, 1)),
    ("dump", Spec::new(1, 1, 1)),
    ("restore", Spec::new(1, 1, 1)),
    ("hget", Spec::new(1, 1, 1)),
    ("hset", Spec::new(1, 1, 1)),
    ("hsetnx", Spec::new(1, 1, 1)),
    ("hmset", Spec::new(1, 1, 1)),
    ("hmget", Spec::new(1, 1, 1)),
    ("hdel", Spec::new(1, 1, 1)),
    ("hgetall", Spec::new(1, 1, 1)),
    ("hincrby", Spec::new(1, 1, 1)),
    ("hlen", Spec::new(1, 1, 1)),
    ("hkeys", Spec::new(1, 1, 1)),
    ("hvals", Spec::new(1, 1, 1)),
    ("hexists", Spec::new(1, 1, 1)),
    ("hscan", Spec::new(1, 1, 1)),
    ("lpush", Spec::new(1, 1, 1)),
    ("rpush", Spec::new(1, 1, 1)),
    ("lpop", Spec::new(1, 1, 1)),
    ("rpop", Spec::new(1, 1, 1)),
    ("llen", Spec::new(1, 1, 1)),
    ("lrange", Spec::new(1, 1, 1)),
    ("lindex", Spec::new(1, 1, 1)),
    ("lset", Spec::new(1, 1, 1)),
    ("lrem", Spec::new(1, 1, 1)),
    ("ltrim", Spec::new(1, 1, 1)),
    ("lmove", Spec::new(1, 2, 1)),
    ("rpoplpush", Spec::new(1, 2, 1)),
    ("blpop", Spec::new(1, -2, 1)),
    ("brpop", Spec::new(1, -2, 1)),
    ("blmove", Spec::new(1, 2, 1)),
    ("brpoplpush", Spec::new(1, 2, 1)),
    ("sadd", Spec::new(1, 1, 1)),
    ("srem", Spec::new(1, 1, 1)),
    ("smembers", Spec::new(1, 1, 1)),
    ("sismember", Spec::new(1, 1, 1)),
    ("scard", Spec::new(1, 1, 1)),
    ("spop", Spec::new(1, 1, 1)),
    ("srandmember", Spec::new(1, 1, 1)),
    ("sscan", Spec::new(1, 1, 1)),
    ("sinter", Spec::new(1, -1, 1)),
    ("sunion", Spec::new(1, -1, 1)),
    ("sdiff", Spec::new(1, -1, 1)),
    ("sinterstore", Spec::new(1, -1, 1)),
    ("sunionstore", Spec::new(1, -1, 1)),
    ("sdiffstore", Spec::new(1, -1, 1)),
    ("smove", Spec::new(1, 2, 1)),
    ("zadd", Spec::new(1, 1, 1)),
    ("zrem", Spec::new(1, 1, 1)),
    ("zscore", Spec::new(1, 1, 1)),
    ("zincrby", Spec::new(1, 1, 1)),
    ("zcard", Spec::new(1, 1, 1)),
    ("zrange", Spec::new(1, 1, 1)),
    ("zrangestore", Spec::new(1, 2, 1)),
    ("zrank", Spec::new(1, 1, 1)),
    ("zscan", Spec::new(1, 1, 1)),
    ("zpopmin", Spec::new(1, 1, 1)),
    ("zpopmax", Spec::new(1, 1, 1)),
    ("bzpopmin", Spec::new(1, -2, 1)),
    ("bzpopmax", Spec::new(1, -2, 1)),
    ("xadd", Spec::new(1, 1, 1)),
    ("xlen", Spec::new(1, 1, 1)),
    ("xrange", Spec::new(1, 1, 1)),
    ("xdel", Spec::new(1, 1, 1)),
    ("xack", Spec::new(1, 1, 1)),
    ("xtrim", Spec::new(1, 1, 1)),
    ("pfadd", Spec::new(1, 1, 1)),
    ("pfcount", Spec::new(1, -1, 1)),
    ("pfmerge", Spec::new(1, -1, 1)),
    ("setbit", Spec::new(1, 1, 1)),
    ("getbit", Spec::new(1, 1, 1)),
    ("bitcount", Spec::new(1, 1, 1)),
    ("bitop", Spec::new(2, -1, 1)),
    ("geoadd", Spec::new(1, 1, 1)),
    ("geosearch", Spec::new(1, 1, 1)),
    ("watch", Spec::new(1, -1, 1)),
    ("spublish", Spec::new(1, 1, 1)),
    ("object|encoding", Spec::new(2, 2, 1)),
    ("object|freq", Spec::new(2, 2, 1)),
    ("object|idletime", Spec::new(2, 2, 1)),
    ("object|refcount", Spec::new(2, 2, 1)),
    ("memory|usage", Spec::new(2, 2, 1)),
    ("xinfo|stream", Spec::new(2, 2, 1)),
    ("xinfo|groups", Spec::new(2, 2, 1)),
    ("xinfo|consumers", Spec::new(2, 2, 1)),
    ("xgroup|create", Spec::new(2, 2, 1)),
    ("xgroup|destroy", Spec::new(2, 2, 1)),
    ("xgroup|setid", Spec::new(2, 2, 1)),
    ("xgroup|createconsumer", Spec::new(2, 2, 1)),
    ("xgroup|delconsumer", Spec::new(2, 2, 1)),
];

/// Commands with subcommands whose keys the subcommand's entry gives.
pub(super) const CONTAINERS: &[&str] = &["object", "memory", "xinfo", "xgroup"];

/// Where a command's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// No keys (PING, INFO, PUBLISH...).
    None,
    /// Argument indexes of the keys, in order (may be empty: `EVAL s 0`).
    At(Vec<usize>),
    /// The arguments do not say (bad numkeys, missing STREAMS): let the server
    /// answer; the router sends such a command to any node.
    Unreadable,
}

/// The positions of the keys of `args` (`args[0]` is the name, `lower` the
/// name in lower case) by `spec`.
pub(super) fn positions(spec: Spec, lower: &[u8], args: &[&[u8]]) -> Keys {
    if spec.movable {
        if let Some(k) = movable(lower, args) {
            return k;
        }
    }
    by_range(spec, args.len())
}

fn by_range(spec: Spec, argc: usize) -> Keys {
    if spec.first <= 0 || spec.step <= 0 {
        return Keys::None;
    }
    let first = spec.first as usize;
    let last = if spec.last < 0 {
        argc as i64 + spec.last
    } else {
        spec.last
    };
    if last < spec.first || first >= argc {
        return if first >= argc {
            Keys::Unreadable
        } else {
            Keys::None
        };
    }
    let last = (last as usize).min(argc - 1);
    Keys::At((first..=last).step_by(spec.step as usize).collect())
}

fn int_at(args: &[&[u8]], i: usize) -> Option<usize> {
    std::str::from_utf8(args.get(i)?).ok()?.parse().ok()
}

/// `count` keys from `args[from]`, the count read at `args[at]`.
fn numkeys(args: &[&[u8]], at: usize, from: usize) -> Keys {
    match int_at(args, at) {
        Some(n) if from.checked_add(n).is_some_and(|end| end <= args.len()) => {
            Keys::At((from..from + n).collect())
        }
        _ => Keys::Unreadable,
    }
}

/// Keys of a `movablekeys` command; `None`: use its first/last/step.
fn movable(name: &[u8], args: &[&[u8]]) -> Option<Keys> {
    let eq = |i: usize, w: &str| {
        args.get(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(w.as_bytes()))
    };
    Some(match name {
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro" => {
            numkeys(args, 2, 3)
        }
        b"zunion" | b"zinter" | b"zdiff" | b"zintercard" | b"sintercard" | b"lmpop" | b"zmpop" => {
            numkeys(args, 1, 2)
        }
        b"blmpop" | b"bzmpop" => numkeys(args, 2, 3),
        b"zunionstore" | b"zinterstore" | b"zdiffstore" => match numkeys(args, 2, 3) {
            Keys::At(mut k) => {
                k.insert(0, 1);
                Keys::At(k)
            }
            other => other,
        },
        b"xread" | b"xreadgroup" => {
            let Some(s) = (1..args.len()).find(|&i| eq(i, "STREAMS")) else {
                return Some(Keys::Unreadable);
            };
            let rest = args.len() - s - 1;
            if rest == 0 || !rest.is_multiple_of(2) {
                return Some(Keys::Unreadable);
            }
            Keys::At((s + 1..s + 1 + rest / 2).collect())
        }
        b"migrate" => {
            if args.get(3).is_some_and(|k| !k.is_empty()) {
                Keys::At(vec![3])
            } else {
                match (6..args.len()).find(|&i| eq(i, "KEYS")) {
                    Some(k) => Keys::At((k + 1..args.len()).collect()),
                    None => Keys::Unreadable,
                }
            }
        }
        b"sort" | b"sort_ro" | b"georadius" | b"georadiusbymember" => {
            if args.len() < 2 {
                return Some(Keys::Unreadable);
            }
            let mut keys = vec![1];
            let store = |w: &[u8]| {
                w.eq_ignore_ascii_case(b"STORE")
                    || (name.starts_with(b"geo") && w.eq_ignore_ascii_case(b"STOREDIST"))
            };
            let mut i = 2;
            while i < args.len() {
                if store(args[i]) && i + 1 < args.len() {
                    keys.push(i + 1);
                    i += 1;
                }
                i += 1;
            }
            Keys::At(keys)
        }
        _ => return None,
    })
}

/// Keys of one command in several slots (Redis answers `CROSSSLOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossSlot;

/// The one slot every key of `args` at `positions` hashes to; `Err` when
/// they hash to several; `Ok(None)` without keys.
pub fn common_slot(args: &[&[u8]], positions: &[usize]) -> Result<Option<u16>, CrossSlot> {
    let mut found = None;
    for &p in positions {
        let Some(k) = args.get(p) else { continue };
        let s = slot(k);
        match found {
            None => found = Some(s),
            Some(f) if f != s => return Err(CrossSlot),
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
