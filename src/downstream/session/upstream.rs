//! The session's way to its upstream connections: the shared connection it
//! was given and the pinned one it takes for state, batches and single
//! commands sent on them, switching between them in order, and waiting for
//! what is owed.

use super::*;

impl Session {
    /// Write replies (and push frames) as they arrive until every reply due
    /// from upstream has arrived; with `all`, until everything owed is written
    /// too. Ends early if the client is gone.
    pub(super) async fn settle(&mut self, all: bool) {
        let client = &mut self.client;
        poll_fn(|cx| {
            client.poll_out(cx);
            let done = if all {
                client.owed.is_empty() && client.out.is_idle()
            } else {
                client.waits == 0
            };
            if done || client.gone {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Await one reply outside the ordered queue (nothing else is owed),
    /// writing push frames and pub/sub messages meanwhile. Gives up if the
    /// client is gone (or was dropped by the hub).
    pub(super) async fn wait_reply(
        &mut self,
        mut rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
    ) -> Result<Bytes, UpstreamError> {
        let marked = self.st.pinned.as_ref().is_some_and(|p| p.marks);
        // Counted as owed while awaited: a mark taken between replies waits.
        self.client.marked += usize::from(marked);
        let client = &mut self.client;
        let res = poll_fn(|cx| {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                let r = r.unwrap_or_else(|_| Err(connection_ended()));
                client.pushes_before(marked && r.is_ok(), cx);
                return Poll::Ready(r);
            }
            client.poll_out(cx);
            if client.gone {
                return Poll::Ready(Err(UpstreamError::Lost {
                    reason: "client gone".into(),
                }));
            }
            Poll::Pending
        })
        .await;
        if marked {
            self.client.unmark();
        }
        res
    }

    pub(super) async fn flush_batch(
        &mut self,
        buf: &mut BytesMut,
        batch_len: &mut usize,
        batch_count: &mut usize,
        arrived: Instant,
    ) {
        if *batch_count == 0 {
            return;
        }
        let bytes = buf.split_to(*batch_len).freeze();
        let count = *batch_count;
        *batch_len = 0;
        *batch_count = 0;
        for _ in 0..count {
            self.ctx.metrics.command(Route::Shared);
        }
        self.op = self.batch_op.take().unwrap_or(ops::OTHER);
        let handle = self.shared_handle();
        self.send_upstream(&handle.tx, bytes, count, count, false, arrived)
            .await;
        let fixes = std::mem::take(&mut self.census);
        self.census_reply(count, fixes);
    }

    /// The shared connection this client uses (one per client, so its
    /// commands run in the order sent), chosen on first use. On a cluster,
    /// a dispatcher of the client's own, which [`Client::poll_out`] runs.
    pub(super) fn shared_handle(&mut self) -> Handle {
        if let Some(h) = &self.st.shared {
            return h.clone();
        }
        let (h, plain, driver) = self.ctx.pool.shared_plain(self.st.proto);
        self.st.shared = Some(h.clone());
        self.st.shared_plain = plain;
        if let Some(d) = driver {
            // A cluster's dispatcher of this client's own, run from here
            // (one it replaces runs on until it answered what it was sent).
            self.client.drivers.push(d);
        }
        h
    }

    /// A transaction at the front of `buf` that can run on the client's
    /// shared connection as one write (see [`whole_tx`]): its bytes and
    /// commands, and its counting commands (by position among the queued
    /// ones: in EXEC's array).
    pub(super) fn whole_tx(&mut self, buf: &[u8]) -> Option<(usize, usize, census::Queued)> {
        if self.st.tx.watch_failed {
            // The transaction after a failed WATCH must abort.
            return None;
        }
        self.shared_handle();
        if !self.st.shared_plain {
            return None;
        }
        let limits = self.ctx.limits;
        let this = &*self;
        let mut census = Vec::new();
        let mut queued = 0;
        let block = whole_tx::whole_tx(buf, limits, |frame, cmd| match this.classify(frame, cmd) {
            Class::Shared => {
                if let Some(q) = this.counting(frame, cmd) {
                    census.push((queued, q));
                }
                queued += 1;
                whole_tx::Part::Plain
            }
            Class::Local(Local::TxEnd) => {
                let name = cmd.arg(frame, 0).unwrap_or_default();
                if name.eq_ignore_ascii_case(b"EXEC") || name.eq_ignore_ascii_case(b"DISCARD") {
                    whole_tx::Part::End
                } else {
                    whole_tx::Part::Other
                }
            }
            _ => whole_tx::Part::Other,
        });
        block.map(|(len, count)| (len, count, census))
    }

    /// Queue `bytes` on an upstream connection; `replies` replies are owed.
    pub(super) async fn send_upstream(
        &mut self,
        tx: &mpsc::Sender<Request>,
        bytes: Bytes,
        count: usize,
        replies: usize,
        in_multi_after: bool,
        since: Instant,
    ) {
        self.same_connection(tx).await;
        let (reply_tx, reply_rx) = oneshot::channel();
        let req = Request {
            bytes,
            count,
            reply: Some(reply_tx),
            in_multi_after,
            pushes: 0,
        };
        if let Err(mpsc::error::SendError(req)) = tx.send(req).await {
            if let Some(t) = req.reply {
                let _ = t.send(Err(self.unsent(tx)));
            }
        }
        // The pinned connection's tracking invalidations and MONITOR lines
        // come marked: those sent before this reply are written before it.
        let marked = self
            .st
            .pinned
            .as_ref()
            .is_some_and(|p| p.marks && p.tx.same_channel(tx));
        self.client.marked += usize::from(marked);
        self.client.owed.push_back(Out::Wait {
            rx: reply_rx,
            count: replies,
            since,
            silent: self.silent,
            own: None,
            op: self.op,
            marked,
        });
        self.client.owed_replies += replies;
        self.client.waits += 1;
    }

    /// The error of a command that found `tx`'s connection ended before it
    /// was written: it did not run ("shutting down" only when the proxy is).
    pub(super) fn unsent(&self, tx: &mpsc::Sender<Request>) -> UpstreamError {
        let pinned = self
            .st
            .pinned
            .as_ref()
            .is_some_and(|p| p.tx.same_channel(tx));
        self.ctx.pool.unsent(if pinned {
            "the client's dedicated connection had ended"
        } else {
            "the shared connection had ended"
        })
    }

    /// Before a command goes on another connection than the previous one
    /// (any switch: shared and pinned, a RESP2 and a RESP3 shared
    /// connection after HELLO or RESET, a cluster node's own), wait for the
    /// replies still due: commands run in the order the client sent them.
    /// (Only a weak reference to the last connection is kept: holding it
    /// must not keep a released pinned connection open.)
    pub(super) async fn same_connection(&mut self, tx: &mpsc::Sender<Request>) {
        let moved = self
            .st
            .last_conn
            .as_ref()
            .is_some_and(|last| !last.upgrade().is_some_and(|l| l.same_channel(tx)));
        if moved && self.client.waits > 0 {
            self.settle(false).await;
        }
        if !moved && self.st.last_conn.is_some() {
            return;
        }
        self.st.last_conn = Some(tx.downgrade());
    }

    /// Move this client's commands to `target`, waiting for the replies still
    /// due on the other connection so that execution order is kept.
    pub(super) async fn switch_to(&mut self, target: Target) {
        if self.st.last_target != target {
            self.settle(false).await;
            self.st.last_target = target;
        }
    }

    pub(super) async fn ensure_pinned(&mut self) -> Result<(), UpstreamError> {
        if self.st.pinned.is_some() {
            return Ok(());
        }
        self.switch_to(Target::Pinned).await;
        if let Some(spare) = self.st.spare.take() {
            if spare.proto == self.st.proto
                && !spare.pinned.lost.is_cancelled()
                && !spare.pinned.tx.is_closed()
            {
                self.st.pinned = Some(spare.pinned);
                return Ok(());
            }
            self.st.spare = Some(spare);
            self.release_spare();
        }
        let push = PushSink::marked(self.push_sender());
        let pinned = self.ctx.pool.pin(self.st.proto, push).await?;
        self.st.pinned = Some(pinned);
        Ok(())
    }

    /// The sender pinned connections get for push frames.
    pub(super) fn push_sender(&mut self) -> mpsc::UnboundedSender<Bytes> {
        let client = &mut self.client;
        self.push_tx
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                client.push = Some(rx);
                tx
            })
            .clone()
    }

    /// Let go of the pinned connection once it holds nothing the client needs.
    pub(super) async fn maybe_unpin(&mut self) {
        if self.st.pinned.is_some() && !self.st.needs_pin() && self.client.waits == 0 {
            debug!(
                id = self.st.id,
                "client state cleared; releasing its pinned connection"
            );
            // Nothing of the client's is on it. Kept a moment for the
            // client's next WATCH or MULTI (a pooled client alternating
            // optimistic-locking transactions with plain commands lets go
            // of it after each: issue 19), then the pool may keep it warm
            // as it is, without RESET. Not on a cluster, whose pinned
            // connection binds to a node as it goes.
            let pinned = self.st.pinned.take();
            self.shared_handle();
            if let Some(p) = pinned.filter(|_| self.st.shared_plain) {
                self.release_spare();
                self.st.spare = Some(Spare {
                    pinned: p,
                    proto: self.st.proto,
                    until: Instant::now() + SPARE_FOR,
                });
            }
        }
    }

    /// Give the spare pinned connection back to the pool, which keeps it
    /// warm without RESET (it holds nothing of the client's) if it still
    /// speaks the protocol it was handed out with; one that switched with
    /// its client is reset (RESET + HELLO) for the set it came from.
    pub(super) fn release_spare(&mut self) {
        if let Some(s) = self.st.spare.take() {
            s.pinned.clean.store(
                s.proto == s.pinned.proto,
                std::sync::atomic::Ordering::Release,
            );
        }
    }

    /// One command on the client's shared connection, after the replies still
    /// due on its pinned one.
    pub(super) async fn send_shared(&mut self, frame: Bytes, since: Instant) {
        let handle = self.shared_handle();
        self.send_shared_on(handle, frame, since).await;
    }

    /// One command on a given shared connection (a cluster node's own).
    pub(super) async fn send_shared_on(&mut self, handle: Handle, frame: Bytes, since: Instant) {
        self.switch_to(Target::Shared).await;
        self.ctx.metrics.command(Route::Shared);
        self.send_upstream(&handle.tx, frame, 1, 1, false, since)
            .await;
    }

    /// `CLIENT TRACKING on REDIRECT <id>` names a client of the proxy;
    /// upstream it must name the hub's connection, which fans the
    /// invalidations out to the local subscribers of `__redis__:invalidate`
    /// and to the clients named so (a RESP3 one gets them as pushes, whether
    /// or not it subscribed). Other frames pass as they are.
    pub(super) fn tracking_redirect(&mut self, frame: Bytes, args: &[Bytes]) -> Bytes {
        let is_tracking = args
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING"));
        let Some(at) = args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"REDIRECT"))
            .filter(|_| is_tracking)
            .map(|i| i + 1)
            .filter(|i| *i < args.len())
        else {
            return frame;
        };
        let Some((hub_id, gone)) = self.ctx.hub.redirect_target() else {
            // No local client subscribes to anything: the server answers
            // that the client to redirect to does not exist, as it would.
            return frame;
        };
        self.st.redirect_lost = Some(gone);
        // The client named gets the invalidations whether or not it
        // subscribes to the tracking channel, as Redis's redirect target does.
        let target = std::str::from_utf8(&args[at])
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
            .and_then(|t| self.ctx.clients.get(t));
        if let Some(e) = target {
            e.redirect_target
                .store(true, std::sync::atomic::Ordering::Release);
            self.ctx.hub.redirect(e.id);
        }
        let id = hub_id.to_string();
        let refs: Vec<&[u8]> = args
            .iter()
            .enumerate()
            .map(|(i, a)| if i == at { id.as_bytes() } else { &a[..] })
            .collect();
        resp::command(&refs)
    }

    pub(super) async fn forward_pinned(&mut self, frame: Bytes, count: usize, since: Instant) {
        let Some(p) = &self.st.pinned else { return };
        let tx = p.tx.clone();
        if self.st.in_multi {
            self.st.tx.queued += count;
        }
        self.send_upstream(&tx, frame, count, count, self.st.in_multi, since)
            .await;
    }

    /// One command of the proxy's own on the pinned connection (nothing else
    /// owed): `Err` with the error reply to give the client if it failed.
    pub(super) async fn pinned_call(&mut self, frame: Bytes) -> Result<Bytes, Bytes> {
        let Some(p) = &self.st.pinned else {
            return Err(connection_ended().to_reply());
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let req = Request {
            bytes: frame,
            count: 1,
            reply: Some(reply_tx),
            in_multi_after: false,
            pushes: 0,
        };
        if p.tx.send(req).await.is_err() {
            return Err(self.unsent(&p.tx).to_reply());
        }
        match self.wait_reply(reply_rx).await {
            Ok(b) if b.first() == Some(&b'-') || b.first() == Some(&b'!') => Err(b),
            Ok(b) => Ok(b),
            Err(e) => Err(e.to_reply()),
        }
    }

    /// Send `frame` on the pinned connection, its reply dropped.
    pub(super) async fn forward_silently(&mut self, frame: Bytes, since: Instant) {
        let silent = std::mem::replace(&mut self.silent, true);
        let in_multi = std::mem::replace(&mut self.st.in_multi, false);
        self.forward_pinned(frame, 1, since).await;
        self.st.in_multi = in_multi;
        self.silent = silent;
    }
}
