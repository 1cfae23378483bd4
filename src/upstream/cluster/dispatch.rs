//! A client's shared connection when the upstream is a cluster: one
//! dispatcher per client, a future ([`Driver`]) its session polls in its own
//! task (no task, no thread hop of its own). Its router half takes each batch
//! of commands (what a session sends a shared connection), places every
//! command ([`super::route::plan`]) and writes it, grouped per node, to that
//! node's shared connection at once (so commands to one node stay in order
//! and pipelined); its completer half takes the batches in the order they
//! came, gathers their replies, follows redirections and answers each batch
//! with its replies in the client's order.
//!
//! Being the client's own, a dispatcher waits only for the nodes its client
//! uses: a slow or frozen node delays the clients whose commands went there,
//! and no other (issue 17, finding 2).
//!
//! Redirections never reach the client: `MOVED` updates the slot map (and
//! asks for a refresh) and re-sends there, `ASK` re-sends with `ASKING` to the
//! importing node, `TRYAGAIN` and `CLUSTERDOWN` are retried with backoff, all
//! within [`MAX_REDIRECTS`] and [`RETRY_BUDGET`]. Such replies mean the
//! command did not run, so re-sending cannot run it twice.

mod answer;
mod census;
mod resolve;

use super::merge;
use super::route::{self, Plan};
use super::Cluster;
use crate::command::{Fan, Merge};
use crate::resp::scan::{args_of, CommandScanner, Limits};
use crate::resp::{self, Proto};
use crate::upstream::conn::{Handle, ReplyTx, Request};
use crate::upstream::topology::Node;
use crate::upstream::UpstreamError;
use answer::answer;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Redirections followed for one command before its last answer is given.
pub const MAX_REDIRECTS: usize = 16;
/// Time spent retrying `TRYAGAIN`/`CLUSTERDOWN` (and waiting for a slot owner)
/// for one command before its last answer is given.
pub const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// How long a keyed command whose node cannot be reached (the command was
/// not written) waits for the cluster to name a new owner (a replica's
/// promotion takes the node timeout and an election) before its error.
pub const NODE_DOWN_HOLD: Duration = Duration::from_secs(15);

type ReplyRx = oneshot::Receiver<Result<Bytes, UpstreamError>>;

/// A client's dispatcher, run by polling it (defined beside the pool, which
/// hands it out).
pub use crate::upstream::pool::Driver;

/// One command as sent: enough to send it again elsewhere.
#[derive(Clone)]
struct Cmd {
    bytes: Bytes,
    slot: Option<u16>,
}

/// One sub-request written to a node, owing `cmds.len()` replies.
struct Sent {
    node: Option<Node>,
    cmds: Vec<Cmd>,
    rx: Option<ReplyRx>,
}

enum Item {
    /// Replies to these commands, in order.
    Plain(Sent),
    Split {
        merge: Merge,
        nkeys: usize,
        keys: Vec<Vec<usize>>,
        parts: Vec<Sent>,
    },
    Fan {
        kind: Fan,
        parts: Vec<Sent>,
    },
    Scan {
        step: super::scan::Step,
        part: Sent,
    },
    Now(Bytes),
    /// PUBLISH, SPUBLISH, PUBSUB NUMSUB...: answered as one Redis ([`census`]).
    Census {
        question: crate::upstream::pubsub::count::Question,
        parts: Vec<Sent>,
    },
}

struct Job {
    reply: Option<ReplyTx>,
    items: Vec<Item>,
}

/// Per-task cache of each node's shared connection (one per node per task, so
/// a client's commands to one node go down one connection, in order).
struct Links {
    cluster: Arc<Cluster>,
    proto: Proto,
    handles: HashMap<Node, Handle>,
    /// The map `handles` was last pruned by: nodes that left it are let go
    /// (their connections end with the last handle).
    pruned: usize,
}

impl Links {
    fn new(cluster: &Arc<Cluster>, proto: Proto) -> Links {
        Links {
            cluster: cluster.clone(),
            proto,
            handles: HashMap::new(),
            pruned: 0,
        }
    }

