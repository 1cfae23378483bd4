//! Answering one batch of a client's dispatcher: each part's replies, in
//! order, redirections followed ([`super::resolve`]), split commands and
//! fan-outs merged, PUBLISH counted as one Redis would.

use super::resolve::{elsewhere, resolve};
use super::{Cluster, Item, Links, Sent};
use crate::resp;
use crate::upstream::cluster::merge::{self, split_replies};
use crate::upstream::topology::Node;
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};

/// One batch's replies, in order, redirections followed and parts merged.
pub(super) async fn answer(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    items: Vec<Item>,
) -> Bytes {
    let mut out = BytesMut::new();
    for item in items {
        match item {
            Item::Now(b) => out.extend_from_slice(&b),
            Item::Plain(sent) => {
                let (_, rs) = replies_on(cluster, links, index, sent, Keyless::Anywhere).await;
                for r in rs {
                    out.extend_from_slice(&r);
                }
            }
            Item::Split {
                merge,
                nkeys,
                keys,
                parts,
            } => {
                let mut rs = Vec::new();
                for p in parts {
                    rs.extend(replies(cluster, links, index, p).await);
                }
                let refs: Vec<&[u8]> = rs.iter().map(|r| &r[..]).collect();
                out.extend_from_slice(&merge::split(merge, nkeys, &keys, &refs));
            }
            Item::Fan { kind, parts } => {
                let mut rs = Vec::new();
                for p in parts {
                    rs.extend(replies(cluster, links, index, p).await);
                }
                let refs: Vec<&[u8]> = rs.iter().map(|r| &r[..]).collect();
                out.extend_from_slice(&merge::fan(kind, &refs));
            }
            Item::Census { question, parts } => {
                let r = super::census::answer(cluster, links, index, question, parts).await;
                out.extend_from_slice(&r);
            }
            Item::Scan { step, part } => {
                let r = replies(cluster, links, index, part).await;
                let (scan, nodes) = (&r[0], &r[1]);
                let (page, stale) = crate::upstream::cluster::scan::reply(scan, nodes, &step);
                if stale {
                    cluster.stale();
                }
                out.extend_from_slice(&page);
            }
        }
    }
    out.freeze()
}

/// Where a part's keyless commands may go when their node cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keyless {
    /// Any primary (they were placed on one only to spread the load).
    Anywhere,
    /// Only the node asked (a fan-out's part, a SCAN step's node).
    There,
}

/// The final reply of each command of `sent`, redirections followed.
pub(super) async fn replies(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    sent: Sent,
) -> Vec<Bytes> {
    replies_on(cluster, links, index, sent, Keyless::There)
        .await
        .1
}

/// [`replies`], and the node that answered: a keyless command its node
/// could not take (not written) goes to another primary when `keyless`
/// says it may ([`elsewhere`]).
pub(super) async fn replies_on(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    sent: Sent,
    keyless: Keyless,
) -> (Option<Node>, Vec<Bytes>) {
    let n = sent.cmds.len();
    let first: Result<Bytes, UpstreamError> = match sent.rx {
        Some(rx) => rx.await.unwrap_or_else(|_| Err(cluster.dropped_reply())),
        None => Ok(Bytes::new()),
    };
    let pieces: Vec<Option<Bytes>> = match (&sent.node, first) {
        (None, _) => vec![None; n],
        (Some(_), Ok(b)) => split_replies(&b, n)
            .into_iter()
            .map(|p| {
                // Never None here: a missing reply is an answer, not a redirection.
                Some(p.unwrap_or_else(|| resp::error("ERR redis-entra-proxy: incomplete reply")))
            })
            .collect(),
        (Some(_), Err(e)) => {
            // A node's connection says `Shutdown` of what it never wrote
            // when its pool stops: the proxy's shutdown, or the end of the
            // grace of a node that left the map (then it may go elsewhere).
            let e = match e {
                UpstreamError::Shutdown if !cluster.shutting_down() => {
                    cluster.unsent(sent.node.as_ref(), "the node left the topology")
                }
                e => e,
            };
            if matches!(
                e,
                UpstreamError::Lost { .. }
                    | UpstreamError::Closed { .. }
                    | UpstreamError::Connect { .. }
                    | UpstreamError::Timeout { .. }
            ) {
                cluster.stale();
            }
            let unwritten = crate::upstream::cluster::node_unreachable(&e);
            let mut at = sent.node.clone();
            let mut out = Vec::with_capacity(n);
            for cmd in sent.cmds {
                out.push(if cmd.slot.is_some() && unwritten {
                    // Not written: wait for the slot's owner, as for a map without one.
                    resolve(cluster, links, index, cmd, None, None).await
                } else if keyless == Keyless::Anywhere && unwritten {
                    let (node, r) =
                        elsewhere(cluster, links, cmd, sent.node.clone(), e.clone()).await;
                    at = node;
                    r
                } else {
                    crate::upstream::cluster::node_error(&e, sent.node.as_ref(), cmd.slot)
                });
            }
            return (at, out);
        }
    };
    let mut out = Vec::with_capacity(n);
    for (cmd, piece) in sent.cmds.into_iter().zip(pieces) {
        out.push(resolve(cluster, links, index, cmd, sent.node.clone(), piece).await);
    }
    (sent.node, out)
}
