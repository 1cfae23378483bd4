//! A client's dedicated connection in a cluster (transactions, WATCH,
//! blocking commands, client modes): a task that stands where a pinned
//! connection stands for the session, and binds to a real pinned connection
//! on the node of the client's keys once a command names them.
//!
//! - `MULTI` is answered `+OK` at once and sent, with any keyless command
//!   queued after it, when the first keyed command says which node; `EXEC`
//!   with no key at all runs on any primary.
//! - While a transaction or a WATCH is open, its keys must stay in the slot of
//!   the first one: another slot gets `CROSSSLOT` (what the Enterprise policy's
//!   proxy answers).
//! - Outside them, each command goes to its keys' node, re-binding when that
//!   is another node; a `MOVED` is followed (the command did not run).
//! - A client mode (CLIENT TRACKING, READONLY, ...) holds for every node:
//!   a command for another node's keys gets a connection there with the
//!   client's mode commands replayed first; the connections of the nodes
//!   left are kept (their tracking invalidations still reach the client).
//!   `CLIENT TRACKING ... REDIRECT` is refused: a cluster would need one
//!   redirect target per shard.
//!
//! If the bound connection is lost while it holds the client's state, the
//! session is told (`lost`), as for any pinned connection.

mod bind;
mod follow;

use super::route::{self, Plan};
use super::Cluster;
use crate::command::{Class, Commands, Pin};
use crate::resp::scan::{args_of, CommandScanner, Limits};
use crate::resp::{self, Proto};
use crate::upstream::conn::{PushSink, Request};
use crate::upstream::pool::{Pinned, ServerRef};
use crate::upstream::topology::Node;
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

struct Bound {
    node: Node,
    pin: Pinned,
    /// Reached through `ASK`: commands outside `MULTI` (and `MULTI`) are
    /// sent after `ASKING`.
    asking: bool,
    /// Cancelled when this binding is dropped: ends the task that passes
    /// the session's abort on, which must not keep the connection open.
    _released: DropGuard,
}

struct Virtual {
    cluster: Arc<Cluster>,
    proto: Proto,
    push: mpsc::UnboundedSender<Bytes>,
    expiry: Arc<AtomicU64>,
    lost: CancellationToken,
    /// The session's abort (its client left while blocked): passed on to
    /// the real connection bound now, which closes at once.
    abort: CancellationToken,
    bound: Option<Bound>,
    /// The slot an open transaction or WATCH is held to.
    slot: Option<u16>,
    in_multi: bool,
    watching: bool,
    sticky: bool,
    /// MULTI and the keyless commands after it, not yet sent (no node yet).
    queued: Vec<Bytes>,
    /// A command of the open transaction was refused here (CROSSSLOT, no
    /// connection to be had): EXEC discards it, as Redis does after an error
    /// while queueing.
    tx_failed: bool,
    /// WATCH could not be given a connection: the next transaction aborts
    /// (it would otherwise run unwatched).
    watch_failed: bool,
    /// The transaction as sent to the server since `MULTI` (made again
    /// elsewhere when the cluster redirects it).
    tx_log: Vec<Bytes>,
    /// The watched keys' slot moved: the next (or open) transaction answers
    /// as aborted by a changed key.
    watch_lost: bool,
    /// The open transaction answers null at `EXEC` (see `watch_lost`).
    tx_null: bool,
    /// A binding made now to this node is reached through `ASK`.
    ask_at: Option<Node>,
    /// The node of the last binding (kept when its connection closes).
    was_on: Option<Node>,
    spread: usize,
    /// The bound connection's server side, for CLIENT UNBLOCK.
    server: ServerRef,
    /// In a client mode: the connections to other nodes, kept with their mode.
    parked: Vec<Bound>,
    /// The client-mode commands that succeeded, in order: replayed on each
    /// node's connection when it is first used.
    modes: Vec<Bytes>,
}

/// Client-mode commands remembered for replay at most (oldest dropped).
const MAX_MODES: usize = 64;

