//! The pub/sub hub: every client subscription is carried on one RESP3 upstream
//! connection, shared by all clients.
//!
//! - One connection, opened when the first client subscribes, run by
//!   [`conn::run`] like every other upstream connection: it re-AUTHs with each
//!   new token (RESP3 allows AUTH while subscribed), sends keepalive PINGs, and
//!   is re-dialled with backoff when it drops.
//! - A registry maps each channel, pattern and shard channel to the local
//!   clients subscribed to it. The first local subscriber makes the hub send
//!   `SUBSCRIBE` upstream, the last one leaving `UNSUBSCRIBE`; in between, the
//!   upstream holds one subscription however many clients share it.
//! - `message`, `pmessage` and `smessage` frames are fanned out to every local
//!   subscriber, as they came for RESP3 clients and as arrays (`*` for `>`, the
//!   only difference) for RESP2 clients.
//! - Confirmations (`subscribe`, `unsubscribe`, ...) are made here for each
//!   client, with its own running count, exactly as Redis would send them, and
//!   go to the client through the same queue as its messages, so a client never
//!   sees a message of a channel before its `subscribe` or after its
//!   `unsubscribe`. A client's `SUBSCRIBE` is confirmed once the upstream
//!   subscription is in place, so a message published after the client saw its
//!   confirmation reaches it.
//! - When the connection drops, every subscription is made again on the next
//!   one; clients stay connected and subscribed. Messages published while no
//!   connection is subscribed are lost, as they would be for a Redis client
//!   that reconnects.
//! - Each client's queue of messages not yet written is capped in bytes
//!   (`limits.max_pubsub_queued_bytes`); a client over the cap is disconnected
//!   with a log line, as Redis does with `client-output-buffer-limit pubsub`.
//!
//! Everything is owned by one task ([`Actor`]); sessions talk to it through
//! [`Hub`], and the connection's supervisor through [`Event`]s.

use super::conn::{self, ConnOpts, PushSink, Request};
use super::tls::Connector;
use super::UpstreamError;
use crate::admin::Health;
use crate::config::Config;
use crate::metrics::{ErrorKind, Metrics};
use crate::resp::{self, Proto};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Requests queued for the hub's connection at most (one per channel being
/// subscribed or unsubscribed). Memory is taken only for what is queued.
const MAX_QUEUED_REQUESTS: usize = 1 << 20;

/// What a subscription is to: channels and patterns share a client's count,
/// shard channels have their own (as in Redis 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Channel,
    Pattern,
    Shard,
}

impl Kind {
    fn idx(self) -> usize {
        match self {
            Kind::Channel => 0,
            Kind::Pattern => 1,
            Kind::Shard => 2,
        }
    }

    fn subscribe_cmd(self) -> &'static [u8] {
        match self {
            Kind::Channel => b"SUBSCRIBE",
            Kind::Pattern => b"PSUBSCRIBE",
            Kind::Shard => b"SSUBSCRIBE",
        }
    }

    fn unsubscribe_cmd(self) -> &'static [u8] {
        match self {
            Kind::Channel => b"UNSUBSCRIBE",
            Kind::Pattern => b"PUNSUBSCRIBE",
            Kind::Shard => b"SUNSUBSCRIBE",
        }
    }

    /// The first element of this kind's confirmation frames.
    fn confirmation(self, subscribe: bool) -> &'static [u8] {
        match (self, subscribe) {
            (Kind::Channel, true) => b"subscribe",
            (Kind::Channel, false) => b"unsubscribe",
            (Kind::Pattern, true) => b"psubscribe",
            (Kind::Pattern, false) => b"punsubscribe",
            (Kind::Shard, true) => b"ssubscribe",
            (Kind::Shard, false) => b"sunsubscribe",
        }
    }

    /// (kind, subscribe?) of a confirmation frame's first element.
    fn of_confirmation(name: &[u8]) -> Option<(Kind, bool)> {
        [Kind::Channel, Kind::Pattern, Kind::Shard]
            .into_iter()
            .flat_map(|k| [(k, true), (k, false)])
            .find(|&(k, s)| k.confirmation(s) == name)
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Channel => "channel",
            Kind::Pattern => "pattern",
            Kind::Shard => "shard channel",
        }
    }
}

