//! PUBLISH, SPUBLISH and the PUBSUB counts on a cluster: sent where one
//! Redis's answer can be read from (any node for PUBLISH, which the cluster
//! broadcasts; the channel's owner for SPUBLISH; every primary for PUBSUB),
//! then made that answer by the hub ([`crate::upstream::pubsub::count`]).

use super::answer::replies;
use super::{Cmd, Item, Links};
use crate::resp;
use crate::upstream::cluster::Cluster;
use crate::upstream::pubsub::count::Question;
use bytes::Bytes;

/// Write `frame` (the question's command) where it must go.
pub(super) async fn send(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    question: Question,
    frame: Bytes,
    slot: Option<u16>,
) -> Item {
    let mut parts = Vec::new();
    if question.every_node() {
        let nodes = cluster.map().map(|m| m.nodes.clone()).unwrap_or_default();
        if nodes.is_empty() {
            return Item::Now(resp::error("CLUSTERDOWN no slot map yet"));
        }
        for n in nodes {
            let cmd = Cmd {
                bytes: frame.clone(),
                slot: None,
            };
            parts.push(links.send_one(Some(n), cmd).await);
        }
    } else {
        let node = cluster.node_for(slot, index);
        parts.push(links.send_one(node, Cmd { bytes: frame, slot }).await);
    }
    Item::Census { question, parts }
}

/// The nodes' replies (redirections followed), as one Redis's.
pub(super) async fn answer(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    question: Question,
    parts: Vec<super::Sent>,
) -> Bytes {
    let mut rs = Vec::with_capacity(parts.len());
    for p in parts {
        let node = p.node.as_ref().map(|n| n.to_string());
        let r = replies(cluster, links, index, p).await;
        rs.push((node, r.into_iter().next().unwrap_or_default()));
    }
    cluster.hub.census(question, rs).await
}