/// Start the task; the session holds the returned [`Pinned`] as usual.
pub fn start(cluster: Arc<Cluster>, proto: Proto, push: PushSink) -> Pinned {
    let (tx, rx) = mpsc::channel::<Request>(1024);
    let exp = {
        let state = cluster.connector.tokens().borrow();
        crate::upstream::conn::unix_secs(
            state
                .usable(std::time::SystemTime::now())
                .and_then(|c| c.expires_at),
        )
    };
    let expiry = Arc::new(AtomicU64::new(exp));
    let server = ServerRef::default();
    let lost = CancellationToken::new();
    let abort = CancellationToken::new();
    let v = Virtual {
        cluster,
        proto,
        push: push.tx,
        expiry: expiry.clone(),
        lost: lost.clone(),
        abort: abort.clone(),
        bound: None,
        slot: None,
        in_multi: false,
        watching: false,
        sticky: false,
        queued: Vec::new(),
        tx_failed: false,
        watch_failed: false,
        tx_log: Vec::new(),
        watch_lost: false,
        tx_null: false,
        ask_at: None,
        was_on: None,
        spread: fastrand::usize(..1024),
        server: server.clone(),
        parked: Vec::new(),
        modes: Vec::new(),
    };
    tokio::spawn(v.run(rx));
    Pinned {
        tx,
        expiry,
        lost,
        abort,
        // Set to the real connection's as it binds (CLIENT UNBLOCK goes there).
        server,
        marks: false,
        clean: Default::default(),
        proto,
    }
}

fn upper(a: &[u8]) -> Vec<u8> {
    a.to_ascii_uppercase()
}

impl Virtual {
    /// A transaction or WATCH is open: it stays on its node.
    fn in_tx(&self) -> bool {
        self.in_multi || self.watching
    }

    fn held(&self) -> bool {
        self.in_tx() || self.sticky
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let limits = Limits {
            max_bulk_bytes: usize::MAX,
            max_line_bytes: usize::MAX,
            max_elements: usize::MAX,
        };
        while let Some(req) = rx.recv().await {
            let mut out = BytesMut::new();
            let mut pos = 0;
            while pos < req.bytes.len() {
                let mut scanner = CommandScanner::new(limits);
                let Ok(Some(cmd)) = scanner.scan(&req.bytes[pos..]) else {
                    out.extend_from_slice(&resp::error(
                        "ERR redis-entra-proxy: cannot re-read a command for cluster routing",
                    ));
                    break;
                };
                let frame = req.bytes.slice(pos..pos + cmd.len);
                pos += cmd.len;
                let args = args_of(&frame, &cmd);
                let frame = if cmd.inline {
                    resp::command(&args)
                } else {
                    frame.clone()
                };
                let owned: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
                let reply = self.one(frame, &owned).await;
                out.extend_from_slice(&reply);
            }
            if let Some(tx) = req.reply {
                let _ = tx.send(Ok(out.freeze()));
            }
        }
    }

