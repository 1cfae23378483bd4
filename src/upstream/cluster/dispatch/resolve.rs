//! Following one command's redirections on the shared path until it has a
//! real answer: `MOVED`, `ASK`, `TRYAGAIN`/`CLUSTERDOWN`, and a node that
//! cannot be reached while the cluster replaces it (see [`super`]).

use super::{is_error_word, not_now, Cmd, Links, MAX_REDIRECTS, NODE_DOWN_HOLD, RETRY_BUDGET};
use crate::resp;
use crate::upstream::cluster::merge::split_replies;
use crate::upstream::cluster::Cluster;
use crate::upstream::topology::{self, Node};
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

/// Follow one command's redirections until it has a real answer.
pub(super) async fn resolve(
    cluster: &Cluster,
    links: &mut Links,
    index: usize,
    cmd: Cmd,
    mut node: Option<Node>,
    mut reply: Option<Bytes>,
) -> Bytes {
    let start = Instant::now();
    let mut attempt = 0u32;
    // The last "node unreachable" error while its slot is being taken over.
    let mut held: Option<Bytes> = None;
    for _ in 0..MAX_REDIRECTS {
        let r = match reply.take() {
            Some(r) => r,
            None => {
                // No owner for the slot (failover, resharding), or its node
                // cannot be reached: wait for the map.
                let budget = if held.is_some() {
                    NODE_DOWN_HOLD
                } else {
                    RETRY_BUDGET
                };
                if start.elapsed() >= budget {
                    return held.unwrap_or_else(|| resp::error("CLUSTERDOWN Hash slot not served"));
                }
                attempt += 1;
                cluster.stale();
                // Back off, but go as soon as the map names another owner.
                let was = node.take();
                let until = (Instant::now() + crate::upstream::conn::backoff(attempt + 2))
                    .min(start + budget);
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    node = cluster.node_for(cmd.slot, index);
                    if node != was || Instant::now() >= until {
                        break;
                    }
                }
                if node.is_none() {
                    continue;
                }
                match send_and_wait(links, node.clone(), cmd.bytes.clone(), 1).await {
                    Ok(r) => r,
                    Err(e)
                        if cmd.slot.is_some() && crate::upstream::cluster::node_unreachable(&e) =>
                    {
                        held = Some(crate::upstream::cluster::node_error(
                            &e,
                            node.as_ref(),
                            cmd.slot,
                        ));
                        continue;
                    }
                    Err(e) => {
                        return crate::upstream::cluster::node_error(&e, node.as_ref(), cmd.slot)
                    }
                }
            }
        };
        if !r.starts_with(b"-") {
            return r;
        }
        let from = node.clone().unwrap_or(Node {
            host: String::new(),
            port: 0,
        });
        if let Some((moved, slot, to)) = topology::parse_redirect(&r, &from) {
            debug!(moved, slot, to = %to, "cluster redirection");
            let bytes = if moved {
                cluster.moved(slot, to.clone());
                cmd.bytes.clone()
            } else {
                let mut b = BytesMut::from(&resp::command(&[b"ASKING"])[..]);
                b.extend_from_slice(&cmd.bytes);
                b.freeze()
            };
            let count = if moved { 1 } else { 2 };
            node = Some(to);
            match send_and_wait(links, node.clone(), bytes, count).await {
                Ok(r) => reply = Some(r),
                Err(e) if cmd.slot.is_some() && crate::upstream::cluster::node_unreachable(&e) => {
                    held = Some(crate::upstream::cluster::node_error(
                        &e,
                        node.as_ref(),
                        cmd.slot,
                    ));
                }
                Err(e) => return crate::upstream::cluster::node_error(&e, node.as_ref(), cmd.slot),
            }
            continue;
        }
        if not_now(&r) {
            if start.elapsed() >= RETRY_BUDGET {
                return r;
            }
            attempt += 1;
            if is_error_word(&r, b"CLUSTERDOWN") {
                cluster.stale();
            }
            tokio::time::sleep(crate::upstream::conn::backoff(attempt + 2)).await;
            node = cluster.node_for(cmd.slot, index).or(node);
            match send_and_wait(links, node.clone(), cmd.bytes.clone(), 1).await {
                Ok(r) => reply = Some(r),
                Err(e) if cmd.slot.is_some() && crate::upstream::cluster::node_unreachable(&e) => {
                    held = Some(crate::upstream::cluster::node_error(
                        &e,
                        node.as_ref(),
                        cmd.slot,
                    ));
                }
                Err(e) => return crate::upstream::cluster::node_error(&e, node.as_ref(), cmd.slot),
            }
            continue;
        }
        return r;
    }
    reply
        .or(held)
        .unwrap_or_else(|| resp::error("ERR redis-entra-proxy: too many cluster redirections"))
}

/// A keyless command that `down` could not take (not written): to another
/// primary of the map, each tried once; when none takes it, every primary
/// again after a backoff (the map may name a promoted replica by then),
/// for as long as a keyed command waits for its node's replacement. The
/// node that answered, and its reply.
pub(super) async fn elsewhere(
    cluster: &Cluster,
    links: &mut Links,
    cmd: Cmd,
    down: Option<Node>,
    e: UpstreamError,
) -> (Option<Node>, Bytes) {
    let start = Instant::now();
    let mut tried: Vec<Node> = down.iter().cloned().collect();
    let mut last = (down, e);
    let mut attempt = 0u32;
    cluster.stale();
    loop {
        let next = cluster
            .map()
            .and_then(|m| m.nodes.iter().find(|n| !tried.contains(n)).cloned());
        let Some(node) = next else {
            let left = NODE_DOWN_HOLD.saturating_sub(start.elapsed());
            if left.is_zero() {
                let (node, e) = last;
                let r = crate::upstream::cluster::node_error(&e, node.as_ref(), None);
                return (node, r);
            }
            attempt += 1;
            tokio::time::sleep(crate::upstream::conn::backoff(attempt + 2).min(left)).await;
            cluster.stale();
            tried.clear();
            continue;
        };
        tried.push(node.clone());
        match send_and_wait(links, Some(node.clone()), cmd.bytes.clone(), 1).await {
            Ok(r) => {
                debug!(to = %node, "keyless command sent to another primary: its node cannot be reached");
                return (Some(node), r);
            }
            Err(e) if crate::upstream::cluster::node_unreachable(&e) => last = (Some(node), e),
            Err(e) => {
                let r = crate::upstream::cluster::node_error(&e, Some(&node), None);
                return (Some(node), r);
            }
        }
    }
}

/// Send `bytes` (owing `count` replies) and return the last reply.
async fn send_and_wait(
    links: &mut Links,
    node: Option<Node>,
    bytes: Bytes,
    count: usize,
) -> Result<Bytes, UpstreamError> {
    let cmds = vec![
        Cmd {
            bytes: Bytes::new(),
            slot: None
        };
        count
    ];
    let sent = links.send(node, cmds, bytes).await;
    let Some(rx) = sent.rx else {
        return Ok(resp::error("CLUSTERDOWN Hash slot not served"));
    };
    let b = rx
        .await
        .unwrap_or_else(|_| Err(links.cluster.dropped_reply()))?;
    let parts = split_replies(&b, count);
    Ok(parts
        .into_iter()
        .last()
        .flatten()
        .unwrap_or_else(|| resp::error("ERR redis-entra-proxy: incomplete reply")))
}