/// Frames the hub queues for one client's session to write.
#[derive(Debug)]
pub enum ToClient {
    /// A `message`/`pmessage`/`smessage`, counted in [`Link::queued`].
    Message(Bytes),
    /// The confirmations answering the client's pub/sub command number `seq`
    /// (possibly none, for RESET). The session writes them in the place of
    /// that command's reply.
    Reply { bytes: Bytes, seq: u64 },
}

/// One client as the hub sees it: where its frames go.
pub struct Link {
    pub id: u64,
    pub peer: String,
    tx: mpsc::UnboundedSender<ToClient>,
    /// Bytes of messages queued for the client and not yet taken for writing
    /// (the session subtracts what it takes).
    pub queued: Arc<AtomicUsize>,
    /// Cancelled when the hub drops the client for being too slow: the
    /// session then closes the connection.
    pub kill: CancellationToken,
}

impl Link {
    pub fn new(id: u64, peer: String) -> (Arc<Link>, mpsc::UnboundedReceiver<ToClient>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Link {
            id,
            peer,
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            kill: CancellationToken::new(),
        };
        (Arc::new(link), rx)
    }
}

/// A client's subscriptions after a command: channels + patterns, and shard
/// channels (the two counts Redis reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub subs: usize,
    pub shard: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.subs + self.shard
    }
}

/// What a command got: the client's counts after it, or an error reply for the
/// client (`-NOPERM ...`, `-ERR upstream ...`).
pub type OpResult = Result<Counts, Bytes>;

enum Op {
    /// (P|S)SUBSCRIBE, or (P|S)UNSUBSCRIBE when `subscribe` is false.
    Change {
        subscribe: bool,
        link: Arc<Link>,
        proto: Proto,
        kind: Kind,
        /// Empty (unsubscribing only): every subscription of this kind.
        names: Vec<Bytes>,
        seq: u64,
        reply: oneshot::Sender<OpResult>,
    },
    /// Drop every subscription (RESET); the `Reply` marks the point after
    /// which no message of them follows.
    Reset {
        link: Arc<Link>,
        seq: u64,
        reply: oneshot::Sender<OpResult>,
    },
    /// The client is gone.
    Gone { id: u64 },
}

/// From the connection's supervisor.
pub enum Event {
    /// A new authenticated connection: requests go to `requests`, its push
    /// frames come from `pushes`.
    Connected {
        epoch: u64,
        requests: mpsc::Sender<Request>,
        pushes: mpsc::UnboundedReceiver<Bytes>,
    },
    /// That connection is gone (every push frame it read is in its channel).
    Lost { epoch: u64 },
    /// No connection could be made: new subscriptions fail with this error
    /// until one is.
    ConnectFailed { error: UpstreamError },
}

/// Settings of the hub.
#[derive(Clone)]
pub struct HubOpts {
    /// A client's cap on queued message bytes.
    pub max_queued_bytes: usize,
    /// A SUBSCRIBE not confirmed upstream within this fails.
    pub op_timeout: Duration,
    pub addr: String,
}

/// The sessions' handle on the hub.
#[derive(Clone)]
pub struct Hub {
    ops: mpsc::UnboundedSender<Op>,
    /// The hub connection's server-side client id, and a token cancelled
    /// when that connection goes (`None` while there is none).
    upstream: Arc<std::sync::Mutex<Option<(u64, CancellationToken)>>>,
}

/// The RESP2 client-side caching channel: `CLIENT TRACKING on REDIRECT <id>`
/// sends invalidations there.
pub const TRACKING_CHANNEL: &[u8] = b"__redis__:invalidate";

