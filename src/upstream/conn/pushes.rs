//! A shared RESP3 connection's maintenance pushes (Redis Enterprise, Azure
//! Managed Redis when it sends them): the opt-in request made at every new
//! connection, and the thin driver that reads the pushes and does what
//! [`maintenance::pushes`] decides.

use super::{Maint, Request};
use crate::metrics::Metrics;
use crate::resp;
use crate::upstream::maintenance::pushes::{self, Action, Dedup};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::info;

/// Set once a server refused the opt-in: said once per process.
static REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);

/// `CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type external-fqdn`, to go
/// first on a new connection, and a future that logs a refusal (an error
/// reply: the server does not send them; Redis OSS, Azure today) once.
pub fn opt_in() -> (Request, impl std::future::Future<Output = ()>) {
    let mut args: Vec<&[u8]> = pushes::OPT_IN.to_vec();
    args.push(pushes::ENDPOINT_TYPE);
    let (tx, rx) = oneshot::channel();
    let req = Request {
        bytes: resp::command(&args),
        count: 1,
        reply: Some(tx),
        in_multi_after: false,
        pushes: 0,
    };
    let check = async move {
        if let Ok(Ok(reply)) = rx.await {
            if let Some(e) = resp::error_text(&reply) {
                if !REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
                    info!(reply = %e, "the server does not send RESP3 maintenance pushes (CLIENT MAINT_NOTIFICATIONS refused); failovers are met by the hold and the AzureRedisEvents notices instead");
                }
            }
        }
    };
    (req, check)
}

/// Read a connection's push frames until it ends, acting on the
/// maintenance ones; `dedup` outlives the connection (sequence numbers
/// repeat after reconnects).
pub async fn follow(
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    dedup: &mut Dedup,
    maint: Option<&watch::Sender<Maint>>,
    metrics: &Metrics,
) {
    while let Some(frame) = rx.recv().await {
        let Some(words) = push_words(&frame) else {
            continue;
        };
        let refs: Vec<&[u8]> = words.iter().map(|w| &w[..]).collect();
        let Some(p) = pushes::parse(&refs) else {
            continue;
        };
        let fresh = dedup.first(&p);
        let action = pushes::decide(&p);
        let label = match (&action, fresh) {
            (_, false) => "repeat",
            (Action::HandOver { .. }, _) => "hand-over",
            (Action::Relax { .. }, _) => "relax",
            (Action::Restore, _) => "restore",
            (Action::RefreshSlots, _) => "noted-refresh-slots",
        };
        info!(
            push = p.label(),
            seq = p.seq(),
            action = label,
            "maintenance push"
        );
        metrics
            .maintenance_notices
            .get_or_create(&vec![("notice", p.label()), ("action", label)])
            .inc();
        if !fresh {
            continue;
        }
        let Some(m) = maint else { continue };
        let now = Instant::now();
        match action {
            // The endpoint moves: the connections made before now finish
            // their replies and end; their slots dial the endpoint again.
            Action::HandOver { .. } => m.send_modify(|s| s.retire_before = Some(now)),
            Action::Relax { ttl } => m.send_modify(|s| s.relax_until = Some(now + ttl)),
            Action::Restore => {
                m.send_if_modified(|s| s.relax_until.take().is_some());
            }
            // The cluster layer's: its map is refreshed on the next MOVED.
            Action::RefreshSlots => {}
        }
    }
}

/// The words of a push frame (bulk or simple strings, numbers as text).
fn push_words(frame: &[u8]) -> Option<Vec<Vec<u8>>> {
    use redis_protocol::resp3::types::OwnedFrame as F;
    let F::Push { data, .. } = resp::decode_reply(frame)? else {
        return None;
    };
    data.iter()
        .map(|f| match f {
            F::BlobString { data, .. } | F::SimpleString { data, .. } => Some(data.clone()),
            F::Number { data, .. } => Some(data.to_string().into_bytes()),
            F::Null => Some(b"null".to_vec()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moving(seq: u64) -> Bytes {
        Bytes::from(format!(
            ">4\r\n$6\r\nMOVING\r\n:{seq}\r\n:15\r\n$20\r\nnode-2.example:10000\r\n"
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn moving_retires_the_connections_once_and_repeats_are_dropped() {
        let (tx, rx) = mpsc::unbounded_channel();
        let maint = watch::Sender::new(Maint::default());
        let metrics = Metrics::new();
        let mut dedup = Dedup::default();
        tx.send(moving(7)).unwrap();
        tx.send(Bytes::from_static(
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n",
        ))
        .unwrap();
        tx.send(Bytes::from_static(b">2\r\n$11\r\nFAILED_OVER\r\n:8\r\n"))
            .unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics).await;
        let first = maint.borrow().retire_before;
        assert!(first.is_some());
        // The same MOVING again (after a reconnect): not acted on twice.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(moving(7)).unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics).await;
        assert_eq!(maint.borrow().retire_before, first);
        let text = metrics.render();
        assert!(
            text.contains("notice=\"MOVING\",action=\"hand-over\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("notice=\"MOVING\",action=\"repeat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("notice=\"FAILED_OVER\",action=\"restore\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failing_over_relaxes_the_reply_timeout_until_failed_over() {
        let (tx, rx) = mpsc::unbounded_channel();
        let maint = watch::Sender::new(Maint::default());
        let metrics = Metrics::new();
        let mut dedup = Dedup::default();
        tx.send(Bytes::from_static(
            b">3\r\n$12\r\nFAILING_OVER\r\n:3\r\n:20\r\n",
        ))
        .unwrap();
        drop(tx);
        let start = Instant::now();
        follow(rx, &mut dedup, Some(&maint), &metrics).await;
        assert_eq!(
            maint.borrow().relax_until,
            Some(start + std::time::Duration::from_secs(20))
        );
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b">2\r\n$11\r\nFAILED_OVER\r\n:4\r\n"))
            .unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics).await;
        assert_eq!(maint.borrow().relax_until, None);
    }

    #[tokio::test]
    async fn the_opt_in_is_the_command_client_libraries_send() {
        let (req, check) = opt_in();
        assert_eq!(
            &req.bytes[..],
            &resp::command(&[
                b"CLIENT",
                b"MAINT_NOTIFICATIONS",
                b"ON",
                b"moving-endpoint-type",
                b"external-fqdn"
            ])[..]
        );
        assert_eq!(req.count, 1);
        // An error reply is fine: logged (once), nothing else.
        let _ = req
            .reply
            .unwrap()
            .send(Ok(Bytes::from_static(b"-ERR unknown subcommand\r\n")));
        check.await;
    }
}