    async fn one(&mut self, frame: Bytes, args: &[Vec<u8>]) -> Bytes {
        let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        let name = upper(refs[0]);
        let class = class_of(self.cluster.table(), &refs);
        let mode = matches!(class, Class::Pin(Pin::ClientMode | Pin::Cluster));
        if mode && is_tracking_redirect(&refs) {
            return resp::error(TRACKING_REDIRECT_REFUSED);
        }
        if mode || matches!(class, Class::Pin(Pin::Monitor)) {
            self.sticky = true;
        }
        if name == b"EXEC" && self.in_multi && self.tx_failed {
            if self.bound.is_some() {
                let _ = self.send(resp::command(&[b"DISCARD"])).await;
            }
            self.end_tx();
            return resp::error("EXECABORT Transaction discarded because of previous errors.");
        }
        let plan = route::plan(self.cluster.table(), &refs);
        let slot = match plan {
            Plan::Slot(s) => Some(s),
            Plan::Split { .. } => return self.refuse(resp::error(route::CROSSSLOT)),
            Plan::Refuse(e) => return self.refuse(e),
            Plan::Any | Plan::FanOut(_) => None,
        };
        if name == b"MULTI" && !self.watching && !self.sticky && !self.in_multi {
            // A new transaction goes to the node of its own first key.
            self.bound = None;
        }
        if name == b"MULTI" && !self.in_multi && self.watch_failed {
            self.tx_failed = true;
        }
        if self.in_multi && self.tx_null {
            return self.tx_lost(&name);
        }
        if name == b"MULTI" && !self.in_multi && self.watch_lost {
            self.in_multi = true;
            self.tx_null = true;
            return resp::ok();
        }
        match &name[..] {
            b"MULTI" if self.bound.is_none() => {
                self.in_multi = true;
                self.tx_log = vec![frame.clone()];
                self.queued = vec![frame];
                return resp::ok();
            }
            b"DISCARD" if self.bound.is_none() && self.in_multi => {
                self.end_tx();
                return resp::ok();
            }
            _ => {}
        }
        if let Some(s) = slot {
            if self.held() && self.slot.is_some_and(|b| b != s) && !self.sticky {
                return self.refuse(resp::error(route::CROSSSLOT));
            }
            if self.in_multi || self.watching || name == b"WATCH" {
                self.slot = Some(s);
            }
        }
        // What the transaction is made of, should it be made again elsewhere.
        let logged = self.in_multi && name != b"EXEC" && name != b"DISCARD";
        if logged {
            self.tx_log.push(frame.clone());
        }
        let reply = match self.forward(frame.clone(), slot, None).await {
            Ok(r) => r,
            // No connection: the command did not reach the server.
            Err(e) => {
                if logged {
                    self.tx_log.pop();
                }
                return self.unsent(&name, e);
            }
        };
        if mode && !reply.starts_with(b"-") {
            if self.modes.len() == MAX_MODES {
                self.modes.remove(0);
            }
            self.modes.push(frame.clone());
        }
        // A redirection means the command did not run: follow it.
        let reply = self.settle(&name, frame.clone(), slot, reply).await;
        if self.tx_null {
            return reply;
        }
        match &name[..] {
            b"EXEC" | b"DISCARD" => {
                self.end_tx();
                self.release();
            }
            b"UNWATCH" => {
                self.watching = false;
                self.watch_failed = false;
                if !self.in_multi {
                    self.slot = None;
                    self.release();
                }
            }
            b"MULTI" => {
                self.in_multi = true;
                self.tx_log = vec![frame];
            }
            b"WATCH" if !reply.starts_with(b"-") => self.watching = true,
            b"WATCH" if !self.watching && !self.in_multi => self.slot = None,
            _ => {}
        }
        reply
    }

    /// A refusal; inside MULTI it also dooms the transaction.
    fn refuse(&mut self, e: Bytes) -> Bytes {
        if self.in_multi {
            self.tx_failed = true;
        }
        e
    }

    /// `name` could not be sent (no connection to be had): its error, and
    /// what that means for a transaction or WATCH of the client.
    fn unsent(&mut self, name: &[u8], e: Bytes) -> Bytes {
        match name {
            b"WATCH" => self.watch_failed = true,
            b"EXEC" if self.in_multi => {
                self.end_tx();
                let why = resp::error_text(&e).unwrap_or_default();
                return resp::error(&format!(
                    "EXECABORT Transaction discarded: {}",
                    why.trim_start_matches("ERR ")
                ));
            }
            b"DISCARD" if self.in_multi => {
                self.end_tx();
                return resp::ok();
            }
            _ => {}
        }
        self.refuse(e)
    }

    fn end_tx(&mut self) {
        self.tx_failed = false;
        self.watch_failed = false;
        self.watch_lost = false;
        self.tx_null = false;
        self.tx_log.clear();
        self.in_multi = false;
        self.watching = false;
        self.slot = None;
        self.queued.clear();
    }

    /// Send one command on the connection of `slot`'s node (binding first).
    /// `Err`: no connection could be had, the command was not sent.
    /// `to`: that node instead of the slot's owner.
    ///
    /// A bound connection found closed before the command was written (its
    /// node died since the client's last command) holds nothing of the
    /// client's outside a transaction, WATCH or mode: the command goes to the
    /// slot's owner, waiting for a new one as the shared path does. Inside
    /// them, the client's state went with it: the session is told (`lost`)
    /// and the command is refused, unsent.
    async fn forward(
        &mut self,
        frame: Bytes,
        slot: Option<u16>,
        to: Option<Node>,
    ) -> Result<Bytes, Bytes> {
        let closed = self
            .bound
            .as_ref()
            .filter(|b| b.pin.tx.is_closed() || b.pin.lost.is_cancelled());
        if let Some(node) = closed.map(|b| b.node.clone()) {
            self.drop_lost();
            if self.held() {
                let e = self.cluster.unsent(Some(&node), STATE_LOST);
                return Err(super::node_error(&e, Some(&node), slot));
            }
        }
        match self.forward_once(frame.clone(), slot, to.clone()).await? {
            // Closed between the look above and the write: once more.
            Err((UpstreamError::Closed { .. }, _)) if !self.held() => {
                self.bound = None;
                let r = self.forward_once(frame, slot, to).await?;
                Ok(self.answer(r))
            }
            r => Ok(self.answer(r)),
        }
    }

