//! Redirections on a cluster's dedicated connection: `MOVED`, `ASK` (the
//! command again after `ASKING` on the importing node), `TRYAGAIN`,
//! `CLUSTERDOWN` and a blocking wait ended by a failover are followed within
//! [`MAX_REDIRECTS`] and [`RETRY_BUDGET`], as on the shared path. Each such
//! reply means the command did not run.
//!
//! - Outside a transaction: the command goes again to the node named (or the
//!   slot's owner once the map says), on that node's connection.
//! - In `MULTI` (no `WATCH`): the server has flagged or discarded the
//!   transaction, so the proxy discards it there and makes it again, whole,
//!   on the node named (`ASKING` first, which holds for all of `MULTI`).
//! - A blocking command ended by a failover is sent again to the new
//!   primary (nothing was consumed); its timeout starts again there.
//! - With `WATCH`: the watched keys' slot is moving, and a watch cannot move
//!   with it: the transaction answers as one whose watched key changed
//!   (`EXEC` gives a null array, nothing runs) and the client retries.

use super::Virtual;
use crate::resp::{self, Proto};
use crate::upstream::cluster::dispatch::{not_now, MAX_REDIRECTS, RETRY_BUDGET};
use crate::upstream::cluster::merge::split_replies;
use crate::upstream::topology::{self, Node};
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

/// Where to send a command again: the node (`None`: the slot's owner in the
/// map), and whether after `ASKING`.
type Target = (Option<Node>, bool);

/// What a failover answers a client blocked on the demoted primary.
fn force_unblocked(reply: &[u8]) -> bool {
    reply.starts_with(b"-UNBLOCKED force unblock")
}

/// A reply that says the command did not run here, and may elsewhere or later.
pub(super) fn redirected(reply: &[u8]) -> bool {
    reply.starts_with(b"-MOVED ")
        || reply.starts_with(b"-ASK ")
        || not_now(reply)
        || force_unblocked(reply)
}

/// `EXEC`'s answer when a watched key changed.
pub(super) fn null_array(proto: Proto) -> Bytes {
    Bytes::from_static(match proto {
        Proto::Resp2 => b"*-1\r\n",
        Proto::Resp3 => b"_\r\n",
    })
}

impl Virtual {
    /// Follow what the cluster answered `frame` until it is a real answer.
    pub(super) async fn settle(
        &mut self,
        name: &[u8],
        frame: Bytes,
        slot: Option<u16>,
        mut reply: Bytes,
    ) -> Bytes {
        let start = Instant::now();
        let mut attempt = 0u32;
        for _ in 0..MAX_REDIRECTS {
            if !redirected(&reply) {
                return reply;
            }
            // The connection may have closed after the reply (a demoted
            // primary): outside a transaction the command can still go on.
            let node = match &self.bound {
                Some(b) => b.node.clone(),
                None if self.in_tx() => return reply,
                None => match self.was_on.clone() {
                    Some(n) => n,
                    None => return reply,
                },
            };
            let target: Target = match topology::parse_redirect(&reply, &node) {
                Some((moved, s, to)) => {
                    tracing::debug!(moved, slot = s, to = %to, "cluster redirection on a dedicated connection");
                    if moved {
                        self.cluster.moved(s, to.clone());
                    }
                    (Some(to), !moved)
                }
                None => {
                    if start.elapsed() >= RETRY_BUDGET {
                        return reply;
                    }
                    attempt += 1;
                    self.cluster.stale();
                    tokio::time::sleep(crate::upstream::conn::backoff(attempt + 2)).await;
                    (None, false)
                }
            };
            let watch_first = name == b"WATCH" && !self.watching && !self.in_multi;
            if self.watching && !watch_first {
                self.watch_lost().await;
                if self.in_multi {
                    return self.tx_lost(name);
                }
            }
            reply = if self.in_multi {
                self.replay(name, &frame, slot, target).await
            } else {
                match self.forward_to(frame.clone(), slot, target).await {
                    Ok(r) => r,
                    Err(e) => return e,
                }
            };
        }
        reply
    }

