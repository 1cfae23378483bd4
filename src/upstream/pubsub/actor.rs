//! The hub's registry, owned by one task: which local clients are subscribed
//! to what, where each subscription is held upstream (connection by
//! connection), and the confirmations and messages each client is owed.

use super::place::{self, Place};
use super::TRACKING_CHANNEL;
use super::{Counts, Event, HubOpts, Kind, Link, Op, OpResult, Start, Starter, ToClient};
use crate::metrics::{ErrorKind, Metrics};
use crate::resp::{self, Proto};
use crate::upstream::conn::Request;
use crate::upstream::topology::{self, Node, SlotMap};
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The connection to the configured host.
const HOME: usize = 0;

/// Redirections (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`) followed in a row
/// for one subscription before its waiting clients get the error.
const MAX_REDIRECTS: u32 = 16;

/// Where a subscription is on one connection; absent: not subscribed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// SUBSCRIBE sent, not confirmed yet.
    Subscribing,
    /// Confirmed.
    Active,
    /// UNSUBSCRIBE sent, not confirmed yet.
    Unsubscribing,
}

#[derive(Default)]
struct Entry {
    /// Clients that receive its messages.
    subs: HashMap<u64, Sub>,
    /// Clients whose SUBSCRIBE waits to be confirmed and that need this one.
    pending: Vec<u64>,
    /// The connections it is to be held on ([`place`]).
    targets: Vec<usize>,
    /// The connections it is on, or on its way onto or off.
    ups: Vec<(usize, Up)>,
    /// Redirections followed since it was last confirmed.
    redirects: u32,
}

impl Entry {
    fn wanted(&self) -> bool {
        !self.subs.is_empty() || !self.pending.is_empty()
    }

    fn state(&self, conn: usize) -> Option<Up> {
        self.ups.iter().find(|(c, _)| *c == conn).map(|(_, u)| *u)
    }

    /// Confirmed on every connection it is to be held on.
    fn ready(&self) -> bool {
        !self.targets.is_empty()
            && self
                .targets
                .iter()
                .all(|t| self.state(*t) == Some(Up::Active))
    }
}

struct Sub {
    link: Arc<Link>,
    proto: Proto,
}

struct Client {
    link: Arc<Link>,
    proto: Proto,
    /// Subscriptions per kind, with the order they were made in (for
    /// UNSUBSCRIBE with no argument).
    sets: [HashMap<Bytes, u64>; 3],
    next: u64,
}

impl Client {
    fn counts(&self) -> Counts {
        Counts {
            subs: self.sets[0].len() + self.sets[1].len(),
            shard: self.sets[2].len(),
        }
    }

    fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Shard => self.sets[2].len(),
            _ => self.sets[0].len() + self.sets[1].len(),
        }
    }
}

/// A client's SUBSCRIBE waiting for upstream confirmations.
struct PendingOp {
    kind: Kind,
    /// As the client sent them (confirmed in this order).
    names: Vec<Bytes>,
    /// The ones it was not subscribed to yet (each once).
    needed: Vec<Bytes>,
    /// Needed ones not confirmed upstream yet.
    waiting: HashSet<Bytes>,
    seq: u64,
    reply: oneshot::Sender<OpResult>,
    /// Messages of its already-confirmed channels that arrived meanwhile,
    /// delivered right after its confirmations.
    buffered: Vec<Bytes>,
    started: Instant,
}

/// The reply to one upstream SUBSCRIBE/UNSUBSCRIBE.
struct Done {
    conn: usize,
    epoch: u64,
    kind: Kind,
    name: Bytes,
    subscribe: bool,
    result: Result<Result<Bytes, UpstreamError>, oneshot::error::RecvError>,
}

struct Upstream {
    epoch: u64,
    requests: mpsc::Sender<Request>,
}

/// One of the hub's connections.
struct Conn {
    /// `None`: the configured host.
    node: Option<Node>,
    up: Option<Upstream>,
    /// Why no connection could be made, until one is.
    down: Option<Bytes>,
    started: bool,
    stop: CancellationToken,
    /// The node left the topology: closed for good.
    retired: bool,
}

