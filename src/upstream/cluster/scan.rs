//! SCAN over a cluster as over one Redis: pure functions.
//!
//! The keyspace is walked in slot order, one run of consecutive slots owned
//! by one node at a time; that node's SCAN cursor walks its whole keyspace,
//! and only the keys of the run are given to the client. Each step also asks
//! the node which slots it owns and which it is migrating away (`CLUSTER
//! NODES`, its own line, in the same write): the run is what the node says,
//! not what the proxy's map said. The proxy's cursor carries the first slot
//! of the run, the node's cursor and a fingerprint of the run (node, end,
//! migration under way). When the run changes between steps (a reshard, a
//! failover), or the node finishes while one of the run's slots is still
//! migrating (its keys may have left before the cursor reached them), the run
//! is walked again from its start. So the cursor does not depend on node
//! order, and a key that exists for the whole scan is returned at least once
//! (duplicates are allowed, as Redis allows).
//!
//! A node that refuses `CLUSTER NODES` (an ACL without it) is taken at the
//! proxy's map's word for its run, without the migration check.
//!
//! A node holding several runs is walked once per run (the price of not
//! depending on node order); most caches hold one run per shard.

use super::merge::{array, bad, first_error, line_int};
use crate::command::keys::{self, SLOTS};
use crate::upstream::topology::{Node, SlotMap};
use bytes::Bytes;

/// Cursor layout, low bits first: first slot of the run, fingerprint, node cursor.
const SLOT_BITS: u32 = 14;
const FP_BITS: u32 = 10;
const LOW_BITS: u32 = SLOT_BITS + FP_BITS;

/// A client's SCAN cursor, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// First slot of the run being scanned.
    pub slot: u16,
    /// Fingerprint of the run when `node` was given (0 with `node` 0).
    pub fp: u16,
    /// The owner's own SCAN cursor (0: start of the run).
    pub node: u64,
}

impl Cursor {
    pub fn decode(c: &[u8]) -> Option<Cursor> {
        let c: u64 = std::str::from_utf8(c).ok()?.parse().ok()?;
        Some(Cursor {
            slot: (c & ((1 << SLOT_BITS) - 1)) as u16,
            fp: ((c >> SLOT_BITS) & ((1 << FP_BITS) - 1)) as u16,
            node: c >> LOW_BITS,
        })
    }

    /// `None`: the node's cursor does not fit.
    pub fn encode(&self) -> Option<u64> {
        if self.node >> (64 - LOW_BITS) != 0 {
            return None;
        }
        Some(self.node << LOW_BITS | u64::from(self.fp) << SLOT_BITS | u64::from(self.slot))
    }
}

/// One step of a SCAN: ask `node` with `node_cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub node: Node,
    pub node_cursor: u64,
    pub cursor: Cursor,
    /// The run as the proxy's map has it: used when the node does not
    /// answer `CLUSTER NODES` (an ACL without it).
    pub by_map: Own,
}

/// What to ask for `cursor`: the owner of its slot in the map now; `None`:
/// no owner now (a failover in progress).
pub fn step(map: &SlotMap, cursor: Cursor) -> Option<Step> {
    let node = map.owner(cursor.slot)?;
    let mut end = cursor.slot;
    while end + 1 < SLOTS && map.owner(end + 1) == Some(node) {
        end += 1;
    }
    Some(Step {
        node: node.clone(),
        node_cursor: cursor.node,
        cursor,
        by_map: Own {
            ranges: vec![(cursor.slot, end)],
            migrating: Vec::new(),
        },
    })
}

/// What a node says of itself in `CLUSTER NODES`: slot ranges it owns
/// (inclusive) and slots it is migrating away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Own {
    pub ranges: Vec<(u16, u16)>,
    pub migrating: Vec<u16>,
}

