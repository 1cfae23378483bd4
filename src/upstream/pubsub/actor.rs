//! The hub's registry, owned by one task: which local clients are subscribed
//! to what, where each subscription is held upstream (connection by
//! connection), and the confirmations and messages each client is owed.

use super::{Counts, Event, HubOpts, Kind, Link, Op, OpResult, Starter, ToClient};
use crate::metrics::{ErrorKind, Metrics};
use crate::resp::{self, Proto};
use crate::upstream::conn::Request;
use crate::upstream::topology::{Node, SlotMap};
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

mod census;
mod upstream;

/// The connection to the configured host.
const HOME: usize = 0;

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
    redirects: usize,
}

impl Entry {
    fn wanted(&self) -> bool {
        !self.subs.is_empty() || !self.pending.is_empty()
    }

    fn state(&self, conn: usize) -> Option<Up> {
        self.ups.iter().find(|(c, _)| *c == conn).map(|(_, u)| *u)
    }

    /// The connections it is confirmed on (the server counts each).
    fn active(&self) -> usize {
        self.ups.iter().filter(|(_, u)| *u == Up::Active).count()
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

impl Conn {
    /// Not started yet; `stop` ends it.
    fn new(node: Option<Node>, stop: CancellationToken) -> Conn {
        Conn {
            node,
            up: None,
            down: None,
            started: false,
            stop,
            retired: false,
        }
    }
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
    /// When the home connection last moved to another node (see `move_home`).
    home_moved_at: Option<tokio::time::Instant>,
    starter: Starter,
    shutdown: CancellationToken,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: Option<mpsc::UnboundedReceiver<Done>>,
    /// The home connection's subscriptions being made again (issue 18).
    resubscribing: crate::upstream::maintenance::resubscribe::Resubscribing,
    /// Clients named as `CLIENT TRACKING ... REDIRECT` targets, until they
    /// leave: they get the home connection's invalidations.
    redirects: HashSet<u64>,
    /// Every client's way, once it has one (its first pub/sub command or
    /// protocol switch), until it leaves: a redirect target's.
    links: HashMap<u64, Arc<Link>>,
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
        let home = Conn::new(None, shutdown.child_token());
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
            home_moved_at: None,
            starter,
            shutdown,
            events_tx,
            events_rx: Some(events_rx),
            done_tx,
            done_rx: Some(done_rx),
            resubscribing: Default::default(),
            redirects: HashSet::new(),
            links: HashMap::new(),
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
        // Issue 18: held PUBLISHes wait until the home connection's
        // subscriptions are made again (see maintenance/resubscribe.rs).
        if self.opts.resub.is_some() {
            self.follow_resubscribe(&ev);
        }
        match ev {
            Event::Connected {
                conn,
                epoch,
                requests,
            } => {
                self.connected(conn, epoch, requests);
                if conn == HOME && self.opts.resub.is_some() {
                    self.resubscribe_sent();
                }
            }
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

    /// Keep the resubscribe gate: closed at a home connection's drop while
    /// it held subscriptions, open once as many confirmations came in on
    /// the next one as subscriptions were sent there.
    fn follow_resubscribe(&mut self, ev: &Event) {
        use crate::upstream::maintenance::resubscribe::is_subscribe_confirmation;
        let closed = match ev {
            Event::Lost { conn, epoch } if *conn == HOME && self.is_current(*conn, *epoch) => {
                let held = self.select(|e| e.wanted() && e.state(HOME).is_some()).len();
                self.resubscribing.lost(held)
            }
            Event::Connected { conn, .. } if *conn == HOME => {
                // Counted once the connection's subscriptions are sent: see
                // the end of `event`, which calls this again.
                return;
            }
            Event::Push { conn, epoch, frame }
                if *conn == HOME
                    && self.is_current(*conn, *epoch)
                    && is_subscribe_confirmation(frame) =>
            {
                self.resubscribing.confirmed()
            }
            _ => return,
        };
        if let Some(g) = &self.opts.resub {
            g.set(closed);
        }
    }

    /// After a home connection came up: the subscriptions sent on it.
    fn resubscribe_sent(&mut self) {
        let sent = self
            .select(|e| e.state(HOME) == Some(Up::Subscribing))
            .len();
        let closed = self.resubscribing.connected(sent);
        if let Some(g) = &self.opts.resub {
            g.set(closed);
        }
    }

    fn is_current(&self, conn: usize, epoch: u64) -> bool {
        self.conns
            .get(conn)
            .and_then(|c| c.up.as_ref())
            .is_some_and(|u| u.epoch == epoch)
    }

    fn op(&mut self, op: Op) {
        if let Op::Change { link, .. } | Op::Reset { link, .. } | Op::Proto { link, .. } = &op {
            self.links.entry(link.id).or_insert_with(|| link.clone());
        }
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
                // RESET: RESP2 again (still a redirect target, if it was).
                link.resp3.store(false, Ordering::Release);
                let _ = link.tx.send(ToClient::Reply {
                    bytes: Bytes::new(),
                    seq,
                });
                let _ = reply.send(Ok(Counts::default()));
            }
            Op::Proto {
                link,
                proto,
                seq,
                reply,
            } => {
                self.protocol(&link, proto);
                let _ = link.tx.send(ToClient::Reply {
                    bytes: Bytes::new(),
                    seq,
                });
                let counts = self.clients.get(&link.id).map(Client::counts);
                let _ = reply.send(Ok(counts.unwrap_or_default()));
            }
            Op::Redirect { id } => {
                self.redirects.insert(id);
            }
            Op::Gone { id } => {
                self.redirects.remove(&id);
                self.links.remove(&id);
                self.remove_client(id)
            }
            Op::Census { asks, reply } => {
                let _ = reply.send(super::count::answer_all(self, &asks));
            }
            Op::Topology { map, refresh } => self.topology(map, refresh),
        }
    }

    /// The client's frames from now on in `proto`.
    fn protocol(&mut self, link: &Link, proto: Proto) {
        link.resp3.store(proto == Proto::Resp3, Ordering::Release);
        let id = link.id;
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        client.proto = proto;
        for (k, set) in client.sets.iter().enumerate() {
            for n in set.keys() {
                if let Some(sub) = self.entries[k].get_mut(n).and_then(|e| e.subs.get_mut(&id)) {
                    sub.proto = proto;
                }
            }
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

    /// Hand a message that came on connection `c` to every client subscribed
    /// to `name` (a channel, or the pattern it matched).
    fn fan_out(&mut self, c: usize, kind: Kind, name: &Bytes, frame: &Bytes) {
        self.fan_out_as(c, kind, name, frame, frame)
    }

    /// [`Self::fan_out`], RESP3 clients getting `frame3` and RESP2 clients
    /// `frame` as an array (a tracking invalidation: Redis sends a RESP3
    /// redirect target an `invalidate` push, a RESP2 one a message).
    fn fan_out_as(&mut self, c: usize, kind: Kind, name: &Bytes, frame: &Bytes, frame3: &Bytes) {
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
            Proto::Resp3 => frame3.clone(),
            Proto::Resp2 => resp2.get_or_insert_with(|| as_array(frame)).clone(),
        };
        let mut over = Vec::new();
        for (id, sub) in &e.subs {
            let bytes = encoded(sub.proto);
            if let Err(queued) = charge(&sub.link, bytes.len(), max) {
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
                if let Err(queued) = charge(&cl.link, bytes.len(), max) {
                    over.push((*id, queued));
                    continue;
                }
                op.buffered.push(bytes);
            }
        }
        self.drop_slow(over);
    }

    /// The home connection's tracking invalidation (`message`: as a message
    /// of [`super::TRACKING_CHANNEL`], `push`: as the server sent it) for the
    /// redirect targets that did not get it as subscribers of that channel:
    /// the push to RESP3 ones; to RESP2 ones the message, while they are in
    /// subscribed mode (nothing otherwise, as Redis).
    pub(super) fn redirect_out(&mut self, c: usize, message: &Bytes, push: &Bytes) {
        if c != HOME || self.redirects.is_empty() {
            return;
        }
        let channel = Bytes::from_static(super::TRACKING_CHANNEL);
        let mut got: HashSet<u64> = HashSet::new();
        if let Some(e) = self.entries[Kind::Channel.idx()].get(&channel) {
            if e.targets.contains(&c) {
                got.extend(e.subs.keys());
                if e.state(c) == Some(Up::Active) {
                    got.extend(&e.pending);
                }
            }
        }
        let max = self.opts.max_queued_bytes;
        let mut over = Vec::new();
        for id in &self.redirects {
            let Some(link) = self.links.get(id).filter(|_| !got.contains(id)) else {
                continue;
            };
            let client = self.clients.get(id);
            let resp3 = client.map_or_else(
                || link.resp3.load(Ordering::Acquire),
                |cl| cl.proto == Proto::Resp3,
            );
            let bytes = if resp3 {
                push.clone()
            } else if client.is_some_and(|cl| cl.counts().total() > 0) {
                as_array(message)
            } else {
                continue;
            };
            if let Err(queued) = charge(link, bytes.len(), max) {
                over.push((*id, queued));
                continue;
            }
            let _ = link.tx.send(ToClient::Message(bytes));
        }
        self.drop_slow(over);
    }

    /// Close the clients whose queues went over the limit.
    fn drop_slow(&mut self, over: Vec<(u64, usize)>) {
        for (id, queued) in over {
            let link = self
                .clients
                .get(&id)
                .map(|cl| cl.link.clone())
                .or_else(|| self.links.get(&id).cloned());
            if let Some(link) = link {
                warn!(
                    peer = %link.peer,
                    id,
                    queued_bytes = queued,
                    limit = self.opts.max_queued_bytes,
                    "closing a pub/sub subscriber that does not read its messages (limits.max_pubsub_queued_bytes)"
                );
                self.metrics.error(ErrorKind::Limit);
                link.kill.cancel();
            }
            self.redirects.remove(&id);
            self.remove_client(id);
        }
    }
}

/// A RESP3 push frame (`>`) as the array a RESP2 client gets (`*`).
fn as_array(frame: &Bytes) -> Bytes {
    let mut b = BytesMut::from(&frame[..]);
    b[0] = b'*';
    b.freeze()
}

/// Count `len` more bytes queued for `link`; `Err` with the total when that
/// passes `max` (the client is then dropped as slow).
fn charge(link: &Link, len: usize, max: usize) -> Result<(), usize> {
    let queued = link.queued.fetch_add(len, Ordering::AcqRel) + len;
    if queued > max {
        Err(queued)
    } else {
        Ok(())
    }
}