    fn get(&mut self, node: &Node) -> Handle {
        let version = self.cluster.map_version();
        if version != self.pruned {
            self.pruned = version;
            if let Some(m) = self.cluster.map() {
                self.handles.retain(|n, _| m.nodes.contains(n));
            }
        }
        // A node can leave the topology and come back between two commands
        // of this client: its old connections closed (after the grace), and
        // the map names it again. A closed handle is replaced, never used.
        if let Some(h) = self.handles.get(node).filter(|h| !h.tx.is_closed()) {
            return h.clone();
        }
        let h = self.cluster.node_pool(node).shared_direct(self.proto);
        self.handles.insert(node.clone(), h.clone());
        h
    }

    /// Write `cmds` (already encoded back to back in `bytes`) to `node`.
    async fn send(&mut self, node: Option<Node>, cmds: Vec<Cmd>, bytes: Bytes) -> Sent {
        let Some(n) = node.clone() else {
            return Sent {
                node,
                cmds,
                rx: None,
            };
        };
        let (tx, rx) = oneshot::channel();
        let req = Request {
            bytes,
            count: cmds.len(),
            reply: Some(tx),
            in_multi_after: false,
            pushes: 0,
        };
        let h = self.get(&n);
        if let Err(mpsc::error::SendError(req)) = h.tx.send(req).await {
            // Closed since `get` looked (nothing was written): once more, on
            // the node's connections of now.
            let h = self.get(&n);
            if let Err(mpsc::error::SendError(req)) = h.tx.send(req).await {
                if let Some(t) = req.reply {
                    // Not written: it may go to the slot's owner of now.
                    let _ = t.send(Err(self
                        .cluster
                        .unsent(Some(&n), "the node left the topology")));
                }
            }
        }
        Sent {
            node,
            cmds,
            rx: Some(rx),
        }
    }

    async fn send_one(&mut self, node: Option<Node>, cmd: Cmd) -> Sent {
        let bytes = cmd.bytes.clone();
        self.send(node, vec![cmd], bytes).await
    }
}

/// A batch being answered: gives the completer's links back with the replies.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = (Links, Bytes)> + Send>>;

enum Next {
    Request(Option<Request>),
    Answered((Links, Bytes)),
}

/// A client's dispatcher, until the session side closes and every batch was
/// answered: routes and writes each batch as it comes (the router half) and
/// answers the batches in the order they came, one at a time (the completer
/// half), in one future. A request that comes while the upstream is not
/// (known to be) a cluster goes to the seed's own connection as it is.
pub async fn run(
    cluster: Arc<Cluster>,
    proto: Proto,
    index: usize,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut seed: Option<Handle> = None;
    let mut links = Links::new(&cluster, proto);
    // Routed batches waiting for their turn to be answered.
    let mut routed: VecDeque<Job> = VecDeque::new();
    // The batch being answered (its answer holds the completer's links).
    let mut answering: Option<(Option<ReplyTx>, Answer)> = None;
    let mut spare = Some(Links::new(&cluster, proto));
    let mut open = true;
    loop {
        if answering.is_none() {
            if let Some(job) = routed.pop_front() {
                let mut l = spare.take().unwrap_or_else(|| Links::new(&cluster, proto));
                let c = cluster.clone();
                // Boxed: an idle dispatcher (one per client) stays small.
                let a: Answer = Box::pin(async move {
                    let out = answer(&c, &mut l, index, job.items).await;
                    (l, out)
                });
                answering = Some((job.reply, a));
            } else if !open {
                return;
            }
        }
        let next = std::future::poll_fn(|cx| {
            if let Some((_, a)) = answering.as_mut() {
                if let Poll::Ready(done) = a.as_mut().poll(cx) {
                    return Poll::Ready(Next::Answered(done));
                }
            }
            if open {
                if let Poll::Ready(r) = rx.poll_recv(cx) {
                    return Poll::Ready(Next::Request(r));
                }
            }
            Poll::Pending
        })
        .await;
        match next {
            Next::Answered((l, out)) => {
                spare = Some(l);
                if let Some((Some(tx), _)) = answering.take() {
                    let _ = tx.send(Ok(out));
                }
            }
            Next::Request(None) => open = false,
            Next::Request(Some(req)) => {
                let job = route(&cluster, &mut links, &mut seed, proto, index, req).await;
                routed.extend(job);
            }
        }
    }
}