impl Hub {
    /// Start the hub. Its upstream connection is opened when the first client
    /// subscribes.
    pub fn start(
        cfg: &Config,
        connector: Arc<Connector>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Hub {
        let conn_opts = ConnOpts {
            addr: connector.addr().to_string(),
            reply_timeout: cfg.upstream.reply_timeout,
            keepalive: cfg.upstream.keepalive,
            tokens: connector.tokens().clone(),
            metrics: metrics.clone(),
            kind: "pubsub",
        };
        let opts = HubOpts {
            max_queued_bytes: cfg.limits.max_pubsub_queued_bytes,
            op_timeout: cfg.upstream.reply_timeout + cfg.upstream.connect_timeout,
            addr: connector.addr().to_string(),
        };
        let sd = shutdown.clone();
        let upstream = Arc::new(std::sync::Mutex::new(None));
        let up = upstream.clone();
        let start: StartUpstream = Box::new(move |events| {
            tokio::spawn(supervise(connector, conn_opts, events, health, sd, up));
        });
        let mut hub = Hub::with_upstream(opts, metrics, start, shutdown);
        hub.upstream = upstream;
        hub
    }

    /// Where a RESP2 client's `CLIENT TRACKING on REDIRECT <local id>` must
    /// point upstream: the hub's connection, which carries every local
    /// subscription to [`TRACKING_CHANNEL`] (its invalidations are fanned out
    /// to them). With the token that is cancelled when that connection goes
    /// (the redirect breaks with it). `None` while the hub has no connection.
    pub fn redirect_target(&self) -> Option<(u64, CancellationToken)> {
        self.upstream.lock().expect("not poisoned").clone()
    }

    /// A hub whose upstream is started by `start` (tests play the upstream).
    fn with_upstream(
        opts: HubOpts,
        metrics: Arc<Metrics>,
        start: StartUpstream,
        shutdown: CancellationToken,
    ) -> Hub {
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let actor = Actor {
            opts,
            metrics,
            entries: [HashMap::new(), HashMap::new(), HashMap::new()],
            clients: HashMap::new(),
            pending: HashMap::new(),
            conn: None,
            down: None,
            held: 0,
            start: Some(start),
            events_tx,
            done_tx,
        };
        tokio::spawn(actor.run(ops_rx, events_rx, done_rx, shutdown));
        Hub {
            ops: ops_tx,
            upstream: Default::default(),
        }
    }

    async fn call(&self, op: impl FnOnce(oneshot::Sender<OpResult>) -> Op) -> OpResult {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(op(tx)).is_err() {
            return Err(UpstreamError::Shutdown.to_reply());
        }
        rx.await
            .unwrap_or_else(|_| Err(UpstreamError::Shutdown.to_reply()))
    }

    /// SUBSCRIBE / PSUBSCRIBE / SSUBSCRIBE `names` (at least one). On success
    /// the confirmations are queued for the client as `Reply { seq }`.
    pub async fn subscribe(
        &self,
        link: &Arc<Link>,
        proto: Proto,
        kind: Kind,
        names: Vec<Bytes>,
        seq: u64,
    ) -> OpResult {
        self.change(true, link, proto, kind, names, seq).await
    }

    /// UNSUBSCRIBE / PUNSUBSCRIBE / SUNSUBSCRIBE `names` (none: all of `kind`).
    pub async fn unsubscribe(
        &self,
        link: &Arc<Link>,
        proto: Proto,
        kind: Kind,
        names: Vec<Bytes>,
        seq: u64,
    ) -> OpResult {
        self.change(false, link, proto, kind, names, seq).await
    }

    async fn change(
        &self,
        subscribe: bool,
        link: &Arc<Link>,
        proto: Proto,
        kind: Kind,
        names: Vec<Bytes>,
        seq: u64,
    ) -> OpResult {
        let link = link.clone();
        self.call(|reply| Op::Change {
            subscribe,
            link,
            proto,
            kind,
            names,
            seq,
            reply,
        })
        .await
    }

    /// Drop all of the client's subscriptions (RESET); an empty `Reply { seq }`
    /// follows the last message queued for them.
    pub async fn reset(&self, link: &Arc<Link>, seq: u64) -> OpResult {
        let link = link.clone();
        self.call(|reply| Op::Reset { link, seq, reply }).await
    }

    /// The client disconnected: drop its subscriptions.
    pub fn gone(&self, id: u64) {
        let _ = self.ops.send(Op::Gone { id });
    }
}

type StartUpstream = Box<dyn FnOnce(mpsc::UnboundedSender<Event>) + Send>;

/// Where the upstream subscription of one channel (pattern, shard channel) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Up {
    /// Not subscribed upstream (nothing sent, or the connection was lost).
    #[default]
    None,
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
    up: Up,
}

