//! PUBLISH, SPUBLISH and the PUBSUB counts on a cluster: sent where one
//! Redis's answer can be read from (any node for PUBLISH, which the cluster
//! broadcasts; the channel's owner for SPUBLISH; every primary for PUBSUB),
//! then made that answer by the hub ([`crate::upstream::pubsub::count`]).

use super::answer::{replies_on, Keyless};
use super::{Cmd, Item, Links, Sent, NODE_DOWN_HOLD};
use crate::resp;
use crate::upstream::cluster::{node_error, node_unreachable, Cluster};
use crate::upstream::pubsub::count::Question;
use crate::upstream::topology::Node;
use bytes::Bytes;
use std::time::Duration;
use tokio::time::Instant;

/// Write `frame` (the question's command) where it must go.
pub(super) async fn send(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    question: Question,
    frame: Bytes,
    slot: Option<u16>,
) -> Item {
    let parts = if question.every_node() {
        match every_node(cluster, links, &frame).await {
            Some(parts) => parts,
            None => return Item::Now(resp::error("CLUSTERDOWN no slot map yet")),
        }
    } else {
        let node = cluster.node_for(slot, index);
        vec![links.send_one(node, Cmd { bytes: frame, slot }).await]
    };
    Item::Census { question, parts }
}

/// `frame` to every primary of the map (`None`: no map yet).
async fn every_node(cluster: &Cluster, links: &mut Links, frame: &Bytes) -> Option<Vec<Sent>> {
    let nodes = cluster.map().map(|m| m.nodes.clone()).unwrap_or_default();
    if nodes.is_empty() {
        return None;
    }
    let mut parts = Vec::with_capacity(nodes.len());
    for n in nodes {
        let cmd = Cmd {
            bytes: frame.clone(),
            slot: None,
        };
        parts.push(links.send_one(Some(n), cmd).await);
    }
    Some(parts)
}

/// The nodes' replies (redirections followed), as one Redis's.
///
/// A node that cannot be reached (the question was not written there) does
/// not fail the answer: PUBLISH goes to another primary (the count is that
/// node's: [`crate::upstream::pubsub::count`] takes the node that
/// answered); a question for every primary is asked again of the
/// primaries of the next map (a promoted replica in place of a dead
/// node), within the hold a keyed command has for its node's replacement.
pub(super) async fn answer(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    question: Question,
    mut parts: Vec<Sent>,
) -> Bytes {
    if !question.every_node() {
        let mut rs = Vec::with_capacity(parts.len());
        for p in parts {
            let (node, r) = replies_on(cluster, links, index, p, Keyless::Anywhere).await;
            rs.push((
                node.map(|n| n.to_string()),
                r.into_iter().next().unwrap_or_default(),
            ));
        }
        return cluster.hub.census(question, rs).await;
    }
    let start = Instant::now();
    loop {
        let frame = parts
            .first()
            .and_then(|p| p.cmds.first())
            .map(|c| c.bytes.clone());
        let mut rs = Vec::with_capacity(parts.len());
        let mut down = None;
        for p in parts {
            let node = p.node.clone();
            let got = match p.rx {
                Some(rx) => rx.await.unwrap_or_else(|_| Err(cluster.dropped_reply())),
                None => Err(cluster.unsent(None, "no node")),
            };
            match got {
                Err(e) if node_unreachable(&e) && start.elapsed() < NODE_DOWN_HOLD => {
                    down = node;
                }
                Err(e) => rs.push((
                    node.as_ref().map(|n| n.to_string()),
                    node_error(&e, node.as_ref(), None),
                )),
                Ok(r) => rs.push((node.map(|n| n.to_string()), r)),
            }
        }
        let (Some(down), Some(frame)) = (down, frame) else {
            return cluster.hub.census(question, rs).await;
        };
        until_replaced(cluster, &down, start + NODE_DOWN_HOLD).await;
        parts = match every_node(cluster, links, &frame).await {
            Some(parts) => parts,
            None => return resp::error("CLUSTERDOWN no slot map yet"),
        };
    }
}

/// Wait (bounded by `deadline`, and by one backoff step) for the map to
/// drop `down` (its replica promoted) or change.
async fn until_replaced(cluster: &Cluster, down: &Node, deadline: Instant) {
    let version = cluster.map_version();
    let until = (Instant::now() + crate::upstream::conn::backoff(5)).min(deadline);
    cluster.stale();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let named = cluster.map().is_some_and(|m| m.nodes.contains(down));
        if !named || cluster.map_version() != version {
            return;
        }
    }
}
