//! The `AzureRedisEvents` listener: one RESP3 connection of its own,
//! subscribed to Azure Cache for Redis's maintenance channel, that turns
//! each notice into a [`Maint`] signal for the pool's shared connections
//! (decisions in [`maintenance::notices`]; this is the thin driver). It
//! re-subscribes after every reconnect (a failover closes it too).

use super::{backoff, run, ConnOpts, Maint, PushSink, Request};
use crate::resp::{self, Proto};
use crate::upstream::maintenance::notices::{self, Action, Notice};
use crate::upstream::maintenance::HOLD_RETRY;
use crate::upstream::tls::Connector;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Listen until shutdown; `maint` is what the shared connections follow.
pub async fn listen(
    connector: Arc<Connector>,
    mut opts: ConnOpts,
    maint: Arc<watch::Sender<Maint>>,
    shutdown: CancellationToken,
) {
    opts.kind = "events";
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            tokio::select! {
                // Soon: the notices after a failover are published as soon
                // as the endpoint reaches the new primary.
                _ = tokio::time::sleep(backoff(attempt).min(HOLD_RETRY)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let conn = tokio::select! {
            c = connector.connect(Proto::Resp3) => c,
            _ = shutdown.cancelled() => return,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                attempt = attempt.saturating_add(1);
                tracing::debug!(error = %e, "AzureRedisEvents listener cannot connect yet");
                continue;
            }
        };
        let (_tx, mut rx) = mpsc::channel::<Request>(4);
        let (push_tx, mut push_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let mut pending = VecDeque::from([Request {
            bytes: resp::command(&[b"SUBSCRIBE", notices::CHANNEL.as_bytes()]),
            count: 0,
            reply: Some(reply_tx),
            in_multi_after: false,
            pushes: 1,
        }]);
        let run = run(
            conn,
            &mut rx,
            &opts,
            Some(PushSink::new(push_tx)),
            &mut pending,
            None,
        );
        let follow = async {
            match reply_rx.await {
                Ok(Ok(b)) if b.is_empty() => {
                    tracing::debug!("subscribed to AzureRedisEvents");
                }
                Ok(Ok(b)) => {
                    // Refused (an ACL without the channel): say so once, stop.
                    warn!(reply = %String::from_utf8_lossy(&b).trim_end(), "cannot subscribe to AzureRedisEvents; Azure maintenance notices will not be followed");
                    return false;
                }
                _ => return true,
            }
            while let Some(frame) = push_rx.recv().await {
                if let Some(n) = message(&frame).and_then(|m| notices::parse(&m)) {
                    act(&n, &maint, &opts);
                }
            }
            true
        };
        let again = tokio::select! {
            r = run => {
                if let Err(e) = r {
                    info!(error = %e, "AzureRedisEvents listener connection lost; reconnecting");
                }
                true
            }
            again = follow => again,
            _ = shutdown.cancelled() => return,
        };
        if !again {
            return;
        }
        attempt = 1;
    }
}

/// The payload of a `message` push on the channel.
fn message(frame: &[u8]) -> Option<Bytes> {
    use redis_protocol::resp3::types::OwnedFrame as F;
    let F::Push { data, .. } = resp::decode_reply(frame)? else {
        return None;
    };
    match data.as_slice() {
        [F::BlobString { data: kind, .. }, F::BlobString { data: chan, .. }, F::BlobString { data: payload, .. }]
            if kind.as_slice() == b"message" && chan.as_slice() == notices::CHANNEL.as_bytes() =>
        {
            Some(Bytes::from(payload.clone()))
        }
        _ => None,
    }
}

/// Do what the notice asks: log it, count it, signal the connections.
fn act(n: &Notice, maint: &Arc<watch::Sender<Maint>>, opts: &ConnOpts) {
    let now = SystemTime::now();
    let action = notices::decide(n, now);
    info!(
        notice = n.kind.label(),
        action = action.label(),
        is_replica = n.is_replica,
        start_in_ms = n
            .start
            .map(|s| s.duration_since(now).map_or(0, |d| d.as_millis() as i64)),
        "Azure maintenance notice"
    );
    opts.metrics
        .maintenance_notices
        .get_or_create(&vec![
            ("notice", n.kind.label()),
            ("action", action.label()),
        ])
        .inc();
    let at = |t: SystemTime| Instant::now() + t.duration_since(now).unwrap_or(Duration::ZERO);
    match action {
        Action::Note => {}
        Action::Drain { from, until } => {
            // Names this drain: a later one (or a resume) supersedes its end.
            let noticed = Instant::now();
            let (from, until) = (at(from), at(until));
            let maint = maint.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(from).await;
                maint.send_modify(|m| m.drain_before = Some(noticed));
                tokio::time::sleep_until(until).await;
                maint.send_if_modified(|m| {
                    let mine = m.drain_before == Some(noticed);
                    if mine {
                        m.drain_before = None;
                    }
                    mine
                });
            });
        }
        Action::Resume => {
            maint.send_if_modified(|m| m.drain_before.take().is_some());
        }
        Action::Refresh => {
            let now = Instant::now();
            maint.send_modify(|m| {
                m.drain_before = None;
                m.retire_before = Some(now);
            });
        }
    }
}
