//! What the proxy answers as itself to cluster-aware clients and about what
//! it is: the cluster face (`CLUSTER SLOTS/SHARDS/NODES/INFO/MYID/KEYSLOT`,
//! `READONLY`/`READWRITE`/`ASKING`), the rewrite that makes `INFO` agree
//! with `HELLO` (the proxy is one standalone Redis), and the refusal of
//! `CLIENT MAINT_NOTIFICATIONS`. Pure: the session ([`super::session`])
//! carries an [`Answer`] out.
//!
//! The face shows one node that owns slots 0-16383 at the address the client
//! connected to, with a stable id: cluster-aware clients (redis-py
//! `RedisCluster`, ioredis `Cluster`, node-redis `createCluster`, phpredis
//! `RedisCluster`, Lettuce, Jedis, go-redis) then send every command to the
//! proxy, which routes it by slot itself when the cache is a cluster.
//! Arity and error texts are Redis 7's (compared with a real redis-server in
//! cluster mode and standalone: `tests/face.rs`).

use crate::command::keys::SLOTS;
use crate::command::Commands;
use crate::resp::{self, Proto};
use bytes::Bytes;
use std::net::SocketAddr;

/// The face's settings, the same for every client.
#[derive(Debug, Clone)]
pub struct Face {
    /// `listen.cluster_face`: answer CLUSTER / READONLY / READWRITE / ASKING.
    pub enabled: bool,
    /// The node id every client sees: 40 hex digits, stable for one upstream.
    pub id: String,
    /// Where a Unix-socket client is told the node is: the first TCP listener
    /// (`None`: the proxy has none).
    pub tcp: Option<SocketAddr>,
}

impl Face {
    pub fn new(enabled: bool, upstream: &str, tcp: Option<SocketAddr>) -> Face {
        Face {
            enabled,
            id: node_id(upstream),
            tcp,
        }
    }
}

/// A stable 40-hex node id from the upstream's name: the same across
/// restarts and for every client (FNV-1a, five lanes of 32 bits).
pub fn node_id(seed: &str) -> String {
    (0u32..5)
        .map(|lane| {
            let mut h: u32 = 0x811c_9dc5 ^ lane.wrapping_mul(0x9e37_79b9);
            for b in b"redis-entra-proxy|".iter().chain(seed.as_bytes()) {
                h ^= u32::from(*b);
                h = h.wrapping_mul(0x0100_0193);
            }
            format!("{h:08x}")
        })
        .collect()
}

/// What the session does with a command the face claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The reply, now.
    Reply(Bytes),
    /// `CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT`: to the slot's primary on a
    /// cluster, to the server otherwise (see [`standalone_slot_reply`]).
    ToSlotOwner(u16),
    /// `INFO`: forwarded, its reply passed through [`rewrite_info`].
    Info,
}

/// Whether the face answers this command (`args[0]` is the name): INFO and
/// CLIENT MAINT_NOTIFICATIONS always, the cluster commands when enabled.
pub fn claims(enabled: bool, args: &[&[u8]]) -> bool {
    let Some(name) = args.first() else {
        return false;
    };
    // On every command's way: most names (GET, SET...) end here.
    if !matches!(name.len(), 4 | 6 | 7 | 8 | 9) {
        return false;
    }
    if name.eq_ignore_ascii_case(b"INFO") {
        return true;
    }
    if name.eq_ignore_ascii_case(b"CLIENT") {
        return args
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"MAINT_NOTIFICATIONS"));
    }
    enabled
        && [&b"CLUSTER"[..], b"READONLY", b"READWRITE", b"ASKING"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
}

fn int(a: &[u8]) -> Option<i64> {
    std::str::from_utf8(a).ok()?.parse().ok()
}

/// Cluster subcommands Redis has that the face does not answer: they manage
/// or inspect a real cluster's nodes, which Azure runs.
const NOT_ANSWERED: &[&str] = &[
    "ADDSLOTS",
    "ADDSLOTSRANGE",
    "BUMPEPOCH",
    "COUNT-FAILURE-REPORTS",
    "DELSLOTS",
    "DELSLOTSRANGE",
    "FAILOVER",
    "FLUSHSLOTS",
    "FORGET",
    "LINKS",
    "MEET",
    "REPLICAS",
    "REPLICATE",
    "RESET",
    "SAVECONFIG",
    "SET-CONFIG-EPOCH",
    "SETSLOT",
    "SLAVES",
];

