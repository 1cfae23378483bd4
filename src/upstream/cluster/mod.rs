//! Clustered caches (Azure Managed Redis OSS cluster policy, clustered Azure
//! Cache for Redis): the proxy presents one plain Redis to its clients and
//! sends each command to the primary that owns its keys.
//!
//! A layer around the per-address [`Pool`]: the seed pool (the configured
//! host) hands its shared and pinned connections over to this layer
//! ([`Pool::install_cluster`]), which keeps one [`Pool`] per primary (each
//! connection authenticated and re-authenticated like any other, TLS checked
//! against the cache's name).
//!
//! - [`route`]: pure placement of one command (slot, any node, split, fan-out,
//!   refusal); [`merge`]: pure merging of the parts' replies.
//! - [`dispatch`]: what a client's shared connection is in a cluster: its
//!   own router, run inside the client's session task, that routes each
//!   command of a batch, follows `MOVED`/`ASK`, retries
//!   `TRYAGAIN`/`CLUSTERDOWN`, and answers the batch in order.
//! - [`pinned`]: transactions and blocking commands on the node of their keys.
//! - Here: detection (`upstream.cluster`), the slot map and its refresh.

pub mod dispatch;
pub mod merge;
mod nodes;
pub mod pinned;
mod refresh;
pub mod route;
pub mod scan;

use super::conn::{Handle, PushSink, Request};
use super::policy;
use super::pool::{BoxFuture, ClusterLayer, Pinned, Pool};
use super::pubsub::Hub;
use super::tls::Connector;
use super::topology::{self, Node, SlotMap};
use super::UpstreamError;
use crate::admin::Health;
use crate::command::Commands;
use crate::config::{ClusterMode, Config};
use crate::metrics::Metrics;
use crate::resp::{self, Proto};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// At most one topology refresh per this long, however many `MOVED` arrive.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// The slot map is re-read this often even when nothing seems to change.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How long the connections of a node that left the topology are kept for
/// the commands in flight on them.
const LEFT_GRACE: Duration = Duration::from_secs(5);
/// Batches a client may have queued for its dispatcher (the session's own
/// budget of replies owed keeps it far below).
const DISPATCH_QUEUE: usize = 4096;
/// Time allowed for one topology query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Undecided,
    Standalone,
    Cluster,
}

pub struct Cluster {
    cfg: Config,
    connector: Arc<Connector>,
    seed: Arc<Pool>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    decision: watch::Sender<Decision>,
    map: Arc<RwLock<Option<Arc<SlotMap>>>>,
    /// Each node's pool, and the token that ends its connections.
    nodes: Arc<Mutex<nodes::Nodes<Arc<Pool>>>>,
    refresh: Arc<Notify>,
    /// Told each new slot map (shard channels, keyspace notifications).
    hub: Hub,
    /// Spreads the clients' keyless commands over the primaries.
    next: AtomicUsize,
    /// Bumped with each new slot map (dispatchers let go of nodes that left).
    version: AtomicUsize,
    /// Why the last attempt to ask the seed (while undecided) failed.
    seed_error: Mutex<Option<UpstreamError>>,
    /// Commands of the proxy's own the access policy refused (logged once).
    refusals: policy::Refusals,
}