/// The router half for one request: placed and written (`None`: answered
/// already, or sent to the seed as it is).
async fn route(
    cluster: &Arc<Cluster>,
    links: &mut Links,
    seed: &mut Option<Handle>,
    proto: Proto,
    index: usize,
    req: Request,
) -> Option<Job> {
    let is_cluster = match cluster.is_cluster().await {
        Ok(c) => c,
        Err(e) => {
            if let Some(t) = req.reply {
                let _ = t.send(Err(e));
            }
            return None;
        }
    };
    if !is_cluster {
        let seed = seed.get_or_insert_with(|| cluster.seed.shared_direct(proto));
        if let Err(mpsc::error::SendError(req)) = seed.tx.send(req).await {
            if let Some(t) = req.reply {
                let _ = t.send(Err(cluster.unsent(None, "the configured host's connection")));
            }
        }
        return None;
    }
    let limits = Limits {
        max_bulk_bytes: usize::MAX,
        max_line_bytes: usize::MAX,
        max_elements: usize::MAX,
    };
    // Boxed: an idle dispatcher (one per client) stays small.
    let items = Box::pin(route_batch(cluster, links, index, &req.bytes, limits)).await;
    Some(Job {
        reply: req.reply,
        items,
    })
}

/// Place and write every command of one batch.
async fn route_batch(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    bytes: &Bytes,
    limits: Limits,
) -> Vec<Item> {
    let mut items = Vec::new();
    let mut pos = 0;
    // Consecutive commands for one node go as one sub-request.
    let mut group: Vec<Cmd> = Vec::new();
    let mut group_node: Option<Node> = None;
    let mut group_start = 0;
    while pos < bytes.len() {
        let mut scanner = CommandScanner::new(limits);
        let cmd = match scanner.scan(&bytes[pos..]) {
            Ok(Some(c)) => c,
            // The session scanned these bytes already; anything else is a bug
            // upstream of here: answer it as an error rather than guess.
            _ => {
                items.push(Item::Now(resp::error(
                    "ERR redis-entra-proxy: cannot re-read a command for cluster routing",
                )));
                break;
            }
        };
        let raw = bytes.slice(pos..pos + cmd.len);
        let args = args_of(&raw, &cmd);
        let plan = route::plan(cluster.table(), &args);
        // Subscriber counts are made whole with the hub's local subscribers.
        let question = crate::upstream::pubsub::count::Question::parse(&args);
        let (slot, single) = match &plan {
            Plan::Slot(s) => (Some(*s), question.is_none()),
            Plan::Any => (None, question.is_none()),
            _ => (None, false),
        };
        let frame = if cmd.inline {
            resp::command(&args)
        } else {
            raw.clone()
        };
        if single {
            let node = cluster.node_for(slot, index);
            let same = !group.is_empty() && group_node == node && !cmd.inline;
            if !same {
                flush(
                    links,
                    &mut items,
                    &mut group,
                    &mut group_node,
                    bytes,
                    group_start,
                    pos,
                )
                .await;
                group_start = pos;
                group_node = node;
            }
            if cmd.inline {
                // Re-encoded: it cannot share the batch's bytes.
                let sent = links
                    .send_one(group_node.clone(), Cmd { bytes: frame, slot })
                    .await;
                items.push(Item::Plain(sent));
                group_node = None;
                group_start = pos + cmd.len;
            } else {
                group.push(Cmd { bytes: frame, slot });
            }
            pos += cmd.len;
            continue;
        }
        flush(
            links,
            &mut items,
            &mut group,
            &mut group_node,
            bytes,
            group_start,
            pos,
        )
        .await;
        pos += cmd.len;
        group_start = pos;
        if let Some(q) = question.filter(|_| matches!(plan, Plan::Slot(_) | Plan::Any)) {
            items.push(census::send(cluster, links, index, q, frame, slot).await);
            continue;
        }
        let item = match plan {
            Plan::Refuse(e) => Item::Now(e),
            Plan::Split { merge, parts, keys } => {
                let mut sent = Vec::new();
                let mut key_lists = Vec::new();
                for p in parts {
                    let node = cluster.node_for(Some(p.slot), index);
                    sent.push(
                        links
                            .send_one(
                                node,
                                Cmd {
                                    bytes: p.bytes,
                                    slot: Some(p.slot),
                                },
                            )
                            .await,
                    );
                    key_lists.push(p.keys);
                }
                Item::Split {
                    merge,
                    nkeys: keys,
                    keys: key_lists,
                    parts: sent,
                }
            }
            Plan::FanOut(Fan::Scan) => scan(cluster, links, &args).await,
            Plan::FanOut(kind) => {
                let nodes = cluster.map().map(|m| m.nodes.clone()).unwrap_or_default();
                let mut parts = Vec::new();
                for n in nodes {
                    parts.push(
                        links
                            .send_one(
                                Some(n),
                                Cmd {
                                    bytes: frame.clone(),
                                    slot: None,
                                },
                            )
                            .await,
                    );
                }
                Item::Fan { kind, parts }
            }
            // Sent with the group above; never reached.
            Plan::Slot(_) | Plan::Any => continue,
        };
        items.push(item);
    }
    flush(
        links,
        &mut items,
        &mut group,
        &mut group_node,
        bytes,
        group_start,
        pos,
    )
    .await;
    items
}