/// The face's answer to a command it [`claims`]. `me`: where the client
/// reached the proxy (`None`: a Unix-socket client of a proxy with no TCP
/// listener).
pub fn answer(face: &Face, args: &[&[u8]], me: Option<SocketAddr>, proto: Proto) -> Answer {
    // Arity and subcommands as a Redis 7.0 cluster node judges them (the
    // session has asked the same before: see `Commands::judge_face`). CLIENT
    // MAINT_NOTIFICATIONS is unknown there: what Redis before 8.2 answers,
    // which clients in their default (auto) mode take as "not supported"
    // and go on without it; the proxy handles the cache's maintenance itself.
    let model = Commands::face();
    if let Some(refusal) = model.refuses(args, args.len()) {
        return Answer::Reply(resp::error(&model.refusal_text(refusal, args)));
    }
    let name = args[0].to_ascii_uppercase();
    match &name[..] {
        b"INFO" => return Answer::Info,
        b"READONLY" | b"READWRITE" | b"ASKING" => return Answer::Reply(resp::ok()),
        _ => {}
    }
    let Some(sub) = args.get(1).filter(|_| name == b"CLUSTER") else {
        return Answer::Reply(resp::error("ERR internal: not a face command"));
    };
    let sub_up = String::from_utf8_lossy(sub).to_ascii_uppercase();
    if NOT_ANSWERED.contains(&sub_up.as_str()) {
        return Answer::Reply(resp::error(&format!(
            "ERR CLUSTER {sub_up} is not supported through redis-entra-proxy: it shows its clients one node that owns every slot, and routes each command to the cache's own shards itself"
        )));
    }
    let node = me.map(Node::from);
    let no_address = || {
        resp::error(
            "ERR redis-entra-proxy has no TCP listener to show a Unix-socket client as its cluster node (set listen.address)",
        )
    };
    Answer::Reply(match sub_up.as_str() {
        "MYID" => resp::bulk(face.id.as_bytes()),
        "KEYSLOT" => resp::integer(i64::from(crate::command::keys::slot(args[2]))),
        "COUNTKEYSINSLOT" => match int(args[2]) {
            None => resp::error("ERR value is not an integer or out of range"),
            Some(s) if !(0..i64::from(SLOTS)).contains(&s) => resp::error("ERR Invalid slot"),
            Some(s) => return Answer::ToSlotOwner(s as u16),
        },
        "GETKEYSINSLOT" => match (int(args[2]), int(args[3])) {
            (Some(s), Some(n)) if (0..i64::from(SLOTS)).contains(&s) && n >= 0 => {
                return Answer::ToSlotOwner(s as u16)
            }
            (Some(_), Some(_)) => resp::error("ERR Invalid slot or number of keys"),
            _ => resp::error("ERR value is not an integer or out of range"),
        },
        "HELP" => help(),
        "INFO" => resp::verbatim(proto, cluster_info().as_bytes()),
        "SLOTS" | "SHARDS" | "NODES" => match node {
            None => no_address(),
            Some(n) => match sub_up.as_str() {
                "SLOTS" => slots(&n, &face.id, proto),
                "SHARDS" => shards(&n, &face.id, proto),
                _ => resp::verbatim(proto, nodes_line(&n, &face.id).as_bytes()),
            },
        },
        _ => resp::error("ERR internal: not a face command"),
    })
}

