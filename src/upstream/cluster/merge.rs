//! Putting the replies of split and fanned-out commands back together as one
//! non-cluster Redis would have answered. Pure functions over raw RESP bytes
//! (elements found with the non-recursive [`ReplyScanner`]); a reply the proxy
//! cannot read becomes an error reply, never a panic.

use super::route::{Fan, Merge};
use crate::resp::scan::ReplyScanner;
use bytes::{BufMut, Bytes, BytesMut};

/// The first error among `replies`, if any.
fn first_error(replies: &[&[u8]]) -> Option<Bytes> {
    replies
        .iter()
        .find(|r| r.first().is_some_and(|&b| b == b'-' || b == b'!'))
        .map(|r| Bytes::copy_from_slice(r))
}

fn bad(what: &str) -> Bytes {
    crate::resp::error(&format!(
        "ERR redis-entra-proxy: cannot merge the shards' replies ({what})"
    ))
}

fn line_int(r: &[u8], prefix: u8) -> Option<(i64, usize)> {
    if r.first() != Some(&prefix) {
        return None;
    }
    let end = memchr::memchr(b'\r', r)?;
    let n = std::str::from_utf8(&r[1..end]).ok()?.parse().ok()?;
    Some((n, end + 2))
}

/// The elements of an array (or set) reply; `None` for anything else.
pub fn elements(reply: &[u8]) -> Option<Vec<&[u8]>> {
    let (n, mut pos) = line_int(reply, b'*').or_else(|| line_int(reply, b'~'))?;
    if n < 0 {
        return None;
    }
    let mut out = Vec::with_capacity((n as usize).min(1 << 16));
    for _ in 0..n {
        let mut s = ReplyScanner::new();
        let r = s.scan(&reply[pos..]).ok()??;
        out.push(&reply[pos..pos + r.len]);
        pos += r.len;
    }
    Some(out)
}

fn array(items: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + items.iter().map(|i| i.len()).sum::<usize>());
    b.put_slice(format!("*{}\r\n", items.len()).as_bytes());
    for i in items {
        b.put_slice(i);
    }
    b.freeze()
}

fn sum(replies: &[&[u8]]) -> Bytes {
    let mut total: i64 = 0;
    for r in replies {
        match line_int(r, b':') {
            Some((n, _)) => total = total.saturating_add(n),
            None => return bad("expected integers"),
        }
    }
    crate::resp::integer(total)
}

fn all_ok(replies: &[&[u8]]) -> Bytes {
    if replies.iter().all(|r| *r == b"+OK\r\n") {
        crate::resp::ok()
    } else {
        bad("expected OK from every shard")
    }
}

/// A split command's reply from its parts: `parts[i]` carried the client's
/// keys `keys[i]` (positions among the keys) and answered `replies[i]`.
pub fn split(merge: Merge, nkeys: usize, keys: &[Vec<usize>], replies: &[&[u8]]) -> Bytes {
    if let Some(e) = first_error(replies) {
        return e;
    }
    match merge {
        Merge::Sum => sum(replies),
        Merge::Ok => all_ok(replies),
        Merge::Array => {
            let mut slots: Vec<&[u8]> = vec![b"$-1\r\n"; nkeys];
            for (ks, r) in keys.iter().zip(replies) {
                let Some(els) = elements(r) else {
                    return bad("expected arrays");
                };
                if els.len() != ks.len() {
                    return bad("array of the wrong length");
                }
                for (&k, e) in ks.iter().zip(els) {
                    if let Some(s) = slots.get_mut(k) {
                        *s = e;
                    }
                }
            }
            array(&slots)
        }
    }
}