async fn flush(
    links: &mut Links,
    items: &mut Vec<Item>,
    group: &mut Vec<Cmd>,
    node: &mut Option<Node>,
    bytes: &Bytes,
    start: usize,
    end: usize,
) {
    if group.is_empty() {
        return;
    }
    let cmds = std::mem::take(group);
    let sent = links.send(node.take(), cmds, bytes.slice(start..end)).await;
    items.push(Item::Plain(sent));
}

/// SCAN: the client's cursor names a run of slots; ask its owner now.
async fn scan(cluster: &Cluster, links: &mut Links, args: &[&[u8]]) -> Item {
    use super::scan::{step, Cursor};
    let Some(map) = cluster.map() else {
        return Item::Now(resp::error("CLUSTERDOWN no slot map yet"));
    };
    let Some(cursor) = args.get(1).and_then(|c| Cursor::decode(c)) else {
        return Item::Now(resp::error("ERR invalid cursor"));
    };
    let Some(step) = step(&map, cursor) else {
        // No owner for that slot now (a failover): the same cursor again.
        let c = args[1];
        return Item::Now(merge::array(&[&resp::bulk(c)[..], b"*0\r\n"]));
    };
    let c = step.node_cursor.to_string();
    let mut rewritten: Vec<&[u8]> = args.to_vec();
    rewritten[1] = c.as_bytes();
    // The node's own word on its slots, in the same write.
    let scan = resp::command(&rewritten);
    let nodes = resp::command(&[b"CLUSTER", b"NODES"]);
    let mut bytes = BytesMut::from(&scan[..]);
    bytes.extend_from_slice(&nodes);
    let cmd = |bytes| Cmd { bytes, slot: None };
    let part = links
        .send(
            Some(step.node.clone()),
            vec![cmd(scan), cmd(nodes)],
            bytes.freeze(),
        )
        .await;
    Item::Scan { step, part }
}

fn is_error_word(reply: &[u8], word: &[u8]) -> bool {
    reply.len() > word.len() + 1 && reply[0] == b'-' && reply[1..].starts_with(word)
}

/// `TRYAGAIN` or `CLUSTERDOWN`: the command did not run, and may once the
/// cluster settles (a migration, a failover).
pub fn not_now(reply: &[u8]) -> bool {
    is_error_word(reply, b"TRYAGAIN") || is_error_word(reply, b"CLUSTERDOWN")
}