    /// [`forward`](Self::forward) without the second try: the inner `Err`
    /// is the request's failure on the node.
    async fn forward_once(
        &mut self,
        frame: Bytes,
        slot: Option<u16>,
        to: Option<Node>,
    ) -> Result<Result<Bytes, (UpstreamError, Option<Node>)>, Bytes> {
        if self.lost.is_cancelled() {
            // The client's state is gone with its connection: nothing more
            // runs here (the session lets this one go).
            let e = self.cluster.unsent(self.was_on.as_ref(), STATE_LOST);
            return Err(super::node_error(&e, self.was_on.as_ref(), slot));
        }
        let want = match (to, slot) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => self.cluster.node_for(slot, self.spread),
            (None, None) => None,
        };
        // A client mode moves to the keys' node (keeping the one it leaves);
        // a transaction or WATCH stays where it is.
        let rebind = match (&self.bound, &want) {
            (Some(b), Some(w)) => b.node != *w && !self.in_tx(),
            _ => false,
        };
        if rebind {
            self.unbind();
        }
        if self.bound.is_none() && self.sticky {
            if let Some(w) = &want {
                if let Some(i) = self.parked.iter().position(|b| b.node == *w) {
                    let b = self.parked.swap_remove(i);
                    if b.pin.lost.is_cancelled() {
                        // The mode held there is gone with it.
                        self.lost.cancel();
                    } else {
                        self.stand_on(b);
                    }
                }
            }
        }
        if self.bound.is_none() {
            if self.in_multi && slot.is_none() && !frame_is(&frame, b"EXEC") {
                // Still no node: keep it for when one is known.
                self.queued.push(frame);
                return Ok(Ok(resp::simple("QUEUED")));
            }
            let node = match want.or_else(|| self.cluster.node_for(None, self.spread)) {
                Some(n) => n,
                None => return Err(resp::error("CLUSTERDOWN Hash slot not served")),
            };
            if let Err((e, node)) = self.bind_held(node, slot).await {
                return Err(super::node_error(&e, Some(&node), slot));
            }
            // A new node's connection takes the client's modes first.
            for m in self.modes.clone() {
                let r = self.send(m).await;
                if r.starts_with(b"-") {
                    return Ok(Ok(r));
                }
            }
        }
        Ok(self.send_raw(frame).await)
    }

    /// The bound connection failed: let it go (and tell the session when the
    /// client's state was on it).
    fn drop_lost(&mut self) {
        if self.held() {
            self.lost.cancel();
        }
        self.bound = None;
        self.cluster.stale();
    }

    /// A request's outcome as the client reads it.
    fn answer(&self, r: Result<Bytes, (UpstreamError, Option<Node>)>) -> Bytes {
        r.unwrap_or_else(|(e, node)| super::node_error(&e, node.as_ref(), self.slot))
    }

    async fn send(&mut self, frame: Bytes) -> Bytes {
        let r = self.send_raw(frame).await;
        self.answer(r)
    }

    /// [`send`](Self::send), its failure kept apart (with the node).
    async fn send_raw(&mut self, frame: Bytes) -> Result<Bytes, (UpstreamError, Option<Node>)> {
        let is_multi = frame_is(&frame, b"MULTI");
        let in_multi_after =
            self.in_multi && !frame_is(&frame, b"EXEC") && !frame_is(&frame, b"DISCARD")
                || is_multi;
        // On a node reached through ASK: ASKING first, except inside MULTI
        // (where ASKING from before MULTI holds, and would be queued).
        let ask = self.bound.as_ref().is_some_and(|b| b.asking) && (!self.in_multi || is_multi);
        let (bytes, count) = if ask {
            let mut b = BytesMut::from(&resp::command(&[b"ASKING"])[..]);
            b.extend_from_slice(&frame);
            (b.freeze(), 2)
        } else {
            (frame, 1)
        };
        let node = self.bound.as_ref().map(|b| b.node.clone());
        match self.request(bytes, count, in_multi_after).await {
            Ok(b) if count == 2 => Ok(super::merge::split_replies(&b, 2)
                .pop()
                .flatten()
                .unwrap_or_else(|| resp::error("ERR redis-entra-proxy: incomplete reply"))),
            Ok(b) => Ok(b),
            Err(e) => Err((e, node)),
        }
    }

    async fn request(
        &mut self,
        bytes: Bytes,
        count: usize,
        in_multi_after: bool,
    ) -> Result<Bytes, UpstreamError> {
        let Some(b) = &self.bound else {
            // Let go of just before (its connection failed): not written.
            return Err(self
                .cluster
                .unsent(self.was_on.as_ref(), "the dedicated connection was lost"));
        };
        let (tx, rx) = oneshot::channel();
        let req = Request {
            bytes,
            count,
            reply: Some(tx),
            in_multi_after,
            pushes: 0,
        };
        let res = if b.pin.tx.send(req).await.is_err() {
            // The connection's task ended (its node died): not written.
            Err(self
                .cluster
                .unsent(Some(&b.node), "the dedicated connection had ended"))
        } else {
            rx.await
                .unwrap_or_else(|_| Err(self.cluster.dropped_reply()))
        };
        self.expiry
            .store(b.pin.expiry.load(Ordering::Acquire), Ordering::Release);
        if b.pin.lost.is_cancelled() || b.pin.tx.is_closed() {
            self.drop_lost();
        }
        res
    }
}

