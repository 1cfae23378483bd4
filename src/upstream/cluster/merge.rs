//! Putting the replies of split and fanned-out commands back together as one
//! non-cluster Redis would have answered. Pure functions over raw RESP bytes
//! (elements found with the non-recursive [`ReplyScanner`]); a reply the proxy
//! cannot read becomes an error reply, never a panic.

use crate::command::{Fan, Merge};
use crate::resp::scan::ReplyScanner;
use bytes::{BufMut, Bytes, BytesMut};

/// The first error among `replies`, if any.
pub(super) fn first_error(replies: &[&[u8]]) -> Option<Bytes> {
    replies
        .iter()
        .find(|r| r.first().is_some_and(|&b| b == b'-' || b == b'!'))
        .map(|r| Bytes::copy_from_slice(r))
}

pub(super) fn bad(what: &str) -> Bytes {
    crate::resp::error(&format!(
        "ERR redis-entra-proxy: cannot merge the shards' replies ({what})"
    ))
}

pub(super) fn line_int(r: &[u8], prefix: u8) -> Option<(i64, usize)> {
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

pub(super) fn array(items: &[&[u8]]) -> Bytes {
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
            // A shard with keys, chosen at random (a shard's chance does
            // not follow its size: see the README's cluster section).
            let keys: Vec<&&[u8]> = replies
                .iter()
                .filter(|r| r.first() == Some(&b'$') && !r.starts_with(b"$-1"))
                .collect();
            match (keys.len(), replies.first()) {
                (0, Some(nil)) => Bytes::copy_from_slice(nil),
                (0, None) => bad("no shard"),
                (n, _) => Bytes::copy_from_slice(keys[fastrand::usize(..n)]),
            }
        }
        Fan::Info => info(replies),
        Fan::Scan => bad("SCAN is merged by scan::reply"),
    }
}

/// INFO from every primary: the first one's, with its `# Keyspace`
/// section made of every shard's (keys and expires summed per database,
/// avg_ttl weighted by expires). Other sections describe that one node.
fn info(replies: &[&[u8]]) -> Bytes {
    let bodies: Option<Vec<InfoBody>> = replies.iter().map(|r| info_body(r)).collect();
    let Some(bodies) = bodies else {
        return bad("INFO reply is not a string");
    };
    let Some(&(kind, prefix, first)) = bodies.first() else {
        return bad("no shard");
    };
    let Ok(first) = std::str::from_utf8(first) else {
        return bad("INFO reply is not text");
    };
    let Some(at) = first.find("# Keyspace\r\n") else {
        return Bytes::copy_from_slice(replies[0]);
    };
    let head_end = at + "# Keyspace\r\n".len();
    let tail_at = first[head_end..]
        .find("\r\n\r\n")
        .map_or(first.len(), |i| head_end + i + 2);
    // db -> (keys, expires, ttl * expires)
    let mut dbs: std::collections::BTreeMap<u32, (u64, u64, u128)> = Default::default();
    for (_, _, body) in &bodies {
        let text = String::from_utf8_lossy(body);
        let Some(at) = text.find("# Keyspace\r\n") else {
            continue;
        };
        for line in text[at..].lines().skip(1) {
            if line.is_empty() {
                break;
            }
            let Some((db, fields)) = line.split_once(':') else {
                continue;
            };
            let Some(n) = db.strip_prefix("db").and_then(|n| n.parse().ok()) else {
                continue;
            };
            let field = |name: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(0)
            };
            let e = dbs.entry(n).or_default();
            e.0 += field("keys");
            e.1 += field("expires");
            e.2 += u128::from(field("avg_ttl")) * u128::from(field("expires"));
        }
    }
    let mut text = String::from(&first[..head_end]);
    for (db, (keys, expires, ttl)) in dbs {
        let avg = if expires > 0 {
            ttl / u128::from(expires)
        } else {
            0
        };
        text += &format!("db{db}:keys={keys},expires={expires},avg_ttl={avg}\r\n");
    }
    text += &first[tail_at..];
    let body = [prefix, text.as_bytes()].concat();
    let mut out = BytesMut::new();
    out.put_slice(format!("{}{}\r\n", kind as char, body.len()).as_bytes());
    out.put_slice(&body);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// (type byte, verbatim prefix, text) of a bulk or verbatim string reply.
type InfoBody<'a> = (u8, &'a [u8], &'a [u8]);

fn info_body(r: &[u8]) -> Option<InfoBody<'_>> {
    let kind = *r.first()?;
    let (len, at) = line_int(r, kind)?;
    let body = r.get(at..at.checked_add(usize::try_from(len).ok()?)?)?;
    match kind {
        b'$' => Some((kind, &[], body)),
        b'=' if body.len() >= 4 => Some((kind, &body[..4], &body[4..])),
        _ => None,
    }
}

/// `n` whole replies from `b`; `None` where they are missing.
pub fn split_replies(b: &Bytes, n: usize) -> Vec<Option<Bytes>> {
    let mut out = Vec::with_capacity(n);
    let mut pos = 0;
    for _ in 0..n {
        let mut s = ReplyScanner::new();
        match s.scan(&b[pos..]) {
            Ok(Some(r)) => {
                out.push(Some(b.slice(pos..pos + r.len)));
                pos += r.len;
            }
            _ => out.push(None),
        }
    }
    out
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
    fn info_keyspace_is_every_shards() {
        let a = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=100\r\n";
        let b =
            "# Keyspace\r\ndb0:keys=5,expires=2,avg_ttl=300\r\ndb1:keys=1,expires=0,avg_ttl=0\r\n";
        let c = "# Server\r\nredis_version:7.0.15\r\n";
        let bulk = |t: &str| format!("${}\r\n{t}\r\n", t.len()).into_bytes();
        let got = fan(Fan::Info, &[&bulk(a), &bulk(b), &bulk(c)]);
        let want = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\ndb0:keys=15,expires=4,avg_ttl=200\r\ndb1:keys=1,expires=0,avg_ttl=0\r\n";
        assert_eq!(got, bulk(want));
        // RESP3 verbatim, and a section after the keyspace kept.
        let v = |t: &str| format!("={}\r\ntxt:{t}\r\n", t.len() + 4).into_bytes();
        let a2 = "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n\r\n# Other\r\nx:1\r\n";
        let got = fan(Fan::Info, &[&v(a2), &v(a2)]);
        assert_eq!(
            got,
            v("# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n\r\n# Other\r\nx:1\r\n")
        );
        // No keyspace section asked for: the first as it is.
        assert_eq!(fan(Fan::Info, &[&bulk(c), &bulk(c)]), bulk(c));
        assert!(fan(Fan::Info, &[b":1\r\n"]).starts_with(b"-ERR"));
    }
}