    /// The watched slot is moving: the watch (and the open transaction) are
    /// dropped on the server; the transaction, open or next, answers as one
    /// aborted by a changed key.
    async fn watch_lost(&mut self) {
        let undo: &[u8] = if self.in_multi {
            b"DISCARD"
        } else {
            b"UNWATCH"
        };
        let _ = self.send(resp::command(&[undo])).await;
        self.watching = false;
        self.watch_lost = true;
        if !self.in_multi {
            self.slot = None;
        }
    }

    /// The reply to `name` in a transaction that will answer null.
    pub(super) fn tx_lost(&mut self, name: &[u8]) -> Bytes {
        self.tx_null = true;
        match name {
            b"EXEC" => {
                self.end_tx();
                self.release();
                null_array(self.proto)
            }
            b"DISCARD" => {
                self.end_tx();
                self.release();
                resp::ok()
            }
            _ => resp::simple("QUEUED"),
        }
    }

    /// Send `frame` to `target` outside a transaction (binding there).
    async fn forward_to(
        &mut self,
        frame: Bytes,
        slot: Option<u16>,
        (node, ask): Target,
    ) -> Result<Bytes, Bytes> {
        let want = node.or_else(|| self.cluster.node_for(slot, self.spread));
        if self.bound.as_ref().map(|b| &b.node) != want.as_ref() || ask {
            self.unbind();
        }
        // The next binding (this one's) was reached through ASK.
        self.ask_at = want.clone().filter(|_| ask);
        let r = self.forward(frame, slot, want).await;
        self.ask_at = None;
        r
    }

    /// Make the open transaction again, whole, on `target`; the reply to
    /// `frame` (or the first redirection among the replies).
    async fn replay(
        &mut self,
        name: &[u8],
        frame: &Bytes,
        slot: Option<u16>,
        (node, ask): Target,
    ) -> Bytes {
        if name != b"EXEC" {
            let _ = self.send(resp::command(&[b"DISCARD"])).await;
        }
        let Some(to) = node.or_else(|| self.cluster.node_for(slot.or(self.slot), self.spread))
        else {
            return resp::error("CLUSTERDOWN Hash slot not served");
        };
        self.unbind();
        if let Err(e) = self.bind(to).await {
            self.tx_failed = true;
            return e.to_reply();
        }
        let mut bytes = BytesMut::new();
        if ask {
            bytes.extend_from_slice(&resp::command(&[b"ASKING"]));
        }
        // The log holds every command since MULTI, this one too unless EXEC.
        let exec = (name == b"EXEC").then_some(frame);
        for f in self.tx_log.iter().chain(exec) {
            bytes.extend_from_slice(f);
        }
        let count = self.tx_log.len() + usize::from(name == b"EXEC") + usize::from(ask);
        let b = match self.request(bytes.freeze(), count, name != b"EXEC").await {
            Ok(b) => b,
            Err(e) => return e.to_reply(),
        };
        let parts = split_replies(&b, count);
        let mut parts = parts.into_iter().skip(usize::from(ask));
        let mut last = None;
        for p in parts.by_ref() {
            let p = p.unwrap_or_else(|| resp::error("ERR redis-entra-proxy: incomplete reply"));
            if redirected(&p) {
                return p;
            }
            last = Some(p);
        }
        last.unwrap_or_else(|| resp::error("ERR redis-entra-proxy: incomplete reply"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_that_say_the_command_did_not_run() {
        for r in [
            &b"-MOVED 3999 127.0.0.1:6381\r\n"[..],
            b"-ASK 3999 127.0.0.1:6381\r\n",
            b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            b"-CLUSTERDOWN The cluster is down\r\n",
            b"-UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)\r\n",
        ] {
            assert!(redirected(r), "{}", String::from_utf8_lossy(r));
        }
        for r in [
            &b"-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n"[..],
            b"-ERR wrong number of arguments\r\n",
            b"-MOVEDX\r\n",
            b"+OK\r\n",
            b"*-1\r\n",
        ] {
            assert!(!redirected(r), "{}", String::from_utf8_lossy(r));
        }
        assert_eq!(&null_array(Proto::Resp2)[..], b"*-1\r\n");
        assert_eq!(&null_array(Proto::Resp3)[..], b"_\r\n");
    }
}