impl Entry {
    fn wanted(&self) -> bool {
        !self.subs.is_empty() || !self.pending.is_empty()
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

struct Actor {
    opts: HubOpts,
    metrics: Arc<Metrics>,
    entries: [HashMap<Bytes, Entry>; 3],
    clients: HashMap<u64, Client>,
    /// At most one per client: a session waits for each command's answer.
    pending: HashMap<u64, PendingOp>,
    conn: Option<Upstream>,
    /// Why no connection could be made, until one is.
    down: Option<Bytes>,
    /// Subscriptions confirmed upstream (the `pubsub_channels` gauge).
    held: usize,
    start: Option<StartUpstream>,
    events_tx: mpsc::UnboundedSender<Event>,
    done_tx: mpsc::UnboundedSender<Done>,
}

impl Actor {
    async fn run(
        mut self,
        mut ops: mpsc::UnboundedReceiver<Op>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut done: mpsc::UnboundedReceiver<Done>,
        shutdown: CancellationToken,
    ) {
        let mut pushes: Option<mpsc::UnboundedReceiver<Bytes>> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => self.op(op),
                    None => break,
                },
                Some(ev) = events.recv() => match ev {
                    Event::Connected { epoch, requests, pushes: rx } => {
                        pushes = Some(rx);
                        self.connected(epoch, requests);
                    }
                    Event::Lost { epoch } => {
                        if self.conn.as_ref().is_some_and(|c| c.epoch == epoch) {
                            // Whatever the connection read before it went.
                            if let Some(mut rx) = pushes.take() {
                                while let Ok(f) = rx.try_recv() {
                                    self.push(f);
                                }
                            }
                            self.lost();
                        }
                    }
                    Event::ConnectFailed { error } => self.connect_failed(error),
                },
                f = async { pushes.as_mut().expect("guarded").recv().await }, if pushes.is_some() => match f {
                    Some(f) => self.push(f),
                    // The connection ended; `Lost` follows.
                    None => pushes = None,
                },
                Some(d) = done.recv() => self.done(d),
                _ = tick.tick() => self.expire_ops(),
                _ = shutdown.cancelled() => break,
            }
        }
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
        let client = self.clients.entry(id).or_insert_with(|| Client {
            link: link.clone(),
            proto,
            sets: Default::default(),
            next: 0,
        });
        let mut seen = HashSet::new();
        let needed: Vec<Bytes> = names
            .iter()
            .filter(|n| !client.sets[kind.idx()].contains_key(*n) && seen.insert(*n))
            .cloned()
            .collect();
        let mut waiting = HashSet::new();
        for n in &needed {
            let e = self.entries[kind.idx()].entry(n.clone()).or_default();
            e.pending.push(id);
            if e.up != Up::Active {
                waiting.insert(n.clone());
            }
        }
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
        if self.conn.is_none() {
            if let Some(err) = self.down.clone() {
                // No connection can be made now: say why at once.
                self.fail(id, err);
                return;
            }
        }
        // Upstream in the order the client named them.
        for n in needed.iter().filter(|n| waiting.contains(*n)) {
            self.ensure(kind, n);
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
            self.release(op.kind, n);
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
            self.release(kind, &n);
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
                self.release(op.kind, n);
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
                self.release(kind, n);
            }
        }
    }

    /// Someone needs `name` subscribed upstream.
    fn ensure(&mut self, kind: Kind, name: &Bytes) {
        let Some(e) = self.entries[kind.idx()].get_mut(name) else {
            return;
        };
        if e.up != Up::None {
            // Active, or on its way (an UNSUBSCRIBE in flight is followed by
            // a new SUBSCRIBE when it is confirmed).
            return;
        }
        match &self.conn {
            Some(_) => {
                e.up = Up::Subscribing;
                self.send(kind, name, true);
            }
            None => {
                // Subscribed when the connection comes up.
                if let Some(start) = self.start.take() {
                    start(self.events_tx.clone());
                }
            }
        }
    }

    /// Nobody may need `name` any more: unsubscribe upstream, or forget it.
    fn release(&mut self, kind: Kind, name: &Bytes) {
        let Some(e) = self.entries[kind.idx()].get_mut(name) else {
            return;
        };
        if e.wanted() {
            return;
        }
        match e.up {
            Up::Active => {
                e.up = Up::Unsubscribing;
                self.send(kind, name, false);
            }
            Up::None => {
                self.entries[kind.idx()].remove(name);
            }
            // Decided when the confirmation arrives.
            Up::Subscribing | Up::Unsubscribing => {}
        }
    }

    fn send(&mut self, kind: Kind, name: &Bytes, subscribe: bool) {
        let Some(conn) = &self.conn else { return };
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
                epoch,
                kind,
                name,
                subscribe,
                result,
            });
        });
    }

    fn connected(&mut self, epoch: u64, requests: mpsc::Sender<Request>) {
        self.conn = Some(Upstream { epoch, requests });
        self.down = None;
        let mut again = Vec::new();
        for kind in [Kind::Channel, Kind::Pattern, Kind::Shard] {
            for (n, e) in &self.entries[kind.idx()] {
                if e.wanted() && e.up == Up::None {
                    again.push((kind, n.clone()));
                }
            }
        }
        if !again.is_empty() {
            info!(
                subscriptions = again.len(),
                "pub/sub hub connected; subscribing"
            );
        }
        for (kind, n) in again {
            self.ensure(kind, &n);
        }
    }

    /// The connection is gone: nothing is subscribed upstream any more. Local
    /// subscriptions stay and are made again on the next connection.
    fn lost(&mut self) {
        self.conn = None;
        self.held = 0;
        self.metrics.pubsub_channels.set(0);
        for map in &mut self.entries {
            map.retain(|_, e| {
                e.up = Up::None;
                e.wanted()
            });
        }
    }

    fn connect_failed(&mut self, error: UpstreamError) {
        let reply = error.to_reply();
        self.down = Some(reply.clone());
        // Every pending SUBSCRIBE waits for the upstream: say why it cannot.
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail(id, reply.clone());
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

    fn set_up(&mut self, kind: Kind, name: &[u8], up: Up) {
        let Some(e) = self.entries[kind.idx()].get_mut(name) else {
            return;
        };
        let was = matches!(e.up, Up::Active | Up::Unsubscribing);
        let is = matches!(up, Up::Active | Up::Unsubscribing);
        e.up = up;
        match (was, is) {
            (false, true) => self.held += 1,
            (true, false) => self.held -= 1,
            _ => {}
        }
        self.metrics.pubsub_channels.set(self.held as i64);
    }

    /// A push frame from the connection.
    fn push(&mut self, frame: Bytes) {
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
                self.fan_out(Kind::Channel, &channel, &m.freeze());
            }
            return;
        }
        let Some(first) = first.map(|f| frame.slice_ref(f)) else {
            return;
        };
        match what {
            b"message" => self.fan_out(Kind::Channel, &first, &frame),
            b"pmessage" => self.fan_out(Kind::Pattern, &first, &frame),
            b"smessage" => self.fan_out(Kind::Shard, &first, &frame),
            other => match Kind::of_confirmation(other) {
                Some((kind, true)) => self.subscribed(kind, first),
                Some((kind, false)) => self.unsubscribed(kind, first),
                None => debug!("pub/sub hub: ignoring a push frame"),
            },
        }
    }

    fn subscribed(&mut self, kind: Kind, name: Bytes) {
        let k = kind.idx();
        if !self.entries[k].contains_key(&name) {
            // Not asked for (cannot happen): take it, then let it go.
            self.entries[k].insert(name.clone(), Entry::default());
        }
        self.set_up(kind, &name, Up::Active);
        let waiters = self.entries[k]
            .get(&name)
            .map(|e| e.pending.clone())
            .unwrap_or_default();
        for id in waiters {
            let ready = self.pending.get_mut(&id).is_some_and(|op| {
                op.waiting.remove(&name);
                op.waiting.is_empty()
            });
            if ready {
                self.finish(id);
            }
        }
        self.release(kind, &name);
    }

    fn unsubscribed(&mut self, kind: Kind, name: Bytes) {
        let Some(e) = self.entries[kind.idx()].get(&name) else {
            return;
        };
        if e.up == Up::Active {
            // The server dropped it by itself (a cluster slot moving).
            warn!(
                kind = kind.label(),
                "upstream dropped a pub/sub subscription; subscribing again"
            );
        }
        self.set_up(kind, &name, Up::None);
        if self.entries[kind.idx()]
            .get(&name)
            .is_some_and(Entry::wanted)
        {
            self.ensure(kind, &name);
        } else {
            self.entries[kind.idx()].remove(&name);
        }
    }

    fn done(&mut self, d: Done) {
        if self.conn.as_ref().is_none_or(|c| c.epoch != d.epoch) {
            return;
        }
        let reply = match d.result {
            Ok(Ok(bytes)) if !bytes.is_empty() => bytes,
            // Confirmed (handled with the push frames), or the connection
            // failed (handled by `Lost`).
            _ => return,
        };
        let text = resp::error_text(&reply).unwrap_or_else(|| "unexpected reply".into());
        let k = d.kind.idx();
        if d.subscribe {
            warn!(kind = d.kind.label(), error = %text, "upstream refused a pub/sub subscription");
            self.set_up(d.kind, &d.name, Up::None);
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
            self.release(d.kind, &d.name);
        } else {
            warn!(kind = d.kind.label(), error = %text, "upstream refused a pub/sub unsubscribe; keeping it");
            self.set_up(d.kind, &d.name, Up::Active);
        }
    }

    /// Hand a message to every client subscribed to `name` (a channel, or the
    /// pattern it matched).
    fn fan_out(&mut self, kind: Kind, name: &Bytes, frame: &Bytes) {
        let Some(e) = self.entries[kind.idx()].get(name) else {
            return;
        };
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
        if e.up == Up::Active {
            for id in &e.pending {
                let (Some(op), Some(c)) = (self.pending.get_mut(id), self.clients.get(id)) else {
                    continue;
                };
                let bytes = encoded(c.proto);
                let queued = c.link.queued.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
                if queued > max {
                    over.push((*id, queued));
                    continue;
                }
                op.buffered.push(bytes);
            }
        }
        for (id, queued) in over {
            if let Some(c) = self.clients.get(&id) {
                warn!(
                    peer = %c.link.peer,
                    id,
                    queued_bytes = queued,
                    limit = max,
                    "closing a pub/sub subscriber that does not read its messages (limits.max_pubsub_queued_bytes)"
                );
                self.metrics.error(ErrorKind::Limit);
                c.link.kill.cancel();
            }
            self.remove_client(id);
        }
    }
}

