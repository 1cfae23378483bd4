//! The hub's upstream side: where each subscription is to be held (by the
//! slot map), the connections that hold them, the commands that bring each
//! one in line, and what the connections send back (confirmations,
//! refusals, redirections, messages).

use super::{Actor, Conn, Done, Entry, Up, Upstream, HOME};
use crate::resp;
use crate::upstream::cluster::dispatch;
use crate::upstream::conn::Request;
use crate::upstream::pubsub::place::{self, Place};
use crate::upstream::pubsub::{Kind, Start, TRACKING_CHANNEL};
use crate::upstream::topology::{self, Node, SlotMap};
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

impl Actor {
    /// The connection that holds `node`'s subscriptions (made on first use).
    pub(super) fn conn_for(&mut self, node: &Node) -> usize {
        if let Some(&c) = self.by_node.get(node) {
            return c;
        }
        let stop = self.shutdown.child_token();
        self.conns.push(Conn::new(Some(node.clone()), stop));
        let c = self.conns.len() - 1;
        self.by_node.insert(node.clone(), c);
        c
    }

    /// The connections a subscription is to be held on now.
    pub(super) fn targets(&mut self, kind: Kind, name: &[u8]) -> Vec<usize> {
        let Some(map) = self.map.clone() else {
            return vec![HOME];
        };
        let primaries =
            |a: &mut Actor| -> Vec<usize> { map.nodes.iter().map(|n| a.conn_for(n)).collect() };
        match place::place(kind, name, true) {
            Place::Home => vec![HOME],
            Place::Primaries => primaries(self),
            Place::HomeAndPrimaries => {
                let mut t = vec![HOME];
                t.extend(primaries(self));
                t
            }
            // No owner (a failover in progress): tried again with the next map.
            Place::Slot(s) => match map.owner(s) {
                Some(n) => vec![self.conn_for(&n.clone())],
                None => Vec::new(),
            },
        }
    }

    /// Bring one subscription's upstream state in line with who wants it and
    /// where it is to be held: SUBSCRIBE where it is wanted and missing (the
    /// connection started if need be), UNSUBSCRIBE where it is confirmed and
    /// no longer wanted, forgotten once it is nowhere and unwanted. A command
    /// in flight is let finish first; its confirmation calls this again.
    pub(super) fn reconcile(&mut self, kind: Kind, name: &Bytes) {
        let k = kind.idx();
        let Some(e) = self.entries[k].get(name) else {
            return;
        };
        let wanted = e.wanted();
        if !wanted && e.ups.is_empty() {
            self.entries[k].remove(name);
            return;
        }
        let mut subscribe = Vec::new();
        let mut start = Vec::new();
        if wanted {
            for &t in &e.targets {
                if e.state(t).is_none() {
                    match self.conns[t].up {
                        Some(_) => subscribe.push(t),
                        None => start.push(t),
                    }
                }
            }
        }
        let unsubscribe: Vec<usize> = e
            .ups
            .iter()
            .filter(|(c, up)| *up == Up::Active && !(wanted && e.targets.contains(c)))
            .map(|(c, _)| *c)
            .collect();
        for t in subscribe {
            self.set_up(kind, name, t, Some(Up::Subscribing));
            self.send(t, kind, name, true);
        }
        for c in unsubscribe {
            self.set_up(kind, name, c, Some(Up::Unsubscribing));
            self.send(c, kind, name, false);
        }
        for t in start {
            self.start(t);
        }
    }

    /// Have connection `c` kept (once); its subscriptions are made when it
    /// comes up.
    pub(super) fn start(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.started || conn.retired {
            return;
        }
        conn.started = true;
        (self.starter)(Start {
            conn: c,
            node: conn.node.clone(),
            events: self.events_tx.clone(),
            stop: conn.stop.clone(),
        });
    }

