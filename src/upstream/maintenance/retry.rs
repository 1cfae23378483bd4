//! Which commands in flight on a lost connection may be sent again on the
//! new one: only those that cannot have changed anything.
//!
//! A command written to a connection that then dropped may or may not have
//! run. A read-only command is safe to run again. Which ones are read-only is
//! the project's own table below: commands Redis 7's `COMMAND` flags
//! `readonly` that are neither `blocking` nor `may_replicate`, plus the
//! `*_RO` script and function calls (read-only by contract: the server
//! refuses writes in them). A command missing from the table is a write.

/// Read-only commands (upper case): running one twice changes nothing.
const READ_ONLY: &[&str] = &[
    "BITCOUNT",
    "BITFIELD_RO",
    "BITPOS",
    "DBSIZE",
    "DUMP",
    "ECHO",
    "EVALSHA_RO",
    "EVAL_RO",
    "EXISTS",
    "EXPIRETIME",
    "FCALL_RO",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO",
    "GEOSEARCH",
    "GET",
    "GETBIT",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HRANDFIELD",
    "HSCAN",
    "HSTRLEN",
    "HVALS",
    "KEYS",
    "LCS",
    "LINDEX",
    "LLEN",
    "LPOS",
    "LRANGE",
    "MGET",
    "PEXPIRETIME",
    "PING",
    "PTTL",
    "RANDOMKEY",
    "SCAN",
    "SCARD",
    "SDIFF",
    "SINTER",
    "SINTERCARD",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "SORT_RO",
    "SRANDMEMBER",
    "SSCAN",
    "STRLEN",
    "SUBSTR",
    "SUNION",
    "TTL",
    "TYPE",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZINTER",
    "ZINTERCARD",
    "ZLEXCOUNT",
    "ZMSCORE",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
];

/// Whether the command named `name` is in the read-only table.
pub fn read_only(name: &[u8]) -> bool {
    READ_ONLY
        .iter()
        .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `bytes` (one or more commands as RESP arrays of bulk strings, as
/// the proxy writes them upstream) holds only read-only commands. Anything
/// it cannot read is not.
pub fn request_read_only(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let Some((name, after)) = command_name(rest) else {
            return false;
        };
        if !read_only(name) {
            return false;
        }
        rest = after;
    }
    true
}

/// The name of the first command in `b` and what follows that command.
fn command_name(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, mut rest) = header(b, b'*')?;
    if n == 0 {
        return None;
    }
    let mut name: &[u8] = &[];
    for i in 0..n {
        let (len, after) = header(rest, b'$')?;
        let data = after.get(..len)?;
        if after.get(len..len + 2)? != b"\r\n" {
            return None;
        }
        if i == 0 {
            name = data;
        }
        rest = &after[len + 2..];
    }
    Some((name, rest))
}

/// `<kind><decimal>\r\n` at the start of `b`: the number and what follows.
fn header(b: &[u8], kind: u8) -> Option<(usize, &[u8])> {
    if b.first() != Some(&kind) {
        return None;
    }
    let end = b.iter().position(|&c| c == b'\r')?;
    if b.get(end + 1) != Some(&b'\n') || !(2..=12).contains(&end) {
        return None;
    }
    let n = std::str::from_utf8(&b[1..end]).ok()?.parse().ok()?;
    Some((n, &b[end + 2..]))
}

/// One entry of a lost connection's in-flight queue, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    /// A client's request that may run again (read-only, not sent twice yet,
    /// not inside MULTI).
    Safe,
    /// A client's request that may have changed something, or was sent again already.
    Unsafe,
    /// The proxy's own (keepalive PING, re-AUTH): dropped, never a client's.
    Own,
}

/// For each in-flight entry, whether to send it again on the new connection:
/// the safe ones, in their order; the unsafe ones get the "may or may not
/// have been executed" error.
///
/// A read sent again runs after whatever the lost connection ran before it
/// dropped, writes written after the read included. A client's pipelined
/// commands read in one go travel as one request (all safe or not), so a
/// read can see a later write of its own client only when that client's
/// pipeline was split across requests, both were in flight, and the write
/// ran before the drop; its client was then told the write may have run.
/// Failing every read written before any write in flight instead (of any
/// client) fails reads in every unplanned failover under load.
pub fn resend_plan(inflight: &[InFlight]) -> Vec<bool> {
    inflight.iter().map(|e| *e == InFlight::Safe).collect()
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