/// The `myself` line of a `CLUSTER NODES` reply (bulk or verbatim string).
pub fn parse_own(reply: &[u8]) -> Option<Own> {
    let text = bulk(reply).or_else(|| {
        let (len, at) = line_int(reply, b'=')?;
        let body = reply.get(at..at.checked_add(usize::try_from(len).ok()?)?)?;
        body.get(4..)
    })?;
    let text = std::str::from_utf8(text).ok()?;
    let line = text.lines().find(|l| {
        l.split(' ')
            .nth(2)
            .is_some_and(|f| f.split(',').any(|x| x == "myself"))
    })?;
    let mut own = Own::default();
    for f in line.split(' ').skip(8) {
        if let Some(m) = f.strip_prefix('[') {
            // `[slot->-id]`: migrating away; `[slot-<-id]`: importing.
            if let Some((slot, _)) = m.split_once("->-") {
                own.migrating.push(slot.parse().ok()?);
            }
        } else if let Some((a, b)) = f.split_once('-') {
            own.ranges.push((a.parse().ok()?, b.parse().ok()?));
        } else if !f.is_empty() {
            let s = f.parse().ok()?;
            own.ranges.push((s, s));
        }
    }
    Some(own)
}

/// The end (exclusive) of the run from `slot` that `own` says is the node's.
fn run_end(own: &Own, slot: u16) -> Option<u16> {
    let owns = |s: u16| own.ranges.iter().any(|&(a, b)| a <= s && s <= b);
    if !owns(slot) {
        return None;
    }
    let mut end = slot + 1;
    while end < SLOTS && owns(end) {
        end += 1;
    }
    Some(end)
}

fn fingerprint(node: &Node, end: u16, migrating: bool) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    let text = format!("{}:{}/{end}/{migrating}", node.host, node.port);
    for b in text.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    // Never 0: a restart cursor of slot 0 must not read as the end.
    1 + (h % ((1 << FP_BITS) - 1)) as u16
}

/// The client's reply from the node's SCAN and `CLUSTER NODES` replies, and
/// whether the proxy's map is stale (the node does not own the slot).
pub fn reply(scan: &[u8], nodes: &[u8], step: &Step) -> (Bytes, bool) {
    if let Some(e) = first_error(&[scan]) {
        return (e, false);
    }
    let own = parse_own(nodes).unwrap_or_else(|| step.by_map.clone());
    let from = step.cursor.slot;
    let again = |fp| Cursor {
        slot: from,
        fp,
        node: 0,
    };
    let Some(end) = run_end(&own, from) else {
        // Not this node's any more: again from the run's start, on the
        // owner the refreshed map names.
        let c = again(fingerprint(&step.node, 0, false));
        return (page(c, &[]), true);
    };
    let migrating = own.migrating.iter().any(|m| (from..end).contains(m));
    let fp = fingerprint(&step.node, end, migrating);
    let Some(els) = super::merge::elements(scan) else {
        return (bad("SCAN reply is not an array"), false);
    };
    let [cursor, keys] = els[..] else {
        return (bad("SCAN reply of the wrong shape"), false);
    };
    let Some(node_cursor) =
        bulk(cursor).and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok())
    else {
        return (bad("SCAN cursor"), false);
    };
    let Some(keys) = super::merge::elements(keys) else {
        return (bad("SCAN keys"), false);
    };
    let kept: Vec<&[u8]> = keys
        .into_iter()
        .filter(|k| bulk(k).is_some_and(|k| (from..end).contains(&keys::slot(k))))
        .collect();
    let changed = step.cursor.node != 0 && step.cursor.fp != fp;
    let next = if changed || (node_cursor == 0 && migrating) {
        again(fp)
    } else if node_cursor != 0 {
        Cursor {
            slot: from,
            fp,
            node: node_cursor,
        }
    } else if end >= SLOTS {
        return (page_raw(0, &kept), false);
    } else {
        Cursor {
            slot: end,
            fp: 0,
            node: 0,
        }
    };
    (page(next, &kept), false)
}