/// The node's address as a client uses it: the host (an IP, IPv6 without
/// brackets, as Redis announces it) and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl From<SocketAddr> for Node {
    fn from(a: SocketAddr) -> Node {
        Node {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

fn bulk_str(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

fn empty_map(proto: Proto) -> &'static str {
    match proto {
        Proto::Resp2 => "*0\r\n",
        Proto::Resp3 => "%0\r\n",
    }
}

/// `CLUSTER SLOTS`: one range, one primary, no replicas.
fn slots(n: &Node, id: &str, proto: Proto) -> Bytes {
    let last = SLOTS - 1;
    Bytes::from(format!(
        "*1\r\n*3\r\n:0\r\n:{last}\r\n*4\r\n{}:{}\r\n{}{}",
        bulk_str(&n.host),
        n.port,
        bulk_str(id),
        empty_map(proto)
    ))
}

/// `CLUSTER SHARDS`: one shard, its one node the primary.
fn shards(n: &Node, id: &str, proto: Proto) -> Bytes {
    let map = |len: usize| match proto {
        Proto::Resp2 => format!("*{}\r\n", len * 2),
        Proto::Resp3 => format!("%{len}\r\n"),
    };
    let last = SLOTS - 1;
    let mut s = String::from("*1\r\n");
    s += &map(2);
    s += &bulk_str("slots");
    s += &format!("*2\r\n:0\r\n:{last}\r\n");
    s += &bulk_str("nodes");
    s += "*1\r\n";
    s += &map(7);
    for (k, v) in [
        ("id", bulk_str(id)),
        ("port", format!(":{}\r\n", n.port)),
        ("ip", bulk_str(&n.host)),
        ("endpoint", bulk_str(&n.host)),
        ("replication-offset", ":0\r\n".into()),
        ("role", bulk_str("master")),
        ("health", bulk_str("online")),
    ] {
        s += &bulk_str(k);
        s += &v;
    }
    Bytes::from(s)
}

/// `CLUSTER NODES`: one `myself,master` line owning every slot (no bus port:
/// `@0`).
fn nodes_line(n: &Node, id: &str) -> String {
    format!(
        "{id} {}:{}@0 myself,master - 0 0 1 connected 0-{}\n",
        n.host,
        n.port,
        SLOTS - 1
    )
}

fn cluster_info() -> String {
    [
        "cluster_state:ok",
        "cluster_slots_assigned:16384",
        "cluster_slots_ok:16384",
        "cluster_slots_pfail:0",
        "cluster_slots_fail:0",
        "cluster_known_nodes:1",
        "cluster_size:1",
        "cluster_current_epoch:1",
        "cluster_my_epoch:1",
        "cluster_stats_messages_sent:0",
        "cluster_stats_messages_received:0",
        "total_cluster_links_buffer_limit_exceeded:0",
    ]
    .iter()
    .map(|l| format!("{l}\r\n"))
    .collect()
}

fn help() -> Bytes {
    let lines = [
        "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "(answered by redis-entra-proxy: one node that owns every slot)",
        "COUNTKEYSINSLOT <slot>",
        "GETKEYSINSLOT <slot> <count>",
        "INFO",
        "KEYSLOT <key>",
        "MYID",
        "NODES",
        "SHARDS",
        "SLOTS",
        "HELP",
    ];
    let mut s = format!("*{}\r\n", lines.len());
    for l in lines {
        s += &format!("+{l}\r\n");
    }
    Bytes::from(s)
}

/// A standalone server's reply to `CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT`:
/// kept if it answered, replaced by an honest refusal if it has no slots.
pub fn standalone_slot_reply(reply: Bytes) -> Bytes {
    if reply.starts_with(b"-ERR This instance has cluster support disabled") {
        resp::error("ERR the cache behind redis-entra-proxy is not a cluster: it keeps no index of keys by slot (use SCAN)")
    } else {
        reply
    }
}

/// `INFO` as one standalone Redis shows it, to agree with HELLO's `mode`:
/// `redis_mode:cluster` -> `standalone`, `cluster_enabled:1` -> `0`. Any
/// other reply (an error, a NOPERM) passes unchanged.
pub fn rewrite_info(reply: Bytes) -> Bytes {
    let (head, body, tail): (&[u8], &[u8], &[u8]) = match reply.first() {
        Some(b'$') | Some(b'=') => {
            let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
                return reply;
            };
            let Some(body) = reply.get(nl + 1..).and_then(|r| r.strip_suffix(b"\r\n")) else {
                return reply;
            };
            (&reply[..1], body, b"\r\n")
        }
        _ => return reply,
    };
    let needle: [(&[u8], &[u8]); 2] = [
        (b"redis_mode:cluster", b"redis_mode:standalone"),
        (b"cluster_enabled:1", b"cluster_enabled:0"),
    ];
    if !needle
        .iter()
        .any(|(from, _)| memchr::memmem::find(body, from).is_some())
    {
        return reply;
    }
    let mut out = Vec::with_capacity(body.len() + 8);
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let bare = line.strip_suffix(b"\r").unwrap_or(line);
        match needle.iter().find(|(from, _)| bare == *from) {
            Some((_, to)) => {
                out.extend_from_slice(to);
                if bare.len() != line.len() {
                    out.push(b'\r');
                }
            }
            None => out.extend_from_slice(line),
        }
    }
    let mut b = Vec::with_capacity(out.len() + 16);
    b.extend_from_slice(head);
    b.extend_from_slice(out.len().to_string().as_bytes());
    b.extend_from_slice(b"\r\n");
    b.extend_from_slice(&out);
    b.extend_from_slice(tail);
    Bytes::from(b)
}

#[cfg(test)]
mod tests;