impl Cluster {
    /// Install the cluster layer on the seed pool unless `upstream.cluster =
    /// off`, and find out (or take from the config) whether it is one.
    pub fn start(
        cfg: &Config,
        connector: Arc<Connector>,
        seed: Arc<Pool>,
        hub: Hub,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Option<Arc<Cluster>> {
        let mode = cfg.upstream.cluster;
        if mode == ClusterMode::Off {
            return None;
        }
        let (decision, _) = watch::channel(Decision::Undecided);
        let c = Arc::new(Cluster {
            cfg: cfg.clone(),
            connector,
            seed: seed.clone(),
            metrics,
            health,
            shutdown,
            decision,
            map: Arc::new(RwLock::new(None)),
            nodes: Arc::new(Mutex::new(nodes::Nodes::new())),
            refresh: Arc::new(Notify::new()),
            hub,
            next: AtomicUsize::new(0),
            version: AtomicUsize::new(0),
            seed_error: Mutex::new(None),
            refusals: Default::default(),
        });
        seed.install_cluster(c.clone());
        tokio::spawn(c.clone().decide(mode == ClusterMode::On));
        Some(c)
    }

    /// Whether requests go through this layer now (cluster, or not known yet).
    pub fn active(&self) -> bool {
        *self.decision.borrow() == Decision::Cluster
    }

    /// Whether the upstream is a cluster, waiting for the answer while the
    /// seed is being asked (at most `upstream.connect_timeout`; then it is
    /// taken as not one). While the seed cannot be reached, its error at once,
    /// so a client gets a clear answer instead of waiting, and no command goes
    /// to the seed unrouted.
    pub async fn is_cluster(&self) -> Result<bool, UpstreamError> {
        let bound = Instant::now() + self.cfg.upstream.connect_timeout;
        let mut rx = self.decision.subscribe();
        loop {
            match *rx.borrow_and_update() {
                Decision::Cluster => return Ok(true),
                Decision::Standalone => return Ok(false),
                Decision::Undecided => {}
            }
            let failing = self.seed_error.lock().expect("not poisoned").clone();
            if let Some(e) = failing {
                // "No credential" is stale once one has arrived: wait instead.
                let stale = matches!(e, UpstreamError::NoCredential { .. })
                    && self
                        .connector
                        .tokens()
                        .borrow()
                        .usable(std::time::SystemTime::now())
                        .is_some();
                if !stale {
                    return Err(e);
                }
            }
            if Instant::now() >= bound {
                return Ok(false);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(false) },
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// A client's shared connection: while the upstream is (or may be) a
    /// cluster, a dispatcher of the client's own and the future that runs it,
    /// for the client's session to poll in its own task (see [`dispatch`]);
    /// `None`: the seed pool's own connection.
    ///
    /// One per client, so a node that is slow or frozen delays only the
    /// clients waiting for it; nothing is spawned, so a client costs no
    /// task and no thread hop of its own.
    pub fn shared(self: &Arc<Self>, proto: Proto) -> Option<(Handle, dispatch::Driver)> {
        if *self.decision.borrow() == Decision::Standalone {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(DISPATCH_QUEUE);
        let driver = Box::pin(dispatch::run(self.clone(), proto, index, rx));
        Some((Handle { tx }, driver))
    }

    /// A client's dedicated connection: bound to a node once its first keyed
    /// command says which.
    pub async fn pin(
        self: &Arc<Self>,
        proto: Proto,
        push: PushSink,
    ) -> Result<Pinned, UpstreamError> {
        Ok(pinned::start(self.clone(), proto, push))
    }

    /// The command model (key positions, classes) the seed connector learned.
    fn table(&self) -> &Commands {
        Commands::or_builtin(self.connector.learned())
    }

    /// Which slot map is current (changes with each new one).
    pub(crate) fn map_version(&self) -> usize {
        self.version.load(Ordering::Acquire)
    }

    /// The current slot map (`None` before the first one is read).
    pub fn map(&self) -> Option<Arc<SlotMap>> {
        self.map.read().expect("not poisoned").clone()
    }

    /// What a reply channel closed without an answer means ([`dropped_reply`]).
    pub(crate) fn dropped_reply(&self) -> UpstreamError {
        dropped_reply(&self.shutdown)
    }

    /// Whether the proxy is shutting down: only then does a client read so.
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// A command found `node`'s connection closed before it was written:
    /// it did not run (and may go to the slot's owner of now), unless the
    /// proxy is shutting down.
    pub(crate) fn unsent(&self, node: Option<&Node>, reason: &str) -> UpstreamError {
        if self.shutting_down() {
            return UpstreamError::Shutdown;
        }
        UpstreamError::Closed {
            addr: node.map(|n| n.to_string()).unwrap_or_else(|| "node".into()),
            reason: reason.into(),
        }
    }

    /// The pool of one node, made on first use.
    pub(crate) fn node_pool(&self, node: &Node) -> Arc<Pool> {
        let mut nodes = self.nodes.lock().expect("not poisoned");
        if let Some(p) = nodes.get(node) {
            return p;
        }
        let connector = Arc::new(self.connector.for_node(&node.host, node.port));
        let stop = self.shutdown.child_token();
        let watch = Arc::new(NodeWatch {
            node: node.clone(),
            map: self.map.clone(),
            refresh: self.refresh.clone(),
        });
        let pool = Pool::for_node(
            &self.cfg,
            connector,
            self.metrics.clone(),
            self.health.clone(),
            stop.clone(),
            watch,
        );
        nodes.insert(node.clone(), pool.clone(), stop);
        pool
    }

    /// The node for a slot (`None`: any primary), by the current map.
    fn node_for(&self, slot: Option<u16>, spread: usize) -> Option<Node> {
        let map = self.map()?;
        match slot {
            Some(s) => map.owner(s).cloned(),
            None => map.nodes.get(spread % map.nodes.len().max(1)).cloned(),
        }
    }
}

/// What a node's shared connections ask while one is being dialled: is the
/// node still a primary of the slot map? A frozen primary's dial would
/// otherwise run to `upstream.connect_timeout`, the commands waiting for it
/// too, while its replica is promoted. A node the map no longer names owns
/// none of the slots the commands waiting for it need (never written, they
/// go to the new owner: see `dispatch`); one still named that lost some
/// slots keeps its dial (those commands come back with `MOVED`).
struct NodeWatch {
    node: Node,
    map: Arc<RwLock<Option<Arc<SlotMap>>>>,
    refresh: Arc<Notify>,
}

impl super::conn::Superseded for NodeWatch {
    fn superseded(&self, polls: u32) -> bool {
        // A dial not done in half a second asks for the map (a healthy one
        // is long done), then every second, as the dedicated path does.
        if polls % 20 == 10 {
            self.refresh.notify_one();
        }
        let map = self.map.read().expect("not poisoned").clone();
        map.is_some_and(|m| !m.nodes.is_empty() && !m.nodes.contains(&self.node))
    }
}

/// What the seed pool sees of this layer (the pool does not name `Cluster`).
impl ClusterLayer for Cluster {
    fn shared(self: Arc<Self>, proto: Proto) -> Option<(Handle, dispatch::Driver)> {
        Cluster::shared(&self, proto)
    }

    fn node_shared(&self, node: &Node, proto: Proto) -> Handle {
        self.node_pool(node).shared_direct(proto)
    }

    fn active(&self) -> bool {
        Cluster::active(self)
    }

    fn map(&self) -> Option<Arc<SlotMap>> {
        Cluster::map(self)
    }

    fn is_cluster(&self) -> BoxFuture<'_, Result<bool, UpstreamError>> {
        Box::pin(Cluster::is_cluster(self))
    }

    fn pin(
        self: Arc<Self>,
        proto: Proto,
        push: PushSink,
    ) -> BoxFuture<'static, Result<Pinned, UpstreamError>> {
        Box::pin(async move { Cluster::pin(&self, proto, push).await })
    }
}

/// A command's reply channel closed without an answer: the proxy is shutting
/// down, or the connection under the command was closed, as the proxy does
/// with a node that left the topology (a primary replaced while frozen):
/// the command may or may not have run there.
fn dropped_reply(shutdown: &CancellationToken) -> UpstreamError {
    if shutdown.is_cancelled() {
        UpstreamError::Shutdown
    } else {
        UpstreamError::Lost {
            reason:
                "the proxy closed its connection to the node, which left the cluster's topology"
                    .into(),
        }
    }
}

/// The command was not written because its node could not be reached (not
/// a limit of the proxy's): it may go to whichever node the cluster names next.
pub(crate) fn node_unreachable(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Connect { reason, .. } => !reason.contains("max_pinned"),
        UpstreamError::Tls { .. } | UpstreamError::Closed { .. } => true,
        UpstreamError::Timeout { during, .. } => during.contains("re-established"),
        _ => false,
    }
}

/// An upstream failure as the client sees it: which node, which slot.
pub(crate) fn node_error(e: &UpstreamError, node: Option<&Node>, slot: Option<u16>) -> Bytes {
    let mut text = format!("ERR {e}");
    match (node, slot) {
        (Some(n), Some(s)) => text += &format!(" (node {n}, slot {s})"),
        (Some(n), None) => text += &format!(" (node {n})"),
        (None, Some(s)) => text += &format!(" (slot {s})"),
        (None, None) => {}
    }
    resp::error(&text)
}

/// Send one command on `handle` and wait for its reply.
async fn ask(handle: &Handle, bytes: Bytes) -> Result<Bytes, UpstreamError> {
    let (tx, rx) = oneshot::channel();
    let req = Request {
        bytes,
        count: 1,
        reply: Some(tx),
        in_multi_after: false,
        pushes: 0,
    };
    if handle.tx.send(req).await.is_err() {
        return Err(UpstreamError::Shutdown);
    }
    match tokio::time::timeout(QUERY_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(UpstreamError::Shutdown),
        Err(_) => Err(UpstreamError::Timeout {
            addr: "cluster node".into(),
            secs: QUERY_TIMEOUT.as_secs_f64(),
            during: "reading the cluster topology",
        }),
    }
}
