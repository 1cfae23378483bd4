//! Blocking commands (BLPOP, BLMOVE, XREAD BLOCK, ...) on the client's pinned
//! connection: waited server-side in pieces that never outlive the token or
//! the reply timeout, re-issued until the client's own timeout, and cancelled
//! at once when the client leaves, so that a client that is gone never takes
//! an element.

use super::*;
use crate::upstream::maintenance::pinned::reissue_blocking;

impl Session {
    /// A blocking command must not outlive the credential its connection is
    /// authenticated with: Azure would close the connection at expiry. Cap the
    /// server-side timeout a little before that deadline, and at two thirds of
    /// `upstream.reply_timeout` (which would otherwise end a long wait as a
    /// lost reply); when the capped call times out while the client's own
    /// timeout has not, re-issue it (by then the connection has re-AUTHed). The
    /// client sees only its own result or its own timeout.
    pub(super) async fn blocking(&mut self, name: &[u8], frame: Bytes, args: &[Bytes]) {
        let Some(p) = &self.st.pinned else { return };
        let (mut tx, mut expiry) = (p.tx.clone(), p.expiry.clone());
        let pos = block_timeout_pos(name, args);
        let client_timeout = pos.and_then(|(i, ms)| {
            let v: f64 = std::str::from_utf8(args.get(i)?).ok()?.parse().ok()?;
            (v >= 0.0).then(|| std::time::Duration::from_secs_f64(if ms { v / 1000.0 } else { v }))
        });
        // A timeout the proxy cannot read: send as it is.
        let (Some((pos, ms)), Some(client_timeout)) = (pos, client_timeout) else {
            self.forward_pinned(frame, 1, Instant::now()).await;
            return;
        };
        self.settle(false).await;
        // Shown as blocked (CLIENT LIST flag b) and reachable by CLIENT
        // UNBLOCK while it waits.
        let server = self.st.pinned.as_ref().map(|p| p.server.clone());
        self.reg.entry.update(|s| s.blocked_on = server);
        let start = Instant::now();
        let forever = client_timeout.is_zero();
        let chunk = self.ctx.pool.max_block();
        let mut issued = 0u32;
        let reply = loop {
            let exp = expiry.load(Ordering::Acquire);
            let left_client = client_timeout.saturating_sub(start.elapsed());
            let cap = if exp == 0 {
                Some(chunk)
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let left = std::time::Duration::from_secs(exp).saturating_sub(now);
                // Leave a tenth of what is left (0.5 s to 10 s) for the re-AUTH.
                let margin = (left / 10).clamp(
                    std::time::Duration::from_millis(500),
                    std::time::Duration::from_secs(10),
                );
                Some(
                    left.saturating_sub(margin)
                        .max(std::time::Duration::from_millis(100))
                        .min(chunk),
                )
            };
            let wait = match (forever, cap) {
                (true, Some(c)) => c,
                (true, None) => std::time::Duration::ZERO,
                (false, Some(c)) => left_client.min(c),
                (false, None) => left_client,
            };
            let capped =
                !(forever && cap.is_none()) && (forever || cap.is_some_and(|c| c < left_client));
            let bytes = if issued == 0 && !capped {
                frame.clone()
            } else {
                let t = if ms {
                    format!("{}", wait.as_millis().max(1))
                } else {
                    format!("{:.3}", wait.as_secs_f64().max(0.001))
                };
                let refs: Vec<&[u8]> = args
                    .iter()
                    .enumerate()
                    .map(|(i, a)| if i == pos { t.as_bytes() } else { &a[..] })
                    .collect();
                resp::command(&refs)
            };
            issued += 1;
            let (reply_tx, reply_rx) = oneshot::channel();
            let req = Request {
                bytes,
                count: 1,
                reply: Some(reply_tx),
                in_multi_after: false,
                pushes: 0,
            };
            let sent = match tx.send(req).await {
                Ok(()) => self.wait_blocking(reply_rx).await,
                // Its connection ended before it was written: not run.
                Err(_) => Err(self.unsent(&tx)),
            };
            let reply = match sent {
                Ok(b) => b,
                Err(e) => {
                    // Issue 18: the connection dropped (failover, blip)
                    // before any reply, or ended before it was written: wait
                    // again on a new one, for what is left of the client's
                    // timeout (at least 1 ms, so the server answers a
                    // timeout in the command's own form).
                    let unblocked = self.reg.entry.unblock.load(Ordering::Acquire)
                        != crate::downstream::clients::UNBLOCK_NONE;
                    if !reissue_blocking(&e, self.client.gone, unblocked, self.st.needs_pin()) {
                        break e.to_reply();
                    }
                    debug!(error = %e, "blocked command's connection lost before its reply; waiting again on a new one");
                    self.st.pinned = None;
                    if let Err(e) = self.ensure_pinned().await {
                        break e.to_reply();
                    }
                    let Some(p) = &self.st.pinned else {
                        break connection_ended().to_reply();
                    };
                    (tx, expiry) = (p.tx.clone(), p.expiry.clone());
                    let server = p.server.clone();
                    self.reg.entry.update(|s| s.blocked_on = Some(server));
                    continue;
                }
            };
            let timed_out = matches!(&reply[..], b"*-1\r\n" | b"$-1\r\n" | b"_\r\n");
            let client_done = !forever && start.elapsed() >= client_timeout;
            // Unblocked by CLIENT UNBLOCK: the answer is final.
            let unblocked = self
                .reg
                .entry
                .unblock
                .swap(crate::downstream::clients::UNBLOCK_NONE, Ordering::AcqRel)
                != crate::downstream::clients::UNBLOCK_NONE;
            if unblocked || !(timed_out && capped && !client_done) {
                break reply;
            }
            debug!(
                issued,
                "blocking command capped at the token deadline; re-issuing"
            );
        };
        self.reg.entry.update(|s| s.blocked_on = None);
        self.reply(reply).await;
    }