pub struct Actor {
    opts: HubOpts,
    metrics: Arc<Metrics>,
    entries: [HashMap<Bytes, Entry>; 3],
    clients: HashMap<u64, Client>,
    /// At most one per client: a session waits for each command's answer.
    pending: HashMap<u64, PendingOp>,
    /// Index 0 is home; the others are cluster primaries, by first use.
    conns: Vec<Conn>,
    by_node: HashMap<Node, usize>,
    /// The cluster's slot map (`None`: not a cluster, or not known yet).
    map: Option<Arc<SlotMap>>,
    refresh: Option<Arc<Notify>>,
    /// Subscriptions to try again at the next tick (a slot being migrated,
    /// a cluster that is down).
    retry: HashSet<(Kind, Bytes)>,
    /// (subscription, connection) pairs confirmed upstream (the
    /// `pubsub_channels` gauge).
    held: usize,
    starter: Starter,
    shutdown: CancellationToken,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: Option<mpsc::UnboundedReceiver<Done>>,
}

impl Actor {
    pub fn new(
        opts: HubOpts,
        metrics: Arc<Metrics>,
        starter: Starter,
        shutdown: CancellationToken,
    ) -> Actor {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let home = Conn {
            node: None,
            up: None,
            down: None,
            started: false,
            stop: shutdown.child_token(),
            retired: false,
        };
        Actor {
            opts,
            metrics,
            entries: [HashMap::new(), HashMap::new(), HashMap::new()],
            clients: HashMap::new(),
            pending: HashMap::new(),
            conns: vec![home],
            by_node: HashMap::new(),
            map: None,
            refresh: None,
            retry: HashSet::new(),
            held: 0,
            starter,
            shutdown,
            events_tx,
            events_rx: Some(events_rx),
            done_tx,
            done_rx: Some(done_rx),
        }
    }

