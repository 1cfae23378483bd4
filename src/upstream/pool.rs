//! Upstream connections by use.
//!
//! - Shared: `upstream.pool_size` multiplexed connections per protocol (RESP2,
//!   RESP3), each a supervised slot that reconnects underneath its clients.
//!   Clients are spread round-robin; one client always uses one slot, so its
//!   commands execute in the order it sent them.
//! - Pinned: a client that creates connection state gets a connection of its
//!   own, taken from `upstream.warm_pinned` connections opened and authenticated
//!   ahead of time (dialled on demand when none is warm), at most
//!   `upstream.max_pinned` at once. A pinned connection is closed when its
//!   client lets go, and the warm set is topped up in the background.

use super::conn::{self, ConnOpts, Handle, PushSink, Request};
use super::tls::{Authed, Connector};
use super::UpstreamError;
use crate::admin::Health;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::resp::{self, Proto};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Warm connections older than this are closed rather than handed out: Azure
/// closes connections idle for 10 minutes.
const WARM_MAX_AGE: Duration = Duration::from_secs(240);

struct Warm {
    conns: Mutex<Vec<(Instant, Authed)>>,
    wanted: Notify,
    started: OnceLock<()>,
}

pub struct Pool {
    connector: Arc<Connector>,
    opts: ConnOpts,
    pool_size: usize,
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
    cluster: OnceLock<Arc<super::cluster::Cluster>>,
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
            wanted: Notify::new(),
            started: OnceLock::new(),
        };
        let pool = Arc::new(Pool {
            connector,
            opts,
            pool_size: cfg.upstream.pool_size,
            warm_pinned: cfg.upstream.warm_pinned,
            max_pinned: cfg.upstream.max_pinned,
            shared: [OnceLock::new(), OnceLock::new()],
            next: AtomicUsize::new(0),
            warm: [warm(), warm()],
            pinned: Arc::new(AtomicUsize::new(0)),
            health,
            shutdown,
            cluster: OnceLock::new(),
        });
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
                        self.health.clone(),
                        self.shutdown.clone(),
                    ));
                    Handle { tx }
                })
                .collect()
        })
    }

    /// Hand shared and pinned connections over to the cluster layer.
    pub fn install_cluster(&self, cluster: Arc<super::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// A shared connection for a new client (round-robin).
    pub fn shared(&self, proto: Proto) -> Handle {
        if let Some(h) = self.cluster.get().and_then(|c| c.shared(proto)) {
            return h;
        }
        self.shared_direct(proto)
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
                return c.pin(proto, push).await;
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
        while let Some(c) = self.take_warm(proto) {
            // An idle connection may have been closed by the server (restart,
            // failover) without our noticing: take only one that is still open.
            if still_open(&c).await {
                warm = Some(c);
                break;
            }
        }
        self.warm[idx(proto)].wanted.notify_one();
        let conn = match warm {
            Some(c) => c,
            None => self.connector.connect(proto).await?,
        };
        let upstream_id = conn.hello.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("id", resp::Value::Int(i)) => u64::try_from(*i).ok(),
            _ => None,
        });
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
        tokio::spawn(async move {
            let _guard = guard;
            let _up = health.healthy_upstream();
            let gauge = opts.metrics.upstream("pinned", "up");
            gauge.inc();
            let mut pending = std::collections::VecDeque::new();
            let res = tokio::select! {
                r = conn::run(
                    conn,
                    &mut rx,
                    &opts,
                    Some(push),
                    &mut pending,
                    Some(&expiry_out),
                ) => r,
                // Dropping the connection closes it: the server forgets the
                // client's blocked wait.
                _ = aborted.cancelled() => Ok(()),
            };
            if let Err(e) = res {
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
            gauge.dec();
        });
        Ok(Pinned {
            tx,
            expiry,
            lost,
            abort,
            upstream_id,
        })
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
                    conns.len()
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

    /// The server's HELLO fields (for answering a client's HELLO locally).
    /// The class of a command the routing table calls shared, given what the
    /// server's command table says (blocking module commands are pinned).
    pub fn refine(&self, name: &[u8]) -> crate::command::Class {
        match self.connector.learned() {
            Some(l) if !l.blocking.is_empty() || !l.unplaced.is_empty() => l.refine(name),
            _ => crate::command::Class::Shared,
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
            Some(c) if c.active() => super::cluster::standalone_hello(&fields),
            _ => fields,
        }
    }
}

/// Whether the server has not closed this idle connection: a peek that finds
/// end-of-stream (or an error) means it is gone. Pending bytes (a TLS session
/// ticket) are left in place for the TLS layer.
async fn still_open(c: &Authed) -> bool {
    let tcp = c.stream.get_ref().0;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::ZERO, tcp.peek(&mut byte)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
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

/// A client's own upstream connection; dropping it closes the connection.
pub struct Pinned {
    pub tx: mpsc::Sender<Request>,
    /// Expiry (Unix seconds, 0 = never) of the credential this connection is
    /// authenticated with right now: blocking commands are capped at it.
    pub expiry: Arc<AtomicU64>,
    /// Cancelled when the connection failed: the client's state on it is gone.
    pub lost: CancellationToken,
    /// Cancel to close the connection at once, with whatever is in flight
    /// (a blocked wait whose client left).
    pub abort: CancellationToken,
    /// The server's id for this connection (what `CLIENT UNBLOCK` names).
    pub upstream_id: Option<u64>,
}