    pub(super) fn send(&mut self, c: usize, kind: Kind, name: &Bytes, subscribe: bool) {
        let Some(conn) = &self.conns[c].up else {
            return;
        };
        let cmd = if subscribe {
            kind.subscribe_cmd()
        } else {
            kind.unsubscribe_cmd()
        };
        let (tx, rx) = oneshot::channel();
        let req = Request {
            bytes: resp::command(&[cmd, name]),
            count: 0,
            reply: Some(tx),
            in_multi_after: false,
            pushes: 1,
        };
        let epoch = conn.epoch;
        match conn.requests.try_send(req) {
            Ok(()) => {}
            // The connection is gone and its `Lost` is on the way: everything
            // is subscribed again on the next one.
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // A million requests queued: refuse this one like the server would.
                self.done(Done {
                    conn: c,
                    epoch,
                    kind,
                    name: name.clone(),
                    subscribe,
                    result: Ok(Ok(resp::error(
                        "ERR the proxy's pub/sub connection has too many requests queued",
                    ))),
                });
                return;
            }
        }
        let done = self.done_tx.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let result = rx.await;
            let _ = done.send(Done {
                conn: c,
                epoch,
                kind,
                name,
                subscribe,
                result,
            });
        });
    }

    /// Every (kind, name) whose entry satisfies `f`.
    pub(super) fn select(&self, f: impl Fn(&Entry) -> bool) -> Vec<(Kind, Bytes)> {
        let mut out = Vec::new();
        for kind in [Kind::Channel, Kind::Pattern, Kind::Shard] {
            for (n, e) in &self.entries[kind.idx()] {
                if f(e) {
                    out.push((kind, n.clone()));
                }
            }
        }
        out
    }

    pub(super) fn connected(&mut self, c: usize, epoch: u64, requests: mpsc::Sender<Request>) {
        let Some(conn) = self.conns.get_mut(c) else {
            return;
        };
        if conn.retired {
            return;
        }
        conn.up = Some(Upstream { epoch, requests });
        conn.down = None;
        let again = self.select(|e| e.wanted() && e.targets.contains(&c) && e.state(c).is_none());
        if !again.is_empty() {
            info!(
                subscriptions = again.len(),
                addr = %self.addr(c),
                "pub/sub hub connected; subscribing"
            );
        }
        for (kind, n) in again {
            self.reconcile(kind, &n);
        }
    }

    pub(super) fn addr(&self, c: usize) -> String {
        match &self.conns[c].node {
            Some(n) => n.to_string(),
            None => self.opts.addr.clone(),
        }
    }

    /// Connection `c` is gone: nothing is subscribed on it any more. Local
    /// subscriptions stay and are made again on its next connection.
    pub(super) fn lost(&mut self, c: usize) {
        self.forget_conn(c);
        if c != HOME || self.map.is_some() {
            self.ask_refresh();
        }
    }

    /// On a cluster every node hears every `PUBLISH`: when the home node
    /// cannot be reached (it died, it is being replaced), channels and
    /// patterns move to another node of the map rather than wait, deaf, for
    /// that one to come back. At most once a second (then the usual backoff).
    fn move_home(&mut self) -> bool {
        self.move_home_because("cannot be reached")
    }

    /// [`move_home`](Self::move_home), saying why.
    fn move_home_because(&mut self, why: &str) -> bool {
        let Some(map) = self.map.clone() else {
            return false;
        };
        if self
            .home_moved_at
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return false;
        }
        let here = self.addr(HOME);
        let others: Vec<&Node> = map.nodes.iter().filter(|n| n.to_string() != here).collect();
        if others.is_empty() {
            return false;
        }
        let to = others[fastrand::usize(..others.len())].clone();
        warn!(from = %here, to = %to, "pub/sub hub: the node holding channels and patterns {why}; moving them to another node");
        self.home_moved_at = Some(tokio::time::Instant::now());
        self.conns[HOME].stop.cancel();
        self.conns[HOME] = Conn::new(Some(to), self.shutdown.child_token());
        self.forget_conn(HOME);
        self.replace(self.select(|e| e.targets.contains(&HOME)));
        self.ask_refresh();
        true
    }

    /// Connection `c` is down or closed: drop it and every upstream state
    /// held on it.
    pub(super) fn forget_conn(&mut self, c: usize) {
        self.conns[c].up = None;
        for (kind, n) in self.select(|e| e.state(c).is_some()) {
            self.set_up(kind, &n, c, None);
            self.reconcile(kind, &n);
        }
    }

    pub(super) fn connect_failed(&mut self, c: usize, error: UpstreamError) {
        if c == HOME && self.move_home() {
            // Pending subscriptions wait for the new home's confirmation.
            return;
        }
        let reply = error.to_reply();
        self.conns[c].down = Some(reply.clone());
        // Every pending SUBSCRIBE that waits for this connection: say why it
        // cannot be made.
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, op)| {
                op.waiting.iter().any(|n| {
                    self.entries[op.kind.idx()]
                        .get(n)
                        .is_some_and(|e| e.targets.contains(&c) && e.state(c) != Some(Up::Active))
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.fail(id, reply.clone());
        }
    }

    /// A new slot map: connections to nodes that are no longer primaries are
    /// closed, and every subscription is placed again.
    pub(super) fn topology(&mut self, map: Arc<SlotMap>, refresh: Arc<Notify>) {
        // The home's node was a primary and is no longer (a frozen primary
        // whose replica was promoted): it may hear nothing for as long as
        // it is frozen, and its connection may never fail to say so. An
        // address never named a primary (a cache's front name) stays.
        let here = self.addr(HOME);
        let named = |m: &SlotMap| m.nodes.iter().any(|n| n.to_string() == here);
        let home_left = self.map.as_deref().is_some_and(named) && !named(&map);
        self.refresh = Some(refresh);
        self.map = Some(map.clone());
        if home_left {
            self.move_home_because("is no longer a primary");
        }
        let gone: Vec<Node> = self
            .by_node
            .keys()
            .filter(|n| !map.nodes.contains(n))
            .cloned()
            .collect();
        for n in gone {
            let Some(c) = self.by_node.remove(&n) else {
                continue;
            };
            info!(node = %n, "pub/sub hub: closing the connection to a node that is no longer a primary");
            let conn = &mut self.conns[c];
            conn.retired = true;
            conn.stop.cancel();
            self.forget_conn(c);
        }
        self.replace(self.select(|_| true));
    }

    /// Place these subscriptions by the current map and reconcile them.
    pub(super) fn replace(&mut self, which: Vec<(Kind, Bytes)>) {
        for (kind, n) in which {
            let targets = self.targets(kind, &n);
            if let Some(e) = self.entries[kind.idx()].get_mut(&n) {
                e.targets = targets;
            }
            self.reconcile(kind, &n);
        }
    }

    pub(super) fn retry_now(&mut self) {
        if self.retry.is_empty() {
            return;
        }
        let which: Vec<(Kind, Bytes)> = self.retry.drain().collect();
        self.replace(which);
    }

    pub(super) fn ask_refresh(&self) {
        if let Some(r) = &self.refresh {
            r.notify_one();
        }
    }

    pub(super) fn set_up(&mut self, kind: Kind, name: &[u8], c: usize, up: Option<Up>) {
        let Some(e) = self.entries[kind.idx()].get_mut(name) else {
            return;
        };
        let held = |u: Option<Up>| matches!(u, Some(Up::Active | Up::Unsubscribing));
        let was = held(e.state(c));
        e.ups.retain(|(x, _)| *x != c);
        if let Some(u) = up {
            e.ups.push((c, u));
        }
        match (was, held(up)) {
            (false, true) => self.held += 1,
            (true, false) => self.held -= 1,
            _ => {}
        }
        self.metrics.pubsub_channels.set(self.held as i64);
    }

    /// A push frame from connection `c`.
    pub(super) fn push(&mut self, c: usize, frame: Bytes) {
        let Some((what, first)) = resp::push_head(&frame) else {
            debug!("pub/sub hub: ignoring a frame that is not a push");
            return;
        };
        if what == b"invalidate" {
            // Tracking redirected to this connection (RESP3): for the local
            // subscribers of the tracking channel, the push itself (RESP3
            // clients) or a message of that channel (RESP2), as Redis sends
            // a redirect target of either protocol.
            const HEAD: &[u8] = b">2\r\n$10\r\ninvalidate\r\n";
            if let Some(keys) = frame.strip_prefix(HEAD) {
                let mut m = BytesMut::with_capacity(frame.len() + 32);
                m.extend_from_slice(b">3\r\n$7\r\nmessage\r\n$20\r\n");
                m.extend_from_slice(TRACKING_CHANNEL);
                m.extend_from_slice(b"\r\n");
                m.extend_from_slice(keys);
                let channel = Bytes::from_static(TRACKING_CHANNEL);
                let m = m.freeze();
                self.fan_out_as(c, Kind::Channel, &channel, &m, &frame);
                self.redirect_out(c, &m, &frame);
            }
            return;
        }
        let Some(first) = first.map(|f| frame.slice_ref(f)) else {
            return;
        };
        let cluster = self.map.is_some();
        match what {
            b"message" => {
                if place::delivers(Kind::Channel, &first, c == HOME, cluster) {
                    self.fan_out(c, Kind::Channel, &first, &frame)
                }
            }
            b"pmessage" => {
                let channel = resp::pmessage_channel(&frame).unwrap_or_default();
                if place::delivers(Kind::Pattern, channel, c == HOME, cluster) {
                    self.fan_out(c, Kind::Pattern, &first, &frame)
                }
            }
            b"smessage" => self.fan_out(c, Kind::Shard, &first, &frame),
            other => match Kind::of_confirmation(other) {
                Some((kind, true)) => self.subscribed(c, kind, first),
                Some((kind, false)) => self.unsubscribed(c, kind, first),
                None => debug!("pub/sub hub: ignoring a push frame"),
            },
        }
    }

    pub(super) fn subscribed(&mut self, c: usize, kind: Kind, name: Bytes) {
        let k = kind.idx();
        // Not asked for (cannot happen): take it, then let it go.
        self.entries[k].entry(name.clone()).or_default();
        self.set_up(kind, &name, c, Some(Up::Active));
        let e = self.entries[k].get_mut(&name).expect("just made");
        e.redirects = 0;
        if e.ready() {
            for id in e.pending.clone() {
                let ready = self.pending.get_mut(&id).is_some_and(|op| {
                    op.waiting.remove(&name);
                    op.waiting.is_empty()
                });
                if ready {
                    self.finish(id);
                }
            }
        }
        self.reconcile(kind, &name);
    }

    pub(super) fn unsubscribed(&mut self, c: usize, kind: Kind, name: Bytes) {
        let Some(e) = self.entries[kind.idx()].get(&name) else {
            return;
        };
        if e.state(c) == Some(Up::Active) {
            // The server dropped it by itself (a cluster slot moving).
            warn!(
                kind = kind.label(),
                addr = %self.addr(c),
                "upstream dropped a pub/sub subscription; subscribing again"
            );
            self.ask_refresh();
        }
        self.set_up(kind, &name, c, None);
        self.reconcile(kind, &name);
    }

    pub(super) fn done(&mut self, d: Done) {
        if !self.is_current(d.conn, d.epoch) {
            return;
        }
        let reply = match &d.result {
            Ok(Ok(bytes)) if !bytes.is_empty() => bytes.clone(),
            // Confirmed (handled with the push frames), or the connection
            // failed (handled by `Lost`).
            _ => return,
        };
        let text = resp::error_text(&reply).unwrap_or_else(|| "unexpected reply".into());
        let k = d.kind.idx();
        if !d.subscribe {
            warn!(kind = d.kind.label(), error = %text, "upstream refused a pub/sub unsubscribe; keeping it");
            self.set_up(d.kind, &d.name, d.conn, Some(Up::Active));
            return;
        }
        self.set_up(d.kind, &d.name, d.conn, None);
        if self.redirected(&d, &reply) {
            return;
        }
        warn!(kind = d.kind.label(), error = %text, "upstream refused a pub/sub subscription");
        let (waiters, subs) = match self.entries[k].get(&d.name) {
            Some(e) => (
                e.pending.clone(),
                e.subs.keys().copied().collect::<Vec<_>>(),
            ),
            None => return,
        };
        for id in waiters {
            self.fail(id, reply.clone());
        }
        // Clients already subscribed (made again after a reconnect) that
        // the server no longer allows: closed, as Redis closes clients
        // whose channel permissions are revoked.
        for id in subs {
            if let Some(c) = self.clients.get(&id) {
                warn!(peer = %c.link.peer, id, "closing a subscriber whose subscription the server refused again");
                c.link.kill.cancel();
            }
            self.remove_client(id);
        }
        self.reconcile(d.kind, &d.name);
    }

    /// A cluster's refusal that says "not here" or "not now" (`MOVED`, `ASK`,
    /// `TRYAGAIN`, `CLUSTERDOWN`): followed or tried again, within a bound.
    /// True when it was taken care of.
    pub(super) fn redirected(&mut self, d: &Done, reply: &[u8]) -> bool {
        let answered_by = self.conns[d.conn].node.clone().unwrap_or(Node {
            host: String::new(),
            port: 0,
        });
        let redirect = topology::parse_redirect(reply, &answered_by);
        let later = dispatch::not_now(reply);
        if redirect.is_none() && !later {
            return false;
        }
        let Some(e) = self.entries[d.kind.idx()].get_mut(&d.name) else {
            return true;
        };
        // As many in a row as a command may follow.
        e.redirects += 1;
        if e.redirects > dispatch::MAX_REDIRECTS {
            return false;
        }
        self.ask_refresh();
        match redirect {
            // Before the first slot map (the cluster layer is still reading
            // it): the map's arrival places every subscription again.
            Some((true, slot, node)) if self.map.is_some() => {
                debug!(slot, node = %node, "pub/sub hub: following MOVED");
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).moved(slot, node);
                }
                self.replace(vec![(d.kind, d.name.clone())]);
            }
            // ASK (a migration under way), the cluster not ready, or no map
            // yet: again at the next tick, by the map as it is then.
            _ => {
                self.retry.insert((d.kind, d.name.clone()));
            }
        }
        true
    }
}
