//! Keeps one of the hub's connections: connect (RESP3, with backoff), run it
//! with [`conn::run`] (re-AUTH with each token, keepalive), report it and
//! every push frame it reads to the hub, and connect again when it drops,
//! until the hub stops it or the proxy shuts down.

use super::{Event, Start};
use crate::admin::Health;
use crate::metrics::ErrorKind;
use crate::resp::Proto;
use crate::upstream::conn::{self, ConnOpts, PushSink};
use crate::upstream::tls::Connector;
use crate::upstream::UpstreamError;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Requests queued for one connection at most (one per channel being
/// subscribed or unsubscribed). Memory is taken only for what is queued.
const MAX_QUEUED_REQUESTS: usize = 1 << 20;

/// Where the home connection publishes its server-side id while it is up
/// (the target of `CLIENT TRACKING ... REDIRECT`).
pub type RedirectTarget = Arc<Mutex<Option<(u64, CancellationToken)>>>;

pub async fn supervise(
    connector: Arc<Connector>,
    opts: ConnOpts,
    start: Start,
    health: Arc<Health>,
    redirect: Option<RedirectTarget>,
) {
    let Start {
        conn: idx,
        events,
        stop,
        ..
    } = start;
    let mut attempt: u32 = 0;
    let mut epoch: u64 = 0;
    let mut had_one = false;
    loop {
        if stop.is_cancelled() || events.is_closed() {
            break;
        }
        let conn = tokio::select! {
            c = connector.connect(Proto::Resp3) => c,
            _ = stop.cancelled() => break,
        };
        match conn {
            Ok(conn) => {
                if had_one || attempt > 0 {
                    opts.metrics.upstream_reconnects.inc();
                    info!(kind = opts.kind, addr = %opts.addr, "pub/sub hub connection re-established");
                }
                attempt = 0;
                had_one = true;
                epoch += 1;
                let (req_tx, mut req_rx) = mpsc::channel(MAX_QUEUED_REQUESTS);
                let (push_tx, mut push_rx) = mpsc::unbounded_channel();
                if events
                    .send(Event::Connected {
                        conn: idx,
                        epoch,
                        requests: req_tx,
                    })
                    .is_err()
                {
                    break;
                }
                // Push frames go to the hub on the same channel as `Lost`,
                // so the hub has every frame before it hears the connection
                // went.
                let ev = events.clone();
                let forward = tokio::spawn(async move {
                    while let Some(frame) = push_rx.recv().await {
                        let push = Event::Push {
                            conn: idx,
                            epoch,
                            frame,
                        };
                        if ev.send(push).is_err() {
                            break;
                        }
                    }
                });
                let healthy = health.healthy_upstream();
                let up = opts.metrics.upstream(opts.kind, "up");
                up.inc();
                let gone = CancellationToken::new();
                if let Some(r) = &redirect {
                    *r.lock().expect("not poisoned") =
                        conn.server_id().map(|id| (id, gone.clone()));
                }
                let mut pending = std::collections::VecDeque::new();
                let res = tokio::select! {
                    r = conn::run(conn, &mut req_rx, &opts, Some(PushSink::new(push_tx)), &mut pending, None) => r,
                    _ = stop.cancelled() => Ok(()),
                };
                up.dec();
                drop(healthy);
                if let Some(r) = &redirect {
                    *r.lock().expect("not poisoned") = None;
                }
                gone.cancel();
                // Requests not written die with this connection: the hub makes
                // every subscription again on the next one.
                drop(req_rx);
                drop(pending);
                let _ = forward.await;
                let _ = events.send(Event::Lost { conn: idx, epoch });
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        opts.metrics.error(ErrorKind::UpstreamLost);
                        warn!(kind = opts.kind, addr = %opts.addr, error = %e, "pub/sub hub connection failed; reconnecting (messages published until it is back are lost)");
                    }
                }
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                opts.metrics.error(ErrorKind::UpstreamConnect);
                warn!(kind = opts.kind, addr = %opts.addr, error = %e, attempt, "cannot open the pub/sub hub connection");
                let no_credential = matches!(e, UpstreamError::NoCredential { .. });
                let _ = events.send(Event::ConnectFailed {
                    conn: idx,
                    error: e,
                });
                let wait = if no_credential {
                    Duration::from_secs(3600)
                } else if had_one {
                    // Issue 18: once it had a connection, dial as often as
                    // the shared connections do (they wait for its
                    // subscriptions before sending what they held).
                    conn::backoff(attempt).min(crate::upstream::maintenance::HOLD_RETRY)
                } else {
                    conn::backoff(attempt)
                };
                let mut tokens = opts.tokens.clone();
                tokens.mark_unchanged();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    Ok(()) = tokens.changed(), if no_credential => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
}
