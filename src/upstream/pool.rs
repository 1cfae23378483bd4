//! Upstream connections by use.
//!
//! - Shared: `upstream.pool_size` multiplexed connections per protocol (RESP2,
//!   RESP3), each a supervised slot that reconnects underneath its clients.
//!   Clients are spread round-robin; one client always uses one slot, so its
//!   commands execute in the order it sent them.
//! - Pinned: a client that creates connection state gets a connection of its
//!   own, taken from `upstream.warm_pinned` connections opened and authenticated
//!   ahead of time (dialled on demand when none is warm), at most
//!   `upstream.max_pinned` at once. A pinned connection its client lets go of
//!   with nothing in flight is reset (`RESET`, then `HELLO ... AUTH`) and
//!   kept warm for the next client; one released in the middle of a reply is
//!   closed. The warm set is topped up in the background.

use super::conn::{self, ConnOpts, Handle, PushSink, Request};
use super::tls::{self, Authed, Connector};
use super::UpstreamError;
use crate::admin::Health;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::resp::{self, Proto};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

mod handles;
mod layer;
pub use handles::{Pinned, ServerConn, ServerRef};
pub use layer::{BoxFuture, ClusterLayer, Driver};

/// Warm connections older than this are closed rather than handed out: Azure
/// closes connections idle for 10 minutes.
const WARM_MAX_AGE: Duration = Duration::from_secs(240);
/// How long a client that needs a pinned connection waits for one being
/// reset (see [`Pool::park`]) before dialling a new one.
const PARK_WAIT: Duration = Duration::from_millis(20);

struct Warm {
    conns: Mutex<Vec<(Instant, Authed)>>,
    /// Released pinned connections being reset now: about to be warm, so the
    /// top-up does not dial for them.
    parking: AtomicUsize,
    /// Signalled when a reset connection joins `conns`.
    parked: Notify,
    wanted: Notify,
    started: OnceLock<()>,
}

pub struct Pool {
    connector: Arc<Connector>,
    opts: ConnOpts,
    pool_size: usize,
    /// How long shared slots hold commands while they reconnect.
    hold: Duration,
    /// What the shared connections follow at maintenance (set by the
    /// `AzureRedisEvents` listener).
    maint: Arc<tokio::sync::watch::Sender<conn::Maint>>,
    warm_pinned: usize,
    max_pinned: usize,
    shared: [OnceLock<Vec<Handle>>; 2],
    next: AtomicUsize,
    warm: [Warm; 2],
    pinned: Arc<AtomicUsize>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    /// Set on the seed pool when the upstream may be a cluster: shared and
    /// pinned connections then come from the cluster layer.
    cluster: OnceLock<Arc<dyn ClusterLayer>>,
    /// A cluster node's pool: whether the cluster still wants its dials.
    superseded: Option<Arc<dyn conn::Superseded>>,
}

fn idx(proto: Proto) -> usize {
    match proto {
        Proto::Resp2 => 0,
        Proto::Resp3 => 1,
    }
}

