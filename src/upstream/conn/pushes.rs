//! A shared RESP3 connection's maintenance pushes (Redis Enterprise, Azure
//! Managed Redis when it sends them): the opt-in request made at every new
//! connection, and the thin driver that reads the pushes and does what
//! [`maintenance::pushes`] decides.

use super::{Maint, Request};
use crate::metrics::Metrics;
use crate::resp;
use crate::resp::Proto;
use crate::upstream::maintenance::moving::{self, Moved};
use crate::upstream::maintenance::pushes::{self, Action, Dedup};
use crate::upstream::tls::{Authed, Connector};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

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
    handover: Option<Handover<'_>>,
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
            Action::HandOver { to, within } => {
                let named = to.as_deref().and_then(moving::parse_endpoint);
                match (named, &handover) {
                    (Some((host, port)), Some(h)) => h.move_to(m, host, port, within).await,
                    (None, _) if to.is_some() => {
                        warn!("MOVING named an endpoint that is not host:port; reconnecting to the configured one");
                        m.send_modify(|s| s.retire_before = Some(now));
                    }
                    _ => m.send_modify(|s| s.retire_before = Some(now)),
                }
            }
            Action::Relax { ttl } => m.send_modify(|s| s.relax_until = Some(now + ttl)),
            Action::Restore => {
                m.send_if_modified(|s| s.relax_until.take().is_some());
            }
            // The cluster layer's: its map is refreshed on the next MOVED.
            Action::RefreshSlots => {}
        }
    }
}

/// What a slot's push follower needs to follow a `MOVING` to a named
/// endpoint, make before break.
pub struct Handover<'a> {
    pub connector: &'a Connector,
    pub proto: Proto,
    /// The connection dialled ahead to the new endpoint: the slot takes it
    /// instead of dialling once its current connection has ended.
    pub spare: &'a Mutex<Option<Authed>>,
}

impl Handover<'_> {
    /// New connections go to `host:port` for `within`; one is dialled (and
    /// authenticated) there first, and only then are the current
    /// connections retired: they take no new command, finish their replies
    /// and end, and what waits goes out in order on the new one. If the new
    /// endpoint cannot be reached the current connection stays until it
    /// closes (redials then go to the new endpoint until `within` ends).
    async fn move_to(&self, m: &watch::Sender<Maint>, host: String, port: u16, within: Duration) {
        self.connector.set_moved(Moved {
            host: host.clone(),
            port,
            until: Instant::now() + within,
        });
        match self.connector.connect(self.proto).await {
            Ok(c) => {
                *self.spare.lock().expect("not poisoned") = Some(c);
                m.send_modify(|s| s.retire_before = Some(Instant::now()));
                info!(%host, port, "MOVING: connected to the named endpoint; handing over");
            }
            Err(e) => {
                warn!(%host, port, error = %e, "MOVING: cannot reach the named endpoint yet; the current connection stays until it closes");
            }
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
        follow(rx, &mut dedup, Some(&maint), &metrics, None).await;
        let first = maint.borrow().retire_before;
        assert!(first.is_some());
        // The same MOVING again (after a reconnect): not acted on twice.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(moving(7)).unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics, None).await;
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
        follow(rx, &mut dedup, Some(&maint), &metrics, None).await;
        assert_eq!(
            maint.borrow().relax_until,
            Some(start + std::time::Duration::from_secs(20))
        );
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b">2\r\n$11\r\nFAILED_OVER\r\n:4\r\n"))
            .unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics, None).await;
        assert_eq!(maint.borrow().relax_until, None);
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn connector(port: u16) -> Connector {
        let mut cfg = crate::config::Config::default();
        cfg.upstream.host = "127.0.0.1".into();
        cfg.upstream.port = port;
        cfg.upstream.server_name = Some("cache.example".into());
        let state = crate::auth::TokenState {
            current: Some(std::sync::Arc::new(crate::auth::Credential {
                username: "u".into(),
                password: crate::secret::Secret::new("p"),
                expires_at: None,
            })),
            generation: 1,
            ..Default::default()
        };
        let (_tx, tokens) = watch::channel(state);
        Connector::new(&cfg, tokens).unwrap()
    }

    fn moving_to(seq: u64, endpoint: &str) -> Bytes {
        Bytes::from(format!(
            ">4\r\n$6\r\nMOVING\r\n:{seq}\r\n:15\r\n${}\r\n{endpoint}\r\n",
            endpoint.len()
        ))
    }

    /// MOVING to a named endpoint not reachable yet: nothing is retired
    /// (break only after make), and new dials go to the named endpoint, not
    /// the configured one, until the ttl.
    #[tokio::test]
    async fn moving_dials_the_named_endpoint_before_retiring_anything() {
        let (configured, named) = (closed_port(), closed_port());
        let connector = connector(configured);
        let spare = Mutex::new(None);
        let maint = watch::Sender::new(Maint::default());
        let metrics = Metrics::new();
        let mut dedup = Dedup::default();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(moving_to(11, &format!("127.0.0.1:{named}")))
            .unwrap();
        drop(tx);
        let handover = Handover {
            connector: &connector,
            proto: Proto::Resp2,
            spare: &spare,
        };
        follow(rx, &mut dedup, Some(&maint), &metrics, Some(handover)).await;
        assert_eq!(maint.borrow().retire_before, None, "broke before making");
        assert!(spare.lock().unwrap().is_none());
        let Err(e) = connector.connect(Proto::Resp2).await else {
            panic!("nothing listens there");
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "127.0.0.1:{named} (moved from 127.0.0.1:{configured})"
            )),
            "{text}"
        );
        // A MOVING naming no usable endpoint: the configured one, at once.
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(moving_to(12, "not an endpoint")).unwrap();
        drop(tx);
        follow(rx, &mut dedup, Some(&maint), &metrics, None).await;
        assert!(maint.borrow().retire_before.is_some());
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