/// Why a command is refused after the connection holding a transaction,
/// WATCH or client mode failed.
const STATE_LOST: &str = "the dedicated connection holding the client's state was lost";

const TRACKING_REDIRECT_REFUSED: &str = "ERR redis-entra-proxy: CLIENT TRACKING ... REDIRECT is not available on a clustered cache (invalidations of each shard would need a redirect target on that shard); use RESP3 tracking (HELLO 3, CLIENT TRACKING on) instead";

/// How the dedicated connection reads `args`: by the command model (the
/// server's `COMMAND` merged with the proxy's table), as the session does,
/// so that a command only the server flags (a module's blocking command)
/// is what the session took it for.
fn class_of(model: &Commands, args: &[&[u8]]) -> Class {
    model.class(args)
}

/// `CLIENT TRACKING ... REDIRECT <id>`.
fn is_tracking_redirect(args: &[&[u8]]) -> bool {
    args.get(1)
        .is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING"))
        && args.iter().any(|a| a.eq_ignore_ascii_case(b"REDIRECT"))
}

/// Whether `frame` (a RESP array command) is the command `name`.
fn frame_is(frame: &[u8], name: &[u8]) -> bool {
    // `*N\r\n$len\r\nNAME\r\n`: find the name after the second line.
    let mut lines = frame.splitn(3, |&b| b == b'\n');
    let (_, _, rest) = (lines.next(), lines.next(), lines.next());
    rest.is_some_and(|r| {
        r.len() >= name.len()
            && r[..name.len()].eq_ignore_ascii_case(name)
            && r.get(name.len()) == Some(&b'\r')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's `COMMAND` listing a module's blocking command with a key
    /// and `CLIENT TRACKING`.
    fn learned() -> Commands {
        let bget = "*10\r\n$10\r\nmymod.bget\r\n:3\r\n*2\r\n+write\r\n+blocking\r\n\
                    :1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n";
        let reply = format!("*1\r\n{bget}");
        Commands::from_command_reply(reply.as_bytes()).expect("a command table")
    }

    #[test]
    fn the_dedicated_connection_reads_the_servers_command_model() {
        let m = learned();
        let bget: &[&[u8]] = &[b"MYMOD.BGET", b"k", b"0"];
        // What the session routes it as (the server flags it blocking).
        assert_eq!(class_of(&m, bget), Class::Pin(Pin::Blocking));
        assert_eq!(class_of(&m, bget), m.judge(bget, 3, false));
        // The proxy's own table still places the rest.
        let tracking: &[&[u8]] = &[b"CLIENT", b"TRACKING", b"on"];
        assert_eq!(class_of(&m, tracking), Class::Pin(Pin::ClientMode));
        assert_eq!(class_of(&m, &[b"MONITOR"]), Class::Pin(Pin::Monitor));
        assert_eq!(class_of(&m, &[b"GET", b"k"]), Class::Shared);
        // Before the server has listed its commands: the built-in table.
        assert_eq!(class_of(Commands::or_builtin(None), bget), Class::Shared);
    }
}