impl Pool {
    pub fn new(
        cfg: &Config,
        connector: Arc<Connector>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Arc<Pool> {
        Pool::build(cfg, connector, metrics, health, shutdown, None)
    }

    /// The pool of a cluster node: a dial of its shared connections is
    /// given up when `superseded` says so (see [`conn::Superseded`]).
    pub fn for_node(
        cfg: &Config,
        connector: Arc<Connector>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: CancellationToken,
        superseded: Arc<dyn conn::Superseded>,
    ) -> Arc<Pool> {
        Pool::build(cfg, connector, metrics, health, shutdown, Some(superseded))
    }

    fn build(
        cfg: &Config,
        connector: Arc<Connector>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: CancellationToken,
        superseded: Option<Arc<dyn conn::Superseded>>,
    ) -> Arc<Pool> {
        let opts = ConnOpts {
            addr: connector.addr().to_string(),
            reply_timeout: cfg.upstream.reply_timeout,
            keepalive: cfg.upstream.keepalive,
            tokens: connector.tokens().clone(),
            metrics,
            kind: "shared",
        };
        let warm = || Warm {
            conns: Mutex::new(Vec::new()),
            parking: AtomicUsize::new(0),
            parked: Notify::new(),
            wanted: Notify::new(),
            started: OnceLock::new(),
        };
        // A cluster node's slots fail at once as before: the cluster layer
        // reads their errors as the sign to refresh its topology.
        let hold = if connector.is_node() {
            Duration::ZERO
        } else {
            cfg.upstream.hold
        };
        let pool = Arc::new(Pool {
            connector,
            opts,
            pool_size: cfg.upstream.pool_size,
            hold,
            maint: Arc::new(tokio::sync::watch::Sender::new(conn::Maint::default())),
            warm_pinned: cfg.upstream.warm_pinned,
            max_pinned: cfg.upstream.max_pinned,
            shared: [OnceLock::new(), OnceLock::new()],
            next: AtomicUsize::new(0),
            warm: [warm(), warm()],
            pinned: Arc::new(AtomicUsize::new(0)),
            health,
            shutdown,
            cluster: OnceLock::new(),
            superseded,
        });
        if cfg.azure_events() && !pool.connector.is_node() {
            tokio::spawn(conn::events::listen(
                pool.connector.clone(),
                pool.opts.clone(),
                pool.maint.clone(),
                pool.shutdown.clone(),
            ));
        }
        // RESP2 is what nearly every client speaks: open it at start so the
        // first command does not pay for TLS and AUTH.
        pool.shared_slots(Proto::Resp2);
        pool.start_warm(Proto::Resp2);
        pool
    }

    fn shared_slots(&self, proto: Proto) -> &Vec<Handle> {
        self.shared[idx(proto)].get_or_init(|| {
            (0..self.pool_size)
                .map(|_| {
                    let (tx, rx) = mpsc::channel(4096);
                    tokio::spawn(conn::supervise_shared(
                        self.connector.clone(),
                        proto,
                        rx,
                        self.opts.clone(),
                        conn::Slot {
                            hold: self.hold,
                            maint: Some(self.maint.clone()),
                            superseded: self.superseded.clone(),
                        },
                        self.health.clone(),
                        self.shutdown.clone(),
                    ));
                    Handle { tx }
                })
                .collect()
        })
    }

    /// Hand shared and pinned connections over to the cluster layer.
    pub fn install_cluster(&self, cluster: Arc<dyn ClusterLayer>) {
        let _ = self.cluster.set(cluster);
    }

    /// A shared connection for a new client, and whether it is a plain
    /// connection (not a cluster's dispatcher, which routes each command on
    /// its own): several commands written to a plain one in one request run
    /// as written. A dispatcher comes with the future that runs it, for the
    /// client's session to poll.
    pub fn shared_plain(&self, proto: Proto) -> (Handle, bool, Option<Driver>) {
        if let Some((h, driver)) = self.cluster.get().and_then(|c| c.clone().shared(proto)) {
            return (h, false, Some(driver));
        }
        (self.shared_direct(proto), true, None)
    }

    /// A shared connection of a cluster node's own pool (`None`: no cluster).
    pub fn node_shared(&self, node: &super::topology::Node, proto: Proto) -> Option<Handle> {
        let c = self.cluster.get()?;
        Some(c.node_shared(node, proto))
    }

    /// Whether the upstream is known to be a cluster (its dispatchers route
    /// and answer; `false` too while that is not known yet).
    pub fn cluster_active(&self) -> bool {
        self.cluster.get().is_some_and(|c| c.active())
    }

    /// The primary that owns `slot` now (`None`: not a cluster, or no map yet).
    pub fn slot_owner(&self, slot: u16) -> Option<super::topology::Node> {
        let c = self.cluster.get().filter(|c| c.active())?;
        c.map()?.owner(slot).cloned()
    }

    /// A shared connection to this pool's own address, cluster or not.
    pub fn shared_direct(&self, proto: Proto) -> Handle {
        let slots = self.shared_slots(proto);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        slots[i].clone()
    }

    /// Pinned connections in use now.
    pub fn pinned_count(&self) -> usize {
        self.pinned.load(Ordering::Relaxed)
    }

    /// A dedicated connection for one client. `push` receives out-of-band frames.
    pub async fn pin(
        self: &Arc<Self>,
        proto: Proto,
        push: PushSink,
    ) -> Result<Pinned, UpstreamError> {
        if let Some(c) = self.cluster.get() {
            if c.is_cluster().await? {
                return c.clone().pin(proto, push).await;
            }
        }
        let prev = self.pinned.fetch_add(1, Ordering::AcqRel);
        let guard = PinGuard {
            count: self.pinned.clone(),
            metrics: self.opts.metrics.clone(),
        };
        self.opts.metrics.pinned_sessions.inc();
        if prev >= self.max_pinned {
            self.opts
                .metrics
                .error(crate::metrics::ErrorKind::PinnedLimit);
            return Err(UpstreamError::Connect {
                addr: self.opts.addr.clone(),
                reason: format!(
                    "too many clients need a dedicated upstream connection (upstream.max_pinned = {}); try again later",
                    self.max_pinned
                ),
            });
        }
        self.start_warm(proto);
        let mut warm = None;
        let w = &self.warm[idx(proto)];
        let wait_until = Instant::now() + PARK_WAIT;
        loop {
            // Registered before looking, so a connection parked in between
            // is not missed.
            let parked = w.parked.notified();
            let Some(c) = self.take_warm(proto) else {
                // None warm, but one is being reset: it is a round trip
                // away, much closer than a new TCP connection, TLS handshake
                // and AUTH (and dialling for it would leave one too many).
                if w.parking.load(Ordering::Acquire) > 0 && Instant::now() < wait_until {
                    let _ = tokio::time::timeout_at(wait_until, parked).await;
                    continue;
                }
                break;
            };
            // An idle connection may have been closed by the server (restart,
            // failover) without our noticing: take only one that is still open.
            if still_open(&c) {
                warm = Some(c);
                break;
            }
        }
        self.warm[idx(proto)].wanted.notify_one();
        let conn = match warm {
            Some(c) => c,
            // Dialled again through a failover's gap, for at most
            // upstream.hold (issue 18: see upstream/pinned_hold.rs).
            None => {
                super::pinned_hold::connect(&self.connector, proto, self.hold, &self.shutdown)
                    .await?
            }
        };
        let upstream_id = conn.server_id();
        let marks = push.marks;
        let (tx, mut rx) = mpsc::channel::<Request>(1024);
        let mut opts = self.opts.clone();
        opts.kind = "pinned";
        let health = self.health.clone();
        let expiry = Arc::new(AtomicU64::new(conn::unix_secs(conn.expires_at)));
        let expiry_out = expiry.clone();
        let lost = CancellationToken::new();
        let lost_out = lost.clone();
        let abort = CancellationToken::new();
        let aborted = abort.clone();
        let pool = Arc::downgrade(self);
        let hello = conn.hello.clone();
        let clean = Arc::new(AtomicBool::new(false));
        let clean_out = clean.clone();
        tokio::spawn(async move {
            let up = health.healthy_upstream();
            let gauge = opts.metrics.upstream("pinned", "up");
            gauge.inc();
            let mut pending = std::collections::VecDeque::new();
            let res = tokio::select! {
                r = conn::run_reusable(
                    conn,
                    &mut rx,
                    &opts,
                    Some(push),
                    &mut pending,
                    Some(&expiry_out),
                ) => r,
                // Dropping the connection closes it: the server forgets the
                // blocked wait of a client that left. Not reused.
                _ = aborted.cancelled() => Ok(None),
            };
            drop(guard);
            drop(up);
            match res {
                Ok(Some(released)) => {
                    gauge.dec();
                    // Released with nothing owed: reset it (or, holding no
                    // state, keep it as it is) for the next client instead
                    // of paying a TLS handshake and AUTH for a new one.
                    if let Some(pool) = pool.upgrade() {
                        let clean = clean_out.load(Ordering::Acquire);
                        pool.park(proto, released, hello, clean).await;
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "pinned upstream connection ended");
                    // State (MULTI, WATCH, SELECT, subscriptions) is gone with the
                    // connection: fail what is left rather than run it elsewhere.
                    rx.close();
                    for r in pending.drain(..) {
                        if let Some(tx) = r.reply {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                    while let Ok(r) = rx.try_recv() {
                        if let Some(tx) = r.reply {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                    lost_out.cancel();
                }
            }
            gauge.dec();
        });
        Ok(Pinned {
            tx,
            expiry,
            lost,
            abort,
            clean,
            proto,
            server: ServerRef::new(upstream_id.map(|id| ServerConn { id, node: None })),
            marks,
        })
    }

    /// Reset a pinned connection its client let go of and keep it warm for
    /// the next one. `RESET` clears what the client left (MULTI, WATCH,
    /// SELECT, tracking, reply mode, MONITOR) and also logs the connection
    /// out and back to RESP2, so `HELLO <proto> AUTH` with the current
    /// credential follows in the same write: one round trip instead of a TCP
    /// connect, a TLS handshake and the AUTH. Kept while fewer connections
    /// are warm than twice `upstream.warm_pinned` plus the clients pinned now:
    /// the top-up has already replaced the warm connection this client took,
    /// so without the surplus a client that pins again and again would make
    /// the pool dial for each time; with it, a burst of transactions reuses
    /// its connections, and what is left over ages out with
    /// [`WARM_MAX_AGE`]. Closed when anything looks wrong.
    ///
    /// `clean`: its client let go of it holding no state of its own (see
    /// [`Pinned::clean`]); authenticated with the current credential, it is
    /// kept as it is, with no round trip (issue 19: a client that alternates
    /// WATCH transactions with plain commands releases it after each).
    async fn park(
        &self,
        proto: Proto,
        released: conn::Released,
        hello: Arc<Vec<(String, resp::Value)>>,
        clean: bool,
    ) {
        let w = &self.warm[idx(proto)];
        let room = |p: &Pool| {
            w.conns.lock().expect("not poisoned").len() < 2 * p.warm_pinned + p.pinned_count()
        };
        if self.warm_pinned == 0 || self.shutdown.is_cancelled() || !room(self) {
            return;
        }
        let (cred, generation) = {
            let state = self.opts.tokens.borrow();
            match state.usable(std::time::SystemTime::now()) {
                Some(c) => (c.clone(), state.generation),
                None => return,
            }
        };
        if clean && released.generation == generation && released.leftover.is_empty() {
            w.conns.lock().expect("not poisoned").push((
                Instant::now(),
                Authed {
                    stream: released.stream,
                    proto,
                    generation,
                    expires_at: released.expires_at,
                    leftover: released.leftover,
                    hello,
                },
            ));
            w.parked.notify_one();
            tracing::debug!(?proto, "pinned connection kept warm as it was (no state)");
            return;
        }
        let limit = self.opts.reply_timeout.min(Duration::from_secs(5));
        let reset = reset_conn(released, proto, &cred);
        w.parking.fetch_add(1, Ordering::AcqRel);
        let reset = tokio::time::timeout(limit, reset).await;
        w.parking.fetch_sub(1, Ordering::AcqRel);
        match reset {
            Ok(Ok((stream, leftover))) if room(self) => {
                w.conns.lock().expect("not poisoned").push((
                    Instant::now(),
                    Authed {
                        stream,
                        proto,
                        generation,
                        expires_at: cred.expires_at,
                        leftover,
                        hello,
                    },
                ));
                w.parked.notify_one();
                tracing::debug!(?proto, "pinned connection reset and kept warm");
            }
            Ok(Ok(_)) => {}
            Ok(Err(reason)) => {
                tracing::debug!(%reason, "pinned connection not reusable; closed")
            }
            Err(_) => tracing::debug!("pinned connection reset timed out; closed"),
        }
    }

    fn take_warm(&self, proto: Proto) -> Option<Authed> {
        let mut conns = self.warm[idx(proto)].conns.lock().expect("not poisoned");
        while let Some((at, c)) = conns.pop() {
            if self.warm_usable(at, &c) {
                return Some(c);
            }
        }
        None
    }

    /// A warm connection is idle, so it does not re-AUTH: hand it out only
    /// while it is young and holds the current credential.
    fn warm_usable(&self, at: Instant, c: &Authed) -> bool {
        let current = self.opts.tokens.borrow().generation;
        let fresh = c.expires_at.is_none_or(|e| {
            e.duration_since(std::time::SystemTime::now())
                .is_ok_and(|left| left > Duration::from_secs(2))
        });
        at.elapsed() < WARM_MAX_AGE && c.generation == current && fresh
    }

    fn start_warm(self: &Arc<Self>, proto: Proto) {
        if self.warm_pinned == 0 {
            return;
        }
        let w = &self.warm[idx(proto)];
        if w.started.set(()).is_err() {
            return;
        }
        let pool = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                let Some(p) = pool.upgrade() else { return };
                let w = &p.warm[idx(proto)];
                let have = {
                    let mut conns = w.conns.lock().expect("not poisoned");
                    conns.retain(|(at, c)| p.warm_usable(*at, c));
                    conns.len() + w.parking.load(Ordering::Acquire)
                };
                if have < p.warm_pinned {
                    match p.connector.connect(proto).await {
                        Ok(c) => {
                            attempt = 0;
                            w.conns
                                .lock()
                                .expect("not poisoned")
                                .push((Instant::now(), c));
                            continue;
                        }
                        Err(_) => attempt = attempt.saturating_add(1),
                    }
                }
                let wait = if attempt > 0 {
                    conn::backoff(attempt + 3)
                } else {
                    WARM_MAX_AGE / 4
                };
                // A new credential makes the warm set stale: refill at once.
                let mut tokens = p.opts.tokens.clone();
                tokens.mark_unchanged();
                tokio::select! {
                    _ = p.warm[idx(proto)].wanted.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokens.changed() => {}
                    _ = shutdown.cancelled() => return,
                }
                drop(p);
            }
        });
    }

    /// The command model with what the server's `COMMAND` said (`None` until
    /// a connection learned it).
    pub fn learned(&self) -> Option<&crate::command::Commands> {
        self.connector.learned()
    }

    /// Whether the proxy is shutting down: only then does a client read so.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// A command found its connection's channel closed before it was
    /// written (that connection ended: killed, dropped): it did not run.
    /// "Shutting down" only when the proxy is.
    pub fn unsent(&self, reason: &str) -> UpstreamError {
        if self.shutting_down() {
            return UpstreamError::Shutdown;
        }
        UpstreamError::Closed {
            addr: self.connector.addr().to_string(),
            reason: reason.into(),
        }
    }

    /// The longest a blocking command may wait server-side in one go: two
    /// thirds of `upstream.reply_timeout` (at least 1 s), so that the reply
    /// timeout never ends a wait the client asked for.
    pub fn max_block(&self) -> Duration {
        (self.opts.reply_timeout * 2 / 3).max(Duration::from_secs(1))
    }

    /// The HELLO fields of this pool's own address, as the server sent them.
    pub fn hello_fields_direct(&self) -> Arc<Vec<(String, resp::Value)>> {
        self.connector.hello_fields()
    }

    pub fn hello_fields(&self) -> Arc<Vec<(String, resp::Value)>> {
        let fields = self.connector.hello_fields();
        match self.cluster.get() {
            // Also while detection is pending: the proxy shows one Redis
            // whatever the cache turns out to be.
            Some(_) => standalone_hello(&fields),
            None => fields,
        }
    }
}

/// HELLO fields as a non-cluster Redis shows them: clients see one server.
fn standalone_hello(fields: &[(String, resp::Value)]) -> Arc<Vec<(String, resp::Value)>> {
    Arc::new(
        fields
            .iter()
            .map(|(k, v)| {
                if k == "mode" {
                    (
                        k.clone(),
                        resp::Value::Str(bytes::Bytes::from_static(b"standalone")),
                    )
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect(),
    )
}

/// `RESET` then `HELLO <proto> AUTH <user> <password>` in one write; waits for
/// `+RESET` (skipping what a MONITOR or tracking client had coming: monitor
/// lines, push frames, at most a few thousand of them) and the HELLO reply.
async fn reset_conn(
    released: conn::Released,
    proto: Proto,
    cred: &crate::auth::Credential,
) -> Result<(tls::Stream, bytes::BytesMut), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let conn::Released {
        mut stream,
        leftover: mut buf,
        ..
    } = released;
    let version: &[u8] = match proto {
        Proto::Resp2 => b"2",
        Proto::Resp3 => b"3",
    };
    let mut cmd = resp::command(&[b"RESET"]).to_vec();
    cmd.extend_from_slice(&resp::command(&[
        b"HELLO",
        version,
        b"AUTH",
        cred.username.as_bytes(),
        cred.password.expose().as_bytes(),
    ]));
    stream.write_all(&cmd).await.map_err(|e| e.to_string())?;
    let mut scanner = crate::resp::scan::ReplyScanner::new();
    let mut reset_seen = false;
    for _ in 0..4096 {
        match scanner.scan(&buf).map_err(|e| e.to_string())? {
            Some(r) => {
                let frame = buf.split_to(r.len);
                if r.push {
                    continue;
                }
                if !reset_seen {
                    reset_seen = &frame[..] == b"+RESET\r\n";
                    continue;
                }
                return match resp::error_text(&frame) {
                    Some(e) => Err(format!("HELLO after RESET: {e}")),
                    None => Ok((stream, buf)),
                };
            }
            None => {
                buf.reserve(4096);
                if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("server closed the connection".into());
                }
            }
        }
    }
    Err("too many frames before the RESET reply".into())
}

/// Whether the server has not closed this idle connection: a peek that finds
/// end-of-stream (or an error) means it is gone. Pending bytes (a TLS session
/// ticket) are left in place for the TLS layer.
///
/// One poll, no wait: a peek that is not ready means nothing has arrived,
/// so the connection is open. (A zero-length timeout around it waited for
/// the next timer tick, a millisecond, on every pin.)
fn still_open(c: &Authed) -> bool {
    let tcp = c.stream.get_ref().0;
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match tcp.poll_peek(&mut cx, &mut buf) {
        std::task::Poll::Pending => true,
        std::task::Poll::Ready(Ok(n)) => n > 0,
        std::task::Poll::Ready(Err(_)) => false,
    }
}

struct PinGuard {
    count: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pinned_sessions.dec();
    }
}