    pub async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        let mut events = self.events_rx.take().expect("run once");
        let mut done = self.done_rx.take().expect("run once");
        let shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => self.op(op),
                    None => break,
                },
                Some(ev) = events.recv() => self.event(ev),
                Some(d) = done.recv() => self.done(d),
                _ = tick.tick() => {
                    self.expire_ops();
                    self.retry_now();
                }
                _ = shutdown.cancelled() => break,
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected {
                conn,
                epoch,
                requests,
            } => self.connected(conn, epoch, requests),
            Event::Push { conn, epoch, frame } => {
                if self.is_current(conn, epoch) {
                    self.push(conn, frame);
                }
            }
            Event::Lost { conn, epoch } => {
                if self.is_current(conn, epoch) {
                    self.lost(conn);
                }
            }
            Event::ConnectFailed { conn, error } => self.connect_failed(conn, error),
        }
    }

    fn is_current(&self, conn: usize, epoch: u64) -> bool {
        self.conns
            .get(conn)
            .and_then(|c| c.up.as_ref())
            .is_some_and(|u| u.epoch == epoch)
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Change {
                subscribe,
                link,
                proto,
                kind,
                names,
                seq,
                reply,
            } => {
                if subscribe {
                    self.subscribe(link, proto, kind, names, seq, reply)
                } else {
                    self.unsubscribe(link, proto, kind, names, seq, reply)
                }
            }
            Op::Reset { link, seq, reply } => {
                self.remove_client(link.id);
                let _ = link.tx.send(ToClient::Reply {
                    bytes: Bytes::new(),
                    seq,
                });
                let _ = reply.send(Ok(Counts::default()));
            }
            Op::Gone { id } => self.remove_client(id),
            Op::Topology { map, refresh } => self.topology(map, refresh),
        }
    }

    /// The connection that holds `node`'s subscriptions (made on first use).
    fn conn_for(&mut self, node: &Node) -> usize {
        if let Some(&c) = self.by_node.get(node) {
            return c;
        }
        self.conns.push(Conn {
            node: Some(node.clone()),
            up: None,
            down: None,
            started: false,
            stop: self.shutdown.child_token(),
            retired: false,
        });
        let c = self.conns.len() - 1;
        self.by_node.insert(node.clone(), c);
        c
    }

    /// The connections a subscription is to be held on now.
    fn targets(&mut self, kind: Kind, name: &[u8]) -> Vec<usize> {
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

    fn subscribe(
        &mut self,
        link: Arc<Link>,
        proto: Proto,
        kind: Kind,
        names: Vec<Bytes>,
        seq: u64,
        reply: oneshot::Sender<OpResult>,
    ) {
        let id = link.id;
        let k = kind.idx();
        let client = self.clients.entry(id).or_insert_with(|| Client {
            link: link.clone(),
            proto,
            sets: Default::default(),
            next: 0,
        });
        let mut seen = HashSet::new();
        let needed: Vec<Bytes> = names
            .iter()
            .filter(|n| !client.sets[k].contains_key(*n) && seen.insert(*n))
            .cloned()
            .collect();
        let mut waiting = HashSet::new();
        for n in &needed {
            if !self.entries[k].contains_key(n) {
                let targets = self.targets(kind, n);
                let e = Entry {
                    targets,
                    ..Entry::default()
                };
                self.entries[k].insert(n.clone(), e);
            }
            let e = self.entries[k].get_mut(n).expect("just made");
            e.pending.push(id);
            if !e.ready() {
                waiting.insert(n.clone());
            }
        }
        // A connection it needs cannot be made now: say why at once.
        let down = waiting.iter().find_map(|n| {
            self.entries[k].get(n)?.targets.iter().find_map(|&t| {
                let c = &self.conns[t];
                c.up.is_none().then(|| c.down.clone()).flatten()
            })
        });
        self.pending.insert(
            id,
            PendingOp {
                kind,
                names,
                needed: needed.clone(),
                waiting: waiting.clone(),
                seq,
                reply,
                buffered: Vec::new(),
                started: Instant::now(),
            },
        );
        if waiting.is_empty() {
            self.finish(id);
            return;
        }
        if let Some(err) = down {
            self.fail(id, err);
            return;
        }
        // Upstream in the order the client named them.
        for n in needed.iter().filter(|n| waiting.contains(*n)) {
            self.reconcile(kind, n);
        }
    }

    /// All of a pending SUBSCRIBE's channels are confirmed upstream: the client
    /// now receives their messages, after its confirmations.
    fn finish(&mut self, id: u64) {
        let Some(op) = self.pending.remove(&id) else {
            return;
        };
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let k = op.kind.idx();
        for n in &op.needed {
            if let Some(e) = self.entries[k].get_mut(n) {
                e.pending.retain(|&c| c != id);
            }
        }
        let mut out = BytesMut::new();
        for n in &op.names {
            if !client.sets[k].contains_key(n) {
                client.sets[k].insert(n.clone(), client.next);
                client.next += 1;
                if let Some(e) = self.entries[k].get_mut(n) {
                    e.subs.insert(
                        id,
                        Sub {
                            link: client.link.clone(),
                            proto: client.proto,
                        },
                    );
                }
            }
            resp::pubsub_confirmation(
                &mut out,
                client.proto,
                op.kind.confirmation(true),
                Some(n),
                client.count(op.kind),
            );
        }
        let _ = client.link.tx.send(ToClient::Reply {
            bytes: out.freeze(),
            seq: op.seq,
        });
        for m in op.buffered {
            let _ = client.link.tx.send(ToClient::Message(m));
        }
        let _ = op.reply.send(Ok(client.counts()));
    }

    /// A pending SUBSCRIBE fails: the client gets `err` and none of it.
    fn fail(&mut self, id: u64, err: Bytes) {
        let Some(op) = self.pending.remove(&id) else {
            return;
        };
        for n in &op.needed {
            if let Some(e) = self.entries[op.kind.idx()].get_mut(n) {
                e.pending.retain(|&c| c != id);
            }
            self.reconcile(op.kind, n);
        }
        // Messages already counted for it will never be queued.
        if let Some(c) = self.clients.get(&id) {
            let bytes: usize = op.buffered.iter().map(Bytes::len).sum();
            c.link.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
        self.forget_if_idle(id);
        let _ = op.reply.send(Err(err));
    }

    fn unsubscribe(
        &mut self,
        link: Arc<Link>,
        proto: Proto,
        kind: Kind,
        names: Vec<Bytes>,
        seq: u64,
        reply: oneshot::Sender<OpResult>,
    ) {
        let id = link.id;
        let k = kind.idx();
        let name = kind.confirmation(false);
        let mut out = BytesMut::new();
        let mut released = Vec::new();
        let counts = match self.clients.get_mut(&id) {
            None => {
                if names.is_empty() {
                    resp::pubsub_confirmation(&mut out, proto, name, None, 0);
                }
                for n in &names {
                    resp::pubsub_confirmation(&mut out, proto, name, Some(n), 0);
                }
                Counts::default()
            }
            Some(client) => {
                let names = if names.is_empty() {
                    let mut all: Vec<(&Bytes, &u64)> = client.sets[k].iter().collect();
                    all.sort_by_key(|(_, order)| **order);
                    all.into_iter().map(|(n, _)| n.clone()).collect()
                } else {
                    names
                };
                if names.is_empty() {
                    resp::pubsub_confirmation(
                        &mut out,
                        client.proto,
                        name,
                        None,
                        client.count(kind),
                    );
                }
                for n in names {
                    if client.sets[k].remove(&n).is_some() {
                        if let Some(e) = self.entries[k].get_mut(&n) {
                            e.subs.remove(&id);
                        }
                        released.push(n.clone());
                    }
                    resp::pubsub_confirmation(
                        &mut out,
                        client.proto,
                        name,
                        Some(&n),
                        client.count(kind),
                    );
                }
                client.counts()
            }
        };
        let _ = link.tx.send(ToClient::Reply {
            bytes: out.freeze(),
            seq,
        });
        let _ = reply.send(Ok(counts));
        for n in released {
            self.reconcile(kind, &n);
        }
        self.forget_if_idle(id);
    }

    fn forget_if_idle(&mut self, id: u64) {
        let idle = self
            .clients
            .get(&id)
            .is_some_and(|c| c.counts().total() == 0 && !self.pending.contains_key(&id));
        if idle {
            self.clients.remove(&id);
        }
    }

    fn remove_client(&mut self, id: u64) {
        if let Some(op) = self.pending.remove(&id) {
            for n in &op.needed {
                if let Some(e) = self.entries[op.kind.idx()].get_mut(n) {
                    e.pending.retain(|&c| c != id);
                }
                self.reconcile(op.kind, n);
            }
        }
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        for kind in [Kind::Channel, Kind::Pattern, Kind::Shard] {
            for n in client.sets[kind.idx()].keys() {
                if let Some(e) = self.entries[kind.idx()].get_mut(n) {
                    e.subs.remove(&id);
                }
                self.reconcile(kind, n);
            }
        }
    }

    /// Bring one subscription's upstream state in line with who wants it and
    /// where it is to be held: SUBSCRIBE where it is wanted and missing (the
    /// connection started if need be), UNSUBSCRIBE where it is confirmed and
    /// no longer wanted, forgotten once it is nowhere and unwanted. A command
    /// in flight is let finish first; its confirmation calls this again.
    fn reconcile(&mut self, kind: Kind, name: &Bytes) {
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
    fn start(&mut self, c: usize) {
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

    fn send(&mut self, c: usize, kind: Kind, name: &Bytes, subscribe: bool) {
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
    fn select(&self, f: impl Fn(&Entry) -> bool) -> Vec<(Kind, Bytes)> {
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

    fn connected(&mut self, c: usize, epoch: u64, requests: mpsc::Sender<Request>) {
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

    fn addr(&self, c: usize) -> String {
        match &self.conns[c].node {
            Some(n) => n.to_string(),
            None => self.opts.addr.clone(),
        }
    }

    /// Connection `c` is gone: nothing is subscribed on it any more. Local
    /// subscriptions stay and are made again on its next connection.
    fn lost(&mut self, c: usize) {
        self.conns[c].up = None;
        self.forget_conn(c);
        if c != HOME {
            self.ask_refresh();
        }
    }

    /// Drop every upstream state held on connection `c`.
    fn forget_conn(&mut self, c: usize) {
        for (kind, n) in self.select(|e| e.state(c).is_some()) {
            self.set_up(kind, &n, c, None);
            self.reconcile(kind, &n);
        }
    }

    fn connect_failed(&mut self, c: usize, error: UpstreamError) {
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
    fn topology(&mut self, map: Arc<SlotMap>, refresh: Arc<Notify>) {
        self.refresh = Some(refresh);
        self.map = Some(map.clone());
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
            conn.up = None;
            self.forget_conn(c);
        }
        self.replace(self.select(|_| true));
    }

    /// Place these subscriptions by the current map and reconcile them.
    fn replace(&mut self, which: Vec<(Kind, Bytes)>) {
        for (kind, n) in which {
            let targets = self.targets(kind, &n);
            if let Some(e) = self.entries[kind.idx()].get_mut(&n) {
                e.targets = targets;
            }
            self.reconcile(kind, &n);
        }
    }

    fn retry_now(&mut self) {
        if self.retry.is_empty() {
            return;
        }
        let which: Vec<(Kind, Bytes)> = self.retry.drain().collect();
        self.replace(which);
    }

    fn ask_refresh(&self) {
        if let Some(r) = &self.refresh {
            r.notify_one();
        }
    }

    fn expire_ops(&mut self) {
        let timeout = self.opts.op_timeout;
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, op)| op.started.elapsed() > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let e = UpstreamError::Timeout {
                addr: self.opts.addr.clone(),
                secs: timeout.as_secs_f64(),
                during: "waiting for the pub/sub subscription",
            };
            self.fail(id, e.to_reply());
        }
    }

    fn set_up(&mut self, kind: Kind, name: &[u8], c: usize, up: Option<Up>) {
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
    fn push(&mut self, c: usize, frame: Bytes) {
        let Some((what, first)) = resp::push_head(&frame) else {
            debug!("pub/sub hub: ignoring a frame that is not a push");
            return;
        };
        if what == b"invalidate" {
            // Tracking redirected to this connection (RESP3): a message of
            // the tracking channel for the local subscribers of it.
            const HEAD: &[u8] = b">2\r\n$10\r\ninvalidate\r\n";
            if let Some(keys) = frame.strip_prefix(HEAD) {
                let mut m = BytesMut::with_capacity(frame.len() + 32);
                m.extend_from_slice(b">3\r\n$7\r\nmessage\r\n$20\r\n");
                m.extend_from_slice(TRACKING_CHANNEL);
                m.extend_from_slice(b"\r\n");
                m.extend_from_slice(keys);
                let channel = Bytes::from_static(TRACKING_CHANNEL);
                self.fan_out(c, Kind::Channel, &channel, &m.freeze());
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

    fn subscribed(&mut self, c: usize, kind: Kind, name: Bytes) {
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

    fn unsubscribed(&mut self, c: usize, kind: Kind, name: Bytes) {
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

    fn done(&mut self, d: Done) {
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
    fn redirected(&mut self, d: &Done, reply: &[u8]) -> bool {
        if self.map.is_none() {
            return false;
        }
        let answered_by = self.conns[d.conn].node.clone().unwrap_or(Node {
            host: String::new(),
            port: 0,
        });
        let redirect = topology::parse_redirect(reply, &answered_by);
        let later = reply.starts_with(b"-TRYAGAIN") || reply.starts_with(b"-CLUSTERDOWN");
        if redirect.is_none() && !later {
            return false;
        }
        let Some(e) = self.entries[d.kind.idx()].get_mut(&d.name) else {
            return true;
        };
        e.redirects += 1;
        if e.redirects > MAX_REDIRECTS {
            return false;
        }
        self.ask_refresh();
        match redirect {
            Some((true, slot, node)) => {
                debug!(slot, node = %node, "pub/sub hub: following MOVED");
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).moved(slot, node);
                }
                self.replace(vec![(d.kind, d.name.clone())]);
            }
            // ASK (a migration under way) or the cluster not ready: again at
            // the next tick, by the map as it is then.
            _ => {
                self.retry.insert((d.kind, d.name.clone()));
            }
        }
        true
    }

    /// Hand a message that came on connection `c` to every client subscribed
    /// to `name` (a channel, or the pattern it matched).
    fn fan_out(&mut self, c: usize, kind: Kind, name: &Bytes, frame: &Bytes) {
        let Some(e) = self.entries[kind.idx()].get(name) else {
            return;
        };
        if !e.targets.contains(&c) {
            // Held there only until its UNSUBSCRIBE is confirmed.
            return;
        }
        let max = self.opts.max_queued_bytes;
        let mut resp2: Option<Bytes> = None;
        let mut encoded = |proto: Proto| match proto {
            Proto::Resp3 => frame.clone(),
            Proto::Resp2 => resp2
                .get_or_insert_with(|| {
                    let mut b = BytesMut::from(&frame[..]);
                    b[0] = b'*';
                    b.freeze()
                })
                .clone(),
        };
        let mut over = Vec::new();
        for (id, sub) in &e.subs {
            let bytes = encoded(sub.proto);
            let queued = sub.link.queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
            if queued > max {
                over.push((*id, queued));
                continue;
            }
            let _ = sub.link.tx.send(ToClient::Message(bytes));
        }
        // Clients whose SUBSCRIBE waits for other channels get it right after
        // their confirmations.
        if e.state(c) == Some(Up::Active) {
            for id in &e.pending {
                let (Some(op), Some(cl)) = (self.pending.get_mut(id), self.clients.get(id)) else {
                    continue;
                };
                let bytes = encoded(cl.proto);
                let queued = cl.link.queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
                if queued > max {
                    over.push((*id, queued));
                    continue;
                }
                op.buffered.push(bytes);
            }
        }
        for (id, queued) in over {
            if let Some(cl) = self.clients.get(&id) {
                warn!(
                    peer = %cl.link.peer,
                    id,
                    queued_bytes = queued,
                    limit = max,
                    "closing a pub/sub subscriber that does not read its messages (limits.max_pubsub_queued_bytes)"
                );
                self.metrics.error(ErrorKind::Limit);
                cl.link.kill.cancel();
            }
            self.remove_client(id);
        }
    }
}