    /// Await a blocking command's reply, also reading the client so that its
    /// leaving is noticed at once: then the pinned connection is closed, and
    /// the server drops the wait before it can hand this client (now gone) an
    /// element that another would have taken. What the client sends
    /// meanwhile is kept for the session to scan next.
    pub(super) async fn wait_blocking(
        &mut self,
        mut rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
    ) -> Result<Bytes, UpstreamError> {
        const INBOX_MAX: usize = 64 * 1024;
        let marked = self.st.pinned.as_ref().is_some_and(|p| p.marks);
        // Counted as owed while awaited: a mark taken between replies waits.
        self.client.marked += usize::from(marked);
        let client = &mut self.client;
        // CLIENT KILL of this client ends the wait as its leaving does.
        let mut killed = std::pin::pin!(self.kill.clone().cancelled_owned());
        let res = poll_fn(|cx| loop {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                let r = r.unwrap_or_else(|_| Err(connection_ended()));
                client.pushes_before(marked && r.is_ok(), cx);
                return Poll::Ready(r);
            }
            client.poll_out(cx);
            if killed.as_mut().poll(cx).is_ready() {
                client.gone = true;
            }
            if client.gone {
                return Poll::Ready(Err(UpstreamError::Lost {
                    reason: "client gone".into(),
                }));
            }
            if client.inbox.len() >= INBOX_MAX {
                return Poll::Pending;
            }
            client.inbox.reserve(512);
            match tokio_util::io::poll_read_buf(
                std::pin::Pin::new(&mut client.io),
                cx,
                &mut client.inbox,
            ) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    client.gone = true;
                }
                Poll::Ready(Ok(n)) => {
                    self.ctx.metrics.bytes_in.inc_by(n as u64);
                }
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
        if marked {
            self.client.unmark();
        }
        if self.client.gone {
            if let Some(p) = self.st.pinned.take() {
                debug!(peer = %self.peer, id = self.st.id, "client left while blocked; closing its upstream connection so the wait takes nothing");
                p.abort.cancel();
            }
        }
        res
    }
}

/// Where a blocking command's timeout sits: (argument index, in milliseconds).
fn block_timeout_pos(name: &[u8], args: &[Bytes]) -> Option<(usize, bool)> {
    match name {
        b"BLPOP" | b"BRPOP" | b"BZPOPMIN" | b"BZPOPMAX" | b"BLMOVE" | b"BRPOPLPUSH" => {
            (args.len() >= 3).then(|| (args.len() - 1, false))
        }
        b"BLMPOP" | b"BZMPOP" => (args.len() >= 4).then_some((1, false)),
        b"XREAD" | b"XREADGROUP" => command::xread_block_pos(args).map(|i| (i, true)),
        _ => None,
    }
}