/// A fanned-out command's reply from every primary's (not SCAN).
pub fn fan(kind: Fan, replies: &[&[u8]]) -> Bytes {
    if let Some(e) = first_error(replies) {
        return e;
    }
    match kind {
        Fan::Sum => sum(replies),
        Fan::AllOk => all_ok(replies),
        Fan::Concat => {
            let mut all = Vec::new();
            for r in replies {
                match elements(r) {
                    Some(e) => all.extend(e),
                    None => return bad("expected arrays"),
                }
            }
            array(&all)
        }
        Fan::Same => match replies.first() {
            Some(first) if replies.iter().all(|r| r == first) => Bytes::copy_from_slice(first),
            Some(_) => bad("the shards answered differently"),
            None => bad("no shard"),
        },
        Fan::And => {
            let lists: Option<Vec<Vec<&[u8]>>> = replies.iter().map(|r| elements(r)).collect();
            let Some(lists) = lists else {
                return bad("expected arrays");
            };
            let n = lists.first().map_or(0, |l| l.len());
            if lists.iter().any(|l| l.len() != n) {
                return bad("arrays of different lengths");
            }
            let items: Vec<&[u8]> = (0..n)
                .map(|i| {
                    if lists.iter().all(|l| l[i] == b":1\r\n") {
                        &b":1\r\n"[..]
                    } else {
                        &b":0\r\n"[..]
                    }
                })
                .collect();
            array(&items)
        }
        Fan::Random => {
            let key = replies
                .iter()
                .find(|r| r.first() == Some(&b'$') && !r.starts_with(b"$-1"));
            match (key, replies.first()) {
                (Some(k), _) => Bytes::copy_from_slice(k),
                (None, Some(nil)) => Bytes::copy_from_slice(nil),
                (None, None) => bad("no shard"),
            }
        }
        Fan::Scan => bad("SCAN is merged by scan_reply"),
    }
}

/// Low bits of a proxy SCAN cursor that name the shard being scanned.
const SHARD_BITS: u32 = 10;

/// A client's SCAN cursor as (shard index, that shard's own cursor).
pub fn decode_cursor(cursor: &[u8]) -> Option<(usize, u64)> {
    let c: u64 = std::str::from_utf8(cursor).ok()?.parse().ok()?;
    Some(((c & ((1 << SHARD_BITS) - 1)) as usize, c >> SHARD_BITS))
}

