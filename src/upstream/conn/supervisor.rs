//! The supervisor of a shared connection slot: dial, run the connection
//! ([`super::run`]), and on failure dial again with backoff. Commands not yet
//! sent wait meanwhile in a bounded hold queue ([`HoldQueue`]: count, bytes,
//! `upstream.hold`) and go out in order on the new connection; a dial failure
//! a wait cannot cure, or a hold of 0, fails them at once instead.

use super::{backoff, fail, run_shared, ConnOpts, Maint, Request};
use crate::resp::Proto;
use crate::upstream::maintenance::resubscribe::RESUB_WAIT_MAX;
use crate::upstream::maintenance::{
    self, hold_through, Dropped, HoldQueue, HOLD_MAX_BYTES, HOLD_MAX_COMMANDS, HOLD_RETRY,
};
use crate::upstream::UpstreamError;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

/// Keep one shared connection slot alive: connect (with backoff), run, and on
/// failure reconnect, carrying requests not yet written to the new connection.
/// With `hold` > 0, once the slot has been connected, requests wait up to
/// `hold` for it through failed dials (see [`hold_through`]); with 0, before
/// the first connection, or after a failure waiting cannot cure, requests
/// fail at once with the reason, so no client hangs.
pub async fn supervise_shared(
    connector: Arc<crate::upstream::tls::Connector>,
    proto: Proto,
    mut rx: mpsc::Receiver<Request>,
    opts: ConnOpts,
    slot: Slot,
    health: Arc<crate::admin::Health>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Slot {
        hold,
        maint,
        superseded,
    } = slot;
    // Maintenance pushes already acted on, across this slot's connections.
    let mut dedup = crate::upstream::maintenance::pushes::Dedup::default();
    let mut attempt: u32 = 0;
    // Waiting for the first credential at startup is neither a connect error
    // nor a reconnect: those count only once a connection has been made.
    let mut ever_connected = false;
    // Without a hold, a request still waits for a dial in progress, bounded
    // by the reply timeout, as a reply would be.
    let bound = if hold.is_zero() {
        opts.reply_timeout
    } else {
        hold
    };
    let mut held = Holding {
        q: HoldQueue::new(bound, HOLD_MAX_COMMANDS, HOLD_MAX_BYTES),
        hold,
        last: None,
        resent: 0,
        opts: &opts,
    };
    let mut pending: VecDeque<Request> = VecDeque::new();
    let spare = std::sync::Mutex::new(None);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // A connection dialled ahead to where a MOVING push said the
        // endpoint went (make before break), else a new dial.
        let ahead = spare.lock().expect("not poisoned").take();
        let dial = async {
            match ahead {
                Some(c) => Ok(c),
                None => dial_unless_superseded(&connector, proto, superseded.as_deref()).await,
            }
        };
        let conn = tokio::select! {
            c = held.wait(&mut rx, dial) => c,
            _ = shutdown.cancelled() => break,
        };
        let Some(conn) = conn else { return };
        match conn {
            Ok(conn) => {
                // The pub/sub hub is subscribing again after the same drop:
                // what was held (PUBLISHes among it) waits for it, so that
                // no subscriber misses a message published after the gap.
                let gate = connector.resubscribe_gate().clone();
                if ever_connected && gate.is_closed() {
                    let waited = tokio::select! {
                        w = held.wait(&mut rx, gate.wait_open(RESUB_WAIT_MAX)) => w,
                        _ = shutdown.cancelled() => break,
                    };
                    let Some(waited) = waited else { return };
                    info!(kind = opts.kind, ?waited, "waited for the pub/sub hub to subscribe again before sending held commands");
                }
                if attempt > 0 && ever_connected {
                    opts.metrics.upstream_reconnects.inc();
                    info!(
                        kind = opts.kind,
                        ?proto,
                        held = held.q.len(),
                        "upstream connection re-established"
                    );
                }
                let now = Instant::now();
                for (waited, r) in held.q.drain(now) {
                    if ever_connected {
                        opts.metrics.upstream_held.inc();
                        opts.metrics
                            .upstream_hold_seconds
                            .observe(waited.as_secs_f64());
                    }
                    pending.push_back(r);
                }
                // How many at the front of `pending` were sent again already.
                let mut resent = std::mem::take(&mut held.resent);
                attempt = 0;
                ever_connected = true;
                held.last = None;
                let healthy = health.healthy_upstream();
                let up = opts.metrics.upstream(opts.kind, "up");
                up.inc();
                // RESP3: ask for maintenance pushes, first thing, and follow them.
                let (push, pushes_rx) = match proto {
                    Proto::Resp3 => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (Some(super::PushSink::new(tx)), Some(rx))
                    }
                    Proto::Resp2 => (None, None),
                };
                let opt_in = pushes_rx.is_some().then(|| {
                    let (req, check) = super::pushes::opt_in();
                    pending.push_front(req);
                    resent += 1;
                    check
                });
                let side = super::SharedSide {
                    maint: maint.as_ref().map(|m| m.subscribe()),
                    push,
                };
                let follow = async {
                    if let Some(rx) = pushes_rx {
                        let handover = super::pushes::Handover {
                            connector: &connector,
                            proto,
                            spare: &spare,
                        };
                        super::pushes::follow(
                            rx,
                            &mut dedup,
                            maint.as_deref(),
                            &opts.metrics,
                            Some(handover),
                        )
                        .await;
                    }
                    std::future::pending::<()>().await
                };
                let check = async {
                    if let Some(c) = opt_in {
                        c.await;
                    }
                    std::future::pending::<()>().await
                };
                let res = tokio::select! {
                    r = run_shared(conn, &mut rx, &opts, &mut pending, &mut resent, side) => r,
                    _ = follow => Ok(()),
                    _ = check => Ok(()),
                    _ = shutdown.cancelled() => Ok(()),
                };
                up.dec();
                drop(healthy);
                match res {
                    // Retired after a maintenance notice, nothing in flight:
                    // the next connection takes over what waits.
                    Ok(()) if !rx.is_closed() && !shutdown.is_cancelled() => {
                        info!(
                            kind = opts.kind,
                            "upstream connection replaced after a maintenance notice"
                        );
                        let now = Instant::now();
                        for r in pending.drain(..) {
                            held.push(now, r);
                        }
                        attempt = 1;
                    }
                    Ok(()) => break,
                    Err(e) => {
                        opts.metrics.error(crate::metrics::ErrorKind::UpstreamLost);
                        warn!(kind = opts.kind, error = %e, unsent = pending.len(), "upstream connection failed; reconnecting");
                        // Taken but never written: they wait for the next one.
                        let now = Instant::now();
                        for r in pending.drain(..) {
                            held.push(now, r);
                        }
                        held.resent = resent;
                        held.last = Some(e);
                    }
                }
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let no_credential = matches!(e, UpstreamError::NoCredential { .. });
                if matches!(e, UpstreamError::Closed { .. }) {
                    // A dial given up (a dial itself never says `Closed`):
                    // what waits goes back to its sender (hold 0 on a
                    // cluster node), who places it anew.
                    opts.metrics.cluster_dials_abandoned.inc();
                    info!(kind = opts.kind, addr = %opts.addr, held = held.q.len(), "dial given up: the cluster's slot map no longer names this node a primary");
                } else if no_credential && !ever_connected {
                    info!(
                        kind = opts.kind,
                        "upstream connection waits for the first credential"
                    );
                } else {
                    opts.metrics
                        .error(crate::metrics::ErrorKind::UpstreamConnect);
                    warn!(kind = opts.kind, error = %e, attempt, held = held.q.len(), "cannot open upstream connection");
                }
                // Held only once the slot has had a connection: a proxy that
                // never reached its upstream (a wrong port or name) says so
                // at once rather than after the hold.
                if !hold.is_zero() && ever_connected && hold_through(&e) {
                    // Dial again soon, the held requests waiting meanwhile.
                    let until = Instant::now() + backoff(attempt).min(HOLD_RETRY);
                    held.last = Some(e);
                    let slept = tokio::select! {
                        s = held.wait(&mut rx, tokio::time::sleep_until(until)) => s,
                        _ = shutdown.cancelled() => break,
                    };
                    if slept.is_none() {
                        return;
                    }
                    continue;
                }
                // Fail what is waiting now, and whatever arrives during the backoff.
                for (_, r) in held.q.drain(Instant::now()) {
                    fail(r.reply, e.clone());
                }
                held.resent = 0;
                // Without a credential there is nothing to retry until the
                // token source publishes one: wait for it instead of a timer.
                let until = Instant::now()
                    + if no_credential {
                        Duration::from_secs(3600)
                    } else {
                        backoff(attempt)
                    };
                let mut tokens = opts.tokens.clone();
                tokens.mark_unchanged();
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Some(r) => fail(r.reply, e.clone()),
                            None => return,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                        Ok(()) = tokens.changed(), if no_credential => break,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
    for r in pending.drain(..) {
        fail(r.reply, UpstreamError::Shutdown);
    }
    for (_, r) in held.q.drain(Instant::now()) {
        fail(r.reply, UpstreamError::Shutdown);
    }
}

/// How a shared slot rides through maintenance.
pub struct Slot {
    /// `upstream.hold` (0: no hold).
    pub hold: Duration,
    /// The maintenance signal its connections follow (and that a `MOVING`
    /// push sets).
    pub maint: Option<Arc<watch::Sender<Maint>>>,
    /// A cluster node's slot: whether the cluster still wants its dials.
    pub superseded: Option<Arc<dyn Superseded>>,
}

/// Asked while a cluster node's shared connection is being dialled: a
/// frozen node (SIGSTOP, a hung host) accepts TCP and never answers the
/// TLS handshake, so its dial would run to `upstream.connect_timeout` while
/// its replica is promoted; the commands waiting for it, never written,
/// may go to the new owner instead.
pub trait Superseded: Send + Sync {
    /// Polled every 50 ms of a dial (`polls` counts them, from 1); true
    /// gives the dial up. May ask for a new slot map.
    fn superseded(&self, polls: u32) -> bool;
}

/// How often a dial asks [`Superseded::superseded`].
const SUPERSEDED_POLL: Duration = Duration::from_millis(50);

/// Dial, given up (a `Closed` error: nothing was written) once
/// `superseded` says the node no longer serves the commands waiting for it.
/// Counted in `cluster_dials_abandoned`.
///
/// # Cancel safety
/// The dial dropped drops its half-made connection; nothing else is held.
async fn dial_unless_superseded(
    connector: &crate::upstream::tls::Connector,
    proto: Proto,
    superseded: Option<&dyn Superseded>,
) -> Result<super::Authed, UpstreamError> {
    let Some(check) = superseded else {
        return connector.connect(proto).await;
    };
    let given_up = async {
        for polls in 1u32.. {
            tokio::time::sleep(SUPERSEDED_POLL).await;
            if check.superseded(polls) {
                return;
            }
        }
    };
    tokio::select! {
        r = connector.connect(proto) => r,
        () = given_up => Err(UpstreamError::Closed {
            addr: connector.addr().to_string(),
            reason: "its dial was given up: the cluster's slot map names another primary for its slots".into(),
        }),
    }
}

/// The requests of a slot with no connection, and what their errors say.
struct Holding<'a> {
    q: HoldQueue<Request>,
    /// `upstream.hold` (0: none; the queue is then bounded by the reply timeout).
    hold: Duration,
    /// Why the last connection or dial failed, for the errors of those that wait too long.
    last: Option<UpstreamError>,
    /// How many at the front of the queue were sent again already (see
    /// [`run_shared`]): the oldest, so the first to expire.
    resent: usize,
    opts: &'a ConnOpts,
}

