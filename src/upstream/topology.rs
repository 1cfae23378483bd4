//! A clustered cache's slot map: which primary owns each of the 16384 hash
//! slots, parsed from `CLUSTER SHARDS` (Redis 7) or, as a fallback,
//! `CLUSTER SLOTS`. Pure: the cluster layer ([`super::cluster`]) asks the
//! server and keeps the current map; this module only reads replies.
//!
//! Node addresses are what the server announces (an IP, or a host name with
//! `cluster-preferred-endpoint-type hostname`); the certificate is checked
//! against the cache's name whatever they are (see [`super::tls`]).

use crate::command::keys::SLOTS;
use redis_protocol::resp3::types::OwnedFrame as F;

/// One primary: where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Owner of every slot. Nodes are sorted by the lowest slot they own, so a
/// shard's index is stable while slots stay where they are (SCAN cursors
/// carry it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    pub nodes: Vec<Node>,
    /// Index into `nodes` per slot; `u16::MAX`: no owner (cluster not fully
    /// covered).
    owner: Vec<u16>,
}

const NONE: u16 = u16::MAX;

impl SlotMap {
    /// A map from `(first slot, last slot, node)` ranges.
    pub fn from_ranges(ranges: &[(u16, u16, Node)]) -> Option<SlotMap> {
        let mut nodes: Vec<(u16, Node)> = Vec::new();
        for (first, _, node) in ranges {
            match nodes.iter_mut().find(|(_, n)| n == node) {
                Some(entry) => entry.0 = entry.0.min(*first),
                None => nodes.push((*first, node.clone())),
            }
        }
        if nodes.is_empty() || nodes.len() >= NONE as usize {
            return None;
        }
        nodes.sort();
        let mut owner = vec![NONE; SLOTS as usize];
        for (first, last, node) in ranges {
            if first > last || *last >= SLOTS {
                return None;
            }
            let i = nodes.iter().position(|(_, n)| n == node)? as u16;
            for s in *first..=*last {
                owner[s as usize] = i;
            }
        }
        Some(SlotMap {
            nodes: nodes.into_iter().map(|(_, n)| n).collect(),
            owner,
        })
    }

    /// The primary that owns `slot` (`None`: nobody, as during a failover).
    pub fn owner(&self, slot: u16) -> Option<&Node> {
        let i = *self.owner.get(slot as usize)?;
        self.nodes.get(i as usize)
    }

    /// Index of the shard that owns `slot`.
    pub fn shard_of(&self, slot: u16) -> Option<usize> {
        let i = *self.owner.get(slot as usize)?;
        (i != NONE).then_some(i as usize)
    }

