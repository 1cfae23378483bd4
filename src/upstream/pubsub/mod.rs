//! The pub/sub hub: every client subscription is carried on shared RESP3
//! upstream connections: one on a single-endpoint cache, and on a cluster one
//! to the configured host plus one per primary that holds keyspace
//! notifications or shard channels ([`place`] says which goes where).
//!
//! - Each connection, opened when a first subscription needs it, run by
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
//! - On a cluster, a shard channel whose slot moves is dropped by the server
//!   (`sunsubscribe`) and made again on the new owner (following `MOVED`);
//!   a primary that leaves the topology has its connection closed and its
//!   subscriptions made where the new topology says.
//!
//! Everything is owned by one task ([`actor::Actor`]); sessions talk to it
//! through [`Hub`], the connections' supervisors ([`supervise`]) through
//! [`Event`]s, and the cluster layer gives it each new slot map.

mod actor;
pub mod count;
pub mod place;
mod supervise;

use super::conn::{ConnOpts, Request};
use super::tls::Connector;
use super::topology::{Node, SlotMap};
use super::UpstreamError;
use crate::admin::Health;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::resp::Proto;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

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
#[derive(Debug)]
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
    /// Its protocol as the hub last learned it (`true`: RESP3), for a
    /// tracking redirect target with no subscription: set by the hub only,
    /// in the order of the client's commands.
    resp3: AtomicBool,
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
            resp3: AtomicBool::new(false),
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
    /// The client switched protocol (HELLO): its frames from now on in
    /// `proto`; the `Reply` marks the point after which they are.
    Proto {
        link: Arc<Link>,
        proto: Proto,
        seq: u64,
        reply: oneshot::Sender<OpResult>,
    },
    /// The client is named as the target of another client's
    /// `CLIENT TRACKING ... REDIRECT`.
    Redirect { id: u64 },
    /// The client is gone.
    Gone { id: u64 },
    /// The reply one Redis would give to a counting command, from the
    /// servers' ([`count`]).
    Census {
        asks: Vec<count::Ask>,
        reply: oneshot::Sender<Vec<Bytes>>,
    },
    /// The upstream is a cluster with this slot map (each new one); `refresh`
    /// asks the cluster layer to read it again.
    Topology {
        map: Arc<SlotMap>,
        refresh: Arc<Notify>,
    },
}

/// From the connections' supervisors; `conn` says which connection (the
/// index the hub gave it when it asked for it to be started).
pub enum Event {
    /// A new authenticated connection: requests go to `requests`.
    Connected {
        conn: usize,
        epoch: u64,
        requests: mpsc::Sender<Request>,
    },
    /// A push frame read on that connection (all of them come before its
    /// `Lost`).
    Push {
        conn: usize,
        epoch: u64,
        frame: Bytes,
    },
    /// That connection is gone.
    Lost { conn: usize, epoch: u64 },
    /// No connection could be made: new subscriptions that need it fail with
    /// this error until one is.
    ConnectFailed { conn: usize, error: UpstreamError },
}

/// The hub asks for a connection to be kept: the home one (connection 0: to
/// the configured host, `node` `None`, or on a cluster to the node it moved
/// to) or one to a cluster primary, until `stop`.
pub struct Start {
    pub conn: usize,
    pub node: Option<Node>,
    pub events: mpsc::UnboundedSender<Event>,
    pub stop: CancellationToken,
}

type Starter = Box<dyn FnMut(Start) + Send>;

/// Settings of the hub.
#[derive(Clone)]
pub struct HubOpts {
    /// A client's cap on queued message bytes.
    pub max_queued_bytes: usize,
    /// A SUBSCRIBE not confirmed upstream within this fails.
    pub op_timeout: Duration,
    pub addr: String,
    /// Closed while the home connection's subscriptions are made again
    /// after a drop (issue 18: upstream/maintenance/resubscribe.rs).
    pub resub: Option<Arc<crate::upstream::maintenance::resubscribe::ResubGate>>,
}

/// The sessions' handle on the hub.
#[derive(Clone)]
pub struct Hub {
    ops: mpsc::UnboundedSender<Op>,
    /// The hub connection's server-side client id, and a token cancelled
    /// when that connection goes (`None` while there is none).
    upstream: supervise::RedirectTarget,
}

/// What the hub adds to and takes from a server's count ([`count`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Receivers {
    /// Local clients counted as Redis counts them (for a message: one per
    /// client subscribed to the channel, one per client and matching pattern).
    pub local: usize,
    /// The hub's own subscriptions the server counted among them.
    pub upstream: usize,
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
            resub: Some(connector.resubscribe_gate().clone()),
        };
        let upstream = Arc::new(std::sync::Mutex::new(None));
        let up = upstream.clone();
        let starter: Starter = Box::new(move |s: Start| {
            let connector = match &s.node {
                None => connector.clone(),
                Some(n) => Arc::new(connector.for_node(&n.host, n.port)),
            };
            // The home connection (wherever it is) is the tracking redirect target.
            let target = (s.conn == 0).then(|| up.clone());
            let mut opts = conn_opts.clone();
            opts.addr = connector.addr().to_string();
            tokio::spawn(supervise::supervise(
                connector,
                opts,
                s,
                health.clone(),
                target,
            ));
        });
        let mut hub = Hub::with_upstream(opts, metrics, starter, shutdown);
        hub.upstream = upstream;
        hub
    }

    /// The upstream is a cluster with this slot map: shard channels and
    /// keyspace notifications are held on the primaries it names.
    pub fn topology(&self, map: Arc<SlotMap>, refresh: Arc<Notify>) {
        let _ = self.ops.send(Op::Topology { map, refresh });
    }

    /// Where a RESP2 client's `CLIENT TRACKING on REDIRECT <local id>` must
    /// point upstream: the hub's connection, which carries every local
    /// subscription to [`TRACKING_CHANNEL`] (its invalidations are fanned out
    /// to them). With the token that is cancelled when that connection goes
    /// (the redirect breaks with it). `None` while the hub has no connection.
    pub fn redirect_target(&self) -> Option<(u64, CancellationToken)> {
        self.upstream.lock().expect("not poisoned").clone()
    }

    /// A hub whose connections are started by `starter` (tests play them).
    fn with_upstream(
        opts: HubOpts,
        metrics: Arc<Metrics>,
        starter: Starter,
        shutdown: CancellationToken,
    ) -> Hub {
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let actor = actor::Actor::new(opts, metrics, starter, shutdown);
        tokio::spawn(actor.run(ops_rx));
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

    /// The client switches to `proto` (HELLO, subscribed or not): the frames
    /// the hub queues for it after the empty `Reply { seq }` are in `proto`.
    pub async fn protocol(&self, link: &Arc<Link>, proto: Proto, seq: u64) -> OpResult {
        let link = link.clone();
        self.call(|reply| Op::Proto {
            link,
            proto,
            seq,
            reply,
        })
        .await
    }

    /// The client `id` is the target of a `CLIENT TRACKING ... REDIRECT`
    /// pointed at the hub's connection: until it leaves ([`Self::gone`]), it
    /// gets that connection's invalidations whether or not it subscribes to
    /// [`TRACKING_CHANNEL`] (as a push in RESP3; in RESP2 as a message, while
    /// it is in subscribed mode), as Redis sends them to a redirect target.
    pub fn redirect(&self, id: u64) {
        let _ = self.ops.send(Op::Redirect { id });
    }

    /// The client disconnected: drop its subscriptions.
    pub fn gone(&self, id: u64) {
        let _ = self.ops.send(Op::Gone { id });
    }
}

#[cfg(test)]
mod tests;