impl Holding<'_> {
    fn push(&mut self, now: Instant, r: Request) {
        let size = r.bytes.len();
        if let Err(r) = self.q.push(now, size, r) {
            self.drop_one(r, Dropped::Full);
        }
    }

    fn drop_one(&self, r: Request, why: Dropped) {
        self.opts
            .metrics
            .upstream_hold_dropped
            .get_or_create(&vec![("reason", why.label())])
            .inc();
        let addr = &self.opts.addr;
        let e = match why {
            Dropped::Full => maintenance::full_error(addr, self.last.as_ref()),
            Dropped::Expired if self.hold.is_zero() => UpstreamError::Timeout {
                addr: addr.clone(),
                secs: self.opts.reply_timeout.as_secs_f64(),
                during: "the upstream connection was being re-established",
            },
            Dropped::Expired => maintenance::expired_error(addr, self.hold, self.last.as_ref()),
        };
        fail(r.reply, e);
    }

    /// Run `f` (a dial, or a backoff) while new requests join the queue and
    /// those held too long fail. `None` when the owner let go of the slot
    /// and nothing is held.
    ///
    /// # Cancel safety
    /// Requests already taken from `rx` stay in the queue.
    async fn wait<F: Future>(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        f: F,
    ) -> Option<F::Output> {
        let mut f = pin!(f);
        let mut rx_open = true;
        let timer = tokio::time::sleep(Duration::ZERO);
        let mut timer = pin!(timer);
        loop {
            let deadline = self.q.next_deadline();
            if let Some(d) = deadline {
                timer.as_mut().reset(d);
            }
            tokio::select! {
                out = &mut f => {
                    if !rx_open && self.q.is_empty() {
                        return None;
                    }
                    return Some(out);
                }
                r = rx.recv(), if rx_open => match r {
                    Some(r) => self.push(Instant::now(), r),
                    None => {
                        rx_open = false;
                        if self.q.is_empty() {
                            return None;
                        }
                    }
                },
                _ = &mut timer, if deadline.is_some() => {
                    let gone = self.q.expire(Instant::now());
                    self.resent = self.resent.saturating_sub(gone.len());
                    for r in gone {
                        self.drop_one(r, Dropped::Expired);
                    }
                    if !rx_open && self.q.is_empty() {
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Says "superseded" once the test says so.
    struct Flag(Arc<AtomicBool>);

    impl Superseded for Flag {
        fn superseded(&self, _polls: u32) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// A frozen node: TCP accepted (by the kernel), no TLS answer ever.
    /// A request queued behind the dial fails as not written (`Closed`)
    /// once the cluster names another primary, long before the dial's own
    /// 60 s timeout, and the dial given up is counted.
    #[tokio::test]
    async fn a_dial_to_a_silent_node_is_given_up_when_superseded() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut cfg = crate::config::Config::default();
        cfg.upstream.host = "127.0.0.1".into();
        cfg.upstream.port = port;
        cfg.upstream.server_name = Some("cache.example".into());
        cfg.upstream.connect_timeout = Duration::from_secs(60);
        let state = crate::auth::TokenState {
            current: Some(Arc::new(crate::auth::Credential {
                username: "u".into(),
                password: crate::secret::Secret::new("p"),
                expires_at: None,
            })),
            generation: 1,
            ..Default::default()
        };
        let (_keep, tokens) = watch::channel(state);
        let connector = Arc::new(
            crate::upstream::tls::Connector::new(&cfg, tokens.clone())
                .unwrap()
                .for_node("127.0.0.1", port),
        );
        let metrics = Arc::new(Metrics::new());
        let opts = ConnOpts {
            addr: format!("127.0.0.1:{port}"),
            reply_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(60),
            tokens: tokens.clone(),
            metrics: metrics.clone(),
            kind: "shared",
        };
        let flag = Arc::new(AtomicBool::new(false));
        let slot = Slot {
            hold: Duration::ZERO,
            maint: None,
            superseded: Some(Arc::new(Flag(flag.clone()))),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = mpsc::channel(8);
        let health = Arc::new(crate::admin::Health::new(tokens));
        tokio::spawn(supervise_shared(
            connector,
            Proto::Resp2,
            rx,
            opts,
            slot,
            health,
            shutdown.clone(),
        ));
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(Request {
            bytes: crate::resp::command(&[b"GET", b"k"]),
            count: 1,
            reply: Some(reply),
            in_multi_after: false,
            pushes: 0,
        })
        .await
        .unwrap();
        // The dial goes on while the node is still the cluster's.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.cluster_dials_abandoned.get(), 0);
        flag.store(true, Ordering::Relaxed);
        let got = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("answered before the dial's own timeout")
            .expect("a reply");
        shutdown.cancel();
        drop(listener);
        assert!(matches!(got, Err(UpstreamError::Closed { .. })), "{got:?}");
        assert!(crate::upstream::cluster::node_unreachable(
            got.as_ref().unwrap_err()
        ));
        assert!(metrics.cluster_dials_abandoned.get() >= 1);
    }
}