/// Keep the hub's connection: connect (RESP3, with backoff), run it, report it
/// to the hub, and connect again when it drops.
async fn supervise(
    connector: Arc<Connector>,
    opts: ConnOpts,
    events: mpsc::UnboundedSender<Event>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    upstream: Arc<std::sync::Mutex<Option<(u64, CancellationToken)>>>,
) {
    let mut attempt: u32 = 0;
    let mut epoch: u64 = 0;
    let mut had_one = false;
    loop {
        if shutdown.is_cancelled() || events.is_closed() {
            break;
        }
        let conn = tokio::select! {
            c = connector.connect(Proto::Resp3) => c,
            _ = shutdown.cancelled() => break,
        };
        match conn {
            Ok(conn) => {
                if had_one || attempt > 0 {
                    opts.metrics.upstream_reconnects.inc();
                    info!(kind = opts.kind, "pub/sub hub connection re-established");
                }
                attempt = 0;
                had_one = true;
                epoch += 1;
                let (req_tx, mut req_rx) = mpsc::channel(MAX_QUEUED_REQUESTS);
                let (push_tx, push_rx) = mpsc::unbounded_channel();
                if events
                    .send(Event::Connected {
                        epoch,
                        requests: req_tx,
                        pushes: push_rx,
                    })
                    .is_err()
                {
                    break;
                }
                let healthy = health.healthy_upstream();
                let up = opts.metrics.upstream(opts.kind, "up");
                up.inc();
                let gone = CancellationToken::new();
                let id = conn.server_id();
                *upstream.lock().expect("not poisoned") = id.map(|id| (id, gone.clone()));
                let mut pending = std::collections::VecDeque::new();
                let res = tokio::select! {
                    r = conn::run(conn, &mut req_rx, &opts, Some(PushSink { tx: push_tx }), &mut pending, None) => r,
                    _ = shutdown.cancelled() => Ok(()),
                };
                up.dec();
                drop(healthy);
                *upstream.lock().expect("not poisoned") = None;
                gone.cancel();
                // Requests not written die with this connection: the hub makes
                // every subscription again on the next one.
                drop(req_rx);
                drop(pending);
                let _ = events.send(Event::Lost { epoch });
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        opts.metrics.error(ErrorKind::UpstreamLost);
                        warn!(kind = opts.kind, error = %e, "pub/sub hub connection failed; reconnecting (messages published until it is back are lost)");
                    }
                }
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                opts.metrics.error(ErrorKind::UpstreamConnect);
                warn!(kind = opts.kind, error = %e, attempt, "cannot open the pub/sub hub connection");
                let no_credential = matches!(e, UpstreamError::NoCredential { .. });
                let _ = events.send(Event::ConnectFailed { error: e });
                let wait = if no_credential {
                    Duration::from_secs(3600)
                } else {
                    conn::backoff(attempt)
                };
                let mut tokens = opts.tokens.clone();
                tokens.mark_unchanged();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    Ok(()) = tokens.changed(), if no_credential => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