/// Rewrite one shard's SCAN reply for the client: the next cursor names the
/// same shard while it has more, then the next shard, then 0 after the last.
pub fn scan_reply(reply: &[u8], shard: usize, shards: usize) -> Bytes {
    if first_error(&[reply]).is_some() {
        return Bytes::copy_from_slice(reply);
    }
    let Some(els) = elements(reply) else {
        return bad("SCAN reply is not an array");
    };
    let [cursor, keys] = els[..] else {
        return bad("SCAN reply of the wrong shape");
    };
    let Some((len, at)) = line_int(cursor, b'$') else {
        return bad("SCAN cursor");
    };
    let Some(node_cursor) = cursor
        .get(at..at.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)))
        .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok())
    else {
        return bad("SCAN cursor");
    };
    let next: u64 = if node_cursor != 0 {
        if node_cursor >> (64 - SHARD_BITS) != 0 {
            return bad("SCAN cursor too large to carry the shard");
        }
        (node_cursor << SHARD_BITS) | shard as u64
    } else if shard + 1 < shards {
        (shard + 1) as u64
    } else {
        0
    };
    let c = next.to_string();
    let cbulk = crate::resp::bulk(c.as_bytes());
    array(&[&cbulk[..], keys])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_replies_merge_in_client_order() {
        // MGET a b c d: part 0 carried keys 0 and 2, part 1 keys 1 and 3.
        let r0 = b"*2\r\n$2\r\nva\r\n$-1\r\n";
        let r1 = b"*2\r\n$2\r\nvb\r\n$2\r\nvd\r\n";
        let got = split(Merge::Array, 4, &[vec![0, 2], vec![1, 3]], &[r0, r1]);
        assert_eq!(
            &got[..],
            b"*4\r\n$2\r\nva\r\n$2\r\nvb\r\n$-1\r\n$2\r\nvd\r\n"
        );
        assert_eq!(
            &split(Merge::Sum, 3, &[], &[b":1\r\n", b":2\r\n"])[..],
            b":3\r\n"
        );
        assert_eq!(
            &split(Merge::Ok, 2, &[], &[b"+OK\r\n", b"+OK\r\n"])[..],
            b"+OK\r\n"
        );
        let err = b"-MOVED 1 h:1\r\n";
        assert_eq!(&split(Merge::Sum, 2, &[], &[b":1\r\n", err])[..], err);
        // Nonsense from a shard: an error, no panic.
        let got = split(Merge::Array, 1, &[vec![0]], &[b"*5\r\n$1\r\n"]);
        assert!(got.starts_with(b"-ERR redis-entra-proxy"));
        let got = split(Merge::Array, 1, &[vec![7]], &[b"*1\r\n:1\r\n"]);
        assert_eq!(&got[..], b"*1\r\n$-1\r\n");
        assert!(split(Merge::Sum, 1, &[], &[b"+x\r\n"]).starts_with(b"-ERR"));
    }

    #[test]
    fn fanned_out_replies() {
        assert_eq!(
            &fan(Fan::Sum, &[b":1\r\n", b":0\r\n", b":5\r\n"])[..],
            b":6\r\n"
        );
        assert_eq!(
            &fan(
                Fan::Concat,
                &[b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*1\r\n$1\r\nb\r\n"]
            )[..],
            b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(
            &fan(Fan::And, &[b"*2\r\n:1\r\n:0\r\n", b"*2\r\n:1\r\n:1\r\n"])[..],
            b"*2\r\n:1\r\n:0\r\n"
        );
        assert_eq!(
            &fan(Fan::Random, &[b"$-1\r\n", b"$1\r\nk\r\n"])[..],
            b"$1\r\nk\r\n"
        );
        assert_eq!(&fan(Fan::Random, &[b"_\r\n", b"_\r\n"])[..], b"_\r\n");
        assert_eq!(
            &fan(Fan::Same, &[b"$2\r\nab\r\n", b"$2\r\nab\r\n"])[..],
            b"$2\r\nab\r\n"
        );
        assert!(fan(Fan::Same, &[b"$2\r\nab\r\n", b"$2\r\nac\r\n"]).starts_with(b"-ERR"));
        assert_eq!(
            &fan(Fan::AllOk, &[b"+OK\r\n", b"-ERR no\r\n"])[..],
            b"-ERR no\r\n"
        );
    }

    #[test]
    fn scan_cursor_carries_the_shard() {
        assert_eq!(decode_cursor(b"0"), Some((0, 0)));
        assert_eq!(decode_cursor(b"x"), None);
        // Shard 1 has more: its cursor 12 goes out as 12 << 10 | 1.
        let r = b"*2\r\n$2\r\n12\r\n*1\r\n$1\r\nk\r\n";
        let got = scan_reply(r, 1, 3);
        let want_cursor = ((12u64 << 10) | 1).to_string();
        assert_eq!(
            got,
            array(&[
                &crate::resp::bulk(want_cursor.as_bytes())[..],
                b"*1\r\n$1\r\nk\r\n"
            ])
        );
        assert_eq!(decode_cursor(want_cursor.as_bytes()), Some((1, 12)));
        // Shard 1 done: next is shard 2 from its start; after the last, 0.
        let done = b"*2\r\n$1\r\n0\r\n*0\r\n";
        assert_eq!(&scan_reply(done, 1, 3)[..], b"*2\r\n$1\r\n2\r\n*0\r\n");
        assert_eq!(&scan_reply(done, 2, 3)[..], b"*2\r\n$1\r\n0\r\n*0\r\n");
        assert!(scan_reply(b"*1\r\n:1\r\n", 0, 1).starts_with(b"-ERR"));
        assert!(scan_reply(b"*2\r\n$1\r\nz\r\n*0\r\n", 0, 1).starts_with(b"-ERR"));
        // A cursor length no reply can have: an error, not an overflow.
        let huge = b"*2\r\n$9223372036854775807\r\n0\r\n*0\r\n";
        assert!(scan_reply(huge, 0, 1).starts_with(b"-ERR"));
    }
}