    /// Record a `MOVED slot host:port`: the slot is now `node`'s.
    pub fn moved(&mut self, slot: u16, node: Node) {
        if slot >= SLOTS {
            return;
        }
        let i = match self.nodes.iter().position(|n| *n == node) {
            Some(i) => i,
            None => {
                if self.nodes.len() + 1 >= NONE as usize {
                    return;
                }
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.owner[slot as usize] = i as u16;
    }

    /// Slots with no owner.
    pub fn uncovered(&self) -> usize {
        self.owner.iter().filter(|&&o| o == NONE).count()
    }
}

fn text(f: &F) -> Option<String> {
    match f {
        F::BlobString { data, .. }
        | F::SimpleString { data, .. }
        | F::VerbatimString { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
        _ => None,
    }
}

fn num(f: &F) -> Option<i64> {
    match f {
        F::Number { data, .. } => Some(*data),
        _ => text(f)?.parse().ok(),
    }
}

fn slot_num(f: &F) -> Option<u16> {
    u16::try_from(num(f)?).ok().filter(|s| *s < SLOTS)
}

/// A map (RESP3) or a flat array of key, value (RESP2) as pairs.
fn pairs(f: &F) -> Vec<(String, &F)> {
    match f {
        F::Map { data, .. } => data
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        F::Array { data, .. } => data
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((text(k)?, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(p: &'a [(String, &'a F)], name: &str) -> Option<&'a F> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// An announced endpoint; `?` or empty means "the address you reached me on".
fn endpoint(announced: Option<String>, seed_host: &str) -> String {
    match announced {
        Some(h) if !h.is_empty() && h != "?" => h,
        _ => seed_host.to_string(),
    }
}

/// Parse `CLUSTER SHARDS`. `tls`: take each node's `tls-port`, the port a TLS
/// client must use (a TLS-only node has no `port` field).
pub fn parse_shards(reply: &[u8], seed_host: &str, tls: bool) -> Option<SlotMap> {
    let F::Array { data: shards, .. } = crate::resp::decode_reply(reply)? else {
        return None;
    };
    let mut ranges = Vec::new();
    for shard in &shards {
        let sp = pairs(shard);
        let (Some(F::Array { data: slots, .. }), Some(F::Array { data: nodes, .. })) =
            (field(&sp, "slots"), field(&sp, "nodes"))
        else {
            continue;
        };
        if slots.is_empty() {
            continue;
        }
        let primary = nodes.iter().map(pairs).find(|n| {
            field(n, "role").and_then(text).as_deref() == Some("master")
                && field(n, "health").and_then(text).as_deref() != Some("failed")
        });
        let Some(p) = primary else { continue };
        let port_field = if tls { "tls-port" } else { "port" };
        let port = field(&p, port_field)
            .or_else(|| field(&p, "port"))
            .and_then(num)
            .and_then(|n| u16::try_from(n).ok())?;
        let host = endpoint(field(&p, "endpoint").and_then(text), seed_host);
        let node = Node { host, port };
        for pair in slots.chunks(2) {
            let [a, b] = pair else { return None };
            ranges.push((slot_num(a)?, slot_num(b)?, node.clone()));
        }
    }
    SlotMap::from_ranges(&ranges)
}

/// Parse `CLUSTER SLOTS`: `[first, last, [host, port, id, ...], replicas...]`.
/// (Over TLS the server gives its TLS port.)
pub fn parse_slots(reply: &[u8], seed_host: &str) -> Option<SlotMap> {
    let F::Array { data: entries, .. } = crate::resp::decode_reply(reply)? else {
        return None;
    };
    let mut ranges = Vec::new();
    for e in &entries {
        let F::Array { data, .. } = e else { continue };
        let (Some(a), Some(b), Some(F::Array { data: primary, .. })) =
            (data.first(), data.get(1), data.get(2))
        else {
            continue;
        };
        let host = endpoint(primary.first().and_then(text), seed_host);
        let port = primary
            .get(1)
            .and_then(num)
            .and_then(|n| u16::try_from(n).ok())?;
        ranges.push((slot_num(a)?, slot_num(b)?, Node { host, port }));
    }
    SlotMap::from_ranges(&ranges)
}

/// A `MOVED 3999 127.0.0.1:6381` or `ASK ...` error: (slot, node).
/// An empty host means the host of the node that answered.
pub fn parse_redirect(error: &[u8], answered_by: &Node) -> Option<(bool, u16, Node)> {
    let line = error.strip_prefix(b"-")?;
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    let moved = match words.next()? {
        "MOVED" => true,
        "ASK" => false,
        _ => return None,
    };
    let slot: u16 = words.next()?.parse().ok().filter(|s| *s < SLOTS)?;
    let addr = words.next()?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() {
        answered_by.host.clone()
    } else {
        host.to_string()
    };
    Some((
        moved,
        slot,
        Node {
            host,
            port: port.parse().ok()?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(h: &str, p: u16) -> Node {
        Node {
            host: h.into(),
            port: p,
        }
    }

    fn bulk(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    /// One shard of `CLUSTER SHARDS` in RESP2: slots, then a primary and a replica.
    fn shard(ranges: &[(u16, u16)], endpoint: &str, tls_port: u16, replica_port: u16) -> String {
        let mut s = String::from("*4\r\n");
        s += &bulk("slots");
        s += &format!("*{}\r\n", ranges.len() * 2);
        for (a, b) in ranges {
            s += &format!(":{a}\r\n:{b}\r\n");
        }
        s += &bulk("nodes");
        s += "*2\r\n";
        for (role, port) in [("master", tls_port), ("replica", replica_port)] {
            s += "*12\r\n";
            s += &bulk("id");
            s += &bulk("abc");
            s += &bulk("tls-port");
            s += &format!(":{port}\r\n");
            s += &bulk("ip");
            s += &bulk("10.0.0.9");
            s += &bulk("endpoint");
            s += &bulk(endpoint);
            s += &bulk("role");
            s += &bulk(role);
            s += &bulk("health");
            s += &bulk("online");
        }
        s
    }

    #[test]
    fn shards_reply_gives_each_slot_its_primary() {
        let reply = format!(
            "*3\r\n{}{}{}",
            shard(&[(0, 5460)], "10.0.0.1", 15000, 15003),
            shard(&[(5461, 10922)], "10.0.0.2", 15001, 15004),
            shard(&[(10923, 16000), (16001, 16383)], "", 15002, 15005),
        );
        let map = parse_shards(reply.as_bytes(), "seed.example", true).expect("parses");
        assert_eq!(map.owner(0), Some(&node("10.0.0.1", 15000)));
        assert_eq!(map.owner(5461), Some(&node("10.0.0.2", 15001)));
        // An empty endpoint is the host the proxy reached.
        assert_eq!(map.owner(16383), Some(&node("seed.example", 15002)));
        assert_eq!(map.uncovered(), 0);
        assert_eq!(map.nodes.len(), 3);
        assert_eq!(map.shard_of(0), Some(0));
        assert_eq!(map.shard_of(16383), Some(2));
    }

    #[test]
    fn slots_reply_and_partial_coverage() {
        let reply = "*2\r\n\
            *3\r\n:0\r\n:99\r\n*3\r\n$9\r\n127.0.0.1\r\n:7001\r\n$2\r\nid\r\n\
            *4\r\n:100\r\n:200\r\n*3\r\n$9\r\nlocalhost\r\n:7002\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$2\r\nid\r\n";
        let map = parse_slots(reply.as_bytes(), "seed").expect("parses");
        assert_eq!(map.owner(50), Some(&node("127.0.0.1", 7001)));
        assert_eq!(map.owner(200), Some(&node("localhost", 7002)));
        assert_eq!(map.owner(201), None);
        assert_eq!(map.uncovered(), 16384 - 201);
    }

    #[test]
    fn bad_replies_are_refused_not_panicked_on() {
        for bad in [
            &b"-ERR unknown command\r\n"[..],
            b"*1\r\n*3\r\n:0\r\n:99999\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*3\r\n:5\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:99999\r\n",
            b"",
            b"*0\r\n",
        ] {
            assert!(parse_slots(bad, "s").is_none(), "{bad:?}");
            assert!(parse_shards(bad, "s", true).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn redirections() {
        let by = node("10.0.0.1", 1);
        assert_eq!(
            parse_redirect(b"-MOVED 3999 127.0.0.1:6381\r\n", &by),
            Some((true, 3999, node("127.0.0.1", 6381)))
        );
        assert_eq!(
            parse_redirect(b"-ASK 1 :6382\r\n", &by),
            Some((false, 1, node("10.0.0.1", 6382)))
        );
        assert_eq!(
            parse_redirect(b"-MOVED 1 [::1]:6380\r\n", &by),
            Some((true, 1, node("::1", 6380)))
        );
        assert_eq!(parse_redirect(b"-MOVED 20000 h:1\r\n", &by), None);
        assert_eq!(parse_redirect(b"-ERR x\r\n", &by), None);
        assert_eq!(parse_redirect(b"-MOVED\r\n", &by), None);
        let mut map = SlotMap::from_ranges(&[(0, 16383, node("a", 1))]).unwrap();
        map.moved(7, node("b", 2));
        assert_eq!(map.owner(7), Some(&node("b", 2)));
        assert_eq!(map.owner(8), Some(&node("a", 1)));
        map.moved(40000, node("c", 3));
        assert_eq!(map.nodes.len(), 2);
    }
}
