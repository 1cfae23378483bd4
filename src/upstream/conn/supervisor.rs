//! The supervisor of a shared connection slot: dial (its waiting requests
//! bounded by the reply timeout), run the connection ([`super::run`]), and on
//! failure dial again with backoff, carrying the requests not yet written.

use super::{backoff, fail, run, ConnOpts, Request};
use crate::resp::Proto;
use crate::upstream::tls::Authed;
use crate::upstream::UpstreamError;
use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// Keep one shared connection slot alive: connect (with backoff), run, and on
/// failure reconnect, carrying requests not yet written to the new connection.
/// Requests that arrive while no connection can be made fail at once with the
/// reason, so no client hangs.
pub async fn supervise_shared(
    connector: Arc<crate::upstream::tls::Connector>,
    proto: Proto,
    mut rx: mpsc::Receiver<Request>,
    opts: ConnOpts,
    health: Arc<crate::admin::Health>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut attempt: u32 = 0;
    // Waiting for the first credential at startup is neither a connect error
    // nor a reconnect: those count only once a connection has been made.
    let mut ever_connected = false;
    let mut pending: VecDeque<Request> = VecDeque::new();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let conn = tokio::select! {
            c = connect_within_reply_timeout(&connector, proto, &mut rx, &mut pending, &opts) => c,
            _ = shutdown.cancelled() => break,
        };
        let Some(conn) = conn else { return };
        match conn {
            Ok(conn) => {
                if attempt > 0 && ever_connected {
                    opts.metrics.upstream_reconnects.inc();
                    info!(
                        kind = opts.kind,
                        ?proto,
                        "upstream connection re-established"
                    );
                }
                attempt = 0;
                ever_connected = true;
                let healthy = health.healthy_upstream();
                let up = opts.metrics.upstream(opts.kind, "up");
                up.inc();
                let res = tokio::select! {
                    r = run(conn, &mut rx, &opts, None, &mut pending, None) => r,
                    _ = shutdown.cancelled() => Ok(()),
                };
                up.dec();
                drop(healthy);
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        opts.metrics.error(crate::metrics::ErrorKind::UpstreamLost);
                        warn!(kind = opts.kind, error = %e, "upstream connection failed; reconnecting");
                    }
                }
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let no_credential = matches!(e, UpstreamError::NoCredential { .. });
                if no_credential && !ever_connected {
                    info!(
                        kind = opts.kind,
                        "upstream connection waits for the first credential"
                    );
                } else {
                    opts.metrics
                        .error(crate::metrics::ErrorKind::UpstreamConnect);
                    warn!(kind = opts.kind, error = %e, attempt, "cannot open upstream connection");
                }
                // Fail what is waiting now, and whatever arrives during the backoff.
                for r in pending.drain(..) {
                    fail(r.reply, e.clone());
                }
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
}

/// Dial while requests wait: each waits at most `upstream.reply_timeout`
/// (counted from when the dial began for those carried over from the lost
/// connection), then fails with a timeout, so a server that accepts but does
/// not answer the handshake holds no client longer than a reply would.
/// `None` when the owner let go of the slot.
async fn connect_within_reply_timeout(
    connector: &crate::upstream::tls::Connector,
    proto: Proto,
    rx: &mut mpsc::Receiver<Request>,
    pending: &mut VecDeque<Request>,
    opts: &ConnOpts,
) -> Option<Result<Authed, UpstreamError>> {
    let start = Instant::now();
    let mut waiting: VecDeque<(Instant, Request)> = pending
        .drain(..)
        .map(|r| (start + opts.reply_timeout, r))
        .collect();
    let mut connect = pin!(connector.connect(proto));
    let mut rx_open = true;
    let timer = tokio::time::sleep(opts.reply_timeout);
    let mut timer = pin!(timer);
    let res = loop {
        if let Some((deadline, _)) = waiting.front() {
            timer.as_mut().reset(*deadline);
        }
        tokio::select! {
            c = &mut connect => break Some(c),
            r = rx.recv(), if rx_open => match r {
                Some(r) => waiting.push_back((Instant::now() + opts.reply_timeout, r)),
                None => rx_open = false,
            },
            _ = &mut timer, if !waiting.is_empty() => {
                let now = Instant::now();
                while waiting.front().is_some_and(|(d, _)| *d <= now) {
                    if let Some((_, r)) = waiting.pop_front() {
                        fail(r.reply, UpstreamError::Timeout {
                            addr: opts.addr.clone(),
                            secs: opts.reply_timeout.as_secs_f64(),
                            during: "the upstream connection was being re-established",
                        });
                    }
                }
            }
        }
    };
    pending.extend(waiting.into_iter().map(|(_, r)| r));
    if !rx_open && pending.is_empty() {
        return None;
    }
    res
}