fn page(next: Cursor, keys: &[&[u8]]) -> Bytes {
    match next.encode() {
        Some(c) => page_raw(c, keys),
        None => bad("SCAN cursor too large to carry the slot"),
    }
}

fn page_raw(next: u64, keys: &[&[u8]]) -> Bytes {
    let c = next.to_string();
    let cbulk = crate::resp::bulk(c.as_bytes());
    array(&[&cbulk[..], &array(keys)[..]])
}

/// The content of a bulk string reply.
fn bulk(r: &[u8]) -> Option<&[u8]> {
    let (len, at) = line_int(r, b'$')?;
    r.get(at..at.checked_add(usize::try_from(len).ok()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> Node {
        Node {
            host: "h".into(),
            port,
        }
    }

    fn key_in(slot: u16) -> String {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| keys::slot(k.as_bytes()) == slot)
            .unwrap()
    }

    fn scan_reply(cursor: &str, keys: &[&str]) -> Vec<u8> {
        let mut r = format!("*2\r\n${}\r\n{cursor}\r\n*{}\r\n", cursor.len(), keys.len());
        for k in keys {
            r += &format!("${}\r\n{k}\r\n", k.len());
        }
        r.into_bytes()
    }

    #[test]
    fn cursor_round_trips_and_zero_is_the_start() {
        let c = Cursor::decode(b"0").unwrap();
        assert_eq!(
            c,
            Cursor {
                slot: 0,
                fp: 0,
                node: 0
            }
        );
        let c = Cursor {
            slot: 16383,
            fp: 1023,
            node: 123_456_789,
        };
        let e = c.encode().unwrap().to_string();
        assert_eq!(Cursor::decode(e.as_bytes()), Some(c));
        assert_eq!(
            Cursor {
                slot: 1,
                fp: 0,
                node: u64::MAX >> 10
            }
            .encode(),
            None
        );
        assert_eq!(Cursor::decode(b"-1"), None);
        assert_eq!(Cursor::decode(b"abc"), None);
    }

    const NODES: &str = "e7d1 127.0.0.1:30002@40002,localhost slave 07c3 0 1 2 connected\n\
        07c3 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-99 200 300-16383 [250->-e7d1] [260-<-e7d1]\n";

    fn nodes_reply(text: &str) -> Vec<u8> {
        format!("${}\r\n{text}\r\n", text.len()).into_bytes()
    }

    fn keys_of(r: &[u8]) -> (Cursor, usize) {
        let els = crate::upstream::cluster::merge::elements(r).unwrap();
        let c = Cursor::decode(bulk(els[0]).unwrap()).unwrap_or(Cursor {
            slot: 0,
            fp: 0,
            node: 0,
        });
        (
            c,
            crate::upstream::cluster::merge::elements(els[1])
                .unwrap()
                .len(),
        )
    }

    #[test]
    fn a_node_says_what_it_owns() {
        let own = parse_own(&nodes_reply(NODES)).unwrap();
        assert_eq!(own.ranges, vec![(0, 99), (200, 200), (300, 16383)]);
        assert_eq!(own.migrating, vec![250]);
        let verbatim = format!("={}\r\ntxt:{NODES}\r\n", NODES.len() + 4);
        assert_eq!(parse_own(verbatim.as_bytes()), Some(own));
        assert_eq!(parse_own(b"$3\r\nabc\r\n"), None);
        assert_eq!(parse_own(b"+OK\r\n"), None);
    }

    #[test]
    fn runs_follow_slots_not_node_order() {
        let map = SlotMap::from_ranges(&[(0, 99, node(1)), (100, 16383, node(2))]).unwrap();
        let other = SlotMap::from_ranges(&[(100, 16383, node(2)), (0, 99, node(1))]).unwrap();
        let start = Cursor {
            slot: 0,
            fp: 0,
            node: 0,
        };
        let s = step(&map, start).unwrap();
        assert_eq!(step(&other, start), Some(s.clone()));
        assert_eq!(s.node.port, 1);
        let own = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-99";
        let (k5, k200) = (key_in(5), key_in(200));
        // Keys of other runs are left for their own run.
        let (r, stale) = reply(&scan_reply("7", &[&k5, &k200]), &nodes_reply(own), &s);
        assert!(!stale);
        let (next, n) = keys_of(&r);
        assert_eq!((next.slot, next.node, n), (0, 7, 1));
        // The node is done: the next run starts at slot 100.
        let s = step(&map, next).unwrap();
        let (r, _) = reply(&scan_reply("0", &[&k5]), &nodes_reply(own), &s);
        assert_eq!(
            keys_of(&r),
            (
                Cursor {
                    slot: 100,
                    fp: 0,
                    node: 0
                },
                1
            )
        );
        // The last run done: 0.
        let s = step(
            &map,
            Cursor {
                slot: 100,
                fp: 0,
                node: 0,
            },
        )
        .unwrap();
        let own2 = "b 127.0.0.1:2@3 myself,master - 0 0 1 connected 100-16383";
        let (r, _) = reply(&scan_reply("0", &[]), &nodes_reply(own2), &s);
        assert_eq!(&r[..], b"*2\r\n$1\r\n0\r\n*0\r\n");
    }

    #[test]
    fn a_changed_or_migrating_run_is_walked_again() {
        let map = SlotMap::from_ranges(&[(0, 8000, node(1)), (8001, 16383, node(2))]).unwrap();
        let own = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-8000";
        let s = step(
            &map,
            Cursor {
                slot: 0,
                fp: 0,
                node: 0,
            },
        )
        .unwrap();
        let (r, _) = reply(&scan_reply("42", &[]), &nodes_reply(own), &s);
        let (mid, _) = keys_of(&r);
        assert_eq!(mid.node, 42);
        // Slots 4000.. left meanwhile: the run from 0 again.
        let shorter = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-3999";
        let s = step(&map, mid).unwrap();
        assert_eq!(s.node_cursor, 42);
        let (r, _) = reply(&scan_reply("50", &[]), &nodes_reply(shorter), &s);
        let (again, _) = keys_of(&r);
        assert_eq!((again.slot, again.node), (0, 0));
        assert_ne!(again.encode(), Some(0), "a restart is not the end");
        // Done while a slot of the run is migrating: again.
        let migrating = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-3999 [17->-b]";
        let s = step(&map, again).unwrap();
        let (r, _) = reply(&scan_reply("0", &[]), &nodes_reply(migrating), &s);
        assert_eq!(keys_of(&r).0.node, 0);
        assert_eq!(keys_of(&r).0.slot, 0);
        // Slot 0 is not the node's any more: the map is stale.
        let gone = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 100-3999";
        let (r, stale) = reply(&scan_reply("0", &[]), &nodes_reply(gone), &s);
        assert!(stale);
        assert_eq!(keys_of(&r).0.slot, 0);
        // Nonsense from a node: an error, no panic.
        assert!(reply(b"*2\r\n:1\r\n*0\r\n", &nodes_reply(own), &s)
            .0
            .starts_with(b"-ERR"));
        assert!(reply(b"+OK\r\n", &nodes_reply(own), &s)
            .0
            .starts_with(b"-ERR"));
        // CLUSTER NODES refused (an ACL without it): the map's run.
        let s = step(
            &map,
            Cursor {
                slot: 0,
                fp: 0,
                node: 0,
            },
        )
        .unwrap();
        let (r, stale) = reply(&scan_reply("0", &[]), b"-NOPERM no\r\n", &s);
        assert!(!stale);
        assert_eq!(
            keys_of(&r).0,
            Cursor {
                slot: 8001,
                fp: 0,
                node: 0
            }
        );
        assert_eq!(&reply(b"-ERR x\r\n", b"", &s).0[..], b"-ERR x\r\n");
    }
}
